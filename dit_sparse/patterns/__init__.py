"""Sparsity patterns: pure functions `(layout, config, q=None, k=None, state=None, device, layer=None) -> BlockMask`.

`PATTERNS` maps a method name to its builder and what its mask depends on beyond the config: `"layout"` (static:
q, k, state and layer ignored), `"layer"` (`vdit`: the hooked `layer` too, one pattern per head from a profile) or
`"qk"` (dynamic: `draft`, `reorder` read q, k (B, H, S, D) of the call (video tokens at `layout.video_slice`), the
`layer` (per-layer profile entries) and `state`, a dict the session keeps per attention site between refreshes
(k-means centroids)).
"""

from __future__ import annotations

from typing import Callable

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import (
    DenseConfig,
    DraftConfig,
    MethodConfig,
    NeighborhoodConfig,
    RadialConfig,
    RandomBlocksConfig,
    ReorderConfig,
    VditConfig,
)
from dit_sparse.layout import VideoLayout

from .draft import draft
from .neighborhood import neighborhood
from .radial import radial
from .random_blocks import random_blocks
from .reorder import reorder_axes, reorder_cluster
from .vdit import vdit_mask

PatternBuilder = Callable[..., BlockMask]


def _build_dense(layout: VideoLayout, config: DenseConfig, q=None, k=None, state=None, device="cpu",
                 layer=None) -> BlockMask:
    return BlockMask.full(layout.video_len, config.block_size, device=device)


def _build_radial(layout: VideoLayout, config: RadialConfig, q=None, k=None, state=None, device="cpu",
                  layer=None) -> BlockMask:
    return radial(
        layout, block_size=config.block_size, decay_factor=config.decay_factor, variant=config.variant
    ).to(device)


def _build_random(
    layout: VideoLayout, config: RandomBlocksConfig, q=None, k=None, state=None, device="cpu", layer=None
) -> BlockMask:
    return random_blocks(layout, density=config.density, block_size=config.block_size, seed=config.seed).to(device)


def _build_neighborhood(
    layout: VideoLayout, config: NeighborhoodConfig, q=None, k=None, state=None, device="cpu", layer=None
) -> BlockMask:
    return neighborhood(
        layout, window=config.window, stride=config.stride, dilation=config.dilation, tile=config.tile,
        exact=config.exact,
    ).to(device)


def _video_qk(layout: VideoLayout, q, k, method: str):
    if q is None or k is None:
        raise ValueError(f"method {method!r} estimates its mask from q and k; build_mask needs both")
    video = layout.video_slice
    return q[:, :, video], k[:, :, video]  # (B, H, video_len, D)


def _build_draft(layout: VideoLayout, config: DraftConfig, q=None, k=None, state=None, device="cpu",
                 layer=None) -> BlockMask:
    q, k = _video_qk(layout, q, k, config.method)
    return draft(layout, q, k, density=config.densities(layer, q.shape[1]), tile=config.tile, top_p=config.top_p)


def _build_reorder(layout: VideoLayout, config: ReorderConfig, q=None, k=None, state=None, device="cpu",
                   layer=None) -> BlockMask:
    q, k = _video_qk(layout, q, k, config.method)
    heads = q.shape[1]
    options = dict(density=config.densities(layer, heads), block_size=config.block_size, top_p=config.top_p)
    if config.strategy == "axes":
        return reorder_axes(layout, q, k, axes=config.head_axes(layer, heads), **options)
    mask, centroids = reorder_cluster(layout, q, k, clusters=config.clusters, kmeans_iters=config.kmeans_iters,
                                      state=state, **options)
    if state is not None:
        state.update(centroids)  # the session's per-site dict: warm starts for the next refresh
    return mask


def _build_vdit(layout: VideoLayout, config: VditConfig, q=None, k=None, state=None, device="cpu",
                layer=None) -> BlockMask:
    return vdit_mask(layout, config.head_patterns(layer), config.block_size, config.tile).to(device)


#: method name -> (builder, what the mask depends on beyond the config: "layout", "layer" or "qk")
PATTERNS: dict[str, tuple[PatternBuilder, str]] = {
    "dense": (_build_dense, "layout"),
    "radial": (_build_radial, "layout"),
    "random": (_build_random, "layout"),
    "neighborhood": (_build_neighborhood, "layout"),
    "draft": (_build_draft, "qk"),
    "reorder": (_build_reorder, "qk"),
    "vdit": (_build_vdit, "layer"),
}


def build_mask(layout: VideoLayout, config: MethodConfig, q=None, k=None, state=None, device="cpu",
               layer: int | None = None) -> BlockMask:
    """The mask of `config`'s method for `layout`; per-layer methods also read `layer`, dynamic ones q, k
    (B, H, S, D), `layer` and `state`."""
    builder, _ = PATTERNS[config.method]
    return builder(layout, config, q=q, k=k, state=state, device=device, layer=layer)


def is_static(config: MethodConfig) -> bool:
    """Whether the mask depends on the layout only (one mask per forward, built before it)."""
    return PATTERNS[config.method][1] == "layout"


def is_per_layer(config: MethodConfig) -> bool:
    """Whether the mask depends on the layout and the hooked layer only (one per layer, built once, no q, k)."""
    return PATTERNS[config.method][1] == "layer"


__all__ = ["draft", "neighborhood", "radial", "random_blocks", "reorder_axes", "reorder_cluster", "vdit_mask",
           "build_mask", "is_per_layer", "is_static", "PATTERNS"]
