"""Block-sparse attention kernels behind one dispatch: `block_sparse_attention(q, k, v, mask, backend=...)`.

Backends, fastest first (what `backend="auto"` tries):

- `"fa4"`: FlashAttention-4 block-sparse (`flash-attn-4`, the `dit-sparse[fa4]` extra), CUDA capability 9.x/10.x,
  fp16/bf16, head_dim 64/96/128, block sizes FA4's tiles accept (`fa4.block_constraints_error`), whole blocks only
  (no `token_boxes` in-block masking).
- `"triton"`: our Triton kernel (`triton_block_sparse.py`): any CUDA GPU Triton runs on, fp16/bf16/fp32, head_dim
  16/32/64/128, in-block masking included; on CPU only under `TRITON_INTERPRET=1` (tests).
- `"reference"`: plain PyTorch, any device, any head_dim: the oracle.

`auto` takes the first backend that can run the call (device, dtype, head_dim, block sizes); the environment variable
`DIT_SPARSE_BACKEND` replaces `auto` with a named backend. Asking for a backend that cannot run raises a ValueError
that says what is missing. The choice is logged once per (backend, device, reason) on the "dit_sparse" logger.
flash_attn is imported only on a CUDA machine whose GPU FA4 supports.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from dit_sparse.blockmask import BlockMask, inverse_order

from . import reference

#: Backends in order of preference for `backend="auto"`.
BACKENDS = ("fa4", "triton", "reference")
ENV_VAR = "DIT_SPARSE_BACKEND"

logger = logging.getLogger("dit_sparse")

TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    """None when `module` imports, else the error text (tried once per process)."""
    try:
        importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken install raising something else
        return f"{type(error).__name__}: {error}"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    mask: BlockMask | None = None,
) -> str | None:
    """Why `backend` cannot run a call on `device` with this dtype, head_dim and mask; None when it can."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "the triton backend needs CUDA, and torch.cuda.is_available() is False"
        elif not (device.type == "cpu" and _interpreting()):
            return f"the triton backend needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"
        error = _import_error("triton")
        if error:
            return f"the triton backend needs the `triton` package: {error}"
        if dtype is not None and dtype not in TRITON_DTYPES:
            return f"the triton backend takes dtypes {TRITON_DTYPES}, got {dtype}"
        if head_dim is not None and head_dim not in TRITON_HEAD_DIMS:
            return f"the triton backend supports head_dim {TRITON_HEAD_DIMS}, got {head_dim}"
        if mask is not None and min(mask.q_block_size, mask.kv_block_size) < 16:
            return f"the triton backend needs block sizes >= 16, got {mask.block_size}"
        return None
    if backend == "fa4":
        if mask is not None and mask.token_boxes is not None:
            return ("the fa4 backend runs whole blocks only, and this mask masks tokens inside blocks (token_boxes, "
                    "e.g. an exact neighborhood window): use triton or reference")
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"the fa4 backend needs a CUDA GPU of capability 9.x or 10.x, got device {device}"
        capability = torch.cuda.get_device_capability(device)
        if capability[0] not in (9, 10):
            return f"the fa4 backend needs CUDA capability 9.x or 10.x, this GPU is {capability[0]}.{capability[1]}"
        error = _import_error("flash_attn.cute")
        if error:
            return f"the fa4 backend needs `flash_attn.cute` (pip install 'dit-sparse[fa4]'): {error}"
        from . import fa4

        if dtype is not None and dtype not in fa4.DTYPES:
            return f"the fa4 backend takes dtypes {fa4.DTYPES}, got {dtype}"
        if head_dim is not None and head_dim not in fa4.HEAD_DIMS:
            return f"the fa4 backend supports head_dim {fa4.HEAD_DIMS}, got {head_dim}"
        if mask is not None:
            return fa4.block_constraints_error(mask, head_dim or 128, capability)
        return None
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` here (for some dtype and head_dim), in order of preference."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


@functools.lru_cache(maxsize=None)
def _log_choice(backend: str, device: str, detail: str) -> None:
    logger.info("dit_sparse attention backend: %s on %s%s", backend, device, detail)


def resolve_backend(backend: str, q: torch.Tensor, mask: BlockMask | None = None) -> str:
    """The backend that will run this call: `backend` itself (checked), or for "auto" the env override or the
    fastest available one. Raises ValueError naming what is missing."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    requested = backend
    if backend == "auto":
        override = os.environ.get(ENV_VAR, "").strip()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={override!r} is not a backend; choose one of {('auto',) + BACKENDS}")
            backend, requested = override, f"{ENV_VAR}={override}"
    if backend != "auto":
        reason = unavailable_reason(backend, q.device, q.dtype, q.shape[-1], mask)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run here: {reason}")
        _log_choice(backend, str(q.device), f" (requested {requested})")
        return backend
    skipped = []
    for name in BACKENDS:
        if name == "triton" and q.device.type == "cpu":
            skipped.append("triton: the CPU interpreter is for tests only")
            continue
        reason = unavailable_reason(name, q.device, q.dtype, q.shape[-1], mask)
        if reason is None:
            _log_choice(name, str(q.device), f" (auto; skipped: {'; '.join(skipped)})" if skipped else " (auto)")
            return name
        skipped.append(reason)
    raise AssertionError("the reference backend is always available")  # pragma: no cover


def _on_device(mask: BlockMask, device: torch.device) -> BlockMask:
    """`mask` on `device`, moved once and kept with the mask."""
    if mask.device == device:
        return mask
    moved = mask.__dict__.setdefault("_dit_sparse_on_device", {})
    key = str(device)
    if key not in moved:
        moved[key] = mask.to(device)
    return moved[key]


def _check_call(q, k, v, mask, extra_k, extra_v, extra_key_valid) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, S, H, D), got {getattr(x, 'shape', type(x).__name__)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape (B, S, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a dit_sparse.BlockMask, got {type(mask).__name__}")
    batch, seq_len, heads, _ = q.shape
    mask.check_fits(batch, heads, seq_len)
    if (extra_k is None) != (extra_v is None) or (extra_key_valid is not None and extra_k is None):
        raise ValueError("extra_k and extra_v go together, and extra_key_valid needs them")
    if extra_k is not None:
        if extra_k.shape != extra_v.shape or extra_k.dim() != 4 or extra_k.shape[0] != batch or \
                extra_k.shape[2:] != q.shape[2:]:
            raise ValueError(f"extra_k/extra_v must be (B={batch}, T, H={heads}, D={q.shape[-1]}), got "
                             f"{tuple(extra_k.shape)} and {tuple(extra_v.shape)}")
        if extra_k.dtype != q.dtype or extra_v.dtype != q.dtype:
            raise ValueError(f"extra_k/extra_v must have q's dtype {q.dtype}, got {extra_k.dtype}, {extra_v.dtype}")
        if extra_key_valid is not None and (
            extra_key_valid.dtype != torch.bool or tuple(extra_key_valid.shape) != tuple(extra_k.shape[:2])
        ):
            raise ValueError(f"extra_key_valid must be bool {tuple(extra_k.shape[:2])}, got "
                             f"{extra_key_valid.dtype} {tuple(extra_key_valid.shape)}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    scale: float | None = None,
    backend: str = "auto",
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_key_valid: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the kept key blocks of `mask` (plus every valid extra key); q, k, v (B, S, H, D), S == seq_len.

    `extra_k`/`extra_v` (B, T, H, D) are keys every query also attends to (the joint text), `extra_key_valid`
    (B, T) bool marks the real ones (False: padding, exactly zero weight). Returns (out (B, S, H, D) in q's dtype,
    lse (B, H, S) fp32). A query with no kept key and no valid extra key gets zeros and lse -inf. `out`, when given
    ((B, S, H, D), q's dtype, any strides, e.g. a slice of the joint sequence's output), receives the result.
    """
    _check_call(q, k, v, mask, extra_k, extra_v, extra_key_valid)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = _on_device(mask, q.device)
    if mask.per_head_order:
        return _per_head_order_attention(q, k, v, mask, scale, backend, extra_k, extra_v, extra_key_valid, out)
    name = resolve_backend(backend, q, mask)
    if name == "triton":
        from . import triton_block_sparse

        return triton_block_sparse.block_sparse_attention(
            q, k, v, mask, scale, extra_k=extra_k, extra_v=extra_v, extra_key_valid=extra_key_valid, out=out
        )
    if name == "fa4":
        return _fa4_attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out)
    result, lse = reference.block_sparse_attention(q, k, v, mask, scale)
    if extra_k is not None:
        result, lse = reference.extend_attention(result, lse, q, extra_k, extra_v, extra_key_valid, scale)
    return _into(out, result), lse


def _per_head_order_attention(q, k, v, mask, scale, backend, extra_k, extra_v, extra_key_valid, out):
    """A mask with per-head token orders (or keys ordered apart from queries): gather q (and k, v) of each batch
    entry and head into its blocked order, run any backend on the un-permuted blocks, scatter the rows back. The
    extra keys (joint text) are per row, so they need no reordering."""
    batch, seq_len, heads, head_dim = q.shape
    q_order, k_order = mask.orders()  # (Pb, Ph, S) each

    def gather(x, order):  # x (B, S, H, D) -> x in `order`, (B, S, H, D)
        index = order.expand(batch, heads, -1).transpose(1, 2)  # (B, S, H)
        return x.gather(1, index[..., None].expand(-1, -1, -1, x.shape[-1]))

    q_in = gather(q, q_order)
    k_in, v_in = gather(k, k_order), gather(v, k_order)
    result, lse = block_sparse_attention(
        q_in, k_in, v_in, mask.in_blocked_order(), scale=scale, backend=backend, extra_k=extra_k, extra_v=extra_v,
        extra_key_valid=extra_key_valid,
    )
    inverse = inverse_order(q_order).expand(batch, heads, -1)  # (B, H, S)
    lse = lse.gather(2, inverse)
    return _into(out, gather(result, inverse)), lse


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _fa4_attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out):
    """FA4 over the kept blocks; extra keys and the inverse permutation in one Triton pass that continues FA4's
    (out, lse) exactly (no merge pass)."""
    from . import fa4

    permuted = mask.permutation is not None
    if permuted:
        perm = mask.permutation
        q_in, k_in, v_in = (x.index_select(1, perm) for x in (q, k, v))
    else:
        q_in, k_in, v_in = q, k, v
    result, lse = fa4.block_sparse_attention(q_in, k_in, v_in, mask, scale)
    if extra_k is not None and unavailable_reason("triton", q.device, q.dtype, q.shape[-1]) is None:
        from . import triton_block_sparse

        perm32 = triton_block_sparse._permutation_int32(mask) if permuted else None
        return triton_block_sparse.extend_attention(
            result, lse, q, extra_k, extra_v, extra_key_valid, scale, permutation=perm32, out=out
        )
    if permuted:
        inverse = _inverse_permutation(mask)
        result, lse = result.index_select(1, inverse), lse.index_select(2, inverse)
    if extra_k is not None:
        result, lse = reference.extend_attention(result, lse, q, extra_k, extra_v, extra_key_valid, scale)
    return _into(out, result), lse


def _inverse_permutation(mask: BlockMask) -> torch.Tensor:
    cached = mask.__dict__.get("_dit_sparse_inverse_perm")
    if cached is None:
        cached = inverse_order(mask.permutation)
        object.__setattr__(mask, "_dit_sparse_inverse_perm", cached)
    return cached


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (B, Sq, H, D) over k/v (B, Sk, H, D) with optional key padding `key_valid` (B, Sk) bool,
    memory-bounded on every backend (no Sq x Sk tensor). Used for the joint text queries. Returns (out, lse).

    The fa4 backend runs this through our Triton kernel (FA4 has no key-padding mask without a mask_mod).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = backend
    if backend in ("auto", "fa4"):
        name = "triton" if q.device.type == "cuda" else "reference"
    if name == "triton" and unavailable_reason("triton", q.device, q.dtype, q.shape[-1]) is None:
        from . import triton_block_sparse

        return triton_block_sparse.dense_attention(q, k, v, key_valid, scale, out=out)
    if name == "triton" and backend == "triton":
        raise ValueError(
            f"backend 'triton' cannot run here: {unavailable_reason('triton', q.device, q.dtype, q.shape[-1])}"
        )
    result, lse = reference.dense_attention(q, k, v, key_valid, scale)
    return _into(out, result), lse


__all__ = ["BACKENDS", "available_backends", "block_sparse_attention", "dense_attention", "resolve_backend",
           "unavailable_reason"]
