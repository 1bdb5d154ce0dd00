"""Block-sparse attention kernels behind one dispatch: `block_sparse_attention(q, k, v, mask, backend=...)`.

The backends are the records of `REGISTRY` (`backend.Backend`: where each runs, the dtypes, head dims and masks it
takes, its calls), fastest first: `fa4` (FlashAttention-4, `fa4.py`), `triton` (our kernel, `triton_block_sparse.py`,
its record in `triton_backend.py`), `reference` (plain PyTorch, any device: the oracle, `reference.py`).
`describe_backends()` gives the table for the docs.

`auto` takes the first backend that can run the call (device, dtype, head_dim, block sizes); the environment variable
`DIT_SPARSE_BACKEND` replaces `auto` with a named backend. Asking for a backend that cannot run raises a ValueError
that says what is missing. The choice is logged once per (backend, device, reason) on the "dit_sparse" logger.
flash_attn is imported only on a CUDA machine whose GPU FA4 supports. The arguments are checked once, here (and in
`dit_sparse.sparse_attention`); the backends' calls trust them.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os

import torch

from dit_sparse.blockmask import BlockMask, inverse_order

from . import fa4, reference, triton_backend
from .backend import Backend, write_into

#: The backend records, fastest first: the order `backend="auto"` tries. A new backend is one module and one line.
REGISTRY: dict[str, Backend] = {record.name: record for record in (fa4.BACKEND, triton_backend.BACKEND,
                                                                    reference.BACKEND)}
#: Backend names in order of preference for `backend="auto"`.
BACKENDS = tuple(REGISTRY)
ENV_VAR = "DIT_SPARSE_BACKEND"

logger = logging.getLogger("dit_sparse")


def _record(backend: str) -> Backend:
    """The record named `backend`; a ValueError naming the allowed names for anything else ("auto" included)."""
    record = REGISTRY.get(backend) if isinstance(backend, str) else None
    if record is None:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return record


def check_backend_name(backend) -> None:
    """Raise ValueError unless `backend` is "auto" or a registry name."""
    if backend != "auto":
        _record(backend)


def unavailable_reason(
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
    mask: BlockMask | None = None,
) -> str | None:
    """Why `backend` cannot run a call on `device` with this dtype, head_dim and mask; None when it can."""
    return _record(backend).unavailable_reason(torch.device(device), dtype, head_dim, mask)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` here (for some dtype and head_dim), in order of preference."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def check_backend(backend: str, device: torch.device | str) -> None:
    """Raise ValueError unless `backend` ("auto" or a registry name) can run on `device` here (its hardware and
    package; dtype, head_dim and block sizes are the call's, checked then). "auto" always can (reference)."""
    check_backend_name(backend)
    if backend == "auto":
        return
    device = torch.device(device)
    reason = REGISTRY[backend].device_reason(device)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot run on {device} here: {reason}")


def describe_backends() -> str:
    """The registry as a Markdown table (backend, where, dtypes, head dims, in-block masking, what), `auto`'s order."""
    def names(values):
        return "any" if values is None else "/".join(str(v).replace("torch.", "") for v in values)

    rows = ["| backend | where | dtypes | head_dim | tokens masked inside blocks | what |", "|---|---|---|---|---|---|"]
    for record in REGISTRY.values():
        dtypes = "any floating" if record.dtypes is None else names(record.dtypes)
        rows.append(f"| `{record.name}` | {record.where} | {dtypes} | {names(record.head_dims)} | "
                    f"{'yes' if record.token_boxes else 'no'} | {record.summary} |")
    return "\n".join(rows)


@functools.lru_cache(maxsize=None)
def _log_choice(backend: str, device: str, detail: str) -> None:
    logger.info("dit_sparse attention backend: %s on %s%s", backend, device, detail)


def resolve_backend(backend: str, q: torch.Tensor, mask: BlockMask | None = None) -> str:
    """The backend that will run this call: `backend` itself (checked), or for "auto" the env override or the
    fastest available one. Raises ValueError naming what is missing."""
    check_backend_name(backend)
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
    for record in REGISTRY.values():
        if record.auto_skips_cpu is not None and q.device.type == "cpu":
            skipped.append(f"{record.name}: {record.auto_skips_cpu}")
            continue
        reason = record.unavailable_reason(q.device, q.dtype, q.shape[-1], mask)
        if reason is None:
            _log_choice(record.name, str(q.device), f" (auto; skipped: {'; '.join(skipped)})" if skipped else " (auto)")
            return record.name
        skipped.append(reason)
    raise AssertionError("the reference backend is always available")  # pragma: no cover


# ---- the argument rules, checked once at the public edge ------------------------------------------------------


def _check_4d(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (B, S, H, D), got {getattr(x, 'shape', type(x).__name__)}")


def check_qkv(q, k, v) -> None:
    """Raise ValueError unless q, k, v are 4-D tensors (B, S, H, D) of one shape, every size >= 1, one floating
    dtype and one device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, x)
    if not (q.shape == k.shape == v.shape):
        differ = "(B, S, H)" if not (q.shape[:3] == k.shape[:3] == v.shape[:3]) else "the head_dim D"
        raise ValueError(f"q, k, v must have one shape (B, S, H, D); they differ on {differ}: {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must have a floating dtype (float16, bfloat16, float32, ...), got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if 0 in q.shape:
        raise ValueError(f"q, k, v must have every size >= 1 (B, S, H, D), got {tuple(q.shape)}")


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: `scale` (a finite real number) as a float, or 1/sqrt(head_dim) for None."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None (1/sqrt(D)), got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def check_mask(mask, batch: int, heads: int, seq_len: int) -> None:
    """Raise unless `mask` is a BlockMask serving a call of `batch` x `heads` over `seq_len` tokens."""
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a dit_sparse.BlockMask, got {type(mask).__name__}")
    mask.check_fits(batch, heads, seq_len)


def _check_keys_for(q: torch.Tensor, k, v, key_valid, names: tuple[str, str, str]) -> None:
    """k, v (B, T, H, D) keys for q (B, S, H, D) in q's dtype and device; `key_valid` (B, T) bool or None."""
    keys = f"{names[0]}/{names[1]}"
    _check_4d(names[0], k)
    _check_4d(names[1], v)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"{keys} must be (B={q.shape[0]}, T, H={q.shape[2]}, D={q.shape[-1]}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{keys} must have q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{keys} must be on q's device {q.device}, got {k.device}, {v.device}")
    if key_valid is not None and (not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool
                                  or tuple(key_valid.shape) != tuple(k.shape[:2])):
        raise ValueError(f"{names[2]} must be bool {tuple(k.shape[:2])}, got "
                         f"{getattr(key_valid, 'dtype', type(key_valid).__name__)} "
                         f"{tuple(getattr(key_valid, 'shape', ()))}")


def _check_out(out, q: torch.Tensor) -> None:
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got "
                         f"{tuple(getattr(out, 'shape', ()))} {getattr(out, 'dtype', type(out).__name__)} on "
                         f"{getattr(out, 'device', None)}")


