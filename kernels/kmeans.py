"""Fused k-means kernels for `reorder_cluster` (Sparse VideoGen2's k-means of q and k per head): the Lloyd step's
assignment and update without the (P, S, K) score matrix and without per-token-per-dim atomics.

- `assign(x_low, centroids)`: nearest centroid of each point. One program per (problem, tile of BLOCK_N points)
  loads its x tile once, runs over the centroid tiles with `tl.dot` (fp32 accumulation) and keeps, per column slot of
  the tile, the running best score and the centroid tile it came from; one reduction at the end. The score matrix
  never leaves registers: at HunyuanVideo 720p (P = 48 problems, S = 118,800, K = 929, D = 128) the torch path
  writes it (10 GB in bf16) and reads it twice more; here the step is 1.4 TFLOP of tensor-core work, the x tiles
  read once (1.5 GB) and each problem's centroids (0.24 MB) once per tile from L2 (10 GB of L2 reads at
  BLOCK_N = 128: hence the 256-point configs the autotuner also tries).
- `sort_by_label(labels, clusters)`: a stable counting sort, (order, ends): the tokens by cluster (equal to
  `torch.argsort(labels, stable=True)`) and where each cluster's run ends. Chunks of `SORT_CHUNK` tokens count their
  labels and rank each token among its chunk's equal labels by comparing labels tile against tile (no atomics: the
  last token of a label in a chunk stores the chunk's count), one `cumsum` over (cluster, chunk) gives every run's
  place, and each token is written to its place.
- `update(x, labels, centroids)`: Lloyd's update from that sort. One program per (problem, cluster) sums its run of
  sorted tokens in fp32 and writes the mean (an empty cluster keeps its centroid). Deterministic, no atomics.

Why sort, then sum runs: at the Hunyuan shape any update reads x once (fp32: 2.9 GB, ~0.7 ms of HBM); the torch
path's `scatter_add_` adds those bytes with 731 M fp32 atomics, contended, since neighbouring tokens share a
cluster. A chunk kernel with one atomic per run (flash-kmeans) reads as much but its sums change order from run to
run (a nondeterministic centroid, then order). A one-hot matmul is 1.4 TFLOP, as much as the assignment. The sort
adds ~0.35 GB of traffic (labels twice, the `later` ranks, the (P, K, S / SORT_CHUNK) counts and their cumsum, the
order) and S x SORT_CHUNK label compares a problem (2.9 G in all), and it is not extra work for `reorder_cluster`,
which sorts the tokens by cluster anyway: `reorder._lloyd` hands the last step's order on in place of an argsort.
One program sums a cluster's whole run: 44,592 programs of 128 tokens on average at Hunyuan; a cluster holding a
large share of a problem's tokens becomes the kernel's tail (runs are not split across programs).

Layouts: x (..., S, D), centroids (..., K, D), labels (..., S) with the same leading dims (flattened to P
problems); D in `HEAD_DIMS` (others: `reorder` runs its torch code), x in fp16/bf16/fp32. CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1 (tests). No host syncs: every size comes from the shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import interpreting
from .triton_backend import DTYPES, HEAD_DIMS  # the same tiles as the attention kernel's
#: tokens a chunk of the counting sort ranks among themselves: per token SORT_CHUNK label compares, per problem
#: K x S / SORT_CHUNK counts (at Hunyuan: 512 compares a token, 0.9 MB of counts a problem)
SORT_CHUNK = 512
SORT_TILE = 128  # tokens compared at once in a chunk: SORT_TILE x SORT_TILE labels


# ---- assignment ------------------------------------------------------------------------------------------------

#: (BLOCK_N points, BLOCK_K centroids a tile, warps, stages): the running best of every slot of the (BLOCK_N,
#: BLOCK_K) tile stays in registers beside the dot's accumulator, so wide tiles get 8 warps.
ASSIGN_CONFIGS = (
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 3),
    (256, 32, 8, 3),
    (256, 64, 8, 3),
    (64, 128, 4, 3),
)


@triton.jit(do_not_specialize=["seq_len"])
def _assign_kernel(
    X, C, HALF_NORMS, LABELS, BEST,
    stride_xp, stride_xs, stride_xd,
    stride_cp, stride_ck, stride_cd,
    seq_len, clusters,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    problem = tl.program_id(1).to(tl.int64)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    slots = tl.arange(0, BLOCK_K)
    x = tl.load(X + problem * stride_xp + rows[:, None] * stride_xs + dims[None, :] * stride_xd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_N, D), loaded once
    if UPCAST:  # the interpreter's tl.dot misreads bf16 operands; bf16 products are exact in fp32
        x = x.to(tl.float32)
    c_base = C + problem * stride_cp
    norms_base = HALF_NORMS + problem * clusters

    # Slot j of the tile keeps the best score among centroids start + j over the tiles so far, and that tile's start
    # (strict >: the earliest on ties); elementwise, no reduction in the loop.
    running = tl.full([BLOCK_N, BLOCK_K], float("-inf"), dtype=tl.float32)
    tile_start = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for start in range(0, clusters, BLOCK_K):
        ks = start + slots
        k_ok = ks < clusters
        c = tl.load(c_base + ks[:, None] * stride_ck + dims[None, :] * stride_cd, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        half_norm = tl.load(norms_base + ks, mask=k_ok, other=float("inf"))  # past K: score -inf, never chosen
        scores = tl.dot(x, tl.trans(c), input_precision=DOT_PRECISION) - half_norm[None, :]  # (BLOCK_N, BLOCK_K)
        better = scores > running
        running = tl.where(better, scores, running)
        tile_start = tl.where(better, start, tile_start)

    best = tl.max(running, 1)
    # Lowest centroid index among the slots holding the best score (torch's max picks the first too).
    labels = tl.min(tl.where(running == best[:, None], tile_start + slots[None, :], clusters), 1)
    labels = tl.minimum(labels, clusters - 1)  # a NaN row: no slot equals its max; any label will do
    tl.store(LABELS + problem * seq_len + rows, labels.to(tl.int64), mask=row_ok)
    tl.store(BEST + problem * seq_len + rows, best, mask=row_ok)


_assign_tuned = triton.autotune(
    [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in ASSIGN_CONFIGS],
    key=["clusters", "HEAD_DIM"],  # and the dtypes (the autotuner adds them)
)(_assign_kernel)


def assign(x_low: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each point by x.c - |c|^2 / 2 (the squared distance less |x|^2, halved), as
    `reorder._assign`: (labels (..., S) int64, that best score (..., S) fp32). x_low (..., S, D) fp16/bf16/fp32;
    centroids (..., K, D), cast to x_low's dtype for the dot (accumulated in fp32); |c|^2 / 2 from the fp32
    centroids. Ties go to the lowest index."""
    _check_points(x_low, "x_low")
    _check_centroids(centroids, x_low)
    *lead, seq_len, dim = x_low.shape
    clusters = centroids.shape[-2]
    x = x_low.reshape(-1, seq_len, dim)  # (P, S, D)
    c32 = centroids.reshape(-1, clusters, dim).float()  # (P, K, D)
    c_low = c32.to(x.dtype).contiguous()
    half_norms = (0.5 * c32.square().sum(-1)).contiguous()  # (P, K) fp32
    problems = x.shape[0]
    labels = torch.empty(problems, seq_len, dtype=torch.int64, device=x.device)
    best = torch.empty(problems, seq_len, dtype=torch.float32, device=x.device)
    args = (x, c_low, half_norms, labels, best, *x.stride(), *c_low.stride(), seq_len, clusters)
    options = dict(HEAD_DIM=dim, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                   UPCAST=interpreting() and x.dtype == torch.bfloat16)
    if interpreting():  # one big tile: few programs for the interpreter
        block_n = 64
        _assign_kernel[(triton.cdiv(seq_len, block_n), problems)](*args, BLOCK_N=block_n, BLOCK_K=32, **options)
    else:
        _assign_tuned[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_N"]), problems)](*args, **options)
    return labels.view(*lead, seq_len), best.view(*lead, seq_len)


# ---- counting sort ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seq_len", "chunks"])
def _chunk_counts_kernel(
    LABELS, LATER, COUNTS,
    seq_len, clusters, chunks,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
):
    """Per token, how many later tokens of its chunk share its label (`LATER`); the last token of each label in the
    chunk stores the chunk's count of that label at COUNTS[problem, label, chunk]."""
    chunk = tl.program_id(0)
    problem = tl.program_id(1).to(tl.int64)
    labels_base = LABELS + problem * seq_len
    first = chunk * CHUNK
    for i in tl.static_range(CHUNK // TILE):
        rows = first + i * TILE + tl.arange(0, TILE)
        row_ok = rows < seq_len
        mine = tl.load(labels_base + rows, mask=row_ok, other=-1).to(tl.int32)  # (TILE,)
        earlier = tl.zeros([TILE], dtype=tl.int32)
        later = tl.zeros([TILE], dtype=tl.int32)
        for j in tl.static_range(CHUNK // TILE):
            cols = first + j * TILE + tl.arange(0, TILE)
            theirs = tl.load(labels_base + cols, mask=cols < seq_len, other=-2).to(tl.int32)
            same = mine[:, None] == theirs[None, :]  # (TILE, TILE)
            if j < i:
                earlier += tl.sum(same.to(tl.int32), 1)
            elif j > i:
                later += tl.sum(same.to(tl.int32), 1)
            else:
                earlier += tl.sum((same & (cols[None, :] < rows[:, None])).to(tl.int32), 1)
                later += tl.sum((same & (cols[None, :] > rows[:, None])).to(tl.int32), 1)
        tl.store(LATER + problem * seq_len + rows, later, mask=row_ok)
        last = row_ok & (later == 0)
        tl.store(COUNTS + (problem * clusters + mine) * chunks + chunk, earlier + 1, mask=last)


@triton.jit(do_not_specialize=["seq_len", "chunks"])
def _place_kernel(
    LABELS, LATER, ENDS, ORDER,
    seq_len, clusters, chunks,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Each token to its place in the sorted order: the end of its (label, chunk) run less the later tokens of that
    run. ENDS (P, K, chunks) is the inclusive cumsum of the counts over (label, chunk)."""
    problem = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tokens < seq_len
    labels = tl.load(LABELS + problem * seq_len + tokens, mask=ok, other=0).to(tl.int32)
    later = tl.load(LATER + problem * seq_len + tokens, mask=ok, other=0)
    run_end = tl.load(ENDS + (problem * clusters + labels) * chunks + tokens // CHUNK, mask=ok, other=0)
    tl.store(ORDER + problem * seq_len + run_end - 1 - later, tokens.to(tl.int64), mask=ok)


def sort_by_label(labels: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of labels (..., S) in [0, clusters): (order (..., S) int64, the token indices by label,
    equal to `torch.argsort(labels, dim=-1, stable=True)`; ends (..., K) int32, where each label's run ends in that
    order: label k holds positions ends[k - 1] (0 for k = 0) to ends[k]). Labels out of range are not checked."""
    if not isinstance(labels, torch.Tensor) or labels.dim() < 1 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor (..., S), got {getattr(labels, 'dtype', type(labels))}")
    if not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters must be an int >= 1, got {clusters!r}")
    _check_device(labels, "labels")
    *lead, seq_len = labels.shape
    flat = labels.reshape(-1, seq_len).contiguous()  # (P, S)
    problems = flat.shape[0]
    chunks = triton.cdiv(seq_len, SORT_CHUNK)
    later = torch.empty(problems, seq_len, dtype=torch.int32, device=labels.device)
    counts = torch.zeros(problems, clusters, chunks, dtype=torch.int32, device=labels.device)  # (P, K, chunks)
    _chunk_counts_kernel[(chunks, problems)](flat, later, counts, seq_len, clusters, chunks, CHUNK=SORT_CHUNK,
                                             TILE=SORT_TILE)
    ends = counts.view(problems, -1).cumsum(-1, dtype=torch.int32).view(problems, clusters, chunks)
    order = torch.empty(problems, seq_len, dtype=torch.int64, device=labels.device)
    block = 1024
    _place_kernel[(triton.cdiv(seq_len, block), problems)](flat, later, ends, order, seq_len, clusters, chunks,
                                                           CHUNK=SORT_CHUNK, BLOCK=block)
    return order.view(*lead, seq_len), ends[..., -1].reshape(*lead, clusters)


# ---- update ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seq_len"])
def _cluster_means_kernel(
    X, ORDER, ENDS, OLD, CENTROIDS, SIZES,
    stride_xp, stride_xs, stride_xd,
    stride_op, stride_ok, stride_od,
    seq_len, clusters,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Centroid `cluster` of `problem`: the fp32 mean of its run of sorted tokens, the old centroid when empty."""
    cluster = tl.program_id(0)
    problem = tl.program_id(1).to(tl.int64)
    end = tl.load(ENDS + problem * clusters + cluster)
    begin = tl.where(cluster > 0, tl.load(ENDS + problem * clusters + tl.maximum(cluster - 1, 0)), 0)
    dims = tl.arange(0, HEAD_DIM)
    x_base = X + problem * stride_xp
    sums = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    for first in range(begin, end, BLOCK):
        positions = first + tl.arange(0, BLOCK)
        ok = positions < end
        tokens = tl.load(ORDER + problem * seq_len + positions, mask=ok, other=0)
        rows = tl.load(x_base + tokens[:, None] * stride_xs + dims[None, :] * stride_xd, mask=ok[:, None], other=0.0)
        sums += rows.to(tl.float32)
    size = end - begin
    old_ptrs = OLD + problem * stride_op + cluster * stride_ok + dims * stride_od
    mean = tl.where(size > 0, tl.sum(sums, 0) / tl.maximum(size, 1).to(tl.float32), tl.load(old_ptrs))
    tl.store(CENTROIDS + (problem * clusters + cluster) * HEAD_DIM + dims, mean)
    tl.store(SIZES + problem * clusters + cluster, size.to(tl.float32))


def cluster_means(x: torch.Tensor, order: torch.Tensor, ends: torch.Tensor,
                  centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's update from `sort_by_label`'s (order, ends): (centroids (..., K, D) fp32, each the mean of its points
    summed in fp32, an empty one unchanged; sizes (..., K) fp32). x (..., S, D) in any of `DTYPES`."""
    _check_points(x, "x")
    _check_centroids(centroids, x)
    *lead, seq_len, dim = x.shape
    clusters = centroids.shape[-2]
    if tuple(order.shape) != (*lead, seq_len) or tuple(ends.shape) != (*lead, clusters):
        raise ValueError(f"order and ends must be {(*lead, seq_len)} and {(*lead, clusters)} (sort_by_label's), got "
                         f"{tuple(order.shape)} and {tuple(ends.shape)}")
    flat = x.reshape(-1, seq_len, dim)  # (P, S, D)
    old = centroids.reshape(-1, clusters, dim).float()  # (P, K, D)
    problems = flat.shape[0]
    new = torch.empty(problems, clusters, dim, dtype=torch.float32, device=x.device)
    sizes = torch.empty(problems, clusters, dtype=torch.float32, device=x.device)
    _cluster_means_kernel[(clusters, problems)](
        flat, order.reshape(problems, seq_len).contiguous(), ends.reshape(problems, clusters).contiguous(), old, new,
        sizes, *flat.stride(), *old.stride(), seq_len, clusters, HEAD_DIM=dim,
        BLOCK=64, **({} if interpreting() else dict(num_warps=4)),
    )
    return new.view(*lead, clusters, dim), sizes.view(*lead, clusters)


def update(x: torch.Tensor, labels: torch.Tensor,
           centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's update, as `reorder._update`: (centroids (..., K, D) fp32, the mean of each cluster's points, an empty
    one unchanged; sizes (..., K) fp32; order (..., S) int64, the tokens sorted by label, stable, which the update
    sorts by anyway and `reorder_cluster` reuses). x (..., S, D), labels (..., S) in [0, K)."""
    _check_centroids(centroids, x)
    if tuple(labels.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"labels must be {tuple(x.shape[:-1])} (x's points), got {tuple(labels.shape)}")
    order, ends = sort_by_label(labels, centroids.shape[-2])
    return (*cluster_means(x, order, ends, centroids), order)


# ---- argument checks -------------------------------------------------------------------------------------------


def _check_device(x: torch.Tensor, name: str) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"the k-means kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), {name} is on "
                         f"{x.device}")


def _check_points(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"{name} must be a tensor (..., S, D), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; the k-means kernels take {DTYPES}")
    if x.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{name} has D={x.shape[-1]}; the k-means kernels support D in {HEAD_DIMS}")
    _check_device(x, name)


def _check_centroids(centroids: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != x.dim() or \
            centroids.shape[:-2] != x.shape[:-2] or centroids.shape[-1] != x.shape[-1] or centroids.shape[-2] < 1:
        raise ValueError(f"centroids must be (..., K, D) = {(*x.shape[:-2], 'K', x.shape[-1])} for points "
                         f"{tuple(x.shape)}, got {tuple(getattr(centroids, 'shape', ()))}")
    if centroids.device != x.device:
        raise ValueError(f"centroids are on {centroids.device}, the points on {x.device}")
