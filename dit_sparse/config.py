"""One frozen config per sparsity method, validated on construction; `make_config` maps names and overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

BACKENDS = ("auto", "fa4", "triton", "reference")


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
    """

    method: ClassVar[str] = ""
    dense_steps: int = 0
    dense_layers: int = 0
    backend: str = "auto"

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
    block_size: int = 128
    decay_factor: float = 1.0
    variant: str = "wan"

    VARIANTS: ClassVar[tuple[str, ...]] = ("wan", "hunyuan")

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


@dataclass(frozen=True)
class VditConfig(MethodConfig):
    """Sparse-vDiT (Chen et al., 2025): a searched pattern per layer and head (`dit_sparse.patterns.vdit`).

    - `block_size`: tokens per block; `tile`: the 3D tile one block holds (None: `default_tile(block_size)`,
      (1, 8, 16) at 128). The patterns' radii are counted in these tiles, so they must match the profile's.
    - `profile`: path of a profile JSON (`save_vdit_profile`), or `patterns`: the same inline, per layer a sequence of
      per-head `HeadPattern`s or their dicts (stored as tuples of `HeadPattern`). Exactly one of the two.

    Not in `CONFIGS` yet: `sparsify` has no per-layer plumbing for it.
    """

    method: ClassVar[str] = "vdit"
    block_size: int = 128
    tile: tuple[int, int, int] | None = None
    profile: str | None = None
    patterns: tuple | None = None

    def __post_init__(self):
        super().__post_init__()
        from dit_sparse.patterns.vdit import check_profile_layers, resolve_tile  # the patterns package imports us

        owner = type(self).__name__
        _check_block_size(owner, "block_size", self.block_size)
        if self.tile is not None:
            object.__setattr__(self, "tile", resolve_tile(self.block_size, self.tile, owner))
        if (self.profile is None) == (self.patterns is None):
            raise ValueError(
                f"{owner} needs exactly one of profile (a path) and patterns (inline), got profile={self.profile!r} "
                f"and patterns={'None' if self.patterns is None else '...'}"
            )
        if self.profile is not None:
            if isinstance(self.profile, os.PathLike):
                object.__setattr__(self, "profile", os.fspath(self.profile))
            if not isinstance(self.profile, str) or not self.profile:
                raise ValueError(f"{owner}.profile must be a non-empty path, got {self.profile!r}")
        else:
            object.__setattr__(self, "patterns", check_profile_layers(self.patterns, f"{owner}.patterns"))


CONFIGS: dict[str, type[MethodConfig]] = {
    cls.method: cls for cls in (DenseConfig, RadialConfig, RandomBlocksConfig, NeighborhoodConfig)
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
