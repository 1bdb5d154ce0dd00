"""Tensor ops the dynamic patterns share: blocks pooled in a token order, the low-resolution attention over them,
top-k / top-p block selection, and the exact per-block attention mass (calibration, tests).

Every function works on whole tensors over (batch, head, block): no Python loop over tokens or blocks. A token
`order` is (Pb, Ph, S) int64 (Pb in (1, B), Ph in (1, H)) as `BlockMask.orders()` gives it, or None (natural).

The estimate path (`draft_map`, `top_blocks`) makes no host sync: shapes come from the layout and the densities on
the host, never from tensor values, and the few constant tensors it needs are built once per device (memoised).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

# Query rows whose (B, H, rows, S) fp32 scores one step of `block_attention_mass` holds at most (elements).
_SCORES_PER_CHUNK = 1 << 25


def in_order(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, S, D) with each (batch, head)'s tokens taken in `order` (None: unchanged)."""
    if order is None:
        return x
    batch, heads, seq_len, dim = x.shape
    if order.shape[0] == order.shape[1] == 1:  # one order for all: a plain index_select
        return x.index_select(2, order.view(-1))
    index = order.expand(batch, heads, seq_len)  # (B, H, S)
    return x.gather(2, index[..., None].expand(-1, -1, -1, dim))


def video_qk(layout, q: torch.Tensor | None, k: torch.Tensor | None, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The video tokens of the call's q and k (B, H, S, D): (B, H, video_len, D) each, at `layout.video_slice`; a
    ValueError naming `method` when either is missing (a dynamic pattern estimates its mask from them)."""
    if q is None or k is None:
        raise ValueError(f"method {method!r} estimates its mask from q and k; build_mask needs both")
    video = layout.video_slice
    return q[:, :, video], k[:, :, video]


@functools.lru_cache(maxsize=64)
def _block_sizes(seq_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    n = math.ceil(seq_len / block_size)
    sizes = torch.full((n,), float(block_size), device=device)
    sizes[-1:].fill_(seq_len - (n - 1) * block_size)  # a fill, not a copy from the host: no sync
    return sizes


def block_sizes(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """Tokens in each block, fp32 (n,), the last one short when seq_len is not a multiple. Built once per device
    (memoised: a constant; do not write to it)."""
    return _block_sizes(seq_len, block_size, torch.device("cpu" if device is None else device))


@functools.lru_cache(maxsize=64)
def _int_constant(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each run of `block_size` tokens of x (B, H, S, D), summed in fp32 (no fp32 copy of x, no padding):
    (B, H, n_blocks, D) fp32."""
    batch, heads, seq_len, dim = x.shape
    whole = seq_len // block_size
    sums = x[:, :, : whole * block_size].reshape(batch, heads, whole, block_size, dim).sum(3, dtype=torch.float32)
    if whole * block_size < seq_len:  # the short tail block
        sums = torch.cat([sums, x[:, :, whole * block_size:].sum(2, keepdim=True, dtype=torch.float32)], dim=2)
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


def keep_counts(densities: Sequence[float], n_kv_blocks: int) -> tuple[int, ...]:
    """Per head, on the host: key blocks each query block keeps at that density, round(d * n), at least 1 (Python's
    round, half to even, as torch.round)."""
    return tuple(min(n_kv_blocks, max(1, round(float(d) * n_kv_blocks))) for d in densities)


def top_blocks(scores: torch.Tensor, keep: Sequence[int], top_p: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`BlockMask` index lists of the best-scored key blocks: per row of scores (B, H, n_q, n_k) the `keep[h]` best
    (`keep`: one int per head, or one for all), with `top_p` only the fewest of those whose scores (a distribution
    per row) reach `top_p` (SVG2's top-p budget). Returns (kv_block_indices (B, H, n_q, max(keep)) int32 ascending,
    padded with 0; kv_block_counts (B, H, n_q) int32). Every row keeps at least its best block (`keep` >= 1, and
    rank 0 is always within a `top_p` > 0), which the masks built from these lists declare as `rows_all_kept`. One
    `topk` and one small sort; shapes from `keep` alone, no host sync."""
    batch, heads, n_q, n_k = scores.shape
    kept_max = max(keep)
    values, indices = scores.topk(kept_max, dim=-1)  # (B, H, n_q, kept_max), best first
    rank = torch.arange(kept_max, device=scores.device)
    kept = None
    if len(set(keep)) > 1:
        kept = rank < _int_constant(tuple(keep), scores.device).view(1, -1, 1, 1)
    if top_p is not None:
        within = (values.cumsum(-1) - values) < top_p  # the mass before each rank is under the budget
        kept = within if kept is None else kept & within
    if kept is None:  # every row keeps kept_max blocks
        counts = torch.full((batch, heads, n_q), kept_max, dtype=torch.int32, device=scores.device)
        return indices.sort(dim=-1).values.int(), counts
    counts = kept.sum(-1, dtype=torch.int32).expand(batch, heads, n_q).contiguous()  # kept ranks: a prefix
    ascending = torch.where(kept, indices, n_k).sort(dim=-1).values  # dropped ones sort last
    return torch.where(rank < counts[..., None], ascending, 0).int(), counts


def select_blocks(scores: torch.Tensor, keep: Sequence[int], top_p: float | None = None) -> torch.Tensor:
    """Bool (B, H, n_q, n_k): `top_blocks` as a block map (calibration, tests)."""
    indices, counts = top_blocks(scores, keep, top_p)
    valid = torch.arange(indices.shape[-1], device=scores.device) < counts[..., None]
    dense = torch.zeros(*scores.shape[:3], scores.shape[-1] + 1, dtype=torch.bool, device=scores.device)
    return dense.scatter_(-1, torch.where(valid, indices.long(), scores.shape[-1]), True)[..., :-1]


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
