"""Reordered block-sparse attention: a per-head token order that gathers each head's pattern into dense blocks.

Two ways to choose the order: `reorder_axes` (PAROAttention: one of the six orders of the frame, row and column
axes per head, chosen at calibration) and `reorder_cluster` (Sparse VideoGen2: k-means of q and k per head).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import AXIS_ORDERS
from dit_sparse.layout import VideoLayout

from .estimate import block_attention_mass, block_sizes, density_for_recall, draft_map, keep_counts, select_blocks

# ---- axes (PAROAttention) -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def axis_order(layout: VideoLayout, axes: str) -> torch.Tensor:
    """(video_len,) int64 on the CPU: the video tokens ordered with `axes[0]` slowest, e.g. "hwf" puts the frames of
    one (row, column) next to each other; "fhw" is the natural order. Memoised: a pure function of its arguments."""
    if axes not in AXIS_ORDERS:
        raise ValueError(f"axes must be one of {AXIS_ORDERS}, got {axes!r}")
    grid = torch.arange(layout.video_len).view(layout.frames, layout.height, layout.width)
    return grid.permute(*("fhw".index(axis) for axis in axes)).reshape(-1)


def _head_orders(layout: VideoLayout, axes: Sequence[str], device) -> torch.Tensor | None:
    """(1, H, S) orders of the heads, (S,) when every head shares one, None when that one is natural."""
    if len(set(axes)) == 1:
        return None if axes[0] == "fhw" else axis_order(layout, axes[0]).to(device)
    return torch.stack([axis_order(layout, a) for a in axes]).to(device)[None]


def reorder_axes(
    layout: VideoLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    axes: str | Sequence[str] = "fhw",
    density: float | Sequence[float] = 0.25,
    block_size: int = 128,
    top_p: float | None = None,
) -> BlockMask:
    """Per-head axis orders, then the blocks of each head's order pooled and selected as `draft` does.

    Zhao et al., 2025, "PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in
    Visual Generation Models" (arXiv 2506.16054; github.com/thu-nics/PAROAttention). PARO permutes each head's tokens
    by the order of the (frame, height, width) axes that makes its attention block-concentrated (a head attending to
    one spatial position across frames becomes block-diagonal in "hwf"), chosen offline per head (`calibrate`).
    `axes`: one order for every head or one per head (`AXIS_ORDERS`). PARO's sparse masks are static, calibrated
    offline; here each kept block is chosen at run time from the pooled attention in that order (step-cached by
    `refresh`), so one calibration serves any prompt. q, k (B, H, video_len, D).
    """
    heads = q.shape[1]
    axes = [axes] * heads if isinstance(axes, str) else list(axes)
    order = _head_orders(layout, axes, q.device)
    probs = draft_map(q, k, block_size, None if order is None else order.view(1, -1, layout.video_len))
    densities = [density] * heads if isinstance(density, (int, float)) else list(density)
    kept = select_blocks(probs, keep_counts(densities, probs.shape[-1], q.device), top_p)
    return BlockMask.from_block_dense(kept, layout.video_len, block_size, permutation=order)


def axes_calibration(layout: VideoLayout, q: torch.Tensor, k: torch.Tensor, *, block_size: int, density: float,
                     target_recall: float, **_) -> list[dict]:
    """Per head, for every axis order: {"concentration": {order: the exact attention mass the best
    `density` share of blocks holds}, "density": {order: density the pooled estimate needs for `target_recall`}}."""
    heads = q.shape[1]
    keep = keep_counts([density] * heads, math.ceil(layout.video_len / block_size), q.device)
    concentration, needed = {}, {}
    for axes in AXIS_ORDERS:  # six orders, each a whole-tensor pass
        order = axis_order(layout, axes).to(q.device).view(1, 1, -1)
        mass = block_attention_mass(q, k, block_size, block_size, order, order)  # (B, H, n, n)
        best = select_blocks(mass, keep)
        concentration[axes] = ((mass * best).sum(dim=(0, 2, 3)) / mass.sum(dim=(0, 2, 3))).tolist()
        needed[axes] = density_for_recall(mass, draft_map(q, k, block_size, order), target_recall).tolist()
    return [{"concentration": {a: concentration[a][h] for a in AXIS_ORDERS},
             "density": {a: needed[a][h] for a in AXIS_ORDERS}} for h in range(heads)]


# ---- clusters (Sparse VideoGen2) ----------------------------------------------------------------------------------

#: Lloyd steps of a cold start, as a multiple of `kmeans_iters` (the warm-start count)
COLD_START_ITERS = 8


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Label (B, H, S) of each point's nearest centroid; x (B, H, S, D), centroids (B, H, K, D), fp32."""
    distance = centroids.square().sum(-1)[..., None, :] - 2 * torch.matmul(x, centroids.transpose(-1, -2))
    return distance.argmin(-1)


