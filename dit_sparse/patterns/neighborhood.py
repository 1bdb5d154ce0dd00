"""Neighborhood attention: each video token attends to a 3D window (frames, rows, columns) of tokens around it.

Two variants over one token order (3D tiles, one kernel block per tile):

- exact (`exact=True`): NATTEN's window at token level, with its stride and dilation. Blocks with any in-window pair
  are kept; those only partly in the window are masked inside (`BlockMask.token_boxes`): Triton and reference.
- tile-aligned (`exact=False`): Sliding Tile Attention, whole tiles kept, no masking inside blocks: every backend,
  FA4 included, and the fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_sparse.blockmask import BlockMask, TokenBoxes
from dit_sparse.config import MethodConfig, check_tile, check_triple
from dit_sparse.layout import VideoLayout

# Pairs of (query piece, key piece) evaluated at once: bounds the pair tensors to ~4M elements each.
_PAIRS_PER_CHUNK = 1 << 22


@dataclass(frozen=True)
class NeighborhoodConfig(MethodConfig):
    """Neighborhood attention (NATTEN / GNA, Hassani et al., 2025) and Sliding Tile Attention (STA, Zhang et al.,
    2025): each token attends to a 3D window of tokens around it (`dit_sparse.patterns.neighborhood`).

    - `window`, `stride`, `dilation`: (frames, rows, columns) in tokens, as NATTEN defines them (window clamped at
      the borders so every query sees a full window; stride <= window).
    - `tile`: the 3D tile one kernel block holds, prod(tile) a power of two >= 16 ((1, 8, 16) = 128).
    - `exact`: False (default): STA, whole tiles (window rounded up to whole tiles), every backend, fastest; stride and
      dilation must be 1. True: the exact token-level window, partial blocks masked inside (Triton, reference).
    """

    method: ClassVar[str] = "neighborhood"
    window: tuple[int, int, int] = (7, 24, 48)
    stride: tuple[int, int, int] = (1, 1, 1)
    dilation: tuple[int, int, int] = (1, 1, 1)
    tile: tuple[int, int, int] = (1, 8, 16)
    exact: bool = False

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        for name in ("window", "stride", "dilation"):
            object.__setattr__(self, name, check_triple(owner, name, getattr(self, name)))
        object.__setattr__(self, "tile", check_tile(owner, "tile", self.tile))
        if any(s > k for s, k in zip(self.stride, self.window)):
            raise ValueError(f"{owner}.stride {self.stride} must not exceed window {self.window} on any axis")
        if not isinstance(self.exact, bool):
            raise ValueError(f"{owner}.exact must be a bool, got {self.exact!r}")
        if not self.exact and (self.stride != (1, 1, 1) or self.dilation != (1, 1, 1)):
            raise ValueError(
                f"{owner}: stride {self.stride} and dilation {self.dilation} need exact=True; the tile-aligned "
                "variant (exact=False) shares one window per tile and takes stride and dilation (1, 1, 1)"
            )


def neighborhood(
    layout: VideoLayout,
    *,
    window: tuple[int, int, int],
    stride: tuple[int, int, int] = (1, 1, 1),
    dilation: tuple[int, int, int] = (1, 1, 1),
    tile: tuple[int, int, int] = (1, 8, 16),
    exact: bool = False,
) -> BlockMask:
    """The neighborhood block mask over `layout`'s video tokens, shared over batch and heads; block = one tile.

    Hassani et al., 2025, "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of
    Light" (arXiv 2504.16922; github.com/SHI-Labs/NATTEN, `backends/flex.py`, the non-causal mask), and Zhang et al.,
    2025, "Fast Video Generation with Sliding Tile Attention" (arXiv 2502.04507; github.com/hao-ai-lab/FastVideo,
    `generate_sta_mask`).

    NATTEN's rule, per axis of n tokens with window k, stride s and dilation d: a query at x and the keys it sees
    belong to x's dilation group (coordinates = x mod d, m = ceil((n - x mod d) / d) of them); at group index
    i = x // d the stride group's leader is min((i // s) * s + s // 2, m - 1), and the window is the k consecutive
    group members starting at leader - k // 2, shifted inside [0, m) at the borders, so every query sees exactly k
    keys per axis. A token sees a key when every axis allows it.

    - `window`, `stride`, `dilation` (frames, rows, columns) in tokens. An axis shorter than window x dilation is
      covered as far as NATTEN allows: dilation at most the axis, window at most axis // dilation, stride at most the
      window (so images, `frames=1`, get window 1 in time).
    - `tile` (frames, rows, columns): the 3D tile one kernel block holds; prod(tile) must be a power of two >= 16 (e.g.
      (1, 8, 16) or (4, 4, 8) = 128, FA4's and our kernel's block). Tokens are reordered into tiles: first every
      whole tile (one block each, in tile-major order), then the tokens of the short tiles at the borders of axes
      that are not multiples of the tile, in tile-major order, cut into blocks that may mix those short tiles. No
      padding: a padded permutation would put dummy keys into FA4's whole blocks.
    - `exact=True`: the token-level window above. A block is kept when any of its (query, key) pairs is in the
      window, and flagged partial unless all are; partial blocks are masked inside by each query's box (`TokenBoxes`:
      lattice step = dilation), so the attention is exactly NATTEN's. When no block is partial (e.g. windows of an
      odd number of tiles with stride = tile, where NA is STA) the mask has no boxes and FA4 can run it.
      `mask.density` is the kernel's work (partial blocks count whole); the window itself allows
      video_len x prod(`effective_window(...)[0]`) pairs.
    - `exact=False` (STA): the same rule on the grid of tiles, with the window rounded up to whole tiles
      (ceil(window / tile) tiles per axis): a query tile keeps the key tiles of its tile window; stride and dilation
      must be 1 (every query of a tile already shares its window: STA is NA with stride = tile, as GNA notes). On
      layouts whose sizes are multiples of the tile, each query tile keeps exactly prod(window tiles) tiles, so the
      density is prod(window tiles / tiles per axis), and for odd tile windows the mask is STA's. A border block that
      mixes short tiles keeps every key block any of its tiles keeps (whole: no masking inside).
    """
    config = NeighborhoodConfig(window=window, stride=stride, dilation=dilation, tile=tile, exact=exact)  # checks
    window, stride, dilation, tile = config.window, config.stride, config.dilation, config.tile
    block_size = math.prod(tile)

    sizes = (layout.frames, layout.height, layout.width)
    if exact:
        axes = [_axis_windows(n, k, s, d) for n, k, s, d in zip(sizes, window, stride, dilation)]
    else:
        axes = [_tile_axis_windows(n, k, t) for n, k, t in zip(sizes, window, tile)]
    relations = [_relation(lo, hi, step) for lo, hi, step in axes]  # per axis (n, n) bool: y allowed for x

    permutation, coords = tiled_order(layout, tile)  # coords (S, 3) of the blocked order
    pieces = _pieces(layout, tile, coords)
    allowed_pairs = _block_pair_counts(pieces, relations, math.ceil(layout.video_len / block_size))  # (n, n) int64
    block_tokens = torch.bincount(torch.arange(layout.video_len) // block_size).long()  # (n_blocks,)
    kept = allowed_pairs > 0
    partial = kept & (allowed_pairs < block_tokens[:, None] * block_tokens[None, :])

    boxes = None
    if exact and bool(partial.any()):
        lo = torch.stack([axes[a][0][coords[:, a]] for a in range(3)], dim=1).int()  # (S, 3)
        hi = torch.stack([axes[a][1][coords[:, a]] for a in range(3)], dim=1).int()
        boxes = TokenBoxes(lo.contiguous(), hi.contiguous(), coords.int().contiguous(), tuple(a[2] for a in axes))
    return BlockMask.from_block_dense(
        kept, layout.video_len, block_size, permutation=permutation,
        block_partial=partial if boxes is not None else None, token_boxes=boxes,
    )


def build_neighborhood(layout: VideoLayout, config: NeighborhoodConfig, q=None, k=None, state=None, device="cpu",
                       layer=None) -> BlockMask:
    """`neighborhood` with `config`'s options, on `device`."""
    return neighborhood(
        layout, window=config.window, stride=config.stride, dilation=config.dilation, tile=config.tile,
        exact=config.exact,
    ).to(device)


