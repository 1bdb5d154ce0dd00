"""The hooks `sparsify` installs: one per transformer (layout, step), one per self-attention module (interception).

A transformer hook begins each forward by deriving its plan (the video layout, whether this step and layer run
dense, the block mask) and publishing it on the session; an attention hook, while a plan is published, runs its
module under a `TorchFunctionMode` that routes the module's `scaled_dot_product_attention` call to
`sparse_attention`. The joint text is whatever the call has beyond the video tokens (`text_len = S - video_len`), at
the side the adapter names; a key-padding attention mask becomes `sparse_attention`'s `text_padding_mask`. Outside a
hooked forward every call falls through untouched, and no global state is left when the hooks are removed.

torch.compile: the plan is built in a function dynamo skips (one graph break, before the first block); the plan
object is reused while the layout and the dense/sparse phase stay the same, so the compiled graph's guards hold from
step to step; under compilation the sparse call is the custom op `dit_sparse::sparse_attention`, so the graph runs
through attention and the rest of each block fuses around it. Dynamic patterns (`draft`, `reorder`) estimate their
mask in a function dynamo skips too (a graph break before each sparsified attention call): the estimate runs eagerly,
the attention itself still through the custom op.

Dynamic masks are cached per (attention site, CFG branch, layout, device) and re-estimated on the config's
`refresh` schedule (`DynamicConfig.refreshes_at`); per-layer masks (`vdit`) are built once per (layout, device, layer)
and taken from the session in the call the same way (eager under torch.compile); `SparseSession.mask_builds` counts
every mask built or estimated.

Under diffusers' Ulysses context parallelism (`dit_sparse.parallel`) the intercepted call holds the full sequence
for this rank's heads: the interceptor puts the tokens in the natural order when joint text makes the gathered order
differ, takes this rank's rows of a per-head mask (and its entries of per-head settings), and restores the gathered
order on the way out.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.overrides import TorchFunctionMode

from dit_sparse.attention import sparse_attention
from dit_sparse.blockmask import BlockMask, TokenBoxes, inverse_order
from dit_sparse.config import DynamicConfig, MethodConfig
from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import UlyssesShard, config_for_heads, gathered_order, mask_for_heads, ulysses_shard
from dit_sparse.patterns import build_mask, is_per_layer, is_static
from dit_sparse.pipelines.adapters import AttentionSite, TransformerAdapter

TRANSFORMER_HOOK = "dit_sparse.transformer"
ATTENTION_HOOK = "dit_sparse.attention"

_SDPA_FUNCTIONS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


@dataclass(frozen=True, eq=False)
class ForwardPlan:
    """What every self-attention call of one transformer forward needs.

    - `layout`: the video tokens (`text_len` 0); a call's full layout adds the tokens beyond them as text.
    - `text_position`, `attention_mask`: the adapter's text side and mask convention.
    - `sparse_from`: the first sparse layer (`dense_layers`), or None in a dense step (`dense_steps`).
    - `mask`, `density`: the static block mask over the video tokens and its kept fraction; None for dense steps and
      for patterns that need q and k or the layer (taken in the call).
    """

    layout: VideoLayout
    text_position: str | None
    attention_mask: str | None
    sparse_from: int | None
    backend: str
    mask: BlockMask | None = None
    density: float = 1.0

    def is_dense(self, layer: int) -> bool:
        return self.sparse_from is None or layer < self.sparse_from

    def call_layout(self, seq_len: int, site_name: str) -> VideoLayout:
        """The layout of an attention call over `seq_len` tokens: the video plus `seq_len - video_len` text tokens."""
        video = self.layout
        text_len = int(seq_len) - video.video_len  # int(): a compiled graph specializes on it, as the mask does
        if text_len < 0 or (text_len > 0 and self.text_position is None):
            raise RuntimeError(
                f"{site_name}: attention over {seq_len} tokens, but the transformer's input gives {video} "
                f"({video.video_len} video tokens{'' if self.text_position else ' and no joint text'})"
            )
        if text_len == 0:
            return video
        return VideoLayout(video.frames, video.height, video.width, text_len, self.text_position)


@dataclass
class SparseSession:
    """State shared by every hook of one `sparsify` call with one config (both Wan 2.2 experts share one session).

    Holds the config, the masks (static ones built once per layout and device, per-layer ones per layer too) and
    forward plans, the denoising step
    counter, the density statistics, and the plan of the forward now running (`active`, None outside one).
    """

    config: MethodConfig
    masks: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)
    active: ForwardPlan | None = None
    step: int = 0
    last_timestep: float | None = None
    attention_calls: int = 0
    kept_fraction_sum: float | torch.Tensor = 0.0  # a device tensor once a dynamic mask is counted
    branch: object = 0
    mask_builds: int = 0
    dynamic_masks: dict = field(default_factory=dict)
    pattern_state: dict = field(default_factory=dict)
    observer: object = None
    token_orders: dict = field(default_factory=dict)
    head_configs: dict = field(default_factory=dict)  # (head offset, count) -> the config cut to those heads

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
        if step_index is not None:
            self.step = step_index
        elif value is not None and self.last_timestep is not None:
            if value > self.last_timestep:  # timesteps only fall during a generation: a new one started
                self.step = 0
            elif value < self.last_timestep:
                self.step += 1
        self.last_timestep = value
        return self.step

    def reset_steps(self) -> None:
        self.step, self.last_timestep = 0, None

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
            _remember_mask(mask)
            self.masks[key] = (mask, mask.density)
        return self.masks[key]

    def _dynamic_mask(self, layout, device, q, k, layer, site, heads=None) -> tuple[BlockMask, torch.Tensor]:
        key = (site, self.branch, layout, str(device))
        cached = self.dynamic_masks.get(key)
        if cached is not None and not self.config.refreshes_at(self.step, cached[2]):
            return cached[0], cached[1]
        state = self.pattern_state.setdefault((site, self.branch), {})
        config = self.config if heads is None else self.config_for_heads(heads)
        mask = build_mask(layout, config, q=q, k=k, state=state, device=device, layer=layer)
        self.mask_builds += 1
        fraction = mask.kept_fraction  # a device tensor: no host sync per estimate (`stats` reads it)
        self.dynamic_masks[key] = (mask, fraction, self.step)
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
        sparse_from = None if step < self.config.dense_steps else self.config.dense_layers
        key = (layout, str(device), sparse_from, adapter.text_position, adapter.attention_mask)
        if key not in self.plans:
            mask, density = None, 1.0
            if sparse_from is not None and is_static(self.config):
                mask, density = self.mask_for(layout, device)
            self.plans[key] = ForwardPlan(
                layout, adapter.text_position, adapter.attention_mask, sparse_from, self.config.backend, mask, density
            )
        return self.plans[key]

    def record(self, kept_fraction: float | torch.Tensor, calls: int = 1) -> None:
        self.attention_calls += calls
        self.kept_fraction_sum += kept_fraction * calls

    def record_forward(self, plan: ForwardPlan, layers: list[int]) -> None:
        """Count one forward's self-attention calls (one per hooked module); calls to dynamic masks count themselves."""
        for layer in layers:
            if plan.is_dense(layer):
                self.record(1.0)
            elif plan.mask is not None:
                self.record(plan.density)

    def stats(self) -> dict:
        density = float(self.kept_fraction_sum) / self.attention_calls if self.attention_calls else None
        return {"method": self.config.method, "density": density, "attention_calls": self.attention_calls}

    def reset_stats(self) -> None:
        self.attention_calls, self.kept_fraction_sum, self.mask_builds = 0, 0.0, 0


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class TransformerHook(ModelHook):
    """Per transformer: derives the plan of each forward (layout, step) and publishes it to the attention hooks."""

    _is_stateful = True

    def __init__(self, session: SparseSession, adapter: TransformerAdapter, layers: list[int]):
        super().__init__()
        self.session = session
        self.adapter = adapter
        self.layers = layers
        # diffusers' `cache_context` sets the pipeline's step index on every StateManager of a stateful hook.
        self.cache_context = StateManager(_NoState)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        self._begin_forward(module, args, kwargs)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.session.active = None

    @torch.compiler.disable
    def _begin_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Layout, step, mask and statistics of this forward, on the host (compiled code skips this function)."""
        layout = self.adapter.layout(module, args, kwargs)
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        device = hidden_states.device if isinstance(hidden_states, torch.Tensor) else torch.device("cpu")
        context = self.cache_context._context
        step_index = getattr(context, "step_index", None) if context is not None else None
        branch_name = getattr(context, "name", None) if context is not None else None
        step = self.session.observe_call(self.adapter.timestep(args, kwargs), step_index, branch_name)
        plan = self.session.plan_for(layout, device, step, self.adapter)
        self.session.record_forward(plan, self.layers)
        self.session.active = plan

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.session.reset_steps()
        return module


def _sdpa_arguments(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> tuple:
    """`scaled_dot_product_attention`'s arguments by name, however the caller passed them."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class _AttentionInterceptor(TorchFunctionMode):
    """Routes `scaled_dot_product_attention` inside one self-attention module to the sparse path."""

    def __init__(self, session: SparseSession, plan: ForwardPlan, site_name: str, layer: int, site_key=None,
                 shard: UlyssesShard | None = None):
        super().__init__()
        self.session, self.plan, self.site_name, self.layer = session, plan, site_name, layer
        self.site_key = site_name if site_key is None else site_key
        self.shard = shard  # this rank's place under Ulysses context parallelism, None without it
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SDPA_FUNCTIONS:
            name = getattr(func, "__name__", None)
            is_method = name is not None and getattr(torch.Tensor, name, None) is func
            if is_method and args and isinstance(args[0], torch.Tensor):
                # A Tensor method called as a method: dynamo traces it as one, where it cannot inline the Python
                # bodies of some (`Tensor.unflatten` calls `super()`). The same call in eager mode.
                return getattr(args[0], name)(*args[1:], **kwargs)
            return func(*args, **kwargs)
        self.calls += 1
        return self._attend(func, args, kwargs)

    def _attend(self, sdpa, args: tuple, kwargs: dict) -> torch.Tensor:
        # query, key, value: (B, H, S, D), as diffusers' native backend and direct callers pass them to SDPA.
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_arguments(*args, **kwargs)
        if is_causal or dropout_p or enable_gqa or not (query.shape[:3] == key.shape[:3] == value.shape[:3]):
            raise NotImplementedError(
                f"{self.site_name}: sparse attention supports self-attention only (q, k, v of one (B, H, S)), got "
                f"q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}, is_causal={is_causal}, "
                f"dropout_p={dropout_p}, enable_gqa={enable_gqa}"
            )
        plan = self.plan
        layout = plan.call_layout(query.shape[2], self.site_name)
        local_heads = query.shape[1]
        heads = None if self.shard is None else (self.shard.head_offset(local_heads), local_heads)
        orders = None if self.shard is None else self.session.token_order(layout, self.shard.world, query.device)
        if orders is not None:  # Ulysses gathered [video_0; text_0; video_1; text_1; ...]: into [video; text]
            query, key, value = (x[:, :, orders[0]] for x in (query, key, value))
            attn_mask = _mask_in_order(attn_mask, orders[0], query.shape[2])
        text_padding_mask = self._text_padding_mask(attn_mask, layout, query.shape[0])
        if self.session.observer is not None:  # calibration: sees every call's q, k, v (B, H, S, D)
            _observe(self.session, self.layer, layout, query, key, value)
        if plan.is_dense(self.layer):
            return sdpa(*args, **kwargs)  # the original call, mask and all
        mask = plan.mask
        if mask is None:  # a pattern that reads q and k or the layer: taken here, counted here
            mask = _call_mask(self.session, layout, query, key, self.layer, self.site_key, heads)
        if heads is not None:  # this rank's rows of a per-head mask
            mask = mask_for_heads(mask, heads[0], local_heads, local_heads * self.shard.world)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D)
        if torch.compiler.is_compiling():
            boxes = mask.token_boxes
            out = torch.ops.dit_sparse.sparse_attention(
                q, k, v, mask.kv_block_indices, mask.kv_block_counts, mask.permutation, mask.kv_block_partial,
                None if boxes is None else boxes.query_lo, None if boxes is None else boxes.query_hi,
                None if boxes is None else boxes.key_coords, None if boxes is None else list(boxes.step),
                text_padding_mask, mask.seq_len, mask.q_block_size, mask.kv_block_size, layout.frames,
                layout.height, layout.width, layout.text_len, layout.text_position, scale, plan.backend,
                mask.kv_permutation,
            )
        else:
            out = sparse_attention(
                q, k, v, mask, layout, text_padding_mask=text_padding_mask, scale=scale, backend=plan.backend
            )
        out = out.transpose(1, 2)  # (B, H, S, D)
        return out if orders is None else out[:, :, orders[1]]

    def _text_padding_mask(self, attn_mask, layout: VideoLayout, batch: int) -> torch.Tensor | None:
        """(B, text_len) bool, True for real text tokens, from the call's key-padding mask; None without one."""
        if attn_mask is None:
            return None
        if self.plan.attention_mask != "key_padding":
            raise NotImplementedError(
                f"{self.site_name}: got an attention mask {tuple(attn_mask.shape)}, but this transformer's adapter "
                "expects none (sparse attention supports plain self-attention here)"
            )
        seq_len = layout.seq_len
        if (
            attn_mask.dtype != torch.bool
            or attn_mask.dim() != 4
            or attn_mask.shape[0] not in (1, batch)
            or attn_mask.shape[1] != 1
            or attn_mask.shape[2] not in (1, seq_len)
            or attn_mask.shape[3] != seq_len
        ):
            raise ValueError(
                f"{self.site_name}: a key-padding attention mask must be bool (B or 1, 1, 1 or S, S) with B={batch}, "
                f"S={seq_len}; got {attn_mask.dtype} {tuple(attn_mask.shape)}"
            )
        if layout.text_len == 0:
            return None
        row = layout.video_slice.start if attn_mask.shape[2] == seq_len else 0  # a video query sees every valid key
        return attn_mask[:, 0, row, layout.text_slice].expand(batch, -1).contiguous()  # (B, text_len)


