"""Sparse-vDiT: one of a few fixed patterns per head (diagonal, multi-diagonal, vertical stripe, or dense), chosen
offline by measured error against cost, stored in a profile, heads of one layer fused into one block mask.

Chen et al., 2025, "Sparse-vDiT: Unleashing the Power of Sparse Attention to Accelerate Video Diffusion Transformers"
(arXiv 2506.03065; github.com/Peyton-Chen/Sparse-vDiT, which at the time of writing released no code, so this follows
the paper's abstract and pattern descriptions). The paper finds three recurring patterns in video DiT attention maps,
tied to layer depth and head position with limited dependence on the input: diagonal, multi-diagonal and
vertical-stripe. On the frame-major token order we read them as a band around the diagonal (a token and its spatial
neighbours), the band repeated at multiples of the frame length (the same place in other frames), and a few key
columns every query attends to. An offline "sparse diffusion search" selects the strategy per layer and head by
hardware-aware cost modelling, and heads of a layer that share a strategy are fused.

Ours, on the 3D-tiled token order (`neighborhood.tiled_order`, one tile = one kernel block), in units of tiles:
- `diagonal`, `radius` (frames, rows, columns): a key tile is kept when it is within `radius` tiles of the query tile
  on every axis (no shift at the borders); (0, r, r) keeps the band within the frame.
- `multi_diagonal`, `spatial_radius` (rows, columns), `frame_stride`: a key tile within `spatial_radius` tiles in
  space, at a tile-frame distance that is a multiple of `frame_stride` (stride 1: every frame, the same place).
- `stripe`, `key_frames`: every query keeps the key tiles holding a token of those frames (token frame indices, e.g.
  (0,): the first-frame sink); joint text is attended densely by `sparse_attention` anyway.
- `dense`: every block.
A block that mixes border tiles keeps a key block when any of its tiles keeps any of the key block's tiles.

Where we differ: the paper has a kernel per pattern and fuses the heads that share one; we build
one `BlockMask` with a row of block lists per head, so a single block-sparse launch (FA4, Triton, reference) covers
every head whatever its pattern, and the fusion left to do is computing each distinct pattern once (`vdit_mask`). The
paper also skips 3-6% of heads outright; we do not (a skipped head's error shows only after the residual, which an
attention-output error cannot measure). The search's error (relative L2 of the attention output on sampled query
rows) and cost (our measured FA4 time per density) are our own choices, see `search_head_patterns`.

In `sparsify` (`VditConfig`): one `pattern` for every head, or per layer and head the patterns of a profile that
`dit_sparse.calibrate(pipe, prompts, method="vdit")` searched (entries `{"pattern": HeadPattern.to_dict()}`); the mask
of a layer depends on the layout only, so it is built once per (layout, device, layer) and reused at every step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from dit_sparse.blockmask import BlockMask, inverse_order
from dit_sparse.config import MethodConfig, check_block_size, check_triple, is_int
from dit_sparse.layout import VideoLayout

from .neighborhood import tiled_order

KINDS = ("dense", "diagonal", "multi_diagonal", "stripe")
# The fields each kind takes; the others must stay None.
_KIND_FIELDS = {
    "dense": (),
    "diagonal": ("radius",),
    "multi_diagonal": ("spatial_radius", "frame_stride"),
    "stripe": ("key_frames",),
}
_PARAMETERS = ("radius", "spatial_radius", "frame_stride", "key_frames")

#: H200, FA4 block-sparse: time ~= 1.05 x density x dense time (benchmarks/results/attention-h200-2026-11-28.md,
#: `per density` column 1.04-1.13 on Wan and HunyuanVideo): the cost model of the search, dense = 1.
SPARSE_TIME_PER_DENSITY = 1.05


def _int_tuple(owner: str, name: str, value, length: int | None, minimum: int) -> tuple[int, ...]:
    what = f"{length} ints" if length is not None else "a non-empty sequence of ints"
    if (
        not isinstance(value, (tuple, list))
        or (length is not None and len(value) != length)
        or len(value) == 0
        or any(not is_int(v, minimum) for v in value)
    ):
        raise ValueError(f"{owner}.{name} must be {what} >= {minimum}, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class HeadPattern:
    """One head's pattern: `kind` in `KINDS` and the parameters of that kind (in tiles unless said otherwise).

    - `dense`: none.
    - `diagonal`: `radius` (frames, rows, columns) >= 0.
    - `multi_diagonal`: `spatial_radius` (rows, columns) >= 0 and `frame_stride` >= 1.
    - `stripe`: `key_frames`, distinct token frame indices >= 0 (kept sorted).
    Parameters of other kinds must be None. Build with `HeadPattern.diagonal((0, 1, 1))` etc.; `to_dict` / `from_dict`
    give the self-describing JSON form `{"kind": "diagonal", "radius": [0, 1, 1]}`.
    """

    kind: str
    radius: tuple[int, int, int] | None = None
    spatial_radius: tuple[int, int] | None = None
    frame_stride: int | None = None
    key_frames: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"HeadPattern.kind must be one of {KINDS}, got {self.kind!r}")
        wanted = _KIND_FIELDS[self.kind]
        for name in _PARAMETERS:
            value = getattr(self, name)
            if name not in wanted and value is not None:
                raise ValueError(f"HeadPattern kind {self.kind!r} takes only {wanted}, got {name}={value!r}")
            if name in wanted and value is None:
                raise ValueError(f"HeadPattern kind {self.kind!r} needs {name}")
        if self.radius is not None:
            object.__setattr__(self, "radius", _int_tuple("HeadPattern", "radius", self.radius, 3, 0))
        if self.spatial_radius is not None:
            spatial = _int_tuple("HeadPattern", "spatial_radius", self.spatial_radius, 2, 0)
            object.__setattr__(self, "spatial_radius", spatial)
        if self.frame_stride is not None and not is_int(self.frame_stride, 1):
            raise ValueError(f"HeadPattern.frame_stride must be an int >= 1, got {self.frame_stride!r}")
        if self.key_frames is not None:
            frames = _int_tuple("HeadPattern", "key_frames", self.key_frames, None, 0)
            if len(set(frames)) != len(frames):
                raise ValueError(f"HeadPattern.key_frames must be distinct, got {self.key_frames!r}")
            object.__setattr__(self, "key_frames", tuple(sorted(frames)))

    @classmethod
    def dense(cls) -> "HeadPattern":
        return cls("dense")

    @classmethod
    def diagonal(cls, radius: tuple[int, int, int]) -> "HeadPattern":
        return cls("diagonal", radius=radius)

    @classmethod
    def multi_diagonal(cls, spatial_radius: tuple[int, int], frame_stride: int = 1) -> "HeadPattern":
        return cls("multi_diagonal", spatial_radius=spatial_radius, frame_stride=frame_stride)

    @classmethod
    def stripe(cls, key_frames: Sequence[int] = (0,)) -> "HeadPattern":
        return cls("stripe", key_frames=key_frames)

    def to_dict(self) -> dict:
        """`{"kind": ..., <its parameters>}`, JSON-able (tuples as lists)."""
        out: dict = {"kind": self.kind}
        for name in _KIND_FIELDS[self.kind]:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data) -> "HeadPattern":
        """The inverse of `to_dict`; a ValueError names a missing, unknown or bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"a head pattern must be a dict with a 'kind', got {type(data).__name__} {data!r}")
        if "kind" not in data:
            raise ValueError(f"head pattern {data!r} has no 'kind' (one of {KINDS})")
        kind = data["kind"]
        if kind not in KINDS:
            raise ValueError(f"head pattern kind must be one of {KINDS}, got {kind!r}")
        wanted = _KIND_FIELDS[kind]
        missing = [name for name in wanted if name not in data]
        if missing:
            raise ValueError(f"head pattern of kind {kind!r} is missing field(s) {missing}, got {data!r}")
        unknown = sorted(set(data) - {"kind", *wanted})
        if unknown:
            raise ValueError(f"head pattern of kind {kind!r} has unknown field(s) {unknown}; it takes {wanted}")
        return cls(kind, **{name: data[name] for name in wanted})


