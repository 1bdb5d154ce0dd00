"""The `triton` backend's record: our Triton kernels (`triton_block_sparse.py`), on any CUDA GPU Triton runs on.

Kept apart from the kernels because it must import without `triton` (CPU installs have none): it says what the
kernels take, and imports them only when called. The k-means kernels (`kmeans.py`) take the same head dims and dtypes.
"""

from __future__ import annotations

import torch

from dit_sparse.blockmask import BlockMask

from .backend import Backend, import_error, interpreting

#: head dims our Triton kernels are built for (tl.arange needs a power of two; the MMA wants >= 16).
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the smallest query or key block the kernel tiles (its smallest BLOCK_M / BLOCK_N).
MIN_BLOCK_SIZE = 16
#: what `precision=` takes here, and the compute capability each low precision's MMA needs (e4m3 dot: Ada/Hopper
#: 8.9+; int8 dot: Ampere 8.0+).
PRECISIONS = ("bf16", "fp8", "int8")
MIN_CAPABILITY = {"fp8": (8, 9), "int8": (8, 0)}
#: head dims of the quantized kernel (`triton_quantize.py`): the int8 and e4m3 MMAs want a K dim of 32+.
LOW_PRECISION_HEAD_DIMS = (64, 128)


def _device_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "the triton backend needs CUDA, and torch.cuda.is_available() is False"
    elif not (device.type == "cpu" and interpreting()):
        return f"the triton backend needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}"
    error = import_error("triton")
    if error:
        return f"the triton backend needs the `triton` package: {error}"
    return None


def _mask_reason(mask: BlockMask, head_dim: int | None, device: torch.device) -> str | None:
    if min(mask.q_block_size, mask.kv_block_size) < MIN_BLOCK_SIZE:
        return f"the triton backend needs block sizes >= {MIN_BLOCK_SIZE}, got {mask.block_size}"
    return None


def _precision_reason(precision: str, device: torch.device, head_dim: int | None) -> str | None:
    if head_dim is not None and head_dim not in LOW_PRECISION_HEAD_DIMS:
        return f"precision {precision!r} takes head_dim {LOW_PRECISION_HEAD_DIMS}, got head_dim={head_dim}"
    if device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY[precision]:
            major, minor = MIN_CAPABILITY[precision]
            return (f"precision {precision!r} needs {'FP8' if precision == 'fp8' else 'INT8'} tensor cores (compute "
                    f"capability >= {major}.{minor}); {device} ({torch.cuda.get_device_name(device)}) is "
                    f"{capability[0]}.{capability[1]}")
    return None


def _attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out, precision="bf16"):
    from . import triton_block_sparse

    return triton_block_sparse.block_sparse_attention(
        q, k, v, mask, scale, extra_k=extra_k, extra_v=extra_v, extra_key_valid=extra_key_valid, out=out,
        precision=precision,
    )


def _dense_attention(q, k, v, key_valid, scale, out):
    from . import triton_block_sparse

    return triton_block_sparse.dense_attention(q, k, v, key_valid, scale, out=out)


BACKEND = Backend(
    name="triton",
    where="any CUDA GPU Triton runs on (on a CPU only under TRITON_INTERPRET=1, for tests)",
    summary="our block-sparse flash-attention kernel: only kept key blocks, in-block masking, the token permutation "
            "fused into its loads and stores, the joint text keys in the same pass",
    device_reason=_device_reason,
    dtypes=DTYPES,
    head_dims=HEAD_DIMS,
    token_boxes=True,
    attention=_attention,
    dense_attention=_dense_attention,
    mask_reason=_mask_reason,
    auto_skips_cpu="the CPU interpreter is for tests only",
    precisions=PRECISIONS,
    precision_reason=_precision_reason,
)
