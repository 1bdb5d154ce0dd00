"""Tensor ops the dynamic patterns share: blocks pooled in a token order, the low-resolution attention over them,
top-k / top-p block selection, and the exact per-block attention mass (calibration, tests).

Every function works on whole tensors over (batch, head, block): no Python loop over tokens or blocks. A token
`order` is (Pb, Ph, S) int64 (Pb in (1, B), Ph in (1, H)) as `BlockMask.orders()` gives it, or None (natural).
"""

from __future__ import annotations

import math

import torch

# Query rows whose (B, H, rows, S) fp32 scores one step of `block_attention_mass` holds at most (elements).
_SCORES_PER_CHUNK = 1 << 25


def in_order(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, S, D) with each (batch, head)'s tokens taken in `order` (None: unchanged)."""
    if order is None:
        return x
    batch, heads, seq_len, dim = x.shape
    index = order.expand(batch, heads, seq_len)  # (B, H, S)
    return x.gather(2, index[..., None].expand(-1, -1, -1, dim))


def block_sizes(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """Tokens in each block, fp32 (n,), the last one short when seq_len is not a multiple."""
    n = math.ceil(seq_len / block_size)
    sizes = torch.full((n,), float(block_size), device=device)
    sizes[-1] = seq_len - (n - 1) * block_size
    return sizes


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each run of `block_size` tokens of x (B, H, S, D) in fp32: (B, H, n_blocks, D)."""
    batch, heads, seq_len, dim = x.shape
    n = math.ceil(seq_len / block_size)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block_size - seq_len))
    sums = padded.view(batch, heads, n, block_size, dim).sum(dim=3)
    return sums / block_sizes(seq_len, block_size, x.device)[:, None]


def pooled_attention(q_pooled: torch.Tensor, k_pooled: torch.Tensor, k_sizes: torch.Tensor, scale: float):
    """The draft attention map (B, H, n_q, n_k) fp32, rows summing to 1: softmax over pooled keys of the pooled
    scores, each pooled key weighted by the tokens it stands for (log size bias; only the short tail differs)."""
    scores = torch.matmul(q_pooled, k_pooled.transpose(-1, -2)) * scale + k_sizes.log()  # (B, H, n_q, n_k)
    return torch.softmax(scores, dim=-1)


def draft_map(q: torch.Tensor, k: torch.Tensor, block_size: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """The low-resolution attention (B, H, n, n) of q, k (B, H, S, D) pooled over the blocks of `order`."""
    q_pooled = pool_blocks(in_order(q, order), block_size)  # (B, H, n, D)
    k_pooled = pool_blocks(in_order(k, order), block_size)
    return pooled_attention(q_pooled, k_pooled, block_sizes(q.shape[2], block_size, q.device), q.shape[-1] ** -0.5)


def keep_counts(densities, n_kv_blocks: int, device=None) -> torch.Tensor:
    """Per head (H,) int64: key blocks each query block keeps at that density, round(d * n), at least 1."""
    d = torch.as_tensor(densities, dtype=torch.float64, device=device)
    return (d * n_kv_blocks).round().clamp(1, n_kv_blocks).long()


def select_blocks(scores: torch.Tensor, keep: torch.Tensor, top_p: float | None = None) -> torch.Tensor:
    """Bool (B, H, n_q, n_k): per row the `keep[h]` best-scored key blocks (keep (H,) or (1,)); with `top_p`, only
    the fewest of those whose scores (a distribution per row) reach `top_p` (SVG2's top-p budget)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # (B, H, n_q, n_k)
    rank_kept = torch.arange(scores.shape[-1], device=scores.device) < keep.view(1, -1, 1, 1)
    if top_p is not None:
        sorted_scores = scores.gather(-1, order)
        mass_before = sorted_scores.cumsum(-1) - sorted_scores
        rank_kept = rank_kept & (mass_before < top_p)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_kept.expand_as(order))


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    q_block_size: int,
    kv_block_size: int,
    q_order: torch.Tensor | None = None,
    k_order: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention mass per block pair (B, H, n_q, n_k) fp32: the sum, over the query tokens of a block, of the
    softmax weight they give each key block; q, k (B, H, S, D) over the video tokens, blocks cut in `q_order` /
    `k_order`. Each query row contributes 1, so a row of blocks sums to its token count. Chunked over queries."""
    batch, heads, seq_len, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    q, k = in_order(q, q_order).float(), in_order(k, k_order).float()
    n_q, n_k = math.ceil(seq_len / q_block_size), math.ceil(seq_len / kv_block_size)
    pad_k = n_k * kv_block_size - seq_len
    rows = max(q_block_size, _SCORES_PER_CHUNK // max(1, batch * heads * seq_len) // q_block_size * q_block_size)
    mass = torch.zeros(batch, heads, n_q * q_block_size, n_k, device=q.device)
    for start in range(0, seq_len, rows):  # chunks of query blocks: memory bound, not a loop over blocks
        stop = min(seq_len, start + rows)
        weights = torch.softmax(torch.matmul(q[:, :, start:stop], k.transpose(-1, -2)) * scale, dim=-1)
        weights = torch.nn.functional.pad(weights, (0, pad_k))
        mass[:, :, start:stop] = weights.view(batch, heads, stop - start, n_k, kv_block_size).sum(-1)
    return mass.view(batch, heads, n_q, q_block_size, n_k).sum(3)


def density_for_recall(mass: torch.Tensor, scores: torch.Tensor, target_recall: float) -> torch.Tensor:
    """Per head (H,) fp32: the smallest density (kept key blocks per query block / n_k) whose top-k by `scores`
    keeps `target_recall` of the exact `mass` (B, H, n_q, n_k), over the batch and every query block."""
    n_k = mass.shape[-1]
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    captured = mass.gather(-1, order).cumsum(-1).sum(dim=(0, 2))  # (H, n_k): mass kept at k = 1..n_k
    recall = captured / captured[:, -1:].clamp_min(1e-30)
    needed = (recall < target_recall - 1e-6).sum(-1) + 1  # first k reaching the target
    return needed.clamp(max=n_k).float() / n_k