# ---- the public calls -------------------------------------------------------------------------------------------


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
    compensate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the kept key blocks of `mask` (plus every valid extra key); q, k, v (B, S, H, D), S == seq_len.

    `extra_k`/`extra_v` (B, T, H, D) are keys every query also attends to (the joint text), `extra_key_valid`
    (B, T) bool marks the real ones (False: padding, exactly zero weight). Returns (out (B, S, H, D) in q's dtype,
    lse (B, H, S) fp32). A query with no kept key and no valid extra key gets zeros and lse -inf. `out`, when given
    ((B, S, H, D), q's dtype, any strides, e.g. a slice of the joint sequence's output), receives the result.
    Every argument is checked here, before anything runs; the backends trust it.

    `compensate=True` (SVG-EAR, arXiv:2603.08982; DraftAttention, arXiv:2505.14708): for each query block, every
    key block the mask drops still contributes through one pooled key (the block's mean key over its real tokens,
    its score raised by log of that token count) and the block's mean value, inside the same softmax as the kept and
    extra keys. Blocks are pooled in the mask's blocked order (its permutation, or each head's order); a kept block
    masked inside (token boxes) counts as kept, its masked-out tokens stay out. On every backend: the backend's pass,
    then one pooled pass merged by log-sum-exp (`triton_pooled` on a GPU, `reference.compensate_attention` for the
    reference backend and elsewhere).
    """
    if not isinstance(compensate, bool):
        raise ValueError(f"compensate must be a bool (True or False), got {compensate!r}")
    check_qkv(q, k, v)
    batch, seq_len, heads, head_dim = q.shape
    check_mask(mask, batch, heads, seq_len)
    if (extra_k is None) != (extra_v is None) or (extra_key_valid is not None and extra_k is None):
        raise ValueError("extra_k and extra_v go together, and extra_key_valid needs them")
    if extra_k is not None:
        _check_keys_for(q, extra_k, extra_v, extra_key_valid, ("extra_k", "extra_v", "extra_key_valid"))
    _check_out(out, q)
    scale = check_scale(scale, head_dim)
    check_backend_name(backend)
    return _dispatch(q, k, v, mask, scale, backend, extra_k, extra_v, extra_key_valid, out, compensate)


def _dispatch(q, k, v, mask: BlockMask, scale: float, backend: str, extra_k=None, extra_v=None,
              extra_key_valid=None, out=None, compensate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_sparse_attention` of arguments it has checked: the dispatch."""
    mask = _on_device(mask, q.device)
    if mask.per_head_order:
        return _per_head_order_attention(q, k, v, mask, scale, backend, extra_k, extra_v, extra_key_valid, out,
                                         compensate)
    name = resolve_backend(backend, q, mask)
    result, lse = REGISTRY[name].attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out)
    if compensate:
        result, lse = _compensate(result, lse, q, k, v, mask, scale, name)
    return result, lse