def effective_window(layout: VideoLayout, window, stride=(1, 1, 1), dilation=(1, 1, 1)) -> tuple[tuple, tuple, tuple]:
    """(window, stride, dilation) as applied on `layout`: clamped per axis as `neighborhood` documents."""
    sizes = (layout.frames, layout.height, layout.width)
    clamped = [_clamp(n, k, s, d) for n, k, s, d in zip(sizes, window, stride, dilation)]
    return tuple(c[0] for c in clamped), tuple(c[1] for c in clamped), tuple(c[2] for c in clamped)


def tiled_order(layout: VideoLayout, tile: tuple[int, int, int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The blocked token order: whole tiles first (tile-major), then the short border tiles' tokens (tile-major).

    Returns (permutation (video_len,) int64, or None when it is the natural order; coords (video_len, 3) int64: the
    (frame, row, column) of each position of the blocked order).
    """
    perm = layout.tile_permutation(tile)
    frame, rest = perm // layout.tokens_per_frame, perm % layout.tokens_per_frame
    coords = torch.stack([frame, rest // layout.width, rest % layout.width], dim=1)  # (S, 3)
    whole_tiles = torch.tensor([layout.frames // tile[0], layout.height // tile[1], layout.width // tile[2]])
    in_whole_tile = ((coords // torch.tensor(tile)) < whole_tiles).all(dim=1)
    order = torch.sort((~in_whole_tile).to(torch.int8), stable=True).indices
    perm, coords = perm[order], coords[order]
    if torch.equal(perm, torch.arange(layout.video_len)):
        return None, coords
    return perm, coords


# ---- per-axis windows -----------------------------------------------------------------------------------------------


def _clamp(n: int, window: int, stride: int, dilation: int) -> tuple[int, int, int]:
    dilation = min(dilation, n)
    window = max(1, min(window, n // dilation))
    return window, min(stride, window), dilation


def _axis_windows(n: int, window: int, stride: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """NATTEN's window on one axis of n tokens: per coordinate x, keys y with lo[x] <= y < hi[x] and
    (y - lo[x]) % step == 0; returns (lo (n,) int64, hi (n,) int64, step)."""
    k, s, d = _clamp(n, window, stride, dilation)
    x = torch.arange(n)
    group, index = x % d, x // d
    group_len = (n - group + d - 1) // d  # members of x's dilation group
    leader = torch.minimum((index // s) * s + s // 2, group_len - 1)
    start = torch.minimum((leader - k // 2).clamp(min=0), group_len - k)  # the window, shifted inside the group
    lo = start * d + group
    return lo, lo + (k - 1) * d + 1, d


def _tile_axis_windows(n: int, window: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """STA on one axis: NATTEN's window over the ceil(n / tile) tiles, ceil(window / tile) tiles wide, in tokens."""
    n_tiles = math.ceil(n / tile)
    tile_lo, tile_hi, _ = _axis_windows(n_tiles, math.ceil(min(window, n) / tile), 1, 1)
    x_tile = torch.arange(n) // tile
    return tile_lo[x_tile] * tile, (tile_hi[x_tile] * tile).clamp(max=n), 1


def _relation(lo: torch.Tensor, hi: torch.Tensor, step: int) -> torch.Tensor:
    """Bool (n, n): [x, y] is True when key coordinate y is in coordinate x's window."""
    y = torch.arange(lo.shape[0])[None, :]
    return (y >= lo[:, None]) & (y < hi[:, None]) & ((y - lo[:, None]) % step == 0)


# ---- block-pair counts ----------------------------------------------------------------------------------------------


def _pieces(layout: VideoLayout, tile: tuple[int, int, int], coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocked order cut into boxes that never cross a block: each whole tile (one block) is one box; the border
    tokens after them are cut into runs along a row. Returns (block (P,) int64, bounds (P, 3, 2) int64 [start, end))."""
    block_size = math.prod(tile)
    whole = [n // t for n, t in zip((layout.frames, layout.height, layout.width), tile)]
    n_whole = math.prod(whole)
    i = torch.arange(n_whole)
    tile_coords = torch.stack([i // (whole[1] * whole[2]), (i // whole[2]) % whole[1], i % whole[2]], dim=1)
    size = torch.tensor(tile)
    whole_bounds = torch.stack([tile_coords * size, (tile_coords + 1) * size], dim=2)  # (n_whole, 3, 2)

    # Border tokens: a new run starts at a block boundary, a new (frame, row), or a column that does not follow.
    start = n_whole * block_size
    rest = coords[start:]
    position = torch.arange(start, layout.video_len)
    block = position // block_size
    new = torch.ones(rest.shape[0], dtype=torch.bool)
    if rest.shape[0] > 1:
        new[1:] = (
            (block[1:] != block[:-1])
            | (rest[1:, :2] != rest[:-1, :2]).any(dim=1)
            | (rest[1:, 2] != rest[:-1, 2] + 1)
        )
    first = torch.nonzero(new).flatten()
    last = torch.cat([first[1:], torch.tensor([rest.shape[0]])])[: first.shape[0]] - 1
    row_bounds = torch.stack(
        [
            torch.stack([rest[first, 0], rest[first, 0] + 1], dim=1),
            torch.stack([rest[first, 1], rest[first, 1] + 1], dim=1),
            torch.stack([rest[first, 2], rest[last, 2] + 1], dim=1),
        ],
        dim=1,
    )  # (R, 3, 2)
    return torch.cat([i, block[first]]), torch.cat([whole_bounds, row_bounds])


def _block_pair_counts(pieces, relations, n_blocks: int) -> torch.Tensor:
    """Int64 (n_blocks, n_blocks): how many (query, key) pairs of each block pair the per-axis relations allow.

    A pair is allowed when every axis allows it, so for two boxes the count is the product over axes of the 1D counts,
    each a rectangle sum of the axis relation (from its 2D prefix sums); a block pair sums its boxes' pairs."""
    block, bounds = pieces  # (P,), (P, 3, 2)
    prefix = []
    for relation in relations:
        n = relation.shape[0]
        table = torch.zeros(n + 1, n + 1, dtype=torch.int64)
        table[1:, 1:] = relation.long().cumsum(0).cumsum(1)
        prefix.append(table)
    counts = torch.zeros(n_blocks, n_blocks, dtype=torch.int64)
    n_pieces = block.shape[0]
    chunk = max(1, _PAIRS_PER_CHUNK // n_pieces)
    for begin in range(0, n_pieces, chunk):
        q = slice(begin, begin + chunk)
        pairs = None
        for axis, table in enumerate(prefix):
            qs, qe = bounds[q, axis, 0, None], bounds[q, axis, 1, None]  # (p, 1)
            ks, ke = bounds[None, :, axis, 0], bounds[None, :, axis, 1]  # (1, P)
            axis_pairs = table[qe, ke] - table[qs, ke] - table[qe, ks] + table[qs, ks]  # (p, P)
            pairs = axis_pairs if pairs is None else pairs * axis_pairs
        per_key_block = torch.zeros(pairs.shape[0], n_blocks, dtype=torch.int64).index_add_(1, block, pairs)
        counts.index_add_(0, block[q], per_key_block)
    return counts
