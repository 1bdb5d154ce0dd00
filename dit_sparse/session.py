"""What one sparsified pipeline remembers: `SparseSession` (the config, forward plans, masks per layer and CFG
branch, the denoising step, statistics) and `ForwardPlan` (what every self-attention call of one forward needs).

`dit_sparse.hooks` installs the hooks that drive a session; the session itself installs nothing and knows no module.
Dynamic masks are cached per (attention site, CFG branch, layout, device) and re-estimated on the config's
`refresh` schedule (`DynamicConfig.refreshes_at`); per-layer masks (`vdit`) are built once per (layout, device,
layer); `SparseSession.mask_builds` counts every mask built or estimated.

Observing (calibration): `SparseSession.observing(observer)` is a session that runs every attention call as the
original dense call and, before it, hands the call's q, k, v to `observer(layer=, step=, layout=, q=, k=, v=)`
((B, H, S, D), in the natural [video; text] order); `dit_sparse.hooks.observe` installs one for a block of code.

A setting that leaves the method nothing to do is warned about once per session on the `dit_sparse` logger:
`dense_layers` covering every block (at `sparsify`), `dense_steps` covering every step of a run (the pipeline's
scheduler holds the count before the run's first transformer call), a `block_size` at least a layout's video token
count (one block holds the whole video, so the mask is dense). `sparsity_stats`' `sparse_calls` counts what did run
sparse.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from dit_sparse.blockmask import BlockMask, inverse_order
from dit_sparse.config import DynamicConfig, MethodConfig
from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import config_for_heads, gathered_order
from dit_sparse.patterns import DenseConfig, build_mask, is_per_layer, is_static
from dit_sparse.patterns.recall import guard_recall
from dit_sparse.pipelines.adapters import TransformerAdapter

#: What an observing session calls for each attention call: observer(layer=, step=, layout=, q=, k=, v=).
Observer = Callable[..., None]

logger = logging.getLogger("dit_sparse")


@dataclass(frozen=True, eq=False)
class ForwardPlan:
    """What every self-attention call of one transformer forward needs.

    - `layout`: the video tokens and the adapter's extra tokens off the grid (`text_len` 0); a call's full layout
      adds the tokens beyond them as text.
    - `text_position`, `attention_mask`: the adapter's text side and mask convention.
    - `sparse_from`: the first sparse layer (`dense_layers`), or None in a dense step (`dense_steps`).
    - `mask`, `density`: the static block mask over the video tokens and its kept fraction; None for dense steps and
      for patterns that need q and k or the layer (taken in the call).
    - `compensate`, `min_recall`: the config's, for every sparse call (the pooled pass; the recall guard).
    """

    layout: VideoLayout
    text_position: str | None
    attention_mask: str | None
    sparse_from: int | None
    backend: str
    mask: BlockMask | None = None
    density: float = 1.0
    compensate: bool = False
    min_recall: float | None = None

    def is_dense(self, layer: int) -> bool:
        return self.sparse_from is None or layer < self.sparse_from

    def call_layout(self, seq_len: int, site_name: str) -> VideoLayout:
        """The layout of an attention call over `seq_len` tokens: the video and its extra tokens, plus
        `seq_len - video_len - extra_len` text tokens."""
        video = self.layout
        text_len = int(seq_len) - video.video_len - video.extra_len
        if text_len < 0 or (text_len > 0 and self.text_position is None):
            raise RuntimeError(
                f"{site_name}: attention over {seq_len} tokens, but the transformer's input gives {video} "
                f"({video.video_len} video tokens{f', {video.extra_len} extra' if video.extra_len else ''}"
                f"{'' if self.text_position else ' and no joint text'})"
            )
        if text_len == 0:
            return video
        return replace(video, text_len=text_len, text_position=self.text_position)


@dataclass
class SparseSession:
    """State shared by every hook of one `sparsify` call with one config (both Wan 2.2 experts share one session).

    Holds the config, the masks (static ones built once per layout and device, per-layer ones per layer too) and
    forward plans, the denoising step counter, the density statistics (`dit_sparse.sparsity_stats` reads them), and
    the plan of the forward now running (`active`, None outside one). `observer`: set by `observing` only;
    `pipeline`: a weak reference to the pipeline `sparsify` was given (its scheduler tells a run's step count).
    """

    config: MethodConfig
    masks: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)
    active: ForwardPlan | None = None
    step: int = 0
    last_timestep: float | None = None
    generation: int = 0  # counts generations: a timestep above the last, a step index below it, or reset_steps
    attention_calls: int = 0
    kept_fraction_sum: float | torch.Tensor = 0.0  # a device tensor once a dynamic mask is counted
    guard_added_sum: float | torch.Tensor = 0.0  # density the recall guard added, summed over calls (device tensor)
    guard_calls_sum: int | torch.Tensor = 0  # calls whose mask the guard changed (device tensor)
    branch: object = 0
    mask_builds: int = 0
    dynamic_masks: dict = field(default_factory=dict)
    pattern_state: dict = field(default_factory=dict)
    observer: Observer | None = None
    token_orders: dict = field(default_factory=dict)
    head_configs: dict = field(default_factory=dict)  # (head offset, count) -> the config cut to those heads
    sparse_calls: int = 0  # attention calls that ran the method's mask (not dense by dense_steps / dense_layers)
    pipeline: weakref.ref | None = None
    warned: set = field(default_factory=set)  # the warnings this session gave ("layers", "steps", "block")

    @classmethod
    def observing(cls, observer: Observer) -> SparseSession:
        """A session that runs every step and layer dense (the original attention call) and calls `observer` with
        each self-attention call's q, k, v first: what `calibrate` measures on."""
        if not callable(observer):
            raise TypeError(f"observer must be callable, got {type(observer).__name__}")
        return cls(DenseConfig(), observer=observer)

    def observe_call(self, timestep, step_index: int | None, branch_name: str | None = None) -> int:
        """Advance the step counter for one transformer call; CFG's second call of a step repeats the timestep.

        Also sets `branch`, which call of the step this is: the pipeline's cache-context name ("cond", "uncond")
        when it gives one, else the count of calls that repeated the timestep (dynamic masks are kept per branch)."""
        value = None
        if isinstance(timestep, torch.Tensor):
            value = float(timestep.max())
        elif timestep is not None:
            value = float(timestep)
        if branch_name is not None:
            self.branch = branch_name
        elif value is not None and value == self.last_timestep and isinstance(self.branch, int):
            self.branch += 1
        else:
            self.branch = 0
        rose = value is not None and self.last_timestep is not None and value > self.last_timestep
        if rose or (step_index is not None and step_index < self.step):
            self.generation += 1  # timesteps only fall, and step indices only grow, during a generation
        if step_index is not None:
            self.step = step_index
        elif value is not None and self.last_timestep is not None:
            if rose:  # a new generation started
                self.step = 0
            elif value < self.last_timestep:
                self.step += 1
        self.last_timestep = value
        return self.step

    def reset_steps(self) -> None:
        self.step, self.last_timestep = 0, None
        self.generation += 1

    def mask_for(self, layout: VideoLayout, device, q=None, k=None, layer: int | None = None,
                 site=None, heads: tuple[int, int] | None = None) -> tuple[BlockMask, float | torch.Tensor]:
        """The mask over `layout`'s video tokens and its density; static masks are built once per (layout, device),
        per-layer ones per (layout, device, layer), dynamic ones cached per (site, branch, layout, device) and
        re-estimated from q, k on the `refresh` schedule. `heads` (offset, count): the heads q and k hold when they
        are one rank's share under context parallelism (dynamic masks then use those heads' per-head settings)."""
        if isinstance(self.config, DynamicConfig):
            return self._dynamic_mask(layout, device, q, k, layer, site, heads)
        video = VideoLayout(layout.frames, layout.height, layout.width)  # the mask spans the video tokens only
        key = (video, str(device), layer) if is_per_layer(self.config) else (video, str(device))
        if key not in self.masks:
            mask = build_mask(layout, self.config, q=q, k=k, device=device, layer=layer)
            self.mask_builds += 1
            self.masks[key] = (mask, mask.density)
        return self.masks[key]

    def _dynamic_mask(self, layout, device, q, k, layer, site, heads=None) -> tuple[BlockMask, torch.Tensor]:
        key = (site, self.branch, layout, str(device))
        cached = self.dynamic_masks.get(key)
        if cached is not None and cached[3] == self.generation and not self.config.refreshes_at(self.step, cached[2]):
            return cached[0], cached[1]  # a mask of this generation, within its refresh period
        state = self.pattern_state.setdefault((site, self.branch), {})
        config = self.config if heads is None else self.config_for_heads(heads)
        mask = build_mask(layout, config, q=q, k=k, state=state, device=device, layer=layer)
        self.mask_builds += 1
        fraction = mask.kept_fraction  # a device tensor: no host sync per estimate (`sparsity_stats` reads it)
        self.dynamic_masks[key] = (mask, fraction, self.step, self.generation)
        return mask, fraction

    def config_for_heads(self, heads: tuple[int, int]) -> MethodConfig:
        """The config cut to one rank's heads (offset, count), built once per session (a `dataclasses.replace`
        that validates every per-layer profile entry again: not something to redo at every refresh)."""
        config = self.head_configs.get(heads)
        if config is None:
            config = self.head_configs[heads] = config_for_heads(self.config, *heads)
        return config

    def token_order(self, layout: VideoLayout, world: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(natural -> gathered, gathered -> natural) token indices of a call Ulysses gathered from `world` ranks, or
        None when the orders agree; built once per (layout, world, device)."""
        key = (layout, world, str(device))
        if key not in self.token_orders:
            order = gathered_order(layout, world)
            self.token_orders[key] = None if order is None else (order.to(device), inverse_order(order).to(device))
        return self.token_orders[key]

    def plan_for(self, layout: VideoLayout, device, step: int, adapter: TransformerAdapter) -> ForwardPlan:
        """The plan of a forward over `layout` at `step`: the same object as long as nothing in it changes."""
        dense = self.observer is not None or step < self.config.dense_steps
        sparse_from = None if dense else self.config.dense_layers
        key = (layout, str(device), sparse_from, adapter.text_position, adapter.attention_mask)
        if key not in self.plans:
            if sparse_from is not None:
                self._warn_if_one_block(layout)
            mask, density = None, 1.0
            if sparse_from is not None and is_static(self.config):
                mask, density = self.mask_for(layout, device)
            self.plans[key] = ForwardPlan(
                layout, adapter.text_position, adapter.attention_mask, sparse_from, self.config.backend, mask, density,
                compensate=self.config.compensate, min_recall=self.config.min_recall,
            )
        return self.plans[key]

    def record(self, kept_fraction: float | torch.Tensor, calls: int = 1, sparse: bool = True) -> None:
        self.attention_calls += calls
        self.sparse_calls += calls if sparse else 0
        self.kept_fraction_sum += kept_fraction * calls

    def record_forward(self, plan: ForwardPlan, layers: list[int]) -> None:
        """Count one forward's self-attention calls (one per hooked module); calls to dynamic masks count themselves."""
        for layer in layers:
            if plan.is_dense(layer):
                self.record(1.0, sparse=False)
            elif plan.mask is not None:
                self.record(plan.density)

    def guard(self, mask: BlockMask, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> BlockMask:
        """The recall guard on one call's mask (`patterns.recall.guard_recall`, q, k (B, H, S, D) of the video
        tokens), its added density and touched call counted as device tensors (no host sync)."""
        guarded, added, touched = guard_recall(mask, q, k, self.config.min_recall, scale)
        self.guard_added_sum = self.guard_added_sum + added
        self.guard_calls_sum = self.guard_calls_sum + touched
        return guarded

    def reset_stats(self) -> None:
        self.attention_calls, self.sparse_calls, self.kept_fraction_sum, self.mask_builds = 0, 0, 0.0, 0
        self.guard_added_sum, self.guard_calls_sum = 0.0, 0

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self.warned:
            self.warned.add(what)
            logger.warning(message)

    def warn_if_layers_all_dense(self, transformer_name: str, layers: Sequence[int]) -> None:
        """At `sparsify`: warn when `dense_layers` covers every one of a transformer's hooked `layers`."""
        if layers and self.config.dense_layers > max(layers):
            self._warn_once("layers", f"dit-sparse: dense_layers={self.config.dense_layers} covers all "
                            f"{max(layers) + 1} blocks of {transformer_name}: the {self.config.method!r} method never "
                            "runs there")

    def warn_if_steps_all_dense(self) -> None:
        """At a transformer call: warn when `dense_steps` covers every step of the run the pipeline's scheduler set
        up (`len(scheduler.timesteps)`); nothing is known without a pipeline or before its first run."""
        pipeline = None if self.pipeline is None else self.pipeline()
        timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        if timesteps is not None and self.config.dense_steps >= len(timesteps):
            self._warn_once("steps", f"dit-sparse: dense_steps={self.config.dense_steps} covers all {len(timesteps)} "
                            f"steps of this run: the {self.config.method!r} method never runs (every call is dense)")

    def _warn_if_one_block(self, layout: VideoLayout) -> None:
        block_size = getattr(self.config, "block_size", None)
        if block_size is not None and not isinstance(self.config, DenseConfig) and block_size >= layout.video_len:
            self._warn_once("block", f"dit-sparse: block_size={block_size} >= the {layout.video_len} video tokens of "
                            f"{layout}: one block holds the whole video, so the {self.config.method!r} mask is dense")