def _mask_in_order(attn_mask, order: torch.Tensor, seq_len: int):
    """A (B or 1, 1, 1 or S, S) attention mask with its S axes put in `order`; None stays None."""
    if attn_mask is None or attn_mask.dim() != 4 or attn_mask.shape[-1] != seq_len:
        return attn_mask
    attn_mask = attn_mask[..., order]
    return attn_mask[:, :, order] if attn_mask.shape[2] == seq_len else attn_mask


@torch.compiler.disable
def _call_mask(session: SparseSession, layout: VideoLayout, query, key, layer: int, site,
               heads: tuple[int, int] | None = None) -> BlockMask:
    """The mask of this call, counted in the statistics: a dynamic pattern's (estimated or reused per `refresh`) or
    a per-layer one (built once per layout and layer); eager under torch.compile (dynamo skips this function)."""
    mask, density = session.mask_for(layout, query.device, q=query, k=key, layer=layer, site=site, heads=heads)
    session.record(density)
    _remember_mask(mask)
    return mask


@torch.compiler.disable
def _observe(session: SparseSession, layer: int, layout: VideoLayout, query, key, value) -> None:
    session.observer(layer=layer, step=session.step, layout=layout, q=query, k=key, v=value)


class AttentionHook(ModelHook):
    """Per self-attention module: intercepts its attention call while a hooked transformer forward runs."""

    def __init__(self, site: AttentionSite, session: SparseSession):
        super().__init__()
        self.site_name, self.layer, self.session = site.name, site.layer, session

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        plan = self.session.active
        if plan is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        shard = ulysses_shard(module, self.site_name)
        interceptor = _AttentionInterceptor(self.session, plan, self.site_name, self.layer, site_key=id(self),
                                            shard=shard)
        with interceptor:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if interceptor.calls == 0:
            raise RuntimeError(
                f"{self.site_name}: no scaled_dot_product_attention call was seen; its attention backend bypasses "
                "torch SDPA. dit-sparse needs diffusers' native attention backend on sparsified modules."
            )
        return output