def _compensate(result, lse, q, k, v, mask: BlockMask, scale: float, name: str):
    """The pooled pass of `compensate=True` after backend `name`'s main pass, for every backend alike: our Triton
    kernel wherever it runs (any CUDA GPU; on a CPU only under the interpreter) after any backend but the reference,
    whose own PyTorch pass stays the oracle. Both merge into (result, lse) by log-sum-exp, in place."""
    triton_runs = REGISTRY["triton"].unavailable_reason(q.device, q.dtype, q.shape[-1]) is None
    if triton_runs and name != "reference":
        from . import triton_pooled

        return triton_pooled.compensate_attention(result, lse, q, k, v, mask, scale)
    return reference.compensate_attention(result, lse, q, k, v, mask, scale)


def _on_device(mask: BlockMask, device: torch.device) -> BlockMask:
    """`mask` on `device`, moved once and kept with the mask."""
    if mask.device == device:
        return mask
    return mask.cached(("on_device", str(device)), lambda: mask.to(device))


def _per_head_order_attention(q, k, v, mask, scale, backend, extra_k, extra_v, extra_key_valid, out,
                              compensate=False):
    """A mask with per-head token orders (or keys ordered apart from queries): gather q (and k, v) of each batch
    entry and head into its blocked order, run any backend on the un-permuted blocks, scatter the rows back. The
    extra keys (joint text) are per row, so they need no reordering; compensation pools the blocks of that blocked
    order (for a clustered order, the pooled keys are the clusters' centroids)."""
    batch, seq_len, heads, head_dim = q.shape
    q_order, k_order = mask.orders()  # (Pb, Ph, S) each

    def gather(x, order):  # x (B, S, H, D) -> x in `order`, (B, S, H, D)
        index = order.expand(batch, heads, -1).transpose(1, 2)  # (B, S, H)
        return x.gather(1, index[..., None].expand(-1, -1, -1, x.shape[-1]))

    q_in = gather(q, q_order)
    k_in, v_in = gather(k, k_order), gather(v, k_order)
    result, lse = _dispatch(q_in, k_in, v_in, mask.in_blocked_order(), scale, backend, extra_k, extra_v,
                            extra_key_valid, compensate=compensate)
    inverse = inverse_order(q_order).expand(batch, heads, -1)  # (B, H, S)
    lse = lse.gather(2, inverse)
    return write_into(out, gather(result, inverse)), lse


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

    A backend with no dense pass of its own (fa4: no key-padding mask without a mask_mod) runs this on the first
    backend `auto` takes that has one (on a GPU, our Triton kernel). Every argument is checked here.
    """
    check_qkv(q, q, q)  # q's own rules; k and v follow q's
    _check_keys_for(q, k, v, key_valid, ("k", "v", "key_valid"))
    _check_out(out, q)
    scale = check_scale(scale, q.shape[-1])
    check_backend_name(backend)
    return _dispatch_dense(q, k, v, key_valid, scale, backend, out)


def _dispatch_dense(q, k, v, key_valid, scale: float, backend: str, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`dense_attention` of arguments it has checked: the dispatch."""
    record = None if backend == "auto" else REGISTRY[backend]
    if record is None or record.dense_attention is None:
        record = next(
            candidate for candidate in REGISTRY.values()
            if candidate.dense_attention is not None
            and not (candidate.auto_skips_cpu is not None and q.device.type == "cpu")
            and candidate.unavailable_reason(q.device, q.dtype, q.shape[-1]) is None
        )
    else:
        reason = record.unavailable_reason(q.device, q.dtype, q.shape[-1])
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run here: {reason}")
    return record.dense_attention(q, k, v, key_valid, scale, out)


__all__ = ["BACKENDS", "REGISTRY", "Backend", "available_backends", "block_sparse_attention", "check_backend",
           "check_backend_name", "check_mask", "check_qkv", "check_scale", "dense_attention", "describe_backends",
           "resolve_backend", "unavailable_reason"]