def _kmeans_plus_plus(x: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur and Vassilvitskii, 2007; scikit-learn's default: each step draws
    2 + ln K candidates by squared distance and keeps the one that lowers the potential most), every (batch, head)
    at once: (B, H, K, D) fp32, drawn from every `S // 16K`-th token. A loop over the K centroids, on cold starts
    only (later refreshes warm-start from the previous centroids)."""
    stride = max(1, x.shape[2] // (16 * clusters))  # seed from at most ~16 points per cluster: K steps stay cheap
    x = x[:, :, ::stride]
    batch, heads, seq_len, dim = x.shape
    flat = x.reshape(batch * heads, seq_len, dim)
    candidates = 2 + int(math.log(clusters))
    generator = torch.Generator(device=x.device).manual_seed(seed)
    rows = torch.arange(batch * heads, device=x.device)
    first = torch.randint(seq_len, (batch * heads,), generator=generator, device=x.device)
    centroids = [flat[rows, first]]  # each (BH, D)
    closest = (flat - centroids[0][:, None]).square().sum(-1)  # (BH, S): squared distance to the nearest centroid
    for _ in range(clusters - 1):
        picks = torch.multinomial(closest.clamp_min(0) + 1e-12, candidates, replacement=True, generator=generator)
        points = flat[rows[:, None], picks]  # (BH, L, D)
        potential = torch.minimum(closest[:, None], torch.cdist(points, flat).square())  # (BH, L, S)
        best = potential.sum(-1).argmin(-1)  # (BH,)
        centroids.append(points[rows, best])
        closest = potential[rows, best]
    return torch.stack(centroids, dim=1).view(batch, heads, clusters, dim)


def kmeans(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from `centroids` (B, H, K, D) on x (B, H, S, D), batched over (batch, head): (labels (B, H, S),
    centroids (B, H, K, D) fp32, sizes (B, H, K)). An empty cluster keeps its centroid."""
    x = x.float()
    centroids = centroids.float()
    for _ in range(iters):
        labels = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(2, labels[..., None].expand_as(x), x)
        sizes = torch.zeros(centroids.shape[:3], device=x.device).scatter_add_(2, labels, torch.ones_like(labels,
                                                                                                        dtype=x.dtype))
        centroids = torch.where(sizes[..., None] > 0, sums / sizes.clamp_min(1)[..., None], centroids)
    labels = _nearest(x, centroids)
    sizes = torch.zeros(centroids.shape[:3], device=x.device).scatter_add_(2, labels, torch.ones_like(labels,
                                                                                                    dtype=x.dtype))
    return labels, centroids, sizes


