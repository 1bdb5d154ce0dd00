"""One frozen config per sparsity method, validated on construction; `make_config` maps names and overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from dit_sparse import kernels

#: Allowed values of every method's `backend`: "auto" plus the kernel registry's names.
BACKENDS = ("auto",) + kernels.BACKENDS


def _choice(default: str, choices: tuple[str, ...]):
    """A field whose value is one of `choices`, listed in its metadata (`metadata["choices"]`) for UIs to offer."""
    return dataclasses.field(default=default, metadata={"choices": choices})


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def _check_block_size(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
        raise ValueError(f"{owner}.{name} must be a power of two >= 16, got {value!r}")


@dataclass(frozen=True)
class MethodConfig:
    """Options every method shares.

    - `dense_steps`: the first N denoising steps run dense (the official Radial Attention runs 12 of 50 dense).
    - `dense_layers`: the first M transformer blocks run dense (the official Radial Attention keeps 1).
    - `backend`: kernel backend, one of `BACKENDS`; `"auto"` picks the fastest one available.

    A field with a fixed set of allowed values lists them in its metadata, `metadata["choices"]` (the app offers them).
    """

    method: ClassVar[str] = ""
    dense_steps: int = 0
    dense_layers: int = 0
    backend: str = _choice("auto", BACKENDS)

    def __post_init__(self):
        owner = type(self).__name__
        _check_int(owner, "dense_steps", self.dense_steps, 0)
        _check_int(owner, "dense_layers", self.dense_layers, 0)
        if self.backend not in BACKENDS:
            raise ValueError(f"{owner}.backend must be one of {BACKENDS}, got {self.backend!r}")

    def options(self) -> dict:
        """The config as plain keyword arguments (for manifests and `make_config`)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """Dense attention through the sparse path (a full block mask): the control every method is measured against."""

    method: ClassVar[str] = "dense"
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        _check_block_size(type(self).__name__, "block_size", self.block_size)


@dataclass(frozen=True)
class RadialConfig(MethodConfig):
    """Radial Attention (Li et al., 2025): a static mask whose window halves as the frame distance doubles.

    - `block_size`: tokens per block (128 in the official code).
    - `decay_factor`: scales the window; the official default is 1.0 (smaller is sparser).
    - `variant`: `"wan"` or `"hunyuan"`, the two rules of the official `gen_log_mask_shrinked`.
    """

    method: ClassVar[str] = "radial"
    VARIANTS: ClassVar[tuple[str, ...]] = ("wan", "hunyuan")

    block_size: int = 128
    decay_factor: float = 1.0
    variant: str = _choice("wan", VARIANTS)

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        _check_block_size(owner, "block_size", self.block_size)
        if not isinstance(self.decay_factor, (int, float)) or isinstance(self.decay_factor, bool) or not (
            self.decay_factor > 0
        ):
            raise ValueError(f"{owner}.decay_factor must be a number > 0, got {self.decay_factor!r}")
        if self.variant not in self.VARIANTS:
            raise ValueError(f"{owner}.variant must be one of {self.VARIANTS}, got {self.variant!r}")


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
        _check_block_size(owner, "block_size", self.block_size)
        if not isinstance(self.density, (int, float)) or isinstance(self.density, bool) or not (
            0 < self.density <= 1
        ):
            raise ValueError(f"{owner}.density must be in (0, 1], got {self.density!r}")
        _check_int(owner, "seed", self.seed, 0)


def _check_triple(owner: str, name: str, value) -> tuple[int, int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in value)
    ):
        raise ValueError(f"{owner}.{name} must be three positive ints (frames, rows, columns), got {value!r}")
    return tuple(value)


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
        for name in ("window", "stride", "dilation", "tile"):
            object.__setattr__(self, name, _check_triple(owner, name, getattr(self, name)))
        tokens = self.tile[0] * self.tile[1] * self.tile[2]
        if tokens < 16 or tokens & (tokens - 1):
            raise ValueError(f"{owner}.tile {self.tile} holds {tokens} tokens; it must hold a power of two >= 16")
        if any(s > k for s, k in zip(self.stride, self.window)):
            raise ValueError(f"{owner}.stride {self.stride} must not exceed window {self.window} on any axis")
        if not isinstance(self.exact, bool):
            raise ValueError(f"{owner}.exact must be a bool, got {self.exact!r}")
        if not self.exact and (self.stride != (1, 1, 1) or self.dilation != (1, 1, 1)):
            raise ValueError(
                f"{owner}: stride {self.stride} and dilation {self.dilation} need exact=True; the tile-aligned "
                "variant (exact=False) shares one window per tile and takes stride and dilation (1, 1, 1)"
            )


