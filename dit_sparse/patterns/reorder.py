"""Reordered block-sparse attention: a per-head token order that gathers each head's pattern into dense blocks.

Two ways to choose the order: `reorder_axes` (PAROAttention: one of the six orders of the frame, row and column
axes per head, chosen at calibration) and `reorder_cluster` (Sparse VideoGen2: k-means of q and k per head).

The k-means runs on one of two engines: "triton", the fused kernels of `dit_sparse.kernels.kmeans` (no score
matrix, no per-token atomics), or "torch", the plain PyTorch code here, the reference. `kmeans_engine` picks
triton for CUDA tensors when Triton imports and D is one its kernels support, torch otherwise; the environment
variable `DIT_SPARSE_KMEANS` = "torch" | "triton" | "auto" (the default) forces one (benchmarks time both; "triton"
also runs on CPU under TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import DynamicConfig, check_block_size, check_choice, check_int, choice, per_layer_heads
from dit_sparse.kernels import unavailable_reason
from dit_sparse.layout import VideoLayout

from .estimate import (block_attention_mass, block_sizes, density_for_recall, draft_map, keep_counts, select_blocks,
                       top_blocks, video_qk)

#: the orders of the (frame, row, column) axes a `reorder` head may take, slowest axis first ("fhw" is natural)
AXIS_ORDERS = ("fhw", "fwh", "hfw", "hwf", "wfh", "whf")


@dataclass(frozen=True)
class ReorderConfig(DynamicConfig):
    """Per-head token reordering that gathers a head's scattered pattern into dense blocks, then block selection.

    - `strategy="axes"` (PAROAttention, Zhao et al., 2025): each head orders tokens by one of `AXIS_ORDERS`
      (`layer_axes`, chosen per head at calibration; without a profile `axes` for every head); blocks of that
      order are pooled and selected as `draft` does.
    - `strategy="cluster"` (Sparse VideoGen2, Yang et al., 2025, semantic-aware permutation): k-means of q and of k
      per head (`clusters` centroids each, default one per block; centroids reused across refreshes as warm starts
      of `kmeans_iters` Lloyd steps, SVG2's 2 per step; cold starts seed with random tokens and run 8 x as many,
      with centroid relocations), tokens sorted by cluster, blocks chosen from the centroid-level attention.
    - `block_size`: tokens per kernel block (power of two >= 16).
    - `compensate` is on by default for this method alone (SVG-EAR's setting: the pooled keys of the dropped blocks
      are the clusters' centroids). Issue 31's sweep on the tiny model at density 0.25
      (benchmarks/results/quality-tiny-compensation-cpu-2026-12-08.md): +7.2 / +10.2 dB PSNR for clusters / axes in
      blocks of 16, +3.2 / +2.6 dB in blocks of 32, for +7-11% of the attention call on an H100
      (attention-h100-80gb-hbm3-2026-12-08.md); `draft` and `radial` gained under 2 dB in blocks of 32, so theirs
      stays off.
    """

    method: ClassVar[str] = "reorder"
    STRATEGIES: ClassVar[tuple[str, ...]] = ("axes", "cluster")

    strategy: str = choice("cluster", STRATEGIES)
    block_size: int = 128
    axes: str = choice("fhw", AXIS_ORDERS)
    layer_axes: tuple[tuple[str, ...], ...] | None = None
    clusters: int | None = None
    kmeans_iters: int = 2
    compensate: bool = True  # on for reorder alone: see the docstring

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "strategy", self.strategy, self.STRATEGIES)
        check_block_size(owner, "block_size", self.block_size)
        check_choice(owner, "axes", self.axes, AXIS_ORDERS)

        def check_axes(order):
            if order not in AXIS_ORDERS:
                raise ValueError(f"{owner}.layer_axes entries must be one of {AXIS_ORDERS}, got {order!r}")

        object.__setattr__(self, "layer_axes", per_layer_heads(owner, "layer_axes", self.layer_axes, check_axes))
        if self.clusters is not None:
            check_int(owner, "clusters", self.clusters, 2)
        check_int(owner, "kmeans_iters", self.kmeans_iters, 1)

    def head_axes(self, layer: int | None, heads: int) -> tuple[str, ...]:
        """The axis order of each head of `layer`: `layer_axes[layer]`, else `axes` for every head."""
        if self.layer_axes is None or layer is None:
            return (self.axes,) * heads
        if not 0 <= layer < len(self.layer_axes) or len(self.layer_axes[layer]) != heads:
            raise ValueError(f"{type(self).__name__}.layer_axes has no entry of {heads} heads for layer {layer} "
                             "(a profile for another model?)")
        return self.layer_axes[layer]


# ---- axes (PAROAttention) -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def axis_order(layout: VideoLayout, axes: str) -> torch.Tensor:
    """(video_len,) int64 on the CPU: the video tokens ordered with `axes[0]` slowest, e.g. "hwf" puts the frames of
    one (row, column) next to each other; "fhw" is the natural order. Memoised: a pure function of its arguments."""
    check_choice(None, "axes", axes, AXIS_ORDERS)
    grid = torch.arange(layout.video_len).view(layout.frames, layout.height, layout.width)
    return grid.permute(*("fhw".index(axis) for axis in axes)).reshape(-1)


@functools.lru_cache(maxsize=64)
def _head_orders(layout: VideoLayout, axes: tuple[str, ...], device: torch.device) -> torch.Tensor | None:
    """(1, H, S) orders of the heads, (S,) when every head shares one, None when that one is natural; on `device`,
    copied there once (memoised: no host-to-device copy per estimate)."""
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
    order = _head_orders(layout, tuple(axes), q.device)
    probs = draft_map(q, k, block_size, None if order is None else order.view(1, -1, layout.video_len))
    densities = [density] * heads if isinstance(density, (int, float)) else list(density)
    indices, counts = top_blocks(probs, keep_counts(densities, probs.shape[-1]), top_p)
    return BlockMask(indices, counts, layout.video_len, block_size, block_size, permutation=order,
                     rows_all_kept=True)


def axes_calibration(layout: VideoLayout, q: torch.Tensor, k: torch.Tensor, *, block_size: int, density: float,
                     target_recall: float, **_) -> list[dict]:
    """Per head, for every axis order: {"concentration": {order: the exact attention mass the best
    `density` share of blocks holds}, "density": {order: density the pooled estimate needs for `target_recall`}}."""
    heads = q.shape[1]
    keep = keep_counts([density] * heads, math.ceil(layout.video_len / block_size))
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

#: Lloyd steps of a cold start after its relocation passes, as a multiple of `kmeans_iters` (the warm-start count;
#: `kmeans_iters` steps come before them): enough that a warm start from the result finds the same clusters
COLD_START_ITERS = 4
#: relocation passes of a cold start (`_cold_start`), each one move per (batch, head) and one Lloyd step
COLD_START_RELOCATIONS = 6
KMEANS_ENV_VAR = "DIT_SPARSE_KMEANS"
KMEANS_ENGINES = ("auto", "torch", "triton")


@contextlib.contextmanager
def forced_kmeans_engine(engine: str | None):
    """`DIT_SPARSE_KMEANS=engine` inside the block, restored after it (None: left as it is); for benchmarks that time
    both engines and for tests."""
    before = os.environ.get(KMEANS_ENV_VAR)
    if engine is not None:
        os.environ[KMEANS_ENV_VAR] = engine
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(KMEANS_ENV_VAR, None)
        else:
            os.environ[KMEANS_ENV_VAR] = before


def kmeans_engine(x: torch.Tensor) -> str:
    """The k-means code that runs on points x (..., S, D), "triton" or "torch", as `DIT_SPARSE_KMEANS` asks.
    "auto" (unset or empty too) takes triton for CUDA tensors that its kernels take (Triton imports, dtype, D in
    16/32/64/128), torch otherwise; "triton" raises a ValueError saying what is missing when it cannot run."""
    requested = os.environ.get(KMEANS_ENV_VAR, "").strip() or "auto"
    if requested not in KMEANS_ENGINES:
        raise ValueError(f"{KMEANS_ENV_VAR}={requested!r} is not a k-means engine; choose one of {KMEANS_ENGINES}")
    if requested == "torch":
        return "torch"
    reason = unavailable_reason("triton", x.device, x.dtype, x.shape[-1])
    if requested == "triton":
        if reason is not None:
            raise ValueError(f"{KMEANS_ENV_VAR}=triton cannot run here: {reason}")
        return "triton"
    return "triton" if reason is None and x.device.type == "cuda" else "torch"


def _centered(xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The point sets `xs` (each (B, H, S, D)) as one batch of k-means problems, centred per (batch, head):
    (x (n * B, H, S, D) fp32, x in the inputs' dtype for the distance matmuls (x itself when that is fp32), means
    (n * B, H, 1, D) fp32). Centring removes the common offset, so 16-bit distance scores keep their precision."""
    batch = xs[0].shape[0]
    x = torch.empty((len(xs) * batch, *xs[0].shape[1:]), dtype=torch.float32, device=xs[0].device)
    for i, part in enumerate(xs):
        x[i * batch:(i + 1) * batch].copy_(part)
    mean = x.mean(2, keepdim=True)
    x.sub_(mean)
    return x, x.to(xs[0].dtype), mean


def _assign(x_low: torch.Tensor, centroids: torch.Tensor, engine: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each point, from x.c - |c|^2 / 2 (the squared distance less |x|^2, halved): (labels
    (B, H, S) int64, that score (B, H, S) fp32). x_low (B, H, S, D) in its dtype (bf16 on GPU: a tensor-core matmul),
    centroids (B, H, K, D) fp32. torch: one matmul, one in-place bias, one max (the (B, H, S, K) scores in x_low's
    dtype); triton: `kmeans.assign`, the scores in fp32 registers only."""
    if engine == "triton":
        from dit_sparse.kernels import kmeans as fused

        return fused.assign(x_low, centroids)
    half_norms = (0.5 * centroids.square().sum(-1)).to(x_low.dtype)  # (B, H, K)
    scores = torch.matmul(x_low, centroids.to(x_low.dtype).transpose(-1, -2)).sub_(half_norms[..., None, :])
    best, labels = scores.max(-1)  # scores (B, H, S, K)
    return labels, best.float()


def _update(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, engine: str):
    """Lloyd's update: (centroids (B, H, K, D) fp32, each the mean of its points, an empty one unchanged; sizes
    (B, H, K) fp32; order (B, H, S) int64, the tokens sorted by label, stable, or None); x (B, H, S, D) fp32. torch:
    two scatter_add_ (sums, counts) over every head at once, no order (`_lloyd` sorts once, after its last step);
    triton: `kmeans.update`, a counting sort and one sum per cluster's run of sorted tokens (the sort is the order)."""
    if engine == "triton":
        from dit_sparse.kernels import kmeans as fused

        return fused.update(x, labels, centroids)
    sums = torch.zeros_like(centroids).scatter_add_(2, labels[..., None].expand_as(x), x)
    sizes = torch.zeros(centroids.shape[:3], device=x.device).scatter_add_(2, labels, x.new_ones(()).expand(labels.shape))
    return torch.where(sizes[..., None] > 0, sums / sizes.clamp_min(1)[..., None], centroids), sizes, None


def _lloyd(x: torch.Tensor, x_low: torch.Tensor, centroids: torch.Tensor, iters: int, engine: str):
    """`iters` >= 1 Lloyd steps (assign, update) on centred x: (labels (B, H, S), centroids (B, H, K, D) fp32, the
    means of those labels' clusters, sizes (B, H, K) fp32, order (B, H, S): the tokens sorted by those labels)."""
    for _ in range(iters):
        labels, _ = _assign(x_low, centroids, engine)
        centroids, sizes, order = _update(x, labels, centroids, engine)
    if order is None:  # the torch engine: one sort of the last labels
        order = torch.argsort(labels, dim=-1, stable=True)
    return labels, centroids, sizes, order


def _seeds(x: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """Initial centroids (B, H, K, D): K distinct points of each (batch, head) drawn at random (the init of SVG2's
    flash-kmeans), one `rand` and one `topk` for every head."""
    batch, heads, seq_len, dim = x.shape
    generator = torch.Generator(device=x.device).manual_seed(seed)
    draws = torch.rand(batch, heads, seq_len, generator=generator, device=x.device)
    picks = draws.topk(clusters, dim=-1).indices  # (B, H, K)
    return x.gather(2, picks[..., None].expand(-1, -1, -1, dim))


def _cold_start(x: torch.Tensor, x_low: torch.Tensor, clusters: int, iters: int, seed: int, engine: str):
    """k-means of centred x from random seeds, with relocation passes, fixed work for every head at once:
    (labels, centroids, sizes, order) as `_lloyd`.

    Random seeds leave some clusters of the data without a centroid and give others two, a local optimum Lloyd
    steps keep. `iters` Lloyd steps, then `COLD_START_RELOCATIONS` passes, each moving, per
    (batch, head), one centroid of the closest pair onto the point farthest from its centroid, running one Lloyd
    step, and keeping the move where the k-means cost (sum of squared distances) drops, then `COLD_START_ITERS` x
    `iters` Lloyd steps more (a warm start from the result finds the same clusters). Replaces a k-means++ seeding
    whose loop over the K centroids launched ~10 kernels per centroid; recovers planted clusters better."""
    centroids = _lloyd(x, x_low, _seeds(x, clusters, seed), iters, engine)[1]
    sq_norms = x.square().sum(-1)  # (B, H, S)
    # (B, H, S): squared distance of each point to its centroid
    distance = sq_norms - 2 * _assign(x_low, centroids, engine)[1]
    dim = x.shape[-1]
    for _ in range(COLD_START_RELOCATIONS):
        norms = centroids.square().sum(-1)  # (B, H, K)
        gap = norms[..., :, None] + norms[..., None, :] - 2 * torch.matmul(centroids, centroids.transpose(-1, -2))
        gap.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # (B, H, K, K) squared distances between centroids
        donor = gap.amin(-1).argmin(-1)  # (B, H): a centroid of the closest pair
        farthest = distance.argmax(-1)  # (B, H): the point worst served
        moved = centroids.scatter(2, donor[..., None, None].expand(-1, -1, 1, dim),
                                  x.gather(2, farthest[..., None, None].expand(-1, -1, 1, dim)))
        moved = _update(x, _assign(x_low, moved, engine)[0], moved, engine)[0]
        moved_distance = sq_norms - 2 * _assign(x_low, moved, engine)[1]
        better = moved_distance.sum(-1) < distance.sum(-1)  # (B, H)
        centroids = torch.where(better[..., None, None], moved, centroids)
        distance = torch.where(better[..., None], moved_distance, distance)
    return _lloyd(x, x_low, centroids, COLD_START_ITERS * iters, engine)


def kmeans(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`iters` >= 1 steps of Lloyd's k-means from `centroids` (B, H, K, D) on x (B, H, S, D), batched over (batch,
    head): (labels (B, H, S) of the last assignment, centroids (B, H, K) fp32 updated from it (each the mean of its
    cluster; an empty one unchanged), sizes (B, H, K) fp32). Distances in x's dtype, sums in fp32; no host sync."""
    x32, x_low, mean = _centered([x])
    labels, centroids, sizes, _ = _lloyd(x32, x_low, centroids.float() - mean, iters, kmeans_engine(x_low))
    return labels, centroids + mean, sizes


def _cluster_blocks(sorted_labels: torch.Tensor, clusters: int, block_size: int) -> torch.Tensor:
    """Tokens of each cluster in each block (B, H, n_blocks, K) fp32, from the labels in sorted order (B, H, S)."""
    batch, heads, seq_len = sorted_labels.shape
    n = math.ceil(seq_len / block_size)
    cell = torch.arange(seq_len, device=sorted_labels.device) // block_size * clusters + sorted_labels  # block*K+label
    counts = torch.zeros(batch, heads, n * clusters, device=sorted_labels.device)
    counts.scatter_add_(-1, cell, counts.new_ones(()).expand(cell.shape))
    return counts.view(batch, heads, n, clusters)


def _cluster_map(q, k, clusters: int, block_size: int, state: dict | None, iters: int, seed: int):
    """k-means of q and k (one batch of problems), the token orders and the centroid-level attention spread over
    the blocks: (q order, k order (B, H, S), block map (B, H, n, n) with rows summing to 1, new state)."""
    batch, heads, seq_len, _ = q.shape
    clusters = min(clusters, seq_len)
    x, x_low, mean = _centered([q, k])  # (2B, H, S, D): q's problems, then k's
    engine = kmeans_engine(x_low)
    previous = [None if state is None else state.get(name) for name in ("q", "k")]
    if all(p is not None and p.shape[:3] == (batch, heads, clusters) and p.device == q.device for p in previous):
        start = torch.cat(previous).float() - mean  # SVG2: centroids reused across steps
        labels, centroids, sizes, order = _lloyd(x, x_low, start, iters, engine)
    else:
        labels, centroids, sizes, order = _cold_start(x, x_low, clusters, iters, seed, engine)
    centroids = centroids + mean  # order (2B, H, S): tokens by cluster, q and k in one sort (the last update's)
    counts = _cluster_blocks(labels.gather(-1, order), clusters, block_size)  # (2B, H, n, K)
    q_counts, k_counts, k_sizes = counts[:batch], counts[batch:], sizes[batch:]
    q_centroids, k_centroids = centroids[:batch], centroids[batch:]
    # Centroid-level attention: each key centroid stands for its cluster's tokens (log size bias; empty ones none).
    scores = torch.matmul(q_centroids, k_centroids.transpose(-1, -2)) * q.shape[-1] ** -0.5 + k_sizes.log()[..., None, :]
    cluster_probs = torch.softmax(scores, dim=-1)  # (B, H, Kq, Kk)
    share = k_counts.transpose(-1, -2) / k_sizes.clamp_min(1)[..., None]  # (B, H, Kk, n): where each cluster lies
    block_map = torch.matmul(torch.matmul(q_counts, cluster_probs), share)  # (B, H, n, n) token-weighted
    block_map = block_map / block_sizes(seq_len, block_size, q.device)[:, None]
    return order[:batch], order[batch:], block_map, {"q": q_centroids, "k": k_centroids}


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
    across steps (`state`, warm starts run `kmeans_iters` Lloyd steps; a cold start seeds with random tokens, as
    SVG2's flash-kmeans, and adds relocation passes: `_cold_start`), the attention of query
    centroids over key centroids (each weighted by its cluster's size) estimates the attention, and kept blocks
    follow its mass (`density` top-k per row, `top_p` SVG2's cumulative budget). SVG2 runs variable-size blocks, one
    per cluster; our kernels cut the sorted tokens into fixed `block_size` blocks, each block's estimate is the mass
    of the clusters it holds (a block straddling two clusters gets both). `clusters` defaults to one per block.
    q, k (B, H, video_len, D).
    """
    check_int(None, "kmeans_iters", kmeans_iters, 1)
    seq_len, heads = layout.video_len, q.shape[1]
    clusters = clusters or math.ceil(seq_len / block_size)
    q_order, k_order, block_map, new_state = _cluster_map(q, k, clusters, block_size, state, kmeans_iters, seed)
    densities = [density] * heads if isinstance(density, (int, float)) else list(density)
    indices, counts = top_blocks(block_map, keep_counts(densities, block_map.shape[-1]), top_p)
    mask = BlockMask(indices, counts, seq_len, block_size, block_size, q_order, kv_permutation=k_order,
                     rows_all_kept=True)
    return mask, new_state


def build_reorder(layout: VideoLayout, config: ReorderConfig, q=None, k=None, state=None, device="cpu",
                  layer=None) -> BlockMask:
    """`reorder_axes` or `reorder_cluster` (`config.strategy`) of the call's video q, k; `layer` gives the per-head
    densities and axes, `state` (the session's per-site dict) the k-means centroids, updated for the next refresh."""
    q, k = video_qk(layout, q, k, config.method)
    heads = q.shape[1]
    options = dict(density=config.densities(layer, heads), block_size=config.block_size, top_p=config.top_p)
    if config.strategy == "axes":
        return reorder_axes(layout, q, k, axes=config.head_axes(layer, heads), **options)
    mask, centroids = reorder_cluster(layout, q, k, clusters=config.clusters, kmeans_iters=config.kmeans_iters,
                                      state=state, **options)
    if state is not None:
        state.update(centroids)  # the session's per-site dict: warm starts for the next refresh
    return mask


def cluster_calibration(layout: VideoLayout, q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                        clusters: int | None, kmeans_iters: int, target_recall: float, **_) -> list[dict]:
    """Per head: {"density"}, the density at which the centroid-level estimate's top-k keeps `target_recall` of the
    exact attention mass in the clustered orders."""
    clusters = clusters or math.ceil(layout.video_len / block_size)
    q_order, k_order, block_map, _ = _cluster_map(q, k, clusters, block_size, None, kmeans_iters, 0)
    mass = block_attention_mass(q, k, block_size, block_size, q_order, k_order)
    return [{"density": float(d)} for d in density_for_recall(mass, block_map, target_recall)]
