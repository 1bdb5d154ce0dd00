"""The base method configs and the validators every pattern's config shares.

Each pattern's own config (`RadialConfig`, ...) lives in its module under `dit_sparse.patterns`, which also holds the
registry (`CONFIGS`, `make_config`). Here: `MethodConfig` (the options every method takes), `DynamicConfig` (those of
the methods that estimate their mask from q and k) and the field checks, each written once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from dit_sparse import kernels

#: Allowed values of every method's `backend`: "auto" plus the kernel registry's names.
BACKENDS = ("auto",) + kernels.BACKENDS


def choice(default: str, choices: tuple[str, ...]):
    """A field whose value is one of `choices`, listed in its metadata (`metadata["choices"]`) for UIs to offer."""
    return dataclasses.field(default=default, metadata={"choices": choices})


def is_int(value, minimum: int) -> bool:
    """Whether `value` is an int (not a bool) >= `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _named(owner: str | None, name: str) -> str:
    """How an error names the value: `Owner.name` for a config's field, `name` for a function's argument (None)."""
    return f"{owner}.{name}" if owner else name


def check_int(owner: str | None, name: str, value, minimum: int) -> None:
    if not is_int(value, minimum):
        raise ValueError(f"{_named(owner, name)} must be an int >= {minimum}, got {value!r}")


def check_block_size(owner: str | None, name: str, value) -> None:
    if not is_int(value, 16) or value & (value - 1):
        raise ValueError(f"{_named(owner, name)} must be a power of two >= 16, got {value!r}")


def check_positive(owner: str | None, name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{_named(owner, name)} must be a number > 0, got {value!r}")


def check_fraction(owner: str | None, name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value <= 1):
        raise ValueError(f"{_named(owner, name)} must be in (0, 1], got {value!r}")


def check_choice(owner: str | None, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{_named(owner, name)} must be one of {allowed}, got {value!r}")


def check_triple(owner: str | None, name: str, value) -> tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(is_int(v, 1) for v in value):
        raise ValueError(f"{_named(owner, name)} must be three positive ints (frames, rows, columns), got {value!r}")
    return tuple(value)


def check_tile(owner: str | None, name: str, value) -> tuple[int, int, int]:
    """A 3D tile (frames, rows, columns) that one kernel block holds: prod(tile) a power of two >= 16."""
    tile = check_triple(owner, name, value)
    tokens = tile[0] * tile[1] * tile[2]
    if tokens < 16 or tokens & (tokens - 1):
        raise ValueError(f"{_named(owner, name)} {tile} holds {tokens} tokens; it must hold a power of two >= 16")
    return tile


def per_layer_heads(owner: str | None, name: str, value, check) -> tuple[tuple, ...] | None:
    """None, or one tuple per hooked layer of one value per head (profiles give them), each passing `check`."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or not value or any(
        not isinstance(layer, (tuple, list)) or not layer for layer in value
    ):
        raise ValueError(f"{_named(owner, name)} must be one non-empty sequence per layer of one value per head, got "
                         f"{value!r:.200}")
    for layer in value:
        for item in layer:
            check(item)
    return tuple(tuple(layer) for layer in value)


@dataclass(frozen=True)
class MethodConfig:
    """Options every method shares.

    - `dense_steps`: the first N denoising steps run dense (the official Radial Attention runs 12 of 50 dense).
    - `dense_layers`: the first M transformer blocks run dense (the official Radial Attention keeps 1).
    - `backend`: kernel backend, one of `BACKENDS`; `"auto"` picks the fastest one available.
    - `compensate`: every key block the mask drops still contributes through one pooled key (its mean key, score
      raised by log of its token count) and its mean value, in the same softmax (SVG-EAR; DraftAttention);
      `kernels.block_sparse_attention` documents the rule.
    - `min_recall`: None, or the recall guard: per call, blocks are added to each query block whose kept blocks hold
      less than this share of its estimated (pooled) attention mass (`dit_sparse.patterns.recall`).

    A field with a fixed set of allowed values lists them in its metadata, `metadata["choices"]` (the app offers them).
    """

    method: ClassVar[str] = ""
    dense_steps: int = 0
    dense_layers: int = 0
    backend: str = choice("auto", BACKENDS)
    compensate: bool = False
    min_recall: float | None = None

    def __post_init__(self):
        owner = type(self).__name__
        check_int(owner, "dense_steps", self.dense_steps, 0)
        check_int(owner, "dense_layers", self.dense_layers, 0)
        if self.backend not in BACKENDS:
            raise ValueError(f"{owner}.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.compensate, bool):
            raise ValueError(f"{owner}.compensate must be a bool (True or False), got {self.compensate!r}")
        if self.min_recall is not None:
            check_fraction(owner, "min_recall", self.min_recall)

    def options(self) -> dict:
        """The config as plain keyword arguments (for manifests and `make_config`)."""
        return dataclasses.asdict(self)


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
        check_fraction(owner, "density", self.density)
        if self.top_p is not None:
            check_fraction(owner, "top_p", self.top_p)
        if isinstance(self.refresh, (tuple, list)):
            steps = self.refresh
            if not steps or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in steps):
                raise ValueError(f"{owner}.refresh must be an int >= 1 (a period in steps) or a non-empty tuple of "
                                 f"step indices >= 0, got {self.refresh!r}")
            object.__setattr__(self, "refresh", tuple(sorted(set(steps))))
        elif not isinstance(self.refresh, int) or isinstance(self.refresh, bool) or self.refresh < 1:
            raise ValueError(f"{owner}.refresh must be an int >= 1 (a period in steps) or a non-empty tuple of step "
                             f"indices >= 0, got {self.refresh!r}")
        object.__setattr__(self, "layer_density", per_layer_heads(
            owner, "layer_density", self.layer_density, lambda d: check_fraction(owner, "layer_density entry", d)))

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
