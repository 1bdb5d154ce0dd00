"""`Profile`: what `calibrate` measured per layer and head, as JSON; `sparsify(pipe, profile=...)` runs it as is.

A profile belongs to one transformer class, layer count and head count (`check` refuses any other). Its `entries`
hold one JSON-able dict per (layer, head); each key `x` becomes the config field `layer_x` (`density` ->
`DynamicConfig.layer_density`, `axes` -> `ReorderConfig.layer_axes`, `pattern` (a `HeadPattern.to_dict()`) ->
`VditConfig.layer_pattern`), so a method reads its profile through its own config and does no search at run time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dit_sparse.config import MethodConfig
from dit_sparse.files import write_atomic
from dit_sparse.patterns import CONFIGS, make_config

PROFILE_VERSION = 1


@dataclass(frozen=True)
class Profile:
    """A calibration profile.

    - `method`: the method it configures (`dit_sparse.CONFIGS`); `options`: that method's other options.
    - `transformer`: the transformer class name; `layers`: hooked self-attention layers; `heads`: heads per layer.
    - `layout`: (frames, height, width) in tokens of the calibration videos (a record; entries apply to any size).
    - `entries[layer][head]`: a dict of what that head needs, e.g. {"density": 0.18}, {"axes": "hwf", ...} or
      {"pattern": {"kind": "diagonal", "radius": [0, 1, 1]}}.
    - `meta`: prompts, seeds, steps, the calibration settings (target recall; max error, cost weight), date.
    """

    method: str
    transformer: str
    layers: int
    heads: int
    layout: tuple[int, int, int]
    options: dict
    entries: list
    meta: dict = field(default_factory=dict)
    version: int = PROFILE_VERSION

    def __post_init__(self):
        if self.method not in CONFIGS:
            raise ValueError(f"Profile.method must be one of {sorted(CONFIGS)}, got {self.method!r}")
        if self.version != PROFILE_VERSION:
            raise ValueError(f"Profile.version {self.version!r} is not supported (this dit-sparse reads "
                             f"{PROFILE_VERSION})")
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Profile.{name} must be an int >= 1, got {value!r}")
        object.__setattr__(self, "layout", tuple(self.layout))
        for name in ("options", "entries", "meta"):  # as JSON holds them (tuples become lists), so loads compare equal
            try:
                object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name))))
            except TypeError as error:
                raise ValueError(f"Profile.{name} must be JSON-able: {error}") from None
        if len(self.entries) != self.layers or any(
            not isinstance(row, (list, tuple)) or len(row) != self.heads or not all(isinstance(e, dict) for e in row)
            for row in self.entries
        ):
            raise ValueError(f"Profile.entries must hold {self.layers} layers of {self.heads} dicts (one per head)")
        keys = {key for row in self.entries for entry in row for key in entry}
        allowed = {f.name for f in dataclasses.fields(CONFIGS[self.method])}
        unknown = sorted(f"layer_{key}" for key in keys if f"layer_{key}" not in allowed)
        if unknown:
            raise ValueError(f"Profile entries give {unknown}, which method {self.method!r} does not take")

    # ---- files ----------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "layout": list(self.layout)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile as JSON atomically (a temporary file in the same folder, then a rename)."""
        path = Path(path)
        write_atomic(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"profile {os.fspath(path)!r} is not JSON: {error}") from None
        allowed = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not {"method", "transformer", "layers", "heads"} <= set(data):
            raise ValueError(f"profile {os.fspath(path)!r} is not a dit-sparse profile (fields {sorted(allowed)})")
        return cls(**{key: value for key, value in data.items() if key in allowed})

    # ---- use ------------------------------------------------------------------------------------------------------
    def check(self, transformer: torch.nn.Module, adapter) -> None:
        """Raise ValueError unless this profile was made for `transformer`'s class, layer count and head count."""
        name = type(transformer).__name__
        if name != self.transformer:
            raise ValueError(f"profile was calibrated on {self.transformer}, not {name}")
        sites = adapter.attention_sites(transformer)
        if len(sites) != self.layers:
            raise ValueError(f"profile has {self.layers} layers; {name} has {len(sites)} self-attention layers")
        heads = {getattr(site.module, "heads", None) for site in sites}
        if heads != {self.heads}:
            raise ValueError(f"profile has {self.heads} heads per layer; {name} has {sorted(heads, key=str)}")

    def config(self, **overrides) -> MethodConfig:
        """The method's config: `options`, then each entry key `x` as `layer_x` (per layer, per head), then
        `overrides` (e.g. `refresh`, `backend`)."""
        keys = sorted({key for row in self.entries for entry in row for key in entry})
        missing = [(l, h, key) for key in keys for l, row in enumerate(self.entries) for h, e in enumerate(row)
                   if key not in e]
        if missing:
            raise ValueError(f"profile entries lack values, e.g. layer {missing[0][0]} head {missing[0][1]} has no "
                             f"{missing[0][2]!r}")
        per_layer = {f"layer_{key}": tuple(tuple(e[key] for e in row) for row in self.entries) for key in keys}
        return make_config(self.method, **{**self.options, **per_layer, **overrides})
