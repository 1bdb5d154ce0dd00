"""Sparsity patterns: one module per pattern, owning its config (a `MethodConfig` with a `method` name) and its pure
builder `(layout, config, q=None, k=None, state=None, device="cpu", layer=None) -> BlockMask`; here the one registry.

`PATTERNS` maps a config type to its `Pattern`: the builder and what the mask depends on beyond the config:
`"layout"` (static: q, k, state and layer ignored), `"layer"` (`vdit`: the hooked `layer` too, one pattern per head
from a profile) or `"qk"` (dynamic: `draft`, `reorder` read q, k (B, H, S, D) of the call (video tokens at
`layout.video_slice`), the `layer` (per-layer profile entries) and `state`, a dict the session keeps per attention
site between refreshes (k-means centroids)). `CONFIGS` (method name -> config type, the string form `make_config`
takes) is built from it. A new pattern is its module plus one line in `PATTERNS`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import MethodConfig
from dit_sparse.layout import VideoLayout

from .dense import DenseConfig, build_dense
from .draft import DraftConfig, build_draft, draft
from .neighborhood import NeighborhoodConfig, build_neighborhood, neighborhood
from .radial import RadialConfig, build_radial, radial
from .random_blocks import RandomBlocksConfig, build_random, random_blocks
from .reorder import ReorderConfig, build_reorder, reorder_axes, reorder_cluster
from .vdit import VditConfig, build_vdit, vdit_mask

PatternBuilder = Callable[..., BlockMask]


class Pattern(NamedTuple):
    """A registered pattern: its builder and what its mask depends on beyond the config ("layout", "layer", "qk")."""

    build: PatternBuilder
    depends_on: str


#: config type -> its pattern; a subclass of a registered config is built as its registered base
PATTERNS: dict[type[MethodConfig], Pattern] = {
    DenseConfig: Pattern(build_dense, "layout"),
    RadialConfig: Pattern(build_radial, "layout"),
    RandomBlocksConfig: Pattern(build_random, "layout"),
    NeighborhoodConfig: Pattern(build_neighborhood, "layout"),
    DraftConfig: Pattern(build_draft, "qk"),
    ReorderConfig: Pattern(build_reorder, "qk"),
    VditConfig: Pattern(build_vdit, "layer"),
}

#: method name -> config type (the string form of `make_config` and `sparsify`)
CONFIGS: dict[str, type[MethodConfig]] = {cls.method: cls for cls in PATTERNS}


def _pattern(config: MethodConfig) -> Pattern:
    """The registered pattern of `config`'s type (or of its nearest registered base)."""
    for cls in type(config).__mro__:
        if cls in PATTERNS:
            return PATTERNS[cls]
    raise TypeError(f"{type(config).__name__} is not a registered pattern config; allowed: "
                    f"{[cls.__name__ for cls in PATTERNS]} (or a subclass of one)")


def make_config(method_or_config: str | MethodConfig, **overrides) -> MethodConfig:
    """A validated config from a method name (its defaults) or a config, with keyword overrides applied."""
    if isinstance(method_or_config, MethodConfig):
        _pattern(method_or_config)
        base_cls, base = type(method_or_config), method_or_config
    elif isinstance(method_or_config, str):
        if method_or_config not in CONFIGS:
            raise ValueError(f"unknown method {method_or_config!r}; allowed: {sorted(CONFIGS)}")
        base_cls, base = CONFIGS[method_or_config], None
    else:
        raise TypeError(
            f"method must be a method name {sorted(CONFIGS)} or a MethodConfig, got {type(method_or_config).__name__}"
        )
    allowed = {f.name for f in dataclasses.fields(base_cls)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {base_cls.method!r}; allowed: {sorted(allowed)}")
    return dataclasses.replace(base, **overrides) if base is not None else base_cls(**overrides)


def build_mask(layout: VideoLayout, config: MethodConfig, q=None, k=None, state=None, device="cpu",
               layer: int | None = None) -> BlockMask:
    """The mask of `config`'s method for `layout`; per-layer methods also read `layer`, dynamic ones q, k
    (B, H, S, D), `layer` and `state`."""
    return _pattern(config).build(layout, config, q=q, k=k, state=state, device=device, layer=layer)


def is_static(config: MethodConfig) -> bool:
    """Whether the mask depends on the layout only (one mask per forward, built before it)."""
    return _pattern(config).depends_on == "layout"


def is_per_layer(config: MethodConfig) -> bool:
    """Whether the mask depends on the layout and the hooked layer only (one per layer, built once, no q, k)."""
    return _pattern(config).depends_on == "layer"


__all__ = ["CONFIGS", "PATTERNS", "DenseConfig", "DraftConfig", "NeighborhoodConfig", "Pattern", "RadialConfig",
           "RandomBlocksConfig", "ReorderConfig", "VditConfig", "build_mask", "draft", "is_per_layer", "is_static",
           "make_config", "neighborhood", "radial", "random_blocks", "reorder_axes", "reorder_cluster", "vdit_mask"]