def _cluster_blocks(labels: torch.Tensor, clusters: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens sorted by cluster: (order (B, H, S), tokens of each cluster in each block (B, H, n_blocks, K) fp32)."""
    batch, heads, seq_len = labels.shape
    order = torch.argsort(labels, dim=-1, stable=True)  # (B, H, S)
    sorted_labels = labels.gather(-1, order)
    n = math.ceil(seq_len / block_size)
    cell = torch.arange(seq_len, device=labels.device) // block_size * clusters + sorted_labels  # block * K + label
    counts = torch.zeros(batch, heads, n * clusters, device=labels.device)
    counts.scatter_add_(-1, cell, torch.ones_like(cell, dtype=counts.dtype))
    return order, counts.view(batch, heads, n, clusters)


def _cluster_map(q, k, clusters: int, block_size: int, state: dict | None, iters: int, seed: int):
    """k-means of q and k, the token orders and the centroid-level attention spread over the blocks:
    (q order, k order (B, H, S), block map (B, H, n, n) with rows summing to 1, new state)."""
    seq_len = q.shape[2]
    clusters = min(clusters, seq_len)
    fitted = {}
    for name, x in (("q", q), ("k", k)):
        previous = None if state is None else state.get(name)
        if previous is not None and previous.shape[:3] == (*x.shape[:2], clusters) and previous.device == x.device:
            fitted[name] = kmeans(x, previous, iters)  # SVG2: centroids reused across steps
        else:
            fitted[name] = kmeans(x, _kmeans_plus_plus(x.float(), clusters, seed), COLD_START_ITERS * iters)
    (q_labels, q_centroids, _), (k_labels, k_centroids, k_sizes) = fitted["q"], fitted["k"]
    q_order, q_counts = _cluster_blocks(q_labels, clusters, block_size)  # q_counts (B, H, n, Kq)
    k_order, k_counts = _cluster_blocks(k_labels, clusters, block_size)  # k_counts (B, H, n, Kk)
    # Centroid-level attention: each key centroid stands for its cluster's tokens (log size bias; empty ones none).
    scores = torch.matmul(q_centroids, k_centroids.transpose(-1, -2)) * q.shape[-1] ** -0.5 + k_sizes.log()[..., None, :]
    cluster_probs = torch.softmax(scores, dim=-1)  # (B, H, Kq, Kk)
    share = k_counts.transpose(-1, -2) / k_sizes.clamp_min(1)[..., None]  # (B, H, Kk, n): where each cluster lies
    block_map = torch.matmul(torch.matmul(q_counts, cluster_probs), share)  # (B, H, n, n) token-weighted
    block_map = block_map / block_sizes(seq_len, block_size, q.device)[:, None]
    return q_order, k_order, block_map, {"q": q_centroids, "k": k_centroids}


def reorder_cluster(
    layout: VideoLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    density: float | Sequence[float] = 0.25,
    block_size: int = 128,
    clusters: int | None = None,
    top_p: float | None = None,
    kmeans_iters: int = 2,
    state: dict | None = None,
    seed: int = 0,
) -> tuple[BlockMask, dict]:
    """Semantic-aware permutation: k-means clusters of q and of k per head, tokens sorted by cluster, key blocks
    chosen from the centroid-level attention. Returns (mask, state): the centroids to warm-start the next refresh.

    Yang et al., 2025, "Sparse VideoGen2: Accelerate Video Generation with Sparse Attention via Semantic-Aware
    Permutation" (arXiv 2505.18875; github.com/svg-project/Sparse-VideoGen, `svg/kmeans_utils.py`). As SVG2: q and
    k clustered separately (queries and keys get their own order: `BlockMask.kv_permutation`), centroids reused
    across steps (`state`, warm starts run `kmeans_iters` Lloyd steps; a cold start seeds with k-means++ and runs
    `COLD_START_ITERS` x `kmeans_iters`), the attention of query
    centroids over key centroids (each weighted by its cluster's size) estimates the attention, and kept blocks
    follow its mass (`density` top-k per row, `top_p` SVG2's cumulative budget). SVG2 runs variable-size blocks, one
    per cluster; our kernels cut the sorted tokens into fixed `block_size` blocks, each block's estimate is the mass
    of the clusters it holds (a block straddling two clusters gets both). `clusters` defaults to one per block.
    q, k (B, H, video_len, D).
    """
    seq_len, heads = layout.video_len, q.shape[1]
    clusters = clusters or math.ceil(seq_len / block_size)
    q_order, k_order, block_map, new_state = _cluster_map(q, k, clusters, block_size, state, kmeans_iters, seed)
    densities = [density] * heads if isinstance(density, (int, float)) else list(density)
    kept = select_blocks(block_map, keep_counts(densities, block_map.shape[-1], q.device), top_p)
    mask = BlockMask.from_block_dense(kept, seq_len, block_size, permutation=q_order)
    return BlockMask(mask.kv_block_indices, mask.kv_block_counts, seq_len, block_size, block_size, q_order,
                     kv_permutation=k_order), new_state


def cluster_calibration(layout: VideoLayout, q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                        clusters: int | None, kmeans_iters: int, target_recall: float, **_) -> list[dict]:
    """Per head: {"density"}, the density at which the centroid-level estimate's top-k keeps `target_recall` of the
    exact attention mass in the clustered orders."""
    clusters = clusters or math.ceil(layout.video_len / block_size)
    q_order, k_order, block_map, _ = _cluster_map(q, k, clusters, block_size, None, kmeans_iters, 0)
    mass = block_attention_mass(q, k, block_size, block_size, q_order, k_order)
    return [{"density": float(d)} for d in density_for_recall(mass, block_map, target_recall)]
