"""FlashAttention-4 block-sparse backend: `BlockMask` -> FA4's `BlockSparseTensorsTorch`, converted once per mask.

FA4 (`flash-attn-4`, CuTe DSL, Hopper and Blackwell) takes, per (batch, head, query block), two block lists: "mask"
blocks (a `mask_mod` is applied inside them) and "full" blocks (no masking). Our kept blocks are whole blocks, so they
all go in the full list and the mask list is empty. `to_fa4_block_sparse` is plain torch, testable on CPU without
flash_attn; `flash_attn` is imported only inside `block_sparse_attention`, i.e. on a CUDA machine.

Block constraints (flash_attn/cute/interface.py, `_tile_size_fwd_sm90`, `normalize_block_sparse_config`): on SM90 the
key block must equal FA4's tile_n after fitting (a multiple of 16, at most 128) and the query block a multiple of its
q tile (128, or 64 when the q block is a multiple of 64 but not of 128); on SM100 the query block must be a multiple
of 2 x 128 (two Q stages). Seqlen masking of the short tail block is applied by FA4 to the highest kept block, which
is the tail block whenever it is kept, because `kv_block_indices` ascend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dit_sparse.blockmask import BlockMask, inverse_order

from . import reference, triton_backend
from .backend import Backend, import_error, write_into

#: head dims FA4's forward is built for on SM90/SM100 (the ones we test).
HEAD_DIMS = (64, 96, 128)
DTYPES = (torch.float16, torch.bfloat16)


class FA4BlockSparse(NamedTuple):
    """The four FA4 block-sparse tensors (int32, on the mask's device) plus the block size FA4 is told."""

    mask_block_cnt: torch.Tensor  # (Bm, Hm, n_q_blocks): zeros, no partial blocks
    mask_block_idx: torch.Tensor  # (Bm, Hm, n_q_blocks, 1)
    full_block_cnt: torch.Tensor  # (Bm, Hm, n_q_blocks): kept blocks per query block
    full_block_idx: torch.Tensor  # (Bm, Hm, n_q_blocks, max_kept): ascending, padding past the count
    block_size: tuple[int, int]
    has_empty_rows: bool  # some query block keeps no key block


def to_fa4_block_sparse(mask: BlockMask) -> FA4BlockSparse:
    """Convert `mask` to FA4's block lists: every kept block as a full block (no mask_mod), pure torch."""
    if mask.token_boxes is not None:
        raise ValueError("FA4 takes whole blocks only; this mask masks tokens inside blocks (token_boxes)")
    counts = mask.kv_block_counts.contiguous()
    zeros = torch.zeros_like(counts)
    return FA4BlockSparse(
        mask_block_cnt=zeros,
        mask_block_idx=torch.zeros(*counts.shape, 1, dtype=torch.int32, device=counts.device),
        full_block_cnt=counts,
        full_block_idx=mask.kv_block_indices.contiguous(),
        block_size=(mask.q_block_size, mask.kv_block_size),
        # A host sync on CUDA, once per mask (per call for a dynamic pattern) unless the builder vouches for it.
        has_empty_rows=False if mask.rows_all_kept else bool((counts == 0).any()),
    )


def fa4_block_dense(tensors: FA4BlockSparse, n_kv_blocks: int) -> torch.Tensor:
    """Bool (Bm, Hm, n_q_blocks, n_kv_blocks): the blocks FA4 visits (full or mask lists), as FA4 reads them."""
    dense = None
    lists = ((tensors.full_block_cnt, tensors.full_block_idx), (tensors.mask_block_cnt, tensors.mask_block_idx))
    for cnt, idx in lists:
        valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
        part = torch.zeros(*idx.shape[:3], n_kv_blocks + 1, dtype=torch.bool, device=idx.device)
        part.scatter_(-1, torch.where(valid, idx.long(), n_kv_blocks), True)
        dense = part if dense is None else dense | part
    return dense[..., :n_kv_blocks]


def cached_fa4_block_sparse(mask: BlockMask) -> FA4BlockSparse:
    """`to_fa4_block_sparse(mask)`, computed once per mask and dropped with it."""
    return mask.cached("fa4_block_sparse", lambda: to_fa4_block_sparse(mask))


def block_constraints_error(mask: BlockMask, head_dim: int, capability: tuple[int, int]) -> str | None:
    """Why FA4 cannot take this mask's block sizes on a GPU of `capability`, or None when it can."""
    q_block, kv_block = mask.q_block_size, mask.kv_block_size
    if capability[0] == 9:
        if not (16 <= kv_block <= 128 and kv_block % 16 == 0):
            return f"FA4 on SM90 needs kv_block_size a multiple of 16 up to 128 (its tile_n), got {kv_block}"
        if q_block % 64:
            return f"FA4 on SM90 needs q_block_size a multiple of 64 (its q tile), got {q_block}"
    elif capability[0] == 10:
        if kv_block % 128:
            return f"FA4 on SM100 needs kv_block_size a multiple of 128 (its tile_n), got {kv_block}"
        if q_block % 256:
            return f"FA4 on SM100 needs q_block_size a multiple of 256 (2 Q stages x 128), got {q_block}"
    else:
        return f"FA4 needs CUDA capability 9.x or 10.x, got {capability[0]}.{capability[1]}"
    if head_dim not in HEAD_DIMS:
        return f"FA4 backend supports head_dim {HEAD_DIMS}, got {head_dim}"
    return None


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 block-sparse forward; q, k, v (B, S, H, D) bf16/fp16 on CUDA, checked at the public edge.

    Returns (out (B, S, H, D), lse (B, H, S) fp32) in the mask's blocked token order when the mask has a
    permutation (the caller un-permutes, fused with the text pass when there is one).
    """
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    tensors = cached_fa4_block_sparse(mask)
    sparse = BlockSparseTensorsTorch(*_per_batch_and_head(mask, tensors, q.shape[0], q.shape[2]),
                                     block_size=tensors.block_size)
    out, lse = flash_attn_func(q, k, v, softmax_scale=scale, block_sparse_tensors=sparse, return_lse=True)
    if tensors.has_empty_rows:
        # Our contract for query blocks with no kept key block: zero output, lse -inf.
        empty = _empty_rows(mask, tensors)  # (Bm, Hm, S)
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.transpose(1, 2)[..., None], 0.0)
    return out, lse


def _per_batch_and_head(mask: BlockMask, tensors: FA4BlockSparse, batch: int, heads: int) -> tuple:
    """The four tensors materialised at (B, H, ...), kept with the mask: FA4 compiles one kernel per broadcast
    pattern of these tensors, so shared and per-head masks then share one compiled kernel."""
    return mask.cached(("fa4_per_batch_and_head", batch, heads), lambda: tuple(
        t.expand(batch, heads, *t.shape[2:]).contiguous()
        for t in (tensors.mask_block_cnt, tensors.mask_block_idx, tensors.full_block_cnt, tensors.full_block_idx)
    ))


def _empty_rows(mask: BlockMask, tensors: FA4BlockSparse) -> torch.Tensor:
    def build():
        rows = torch.arange(mask.seq_len, device=mask.device) // mask.q_block_size
        return tensors.full_block_cnt[..., rows] == 0  # (Bm, Hm, S) in blocked order

    return mask.cached("fa4_empty_rows", build)


def _attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out):
    """FA4 over the kept blocks; extra keys and the inverse permutation in one Triton pass that continues FA4's
    (out, lse) exactly (no merge pass)."""
    permuted = mask.permutation is not None
    if permuted:
        perm = mask.permutation
        q_in, k_in, v_in = (x.index_select(1, perm) for x in (q, k, v))
    else:
        q_in, k_in, v_in = q, k, v
    result, lse = block_sparse_attention(q_in, k_in, v_in, mask, scale)
    if extra_k is not None and triton_backend.BACKEND.unavailable_reason(q.device, q.dtype, q.shape[-1]) is None:
        from . import triton_block_sparse

        perm32 = triton_block_sparse._permutation_int32(mask) if permuted else None
        return triton_block_sparse.extend_attention(
            result, lse, q, extra_k, extra_v, extra_key_valid, scale, permutation=perm32, out=out
        )
    if permuted:
        inverse = mask.cached("inverse_permutation", lambda: inverse_order(mask.permutation))
        result, lse = result.index_select(1, inverse), lse.index_select(2, inverse)
    if extra_k is not None:
        result, lse = reference.extend_attention(result, lse, q, extra_k, extra_v, extra_key_valid, scale)
    return write_into(out, result), lse


def _device_reason(device: torch.device) -> str | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the fa4 backend needs a CUDA GPU of capability 9.x or 10.x, got device {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability[0] not in (9, 10):
        return f"the fa4 backend needs CUDA capability 9.x or 10.x, this GPU is {capability[0]}.{capability[1]}"
    error = import_error("flash_attn.cute")
    if error:
        return f"the fa4 backend needs `flash_attn.cute` (pip install 'dit-sparse[fa4]'): {error}"
    return None


def _mask_reason(mask: BlockMask, head_dim: int | None, device: torch.device) -> str | None:
    return block_constraints_error(mask, head_dim or 128, torch.cuda.get_device_capability(device))


BACKEND = Backend(
    name="fa4",
    where="CUDA capability 9.x / 10.x (Hopper, Blackwell), with `pip install 'dit-sparse[fa4]'`",
    summary="FlashAttention-4's block-sparse kernel (`flash-attn-4`, CuTe DSL); whole blocks only; the mask is "
            "converted to its block tensors once and kept with the mask; the joint text in one Triton pass after it",
    device_reason=_device_reason,
    dtypes=DTYPES,
    head_dims=HEAD_DIMS,
    token_boxes=False,
    attention=_attention,
    mask_reason=_mask_reason,
)
