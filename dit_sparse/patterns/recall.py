"""The recall guard (`min_recall`, an option of every method): per attention call, blocks added to the query blocks
whose kept key blocks hold too little of their estimated attention mass.

The estimate is the pooled attention map of DraftAttention (`estimate.pooled_attention`): block-mean q against
block-mean k, each pooled key's score raised by log of its token count, softmax over the key blocks per query block
and head, blocks cut in the mask's own order (its permutation or per-head orders). A row whose kept blocks hold less
than `min_recall` of it gets the highest-scoring missing blocks, fewest first, until the target is reached; no block
is ever removed. Added blocks are whole (no in-block masking). Tensor ops only, shapes from the mask: one sort, one
cumsum, one scatter, no host sync (the `top_p` budget of Sparse VideoGen2 is the same rule on a dynamic estimate).
"""

from __future__ import annotations

import torch

from dit_sparse.blockmask import BlockMask

from .estimate import block_sizes, in_order, pool_blocks


def pooled_block_map(q: torch.Tensor, k: torch.Tensor, mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    """The pooled attention map (B, H, n_q, n_kv) fp32 (rows sum to 1) of q, k (B, H, S, D) over the video tokens,
    blocks cut in `mask`'s orders with its query and key block sizes."""
    q_order, k_order = mask.orders()  # (Pb, Ph, S)
    natural = mask.permutation is None
    seq_len = q.shape[2]
    q_pooled = pool_blocks(q if natural else in_order(q, q_order), mask.q_block_size)  # (B, H, n_q, D)
    k_pooled = pool_blocks(k if natural else in_order(k, k_order), mask.kv_block_size)  # (B, H, n_kv, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q_pooled, k_pooled.transpose(-1, -2)) * scale
    scores = scores + block_sizes(seq_len, mask.kv_block_size, q.device).log()
    return torch.softmax(scores, dim=-1)


def guard_recall(mask: BlockMask, q: torch.Tensor, k: torch.Tensor, min_recall: float,
                 scale: float | None = None) -> tuple[BlockMask, torch.Tensor, torch.Tensor]:
    """`mask` with blocks added until every query block's kept blocks hold `min_recall` of its pooled attention
    (`pooled_block_map`); q, k (B, H, S, D), the video tokens of the call. Returns (the new per-batch, per-head mask
    (B, H, ...), with `mask`'s orders and in-block masking; the density it added, a 0-dim fp64 tensor; whether it
    added any block, a 0-dim fp64 tensor, 0 or 1): device tensors, no host sync."""
    if not isinstance(min_recall, (int, float)) or isinstance(min_recall, bool) or not 0 < min_recall <= 1:
        raise ValueError(f"min_recall must be in (0, 1], got {min_recall!r}")
    weights = pooled_block_map(q, k, mask, scale)  # (B, H, n_q, n_kv)
    batch, heads, n_q, n_kv = weights.shape
    kept = mask.to_block_dense().expand(batch, heads, -1, -1)  # (B, H, n_q, n_kv)
    need = min_recall - (weights * kept).sum(-1, keepdim=True)  # (B, H, n_q, 1): > 0 where the row falls short
    missing, order = torch.where(kept, -1.0, weights).sort(dim=-1, descending=True)  # kept blocks last (-1)
    before = missing.clamp_min(0).cumsum(-1) - missing.clamp_min(0)  # mass of the better missing blocks
    add = torch.zeros_like(kept).scatter_(-1, order, (before < need) & (missing >= 0))
    guarded = kept | add
    counts = guarded.sum(-1, dtype=torch.int32)  # (B, H, n_q)
    # A stable descending sort puts kept columns first, ascending; the lists span every block (no host sync).
    columns = guarded.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices  # (B, H, n_q, n_kv)
    valid = torch.arange(n_kv, device=q.device) < counts[..., None]
    partial = None
    if mask.kv_block_partial is not None:
        partial = (mask.to_block_partial().expand(batch, heads, -1, -1).gather(-1, columns) & valid).contiguous()
    new = BlockMask(torch.where(valid, columns, 0).int().contiguous(), counts.contiguous(), mask.seq_len,
                    mask.q_block_size, mask.kv_block_size, mask.permutation, partial, mask.token_boxes,
                    mask.kv_permutation, rows_all_kept=mask.rows_all_kept)
    added = new.kept_fraction - mask.kept_fraction
    return new, added, add.any().double()