def _check_fraction(owner: str, name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value <= 1):
        raise ValueError(f"{owner}.{name} must be in (0, 1], got {value!r}")


def _per_layer_heads(owner: str, name: str, value, check) -> tuple[tuple, ...] | None:
    """None, or one tuple per hooked layer of one value per head (profiles give them), each passing `check`."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or not value or any(
        not isinstance(layer, (tuple, list)) or not layer for layer in value
    ):
        raise ValueError(f"{owner}.{name} must be one non-empty sequence per layer of one value per head, got "
                         f"{value!r:.200}")
    for layer in value:
        for item in layer:
            check(item)
    return tuple(tuple(layer) for layer in value)


@dataclass(frozen=True)
class DynamicConfig(MethodConfig):
    """Options of the methods that read q and k (`draft`, `reorder`): the mask is estimated in the attention call.

    - `density`: kept fraction of key blocks per query block (top-k of the estimate per row, at least one block).
    - `top_p`: None, or keep only the fewest of those top-k blocks whose estimated mass reaches `top_p` of the row
      (fewer blocks where the attention is concentrated; `density` stays the cap).
    - `refresh`: step caching (AdaSpa; Sparse-vDiT): an int N re-estimates the mask every N denoising steps and reuses
      it in between; a tuple of step indices re-estimates at those steps only (and at the first sparse call).
    - `layer_density`: per hooked layer, one density per head (from a calibration profile); None: `density` for all.
    """

    density: float = 0.25
    top_p: float | None = None
    refresh: int | tuple[int, ...] = 1
    layer_density: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        _check_fraction(owner, "density", self.density)
        if self.top_p is not None:
            _check_fraction(owner, "top_p", self.top_p)
        if isinstance(self.refresh, (tuple, list)):
            steps = self.refresh
            if not steps or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in steps):
                raise ValueError(f"{owner}.refresh must be an int >= 1 (a period in steps) or a non-empty tuple of "
                                 f"step indices >= 0, got {self.refresh!r}")
            object.__setattr__(self, "refresh", tuple(sorted(set(steps))))
        elif not isinstance(self.refresh, int) or isinstance(self.refresh, bool) or self.refresh < 1:
            raise ValueError(f"{owner}.refresh must be an int >= 1 (a period in steps) or a non-empty tuple of step "
                             f"indices >= 0, got {self.refresh!r}")
        object.__setattr__(self, "layer_density", _per_layer_heads(
            owner, "layer_density", self.layer_density, lambda d: _check_fraction(owner, "layer_density entry", d)))

    def refreshes_at(self, step: int, last_step: int | None) -> bool:
        """Whether the mask estimated at `last_step` (None: none yet) is re-estimated at `step`."""
        if last_step is None or step < last_step:  # nothing cached, or a new generation started
            return True
        if isinstance(self.refresh, tuple):
            return step in self.refresh and step != last_step
        return step - last_step >= self.refresh

    def densities(self, layer: int | None, heads: int) -> tuple[float, ...]:
        """The density of each head of `layer`: `layer_density[layer]`, else `density` for every head."""
        if self.layer_density is None or layer is None:
            return (self.density,) * heads
        if not 0 <= layer < len(self.layer_density):
            raise ValueError(f"{type(self).__name__}.layer_density covers {len(self.layer_density)} layers; layer "
                             f"{layer} has none (a profile for another model?)")
        row = self.layer_density[layer]
        if len(row) != heads:
            raise ValueError(f"{type(self).__name__}.layer_density[{layer}] has {len(row)} heads; the call has {heads}")
        return row


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
        object.__setattr__(self, "tile", _check_triple(owner, "tile", self.tile))
        tokens = self.tile[0] * self.tile[1] * self.tile[2]
        if tokens < 16 or tokens & (tokens - 1):
            raise ValueError(f"{owner}.tile {self.tile} holds {tokens} tokens; it must hold a power of two >= 16")

    @property
    def block_size(self) -> int:
        return self.tile[0] * self.tile[1] * self.tile[2]


#: the orders of the (frame, row, column) axes a `reorder` head may take, slowest axis first ("fhw" is natural)
AXIS_ORDERS = ("fhw", "fwh", "hfw", "hwf", "wfh", "whf")


@dataclass(frozen=True)
class ReorderConfig(DynamicConfig):
    """Per-head token reordering that gathers a head's scattered pattern into dense blocks, then block selection.

    - `strategy="axes"` (PAROAttention, Zhao et al., 2025): each head orders tokens by one of `AXIS_ORDERS`
      (`layer_axes`, chosen per head at calibration; without a profile `axes` for every head); blocks of that
      order are pooled and selected as `draft` does.
    - `strategy="cluster"` (Sparse VideoGen2, Yang et al., 2025, semantic-aware permutation): k-means of q and of k
      per head (`clusters` centroids each, default one per block; centroids reused across refreshes as warm starts
      of `kmeans_iters` Lloyd steps, SVG2's 2 per step; cold starts seed with random tokens and run 8 x as many,
      with centroid relocations), tokens sorted by cluster, blocks chosen from the centroid-level attention.
    - `block_size`: tokens per kernel block (power of two >= 16).
    """

    method: ClassVar[str] = "reorder"
    STRATEGIES: ClassVar[tuple[str, ...]] = ("axes", "cluster")

    strategy: str = _choice("cluster", STRATEGIES)
    block_size: int = 128
    axes: str = _choice("fhw", AXIS_ORDERS)
    layer_axes: tuple[tuple[str, ...], ...] | None = None
    clusters: int | None = None
    kmeans_iters: int = 2

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        if self.strategy not in self.STRATEGIES:
            raise ValueError(f"{owner}.strategy must be one of {self.STRATEGIES}, got {self.strategy!r}")
        _check_block_size(owner, "block_size", self.block_size)
        if self.axes not in AXIS_ORDERS:
            raise ValueError(f"{owner}.axes must be one of {AXIS_ORDERS}, got {self.axes!r}")

        def check_axes(order):
            if order not in AXIS_ORDERS:
                raise ValueError(f"{owner}.layer_axes entries must be one of {AXIS_ORDERS}, got {order!r}")

        object.__setattr__(self, "layer_axes", _per_layer_heads(owner, "layer_axes", self.layer_axes, check_axes))
        if self.clusters is not None:
            _check_int(owner, "clusters", self.clusters, 2)
        _check_int(owner, "kmeans_iters", self.kmeans_iters, 1)

    def head_axes(self, layer: int | None, heads: int) -> tuple[str, ...]:
        """The axis order of each head of `layer`: `layer_axes[layer]`, else `axes` for every head."""
        if self.layer_axes is None or layer is None:
            return (self.axes,) * heads
        if not 0 <= layer < len(self.layer_axes) or len(self.layer_axes[layer]) != heads:
            raise ValueError(f"{type(self).__name__}.layer_axes has no entry of {heads} heads for layer {layer} "
                             "(a profile for another model?)")
        return self.layer_axes[layer]
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
        from dit_sparse.patterns.vdit import (  # the patterns package imports us
            DEFAULT_PATTERN,
            as_head_pattern,
            check_profile_layers,
            resolve_tile,
        )

        owner = type(self).__name__
        _check_block_size(owner, "block_size", self.block_size)
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
        from dit_sparse.patterns.vdit import resolve_tile

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


CONFIGS: dict[str, type[MethodConfig]] = {
    cls.method: cls
    for cls in (
        DenseConfig, RadialConfig, RandomBlocksConfig, NeighborhoodConfig, DraftConfig, ReorderConfig, VditConfig
    )
}


def make_config(method_or_config: str | MethodConfig, **overrides) -> MethodConfig:
    """A validated config from a method name (its defaults) or a config, with keyword overrides applied."""
    if isinstance(method_or_config, MethodConfig):
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
