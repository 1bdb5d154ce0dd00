"""Random kept blocks at a target density: the control that separates a pattern's choice of blocks from its density."""

from __future__ import annotations

import math

import torch

from dit_sparse.blockmask import BlockMask
from dit_sparse.layout import VideoLayout


def random_blocks(layout: VideoLayout, *, density: float = 0.25, block_size: int = 128, seed: int = 0) -> BlockMask:
    """Each query block keeps its diagonal block plus uniformly drawn key blocks, `round(density * n_blocks)` in all.

    Deterministic in `seed`. Used as the random-mask control of SpargeAttn / VSA-style kernel benchmarks.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    n = math.ceil(layout.video_len / block_size)
    keep = max(1, min(n, round(density * n)))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, n, generator=generator)
    scores.fill_diagonal_(2.0)  # the diagonal always wins
    top = scores.topk(keep, dim=-1).indices
    block_dense = torch.zeros(n, n, dtype=torch.bool).scatter_(-1, top, True)
    return BlockMask.from_block_dense(block_dense, layout.video_len, block_size)
