"""Radial Attention: a static block mask whose spatial window halves each time the frame distance doubles."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import MethodConfig, check_block_size, check_choice, check_positive, choice
from dit_sparse.layout import VideoLayout

# Pairs of (query piece, key piece) evaluated at once: bounds the pair tensors to ~4M int32 each.
_PAIRS_PER_CHUNK = 1 << 22


@dataclass(frozen=True)
class RadialConfig(MethodConfig):
    """Radial Attention (Li et al., 2025): a static mask whose window halves as the frame distance doubles.

    - `block_size`: tokens per block (128 in the official code).
    - `decay_factor`: scales the window; the official default is 1.0 (smaller is sparser).
    - `variant`: the rule of the official `gen_log_mask_shrinked`: `"wan"` (the current official Wan rule, commit
      72788d4 of 2025-11-11 on), `"hunyuan"`, or `"wan-2025-06"` (the earlier Wan rule, from the first release
      3f66894 of 2025-06-25 up to d945317 of 2025-10-30: half the window at frame distance 1).
    """

    method: ClassVar[str] = "radial"
    VARIANTS: ClassVar[tuple[str, ...]] = ("wan", "hunyuan", "wan-2025-06")

    block_size: int = 128
    decay_factor: float = 1.0
    variant: str = choice("wan", VARIANTS)

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_block_size(owner, "block_size", self.block_size)
        check_positive(owner, "decay_factor", self.decay_factor)
        check_choice(owner, "variant", self.variant, self.VARIANTS)


def radial(layout: VideoLayout, *, block_size: int = 128, decay_factor: float = 1.0, variant: str = "wan") -> BlockMask:
    """The Radial Attention block mask over `layout`'s video tokens, shared over batch and heads.

    Li et al., 2025, "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation"
    (arXiv 2506.19852); official code: github.com/mit-han-lab/radial-attention, `radial_attn/attn_mask.py`,
    `gen_log_mask_shrinked`. With s tokens per frame, d = |query frame - key frame|, r, c the tokens' positions in
    their frames, L = 2 ** s.bit_length() (the power of two above s) and g = d.bit_length(), (r, c) is kept when
    - |r - c| <= w(d): w = s at d = 0 and d = 1 (at d = 1, s // 2 for `"wan-2025-06"`); beyond,
      max(L / 2**g * decay_factor, block_size), so the window halves each time d doubles;
    - and, where L / 2**g < block_size, d is a multiple of block_size / (L / 2**g) (far frames are skipped);
    - or, `"wan"` and `"wan-2025-06"` only, the key is in frame 0 (the attention sink).
    Blocks are voted as the official `shrinkMaskStrict` does: each frame owns the ceil(s / block_size) blocks from
    the one it starts in (a frame's tokens past them are left out); per pair of frames owning a (query, key) block,
    a key token is dense when it keeps more than block_size / 3 of the block's rows (other frames' rows count as
    dropped), and the pair keeps the block when over 60% of its key tokens that keep any row are dense. A block is
    kept when any pair keeps it.

    The official code changed its Wan rule at d = 1 from s // 2 to s in commit 72788d4 (2025-11-11): `"wan"` follows
    the current rule, `"wan-2025-06"` the earlier one (commits 3f66894 to d945317); at Wan2.1 480p 81 frames, block
    128, their densities are 0.449 and 0.433 (1,073 of 65,536 blocks differ). `"hunyuan"` is the same at both.
    Equal to the official mask of each commit on its full blocks (tests/test_radial.py against masks the official code
    generated, tests/data/radial_official/: Wan2.1 480p, 21 x 1,560 tokens; HunyuanVideo 720p, 33 x 3,600; block
    128, decay 1.0). Differences:
    - the short tail block (video_len not a multiple of block_size) is kept whole, row and column, as the official
      mask keeps every block from `video_len // block_size` on (there they are ORed with the text region);
    - the diagonal is always kept: the official vote leaves a query block with no key block, so a zero output, when no
      frame owns more than block_size / 3 of its rows (e.g. frames of 255 tokens at block 128);
    - the frame-skip threshold is `block_size`, where the official hard-codes 128 ("equal to block-size").
    `"hunyuan"` has no sink, as in the later official releases (e.g. a5c638bb); early ones (09c88be) gave it one.
    """
    check_choice(None, "variant", variant, RadialConfig.VARIANTS)
    check_block_size(None, "block_size", block_size)
    check_positive(None, "decay_factor", decay_factor)

    seq_len = layout.video_len
    n_blocks = math.ceil(seq_len / block_size)
    n_full = seq_len // block_size
    block_dense = torch.ones(n_blocks, n_blocks, dtype=torch.bool)  # (n_q_blocks, n_kv_blocks)
    block_dense[:n_full, :n_full] = _full_blocks(layout, block_size, float(decay_factor), variant, n_full)
    block_dense.fill_diagonal_(True)
    return BlockMask.from_block_dense(block_dense, seq_len=seq_len, q_block_size=block_size)


def build_radial(layout: VideoLayout, config: RadialConfig, q=None, k=None, state=None, device="cpu",
                 layer=None) -> BlockMask:
    """`radial` with `config`'s options, on `device`."""
    return radial(
        layout, block_size=config.block_size, decay_factor=config.decay_factor, variant=config.variant
    ).to(device)


def _frame_distance_rule(tokens_per_frame: int, frames: int, block_size: int, decay_factor: float, variant: str):
    """Per frame distance d: the window half-width (int64 (frames,)) and whether the frame pair is kept (bool)."""
    s = tokens_per_frame
    widths, kept = [], []
    for d in range(frames):
        if d == 0 or (d == 1 and variant != "wan-2025-06"):
            width = s
        elif d == 1:
            width = s // 2  # the official Wan rule before 72788d4
        else:
            # |r - c| <= w with integer r, c is |r - c| <= floor(w); floor(w) >= block_size iff w >= block_size.
            # A width of s or more keeps the whole frame pair.
            w = 2.0 ** (s.bit_length() - d.bit_length()) * decay_factor
            width = s if w >= s else min(max(math.floor(w), block_size), s)
        decay_length = 2.0 ** (s.bit_length() - d.bit_length())  # the frame skip ignores decay_factor
        widths.append(width)
        kept.append(decay_length >= block_size or d % int(block_size / decay_length) == 0)
    return torch.tensor(widths, dtype=torch.int64), torch.tensor(kept, dtype=torch.bool)


def _full_blocks(layout: VideoLayout, block_size: int, decay_factor: float, variant: str, n_full: int) -> torch.Tensor:
    """Bool (n_full, n_full): the official votes over the blocks that hold block_size video tokens."""
    if n_full == 0:
        return torch.zeros(0, 0, dtype=torch.bool)
    s, frames = layout.tokens_per_frame, layout.frames
    widths, pair_kept = _frame_distance_rule(s, frames, block_size, decay_factor, variant)

    # Pieces: (frame, block) where the block is one of the frame's own blocks; rows [lo, hi) within the frame.
    blocks_per_frame = math.ceil(s / block_size)
    frame_start = torch.arange(frames, dtype=torch.int64) * s  # (F,)
    piece_block = (frame_start // block_size)[:, None] + torch.arange(blocks_per_frame)  # (F, blocks_per_frame)
    piece_frame = torch.arange(frames)[:, None].expand_as(piece_block)
    valid = piece_block < n_full
    piece_block, piece_frame = piece_block[valid], piece_frame[valid]  # (P,)
    first_token = frame_start[piece_frame]
    lo = (piece_block * block_size).clamp(min=first_token) - first_token
    hi = ((piece_block + 1) * block_size).clamp(max=first_token + s) - first_token
    # int32 from here on halves the memory traffic of the (query piece, key piece) tensors.
    lo, hi, piece_frame, widths = lo.int(), hi.int(), piece_frame.int(), widths.int()
    sink = piece_frame == 0  # (P,) key pieces of frame 0

    dense_rows = block_size // 3 + 1  # a key token is dense when it keeps > block_size / 3 query rows
    # A block shared by two frames has a piece in each: index_add_ sums their votes, any vote keeps the block.
    hits = torch.zeros(n_full, n_full, dtype=torch.int32)  # (n_q_blocks, n_kv_blocks) votes
    chunk = max(1, _PAIRS_PER_CHUNK // piece_block.numel())
    for start in range(0, piece_block.numel(), chunk):
        q = slice(start, start + chunk)
        r0, r1 = lo[q, None], hi[q, None]  # (p, 1) query rows of each query piece
        c0, c1 = lo[None, :], hi[None, :]  # (1, P) key columns of each key piece
        distance = (piece_frame[q, None] - piece_frame[None, :]).abs()  # (p, P)
        width = widths[distance]
        nonzero = _columns_keeping_at_least(1, r0, r1, c0, c1, width)
        dense = _columns_keeping_at_least(dense_rows, r0, r1, c0, c1, width)
        keep = pair_kept[distance] & (5 * dense > 3 * nonzero)  # (p, P): more than 60% dense
        if variant != "hunyuan":  # frame 0 is kept whole: every key column keeps all the piece's query rows
            keep[:, sink] = (3 * (r1 - r0) > block_size).expand(-1, int(sink.sum()))
        per_key_block = torch.zeros(keep.shape[0], n_full, dtype=torch.int32).index_add_(1, piece_block, keep.int())
        hits.index_add_(0, piece_block[q], per_key_block)
    return hits > 0


def _columns_keeping_at_least(k: int, r0, r1, c0, c1, width) -> torch.Tensor:
    """How many key positions c in [c0, c1) keep at least k query positions r in [r0, r1) with |r - c| <= width.

    The kept rows of c are [r0, r1) intersected with [c - width, c + width], so the count is >= k exactly when
    r1 - r0 >= k, 2 * width + 1 >= k and c lies in [r0 + k - 1 - width, r1 - k + width].
    """
    first = torch.maximum(c0, r0 + k - 1 - width)
    last = torch.minimum(c1 - 1, r1 - k + width)
    count = (last - first + 1).clamp(min=0)
    return torch.where((r1 - r0 >= k) & (2 * width + 1 >= k), count, 0)
