"""Dense attention through the sparse path: the full block mask, the control every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import MethodConfig, check_block_size
from dit_sparse.layout import VideoLayout


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """Dense attention through the sparse path (a full block mask): the control every method is measured against."""

    method: ClassVar[str] = "dense"
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        check_block_size(type(self).__name__, "block_size", self.block_size)


def build_dense(layout: VideoLayout, config: DenseConfig, q=None, k=None, state=None, device="cpu",
                layer=None) -> BlockMask:
    """Every block of `layout`'s video tokens."""
    return BlockMask.full(layout.video_len, config.block_size, device=device)
