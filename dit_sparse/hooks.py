"""The hooks `sparsify` installs: one per transformer (layout, step), one per self-attention module (interception).

A transformer hook sets a context variable for the duration of its forward; an attention hook, while that context
is set, runs its module under a `TorchFunctionMode` that routes the module's `scaled_dot_product_attention` call to
`sparse_attention`. Outside a hooked forward every call falls through untouched, and no global state is left when
the hooks are removed.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.overrides import TorchFunctionMode

from dit_sparse.attention import sparse_attention
from dit_sparse.blockmask import BlockMask
from dit_sparse.config import MethodConfig
from dit_sparse.layout import VideoLayout
from dit_sparse.patterns import build_mask, is_static
from dit_sparse.pipelines.adapters import AttentionSite, TransformerAdapter

TRANSFORMER_HOOK = "dit_sparse.transformer"
ATTENTION_HOOK = "dit_sparse.attention"

_SDPA_FUNCTIONS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


@dataclass
class SparseSession:
    """State shared by every hook of one `sparsify` call (both Wan 2.2 experts share one session).

    Holds the config, the masks (static ones built once per layout and device), the denoising step counter and
    the density statistics.
    """

    config: MethodConfig
    masks: dict = field(default_factory=dict)
    step: int = 0
    last_timestep: float | None = None
    attention_calls: int = 0
    kept_fraction_sum: float = 0.0

    def observe_call(self, timestep, step_index: int | None) -> int:
        """Advance the step counter for one transformer call; CFG's second call of a step repeats the timestep."""
        value = None
        if isinstance(timestep, torch.Tensor):
            value = float(timestep.max())
        elif timestep is not None:
            value = float(timestep)
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

    def mask_for(self, layout: VideoLayout, q: torch.Tensor, k: torch.Tensor) -> tuple[BlockMask, float]:
        """The mask of this call and its density; static masks are cached per (layout, device)."""
        key = (layout, str(q.device))
        if is_static(self.config) and key in self.masks:
            return self.masks[key]
        mask = build_mask(layout, self.config, q=q, k=k, device=q.device)
        entry = (mask, mask.density)
        if is_static(self.config):
            self.masks[key] = entry
        return entry

    def record(self, kept_fraction: float) -> None:
        self.attention_calls += 1
        self.kept_fraction_sum += kept_fraction

    def stats(self) -> dict:
        density = self.kept_fraction_sum / self.attention_calls if self.attention_calls else None
        return {"method": self.config.method, "density": density, "attention_calls": self.attention_calls}

    def reset_stats(self) -> None:
        self.attention_calls, self.kept_fraction_sum = 0, 0.0


@dataclass(frozen=True)
class _ForwardContext:
    session: SparseSession
    layout: VideoLayout
    step: int


_ACTIVE: contextvars.ContextVar[_ForwardContext | None] = contextvars.ContextVar("dit_sparse_active", default=None)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class TransformerHook(ModelHook):
    """Per transformer: derives the layout and the step of each forward and makes them visible to attention hooks."""

    _is_stateful = True

    def __init__(self, session: SparseSession, adapter: TransformerAdapter):
        super().__init__()
        self.session = session
        self.adapter = adapter
        # diffusers' `cache_context` sets the pipeline's step index on every StateManager of a stateful hook.
        self.cache_context = StateManager(_NoState)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        layout = self.adapter.layout(module, args, kwargs)
        context = self.cache_context._context
        step_index = getattr(context, "step_index", None) if context is not None else None
        step = self.session.observe_call(self.adapter.timestep(args, kwargs), step_index)
        token = _ACTIVE.set(_ForwardContext(self.session, layout, step))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.session.reset_steps()
        return module


class _AttentionInterceptor(TorchFunctionMode):
    """Routes `scaled_dot_product_attention` inside one self-attention module to the sparse path."""

    def __init__(self, context: _ForwardContext, site_name: str, layer: int):
        super().__init__()
        self.context, self.site_name, self.layer = context, site_name, layer
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SDPA_FUNCTIONS:
            return func(*args, **kwargs)
        self.calls += 1
        return self._attend(func, *args, **kwargs)

    def _attend(
        self, sdpa, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        # query, key, value: (B, H, S, D), as diffusers' native backend passes them to SDPA.
        session, layout, step = self.context.session, self.context.layout, self.context.step
        config = session.config
        if attn_mask is not None or is_causal or dropout_p or enable_gqa or key.shape[1] != query.shape[1]:
            raise NotImplementedError(
                f"{self.site_name}: sparse attention supports plain self-attention only, got attn_mask="
                f"{None if attn_mask is None else tuple(attn_mask.shape)}, is_causal={is_causal}, "
                f"dropout_p={dropout_p}, enable_gqa={enable_gqa}"
            )
        if query.shape[2] != layout.seq_len or key.shape[2] != layout.seq_len:
            raise RuntimeError(
                f"{self.site_name}: attention over {query.shape[2]} queries and {key.shape[2]} keys, but the "
                f"transformer's input gives {layout} ({layout.seq_len} tokens)"
            )
        if step < config.dense_steps or self.layer < config.dense_layers:
            session.record(1.0)
            return sdpa(query, key, value, scale=scale)
        mask, density = session.mask_for(layout, query, key)
        session.record(density)
        out = sparse_attention(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            mask,
            layout,
            scale=scale,
            backend=config.backend,
        )
        return out.transpose(1, 2)


class AttentionHook(ModelHook):
    """Per self-attention module: intercepts its attention call while a hooked transformer forward runs."""

    def __init__(self, site: AttentionSite):
        super().__init__()
        self.site_name, self.layer = site.name, site.layer

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        context = _ACTIVE.get()
        if context is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        interceptor = _AttentionInterceptor(context, self.site_name, self.layer)
        with interceptor:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if interceptor.calls == 0:
            raise RuntimeError(
                f"{self.site_name}: no scaled_dot_product_attention call was seen; its attention backend bypasses "
                "torch SDPA. dit-sparse needs diffusers' native attention backend on sparsified modules."
            )
        return output


def install(transformer: torch.nn.Module, adapter: TransformerAdapter, session: SparseSession) -> None:
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
        TransformerHook(session, adapter), TRANSFORMER_HOOK
    )
    for site in adapter.attention_sites(transformer):
        HookRegistry.check_if_exists_or_initialize(site.module).register_hook(AttentionHook(site), ATTENTION_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


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