#: The pattern of every head when no profile gives one: +-3 tile frames and +-1 tile in space, at the default tile
#: (1, 8, 16) the window of `neighborhood`'s default (7, 24, 48) tokens (kept whole at the borders, not shifted).
DEFAULT_PATTERN = HeadPattern.diagonal((3, 1, 1))


def default_tile(block_size: int) -> tuple[int, int, int]:
    """(1, rows, columns) with rows x columns = block_size, as square as powers of two allow: 128 -> (1, 8, 16)."""
    check_block_size(None, "block_size", block_size)
    log = block_size.bit_length() - 1
    return (1, 1 << (log // 2), 1 << (log - log // 2))


def resolve_tile(block_size: int, tile, owner: str = "vdit") -> tuple[int, int, int]:
    """`tile` checked against `block_size` (prod(tile) == block_size), or `default_tile(block_size)` when None."""
    if tile is None:
        return default_tile(block_size)
    default_tile(block_size)  # checks block_size
    tile = check_triple(owner, "tile", tile)
    if math.prod(tile) != block_size:
        raise ValueError(f"{owner}.tile {tile} holds {math.prod(tile)} tokens; it must hold block_size={block_size}")
    return tile


# ---- masks -----------------------------------------------------------------------------------------------------------


def vdit_mask(
    layout: VideoLayout,
    patterns: Sequence[HeadPattern],
    block_size: int = 128,
    tile: tuple[int, int, int] | None = None,
) -> BlockMask:
    """The block mask of one layer: head h keeps the blocks of `patterns[h]`; Bm = 1, Hm = len(patterns).

    Blocks are 3D tiles (`tile`, default `default_tile(block_size)`, prod(tile) == block_size) in
    `neighborhood.tiled_order`. This is the head fusion: each distinct pattern is computed once and shared by the
    heads that use it, and one block-sparse launch serves all heads, whatever their patterns.
    """
    tile = resolve_tile(block_size, tile)
    if not isinstance(layout, VideoLayout):
        raise ValueError(f"layout must be a VideoLayout, got {type(layout).__name__}")
    for head, pattern in enumerate(_check_patterns(patterns, "patterns")):
        if pattern.kind == "stripe" and pattern.key_frames[-1] >= layout.frames:
            raise ValueError(
                f"patterns[{head}] keeps key frames {pattern.key_frames}, but the layout has {layout.frames} frames"
            )

    permutation, coords = tiled_order(layout, tile)  # coords (S, 3) of the blocked order
    tile_grid = [math.ceil(n / t) for n, t in zip((layout.frames, layout.height, layout.width), tile)]
    token_tile = coords // torch.tensor(tile)  # (S, 3) each token's tile
    n_tiles = math.prod(tile_grid)
    token_tile_id = (token_tile[:, 0] * tile_grid[1] + token_tile[:, 1]) * tile_grid[2] + token_tile[:, 2]  # (S,)
    # The (block, tile) pairs that share a token: one per whole-tile block, a few per block of border tokens.
    pairs = torch.unique((torch.arange(layout.video_len) // block_size) * n_tiles + token_tile_id)  # (P,)
    pair_block = pairs // n_tiles
    pair_id = pairs % n_tiles
    pair_tile = torch.stack(
        [pair_id // (tile_grid[1] * tile_grid[2]), (pair_id // tile_grid[2]) % tile_grid[1], pair_id % tile_grid[2]],
        dim=1,
    )  # (P, 3) tile coordinates
    n_blocks = math.ceil(layout.video_len / block_size)

    distinct = list(dict.fromkeys(patterns))
    block_maps = torch.stack(
        [_block_map(pattern, pair_block, pair_tile, tile_grid, tile[0], n_blocks) for pattern in distinct]
    )  # (n_distinct, n_blocks, n_blocks)
    which = torch.tensor([distinct.index(p) for p in patterns])  # (Hm,) each head's distinct pattern
    return BlockMask.from_block_dense(
        block_maps[which][None], layout.video_len, block_size, permutation=permutation
    )


def _check_patterns(patterns, name: str) -> list[HeadPattern]:
    if isinstance(patterns, (str, HeadPattern)) or not isinstance(patterns, Sequence) or len(patterns) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of HeadPattern, got {patterns!r}")
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, HeadPattern):
            raise ValueError(f"{name}[{i}] must be a HeadPattern, got {type(pattern).__name__} {pattern!r}")
    return list(patterns)


def _block_map(pattern: HeadPattern, pair_block, pair_tile, tile_grid, tile_frames: int, n_blocks: int):
    """Bool (n_blocks, n_blocks): a block pair is kept when any (query tile, key tile) pair of it is.

    pair_block (P,), pair_tile (P, 3): the (block, tile coordinates) pairs sharing a token."""
    if pattern.kind == "dense":
        return torch.ones(n_blocks, n_blocks, dtype=torch.bool)
    relation = _tile_relation(pattern, pair_tile, tile_grid, tile_frames).float()  # (P, P)
    per_query_block = torch.zeros(n_blocks, relation.shape[1]).index_add_(0, pair_block, relation)  # (n_blocks, P)
    return torch.zeros(n_blocks, n_blocks).index_add_(1, pair_block, per_query_block) > 0


def _tile_relation(pattern: HeadPattern, tiles: torch.Tensor, tile_grid, tile_frames: int) -> torch.Tensor:
    """Bool (T, T) over tile coordinates `tiles` (T, 3): [a, b] is True when query tile a keeps key tile b."""

    def within(axis: int, radius: int) -> torch.Tensor:  # (T, T) from the (n, n) table of one axis
        grid = torch.arange(tile_grid[axis])
        table = (grid[:, None] - grid[None, :]).abs() <= radius
        return table[tiles[:, axis]][:, tiles[:, axis]]

    if pattern.kind == "diagonal":
        return within(0, pattern.radius[0]) & within(1, pattern.radius[1]) & within(2, pattern.radius[2])
    if pattern.kind == "multi_diagonal":
        frames = torch.arange(tile_grid[0])
        stride = (frames[:, None] - frames[None, :]) % pattern.frame_stride == 0  # (n_frames, n_frames)
        spatial = within(1, pattern.spatial_radius[0]) & within(2, pattern.spatial_radius[1])
        return spatial & stride[tiles[:, 0]][:, tiles[:, 0]]
    # stripe: every query keeps the key tiles whose frames hold a key frame
    holds = torch.isin(tiles[:, 0], torch.tensor(pattern.key_frames) // tile_frames)  # (T,)
    return holds[None, :].expand(tiles.shape[0], -1)


def pattern_costs(
    layout: VideoLayout, patterns: Sequence[HeadPattern], block_size: int = 128, tile=None
) -> torch.Tensor:
    """Float64 (len(patterns),): each pattern's attention time relative to dense on `layout`.

    Dense costs 1; a sparse pattern `SPARSE_TIME_PER_DENSITY` x its density (kept token pairs / all, short tail
    blocks at their size), the measured FA4 block-sparse time on an H200; a sparse pattern above 1 / 1.05 density
    costs more than dense."""
    block_dense = vdit_mask(layout, patterns, block_size, tile).to_block_dense()[0]  # (P, n, n)
    tokens = torch.bincount(torch.arange(layout.video_len) // block_size).double()  # (n,) tokens per block
    density = (block_dense.double() * tokens[:, None] * tokens[None, :]).sum(dim=(-1, -2)) / layout.video_len**2
    is_dense = torch.tensor([p.kind == "dense" for p in patterns])
    return torch.where(is_dense, 1.0, SPARSE_TIME_PER_DENSITY * density)


# ---- the offline search ----------------------------------------------------------------------------------------------

#: The candidates `search_head_patterns` tries by default (radii in tiles; they clip to the layout).
DEFAULT_CANDIDATES: tuple[HeadPattern, ...] = (
    HeadPattern.diagonal((0, 0, 0)),
    HeadPattern.diagonal((0, 1, 1)),
    HeadPattern.diagonal((1, 1, 1)),
    HeadPattern.diagonal((0, 2, 2)),
    HeadPattern.diagonal((1, 2, 2)),
    HeadPattern.multi_diagonal((0, 0), frame_stride=1),
    HeadPattern.multi_diagonal((1, 1), frame_stride=1),
    HeadPattern.multi_diagonal((1, 1), frame_stride=2),
    HeadPattern.stripe((0,)),
    HeadPattern.dense(),
)


def _check_qkv(q, k, v, layout: VideoLayout) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (B, S, H, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v must share (B, S, H) and q, k D: got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1] != layout.video_len:
        raise ValueError(f"q has S={q.shape[1]} tokens, but the layout has {layout.video_len} video tokens")


def candidate_errors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    candidates: Sequence[HeadPattern] = DEFAULT_CANDIDATES,
    block_size: int = 128,
    tile=None,
    *,
    query_rows: int | None = 1024,
    seed: int = 0,
) -> torch.Tensor:
    """Float32 (C, H): each candidate's relative L2 error of the attention output against dense, per head.

    q, k, v (B, S, H, D) over the video tokens in their natural order (the batch entries are samples: prompts or
    steps). The error of one (sample, head) is ||out - dense|| / ||dense|| over `query_rows` query rows drawn once
    (seeded; None or >= S: all rows), fp32, masked dense attention with the candidate's token mask (the mask the
    kernels run); the result is the mean over the batch. Softmax scale 1 / sqrt(D)."""
    _check_qkv(q, k, v, layout)
    candidates = _check_patterns(candidates, "candidates")
    if query_rows is not None and not is_int(query_rows, 1):
        raise ValueError(f"query_rows must be an int >= 1 or None, got {query_rows!r}")
    mask = vdit_mask(layout, candidates, block_size, tile)
    block_dense = mask.to_block_dense()[0]  # (C, n_blocks, n_blocks)
    seq_len = layout.video_len
    position = torch.arange(seq_len) if mask.permutation is None else inverse_order(mask.permutation)
    token_block = (position // block_size).to(q.device)  # (S,) each natural token's block
    if query_rows is None or query_rows >= seq_len:
        rows = torch.arange(seq_len)
    else:
        rows = torch.randperm(seq_len, generator=torch.Generator().manual_seed(seed))[:query_rows].sort().values
    rows = rows.to(q.device)

    batch, _, heads, dim = q.shape
    scale = dim**-0.5
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)  # (B, H, S, D)
    squared_error = torch.zeros(len(candidates), batch, heads, device=q.device)  # (C, B, H)
    squared_norm = torch.zeros(batch, heads, device=q.device)
    chunk = max(1, (1 << 24) // max(1, batch * heads * seq_len))
    block_dense = block_dense.to(q.device)
    for start in range(0, rows.numel(), chunk):
        chunk_rows = rows[start : start + chunk]  # (c,)
        scores = torch.matmul(q[:, chunk_rows].float().transpose(1, 2), kf.transpose(-1, -2)) * scale  # (B, H, c, S)
        dense = torch.softmax(scores, dim=-1) @ vf  # (B, H, c, D)
        squared_norm += dense.square().sum(dim=(-1, -2))
        for c in range(len(candidates)):
            allowed = block_dense[c][token_block[chunk_rows]][:, token_block]  # (c, S)
            masked = scores.masked_fill(~allowed, float("-inf"))
            lse = torch.logsumexp(masked, dim=-1, keepdim=True)
            out = torch.exp(masked - lse).nan_to_num_(0.0) @ vf  # rows with no kept key give 0
            squared_error[c] += (out - dense).square().sum(dim=(-1, -2))
    relative = (squared_error / squared_norm.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()  # (C, B, H)
    return relative.mean(dim=1)


def combine_errors(errors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of per-sample (C, H) error tables (prompts, steps) from `candidate_errors`: (C, H)."""
    if isinstance(errors, torch.Tensor) or not isinstance(errors, Sequence) or len(errors) == 0:
        raise ValueError(f"errors must be a non-empty sequence of (C, H) tensors, got {type(errors).__name__}")
    shapes = {tuple(e.shape) if isinstance(e, torch.Tensor) else None for e in errors}
    if len(shapes) != 1 or None in shapes or len(next(iter(shapes))) != 2:
        raise ValueError(f"errors must all be (C, H) tensors of one shape, got shapes {sorted(map(str, shapes))}")
    return torch.stack([e.float() for e in errors]).mean(dim=0)


def check_search_settings(max_error, cost_weight) -> None:
    """Raise ValueError unless `max_error` is a number >= 0 or None and `cost_weight` a number >= 0."""
    if max_error is not None and (
        not isinstance(max_error, (int, float)) or isinstance(max_error, bool) or not max_error >= 0
    ):
        raise ValueError(f"max_error must be a number >= 0 or None, got {max_error!r}")
    if not isinstance(cost_weight, (int, float)) or isinstance(cost_weight, bool) or not cost_weight >= 0:
        raise ValueError(f"cost_weight must be a number >= 0, got {cost_weight!r}")


def choose_head_patterns(
    errors: torch.Tensor,
    candidates: Sequence[HeadPattern],
    costs: torch.Tensor,
    *,
    max_error: float | None = 0.05,
    cost_weight: float = 0.1,
) -> list[HeadPattern]:
    """Per head, the candidate to run, from `errors` (C, H) and `costs` (C,); dense (error 0, cost 1) always competes.

    With `max_error`: the cheapest candidate whose error is at most `max_error` (ties: the smaller error); dense when
    none is cheaper. With `max_error=None`: the smallest error + `cost_weight` x cost (the error-cost trade-off)."""
    candidates = _check_patterns(candidates, "candidates")
    if not isinstance(errors, torch.Tensor) or errors.dim() != 2 or errors.shape[0] != len(candidates):
        raise ValueError(
            f"errors must be a (C={len(candidates)}, H) tensor, got {getattr(errors, 'shape', type(errors).__name__)}"
        )
    if not isinstance(costs, torch.Tensor) or tuple(costs.shape) != (len(candidates),):
        raise ValueError(f"costs must be a ({len(candidates)},) tensor, got {getattr(costs, 'shape', costs)!r}")
    check_search_settings(max_error, cost_weight)

    heads = errors.shape[1]
    options = candidates + [HeadPattern.dense()]
    errors = torch.cat([errors.double().cpu(), torch.zeros(1, heads, dtype=torch.float64)])  # (C + 1, H)
    costs = torch.cat([costs.double().cpu(), torch.ones(1, dtype=torch.float64)])[:, None].expand(-1, heads)
    if max_error is None:
        choice = (errors + cost_weight * costs).argmin(dim=0)  # (H,); argmin takes the first of equals
    else:
        feasible_cost = torch.where(errors <= max_error, costs, math.inf)  # (C + 1, H)
        cheapest = feasible_cost == feasible_cost.min(dim=0, keepdim=True).values
        choice = torch.where(cheapest, errors, math.inf).argmin(dim=0)
    return [options[i] for i in choice.tolist()]


def search_head_patterns(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    block_size: int = 128,
    candidates: Sequence[HeadPattern] | None = None,
    *,
    tile=None,
    cost_weight: float = 0.1,
    max_error: float | None = 0.05,
    query_rows: int | None = 1024,
    seed: int = 0,
) -> list[HeadPattern]:
    """Sparse-vDiT's offline search for one layer: a pattern per head of q (B, S, H, D) (see `candidate_errors`,
    `pattern_costs`, `choose_head_patterns`). Over several prompts or steps: `candidate_errors` on each,
    `combine_errors`, then `choose_head_patterns`."""
    candidates = DEFAULT_CANDIDATES if candidates is None else candidates
    errors = candidate_errors(q, k, v, layout, candidates, block_size, tile, query_rows=query_rows, seed=seed)
    costs = pattern_costs(layout, candidates, block_size, tile)
    return choose_head_patterns(errors, candidates, costs, max_error=max_error, cost_weight=cost_weight)


# ---- per-layer patterns (profiles, configs) -------------------------------------------------------------------------


def check_profile_layers(layers, where: str) -> tuple[tuple[HeadPattern, ...], ...]:
    """Per-layer head patterns as tuples of HeadPattern (dicts are parsed), every layer with as many heads; errors
    start with `where`. `VditConfig.layer_pattern` takes them so (a profile's entries `{"pattern": {...}}`)."""
    if isinstance(layers, (str, dict)) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(f"{where}: layers must be a non-empty list of per-layer head lists, got {layers!r}")
    checked = []
    for i, heads in enumerate(layers):
        if isinstance(heads, (str, dict)) or not isinstance(heads, Sequence) or len(heads) == 0:
            raise ValueError(f"{where}: layer {i} must be a non-empty list of head patterns, got {heads!r}")
        if len(heads) != len(layers[0]):
            raise ValueError(f"{where}: layer {i} has {len(heads)} heads, layer 0 has {len(layers[0])}")
        checked.append(
            tuple(as_head_pattern(pattern, f"{where}: layer {i} head {h}") for h, pattern in enumerate(heads))
        )
    return tuple(checked)


def as_head_pattern(pattern, where: str) -> HeadPattern:
    """`pattern` as a HeadPattern (its `to_dict` form is parsed); errors start with `where`."""
    if isinstance(pattern, HeadPattern):
        return pattern
    try:
        return HeadPattern.from_dict(pattern)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


@dataclass(frozen=True)
class VditConfig(MethodConfig):
    """Sparse-vDiT (Chen et al., 2025): per layer and head one fixed pattern, diagonal, multi-diagonal, vertical stripe
    or dense (`dit_sparse.patterns.vdit`). A layer's mask depends on the layout only: built once, reused every step.

    - `block_size`: tokens per block; `tile`: the 3D tile one block holds (None: `default_tile(block_size)`,
      (1, 8, 16) at 128). Pattern radii count these tiles, so a profile's patterns keep its block size and tile.
    - `pattern`: every head's pattern, a `HeadPattern` or its dict (None: `DEFAULT_PATTERN`, a diagonal of +-3 tile
      frames and +-1 tile in space).
    - `layer_pattern`: per hooked layer, one pattern per head (from a `calibrate(..., method="vdit")` profile);
      None: `pattern` for every layer and head.
    """

    method: ClassVar[str] = "vdit"
    block_size: int = 128
    tile: tuple[int, int, int] | None = None
    pattern: object = None
    layer_pattern: tuple | None = None

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_block_size(owner, "block_size", self.block_size)
        if self.tile is not None:
            object.__setattr__(self, "tile", resolve_tile(self.block_size, self.tile, owner))
        pattern = DEFAULT_PATTERN if self.pattern is None else as_head_pattern(self.pattern, f"{owner}.pattern")
        object.__setattr__(self, "pattern", pattern)
        if self.layer_pattern is not None:
            layers = check_profile_layers(self.layer_pattern, f"{owner}.layer_pattern")
            object.__setattr__(self, "layer_pattern", layers)

    @property
    def block_tile(self) -> tuple[int, int, int]:
        """The tile one block holds: `tile`, or `default_tile(block_size)`."""
        return resolve_tile(self.block_size, self.tile)

    def head_patterns(self, layer: int | None) -> tuple:
        """The patterns of `layer`'s heads: `layer_pattern[layer]`, else `(pattern,)` (one mask row every head
        shares)."""
        if self.layer_pattern is None:
            return (self.pattern,)
        if layer is None or not 0 <= layer < len(self.layer_pattern):
            raise ValueError(f"{type(self).__name__}.layer_pattern covers {len(self.layer_pattern)} layers; layer "
                             f"{layer!r} has none (a profile for another model?)")
        return self.layer_pattern[layer]

    def options(self) -> dict:
        """The config as plain JSON-able keyword arguments: patterns as `HeadPattern.to_dict()`, `tile` resolved."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        options["tile"] = list(self.block_tile)
        options["pattern"] = self.pattern.to_dict()
        if self.layer_pattern is not None:
            options["layer_pattern"] = [[p.to_dict() for p in heads] for heads in self.layer_pattern]
        return options


def build_vdit(layout: VideoLayout, config: VditConfig, q=None, k=None, state=None, device="cpu",
               layer=None) -> BlockMask:
    """`vdit_mask` of `layer`'s head patterns (`config.head_patterns`), on `device`."""
    return vdit_mask(layout, config.head_patterns(layer), config.block_size, config.tile).to(device)