# ---- torch.compile: the sparse call as one opaque op ------------------------------------------------------------
def _remember_mask(mask: BlockMask) -> None:
    """Let the custom op find `mask` (and the per-mask caches the kernels keep on it) from its index tensor."""
    mask.kv_block_indices._dit_sparse_block_mask = weakref.ref(mask)


def _block_mask_of(
    kv_block_indices, kv_block_counts, permutation, kv_block_partial, boxes, seq_len, q_block_size, kv_block_size,
    kv_permutation=None,
) -> BlockMask:
    """The session's own BlockMask behind these tensors (its kernel caches live on it), else one rebuilt from them,
    in-block masking included. `boxes`: (query_lo, query_hi, key_coords, step), all None without in-block masking."""
    ref = getattr(kv_block_indices, "_dit_sparse_block_mask", None)
    mask = ref() if ref is not None else None
    if (
        mask is not None
        and mask.kv_block_counts is kv_block_counts
        and mask.permutation is permutation
        and mask.kv_block_partial is kv_block_partial
        and mask.kv_permutation is kv_permutation
        and (mask.seq_len, mask.q_block_size, mask.kv_block_size) == (seq_len, q_block_size, kv_block_size)
    ):
        return mask
    query_lo, query_hi, key_coords, step = boxes
    token_boxes = None if kv_block_partial is None else TokenBoxes(query_lo, query_hi, key_coords, tuple(step))
    return BlockMask(
        kv_block_indices, kv_block_counts, seq_len, q_block_size, kv_block_size, permutation, kv_block_partial,
        token_boxes, kv_permutation,
    )


