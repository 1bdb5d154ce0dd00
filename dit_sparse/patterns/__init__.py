"""Sparsity patterns: pure functions `(layout, config, q=None, k=None, state=None) -> BlockMask`.

`PATTERNS` maps a method name to its builder; static patterns ignore q, k and state.
"""

from __future__ import annotations

from typing import Callable

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import DenseConfig, MethodConfig, NeighborhoodConfig, RadialConfig, RandomBlocksConfig
from dit_sparse.layout import VideoLayout

from .neighborhood import neighborhood
from .radial import radial
from .random_blocks import random_blocks

PatternBuilder = Callable[..., BlockMask]


def _build_dense(layout: VideoLayout, config: DenseConfig, q=None, k=None, state=None, device="cpu") -> BlockMask:
    return BlockMask.full(layout.video_len, config.block_size, device=device)


def _build_radial(layout: VideoLayout, config: RadialConfig, q=None, k=None, state=None, device="cpu") -> BlockMask:
    return radial(
        layout, block_size=config.block_size, decay_factor=config.decay_factor, variant=config.variant
    ).to(device)


def _build_random(
    layout: VideoLayout, config: RandomBlocksConfig, q=None, k=None, state=None, device="cpu"
) -> BlockMask:
    return random_blocks(layout, density=config.density, block_size=config.block_size, seed=config.seed).to(device)


def _build_neighborhood(
    layout: VideoLayout, config: NeighborhoodConfig, q=None, k=None, state=None, device="cpu"
) -> BlockMask:
    return neighborhood(
        layout, window=config.window, stride=config.stride, dilation=config.dilation, tile=config.tile,
        exact=config.exact,
    ).to(device)


#: method name -> (builder, whether the mask depends only on the layout and config)
PATTERNS: dict[str, tuple[PatternBuilder, bool]] = {
    "dense": (_build_dense, True),
    "radial": (_build_radial, True),
    "random": (_build_random, True),
    "neighborhood": (_build_neighborhood, True),
}


def build_mask(layout: VideoLayout, config: MethodConfig, q=None, k=None, state=None, device="cpu") -> BlockMask:
    """The mask of `config`'s method for `layout`."""
    builder, _ = PATTERNS[config.method]
    return builder(layout, config, q=q, k=k, state=state, device=device)


def is_static(config: MethodConfig) -> bool:
    return PATTERNS[config.method][1]


__all__ = ["neighborhood", "radial", "random_blocks", "build_mask", "is_static", "PATTERNS"]
