"""Random kept blocks at a target density: the control that separates a pattern's choice of blocks from its density."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import MethodConfig, check_block_size, check_fraction, check_int
from dit_sparse.layout import VideoLayout


@dataclass(frozen=True)
class RandomBlocksConfig(MethodConfig):
    """Random kept key blocks at a given density (the diagonal always kept): a control for ablations and benchmarks."""

    method: ClassVar[str] = "random"
    density: float = 0.25
    block_size: int = 128
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        check_block_size(owner, "block_size", self.block_size)
        check_fraction(owner, "density", self.density)
        check_int(owner, "seed", self.seed, 0)


def random_blocks(layout: VideoLayout, *, density: float = 0.25, block_size: int = 128, seed: int = 0) -> BlockMask:
    """Each query block keeps its diagonal block plus uniformly drawn key blocks, `round(density * n_blocks)` in all.

    Deterministic in `seed`. Used as the random-mask control of SpargeAttn / VSA-style kernel benchmarks.
    """
    check_fraction(None, "density", density)
    n = math.ceil(layout.video_len / block_size)
    keep = max(1, min(n, round(density * n)))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n, generator=generator)
    scores.fill_diagonal_(2.0)  # the diagonal always wins
    top = scores.topk(keep, dim=-1).indices
    block_dense = torch.zeros(n, n, dtype=torch.bool).scatter_(-1, top, True)
    return BlockMask.from_block_dense(block_dense, layout.video_len, block_size)


def build_random(layout: VideoLayout, config: RandomBlocksConfig, q=None, k=None, state=None, device="cpu",
                 layer=None) -> BlockMask:
    """`random_blocks` with `config`'s options, on `device`."""
    return random_blocks(layout, density=config.density, block_size=config.block_size, seed=config.seed).to(device)