@torch.library.custom_op(
    "dit_sparse::sparse_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor kv_block_indices, Tensor kv_block_counts, Tensor? permutation, "
    "Tensor? kv_block_partial, Tensor? query_lo, Tensor? query_hi, Tensor? key_coords, int[]? box_step, "
    "Tensor? text_padding_mask, int seq_len, int q_block_size, int kv_block_size, int frames, int height, int width, "
    "int text_len, str? text_position, float? scale, str backend, Tensor? kv_permutation=None) -> Tensor",
)
def _sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_block_indices: torch.Tensor,
    kv_block_counts: torch.Tensor,
    permutation: torch.Tensor | None,
    kv_block_partial: torch.Tensor | None,
    query_lo: torch.Tensor | None,
    query_hi: torch.Tensor | None,
    key_coords: torch.Tensor | None,
    box_step: list[int] | None,
    text_padding_mask: torch.Tensor | None,
    seq_len: int,
    q_block_size: int,
    kv_block_size: int,
    frames: int,
    height: int,
    width: int,
    text_len: int,
    text_position: str | None,
    scale: float | None,
    backend: str,
    kv_permutation: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sparse_attention` with the BlockMask and VideoLayout spelled out as tensors and ints; (B, S, H, D) out,
    contiguous. What compiled graphs call in place of the interceptor's eager `sparse_attention`."""
    mask = _block_mask_of(
        kv_block_indices, kv_block_counts, permutation, kv_block_partial, (query_lo, query_hi, key_coords, box_step),
        seq_len, q_block_size, kv_block_size, kv_permutation,
    )
    layout = VideoLayout(frames, height, width, text_len, text_position)
    out = sparse_attention(q, k, v, mask, layout, text_padding_mask=text_padding_mask, scale=scale, backend=backend)
    return out.contiguous()


@_sparse_attention_op.register_fake
def _sparse_attention_fake(q, k, v, *args, **kwargs) -> torch.Tensor:
    return q.new_empty(q.shape)  # (B, S, H, D), contiguous like the real output


# ---- install / remove -------------------------------------------------------------------------------------------
def install(transformer: torch.nn.Module, adapter: TransformerAdapter, session: SparseSession) -> None:
    sites = adapter.attention_sites(transformer)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
        TransformerHook(session, adapter, [site.layer for site in sites]), TRANSFORMER_HOOK
    )
    for site in sites:
        HookRegistry.check_if_exists_or_initialize(site.module).register_hook(
            AttentionHook(site, session), ATTENTION_HOOK
        )
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def hooked_modules(transformer: torch.nn.Module) -> list[str]:
    """Qualified names of the modules under `transformer` that carry a dit-sparse hook ("" is the transformer)."""
    return [
        name
        for name, module in transformer.named_modules()
        if getattr(module, "_diffusers_hook", None) is not None
        and {TRANSFORMER_HOOK, ATTENTION_HOOK} & set(module._diffusers_hook.hooks)
    ]


def session_of(transformer: torch.nn.Module) -> SparseSession | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(TRANSFORMER_HOOK) if registry is not None else None
    return hook.session if hook is not None else None


def remove(transformer: torch.nn.Module) -> bool:
    """Remove every dit-sparse hook under `transformer`; registries left empty are dropped. True if any was there."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None:
        return False
    found = registry.get_hook(TRANSFORMER_HOOK) is not None
    registry.remove_hook(TRANSFORMER_HOOK, recurse=True)
    registry.remove_hook(ATTENTION_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()
    for module in transformer.modules():
        child_registry = module.__dict__.get("_diffusers_hook")
        if child_registry is not None and not child_registry.hooks:
            del module._diffusers_hook
            _drop_restored_forward(module)
    return found


def _drop_restored_forward(module: torch.nn.Module) -> None:
    """A removed hook leaves the class's own forward as an instance attribute; drop it so the module is as before."""
    forward = module.__dict__.get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward
