"""DraftAttention: key tiles chosen per head from a low-resolution (tile-pooled) attention map."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import DynamicConfig, check_tile
from dit_sparse.layout import VideoLayout

from .estimate import block_attention_mass, density_for_recall, draft_map, keep_counts, top_blocks, video_qk
from .neighborhood import tiled_order


@dataclass(frozen=True)
class DraftConfig(DynamicConfig):
    """DraftAttention (Shen et al., 2025): per head, the attention of q and k average-pooled over 3D tiles (the
    low-resolution draft) picks the key tiles each query tile keeps; tokens are reordered so a tile is a block.

    - `tile`: (frames, rows, columns) of one tile = one kernel block; prod(tile) a power of two >= 16.
    """

    method: ClassVar[str] = "draft"
    tile: tuple[int, int, int] = (1, 8, 16)

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        object.__setattr__(self, "tile", check_tile(owner, "tile", self.tile))

    @property
    def block_size(self) -> int:
        return self.tile[0] * self.tile[1] * self.tile[2]


@functools.lru_cache(maxsize=16)
def tile_order(layout: VideoLayout, tile: tuple[int, int, int]) -> torch.Tensor | None:
    """The blocked order of `tile` over `layout` (`neighborhood.tiled_order`: whole tiles first, one block each),
    (video_len,) int64 on the CPU, or None for the natural order. Memoised: a pure function of its arguments."""
    return tiled_order(layout, tile)[0]


@functools.lru_cache(maxsize=16)
def _tile_order_on(layout: VideoLayout, tile: tuple[int, int, int], device: torch.device) -> torch.Tensor | None:
    """`tile_order` on `device`, copied there once (memoised: no host-to-device copy per estimate)."""
    perm = tile_order(layout, tile)
    return None if perm is None else perm.to(device)


def _tile_map(layout: VideoLayout, q: torch.Tensor, k: torch.Tensor, tile) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(the tile order on q's device or None, the draft map (B, H, n, n))."""
    perm = _tile_order_on(layout, tuple(tile), q.device)
    return perm, draft_map(q, k, math.prod(tile), None if perm is None else perm.view(1, 1, -1))


def draft(
    layout: VideoLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    density: float | Sequence[float] = 0.25,
    tile: tuple[int, int, int] = (1, 8, 16),
    top_p: float | None = None,
) -> BlockMask:
    """The DraftAttention block mask of q, k (B, H, video_len, D) over `layout`'s video tokens, per batch and head.

    Shen et al., 2025, "DraftAttention: Fast Video Diffusion via Low-Resolution Attention Guidance" (arXiv
    2505.14708; github.com/shawnricecake/draft-attention, `draft_attention.py`). q and k are average-pooled over
    3D tiles (the official code pools 8 x 16 patches of each frame: `tile=(1, 8, 16)`), the draft attention map
    softmax(q_pool k_pool^T / sqrt(D)) is computed per head, and each query tile keeps its `round(density * n)`
    highest-scoring key tiles (`density` one value, or one per head). The official code keeps the top `density`
    share of the whole map per head; keeping per row serves every query tile and hits `density` exactly. `top_p`:
    keep only the fewest of those reaching `top_p` of the row's draft mass. Tokens are reordered tile by tile
    (`tiled_order`, the official `reorg_idx`), so each kept tile is one contiguous kernel block.
    """
    perm, probs = _tile_map(layout, q, k, tile)  # probs (B, H, n, n)
    densities = [density] * q.shape[1] if isinstance(density, (int, float)) else list(density)
    indices, counts = top_blocks(probs, keep_counts(densities, probs.shape[-1]), top_p)
    block = math.prod(tile)
    return BlockMask(indices, counts, layout.video_len, block, block, permutation=perm, rows_all_kept=True)


def build_draft(layout: VideoLayout, config: DraftConfig, q=None, k=None, state=None, device="cpu",
                layer=None) -> BlockMask:
    """`draft` of the call's video q, k with `config`'s options (`layer`: its per-head densities)."""
    q, k = video_qk(layout, q, k, config.method)
    return draft(layout, q, k, density=config.densities(layer, q.shape[1]), tile=config.tile, top_p=config.top_p)


def draft_calibration(layout: VideoLayout, q: torch.Tensor, k: torch.Tensor, *, tile, target_recall: float,
                      **_) -> list[dict]:
    """Per head: {"density"}, the density at which the draft's top-k keeps `target_recall` of the exact attention
    mass of q, k (B, H, video_len, D)."""
    perm, probs = _tile_map(layout, q, k, tile)
    block = math.prod(tile)
    order = None if perm is None else perm.view(1, 1, -1)
    mass = block_attention_mass(q, k, block, block, order, order)
    return [{"density": float(d)} for d in density_for_recall(mass, probs, target_recall)]
