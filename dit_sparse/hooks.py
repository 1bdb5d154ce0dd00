"""What `sparsify` installs: a hook on each transformer (layout, step) and an interception on each self-attention
module.

A transformer hook (diffusers' HookRegistry) begins each forward by deriving its plan (the video layout, whether this
step and layer run dense, the block mask) and publishing it on the session. A self-attention module's class is
swapped for a subclass of it (one per class, same name) whose `forward`, while a plan is published, runs the module's
own forward under a `TorchFunctionMode` that routes its `scaled_dot_product_attention` call to the sparse path; a
module that already has an instance-level `forward` (another HookRegistry hook) gets a HookRegistry hook instead.
The joint text is whatever the call has beyond the video tokens and the adapter's extra tokens off the grid
(`text_len = S - video_len - extra_len`), at the side the adapter names; a key-padding attention mask becomes
`sparse_attention`'s `text_padding_mask`; any other SDPA call in the module (a cross-attention, as FLUX's IP-Adapter
makes) runs as it is. Outside a hooked forward every call falls through untouched; `remove` restores every class and
hook (the intercepting subclasses stay cached for the next `sparsify`, unused), and no other state is left.

torch.compile: the plan is built in a function dynamo skips (one graph break, before the first block); the plan
object is reused while the layout and the dense/sparse phase stay the same, so the compiled graph's guards hold from
step to step. In a sparse step the attention call is the custom op `dit_sparse::attention(q, k, v, site, ...)`:
`site` is the module's token, a one-element CPU tensor that compiled code passes through as a graph input; the op's body
finds the layer, the mask (static, per layer, or estimated from q and k) and the kernel from it on the host. Traced
code never reads a layer index or a per-module object identity, so all blocks trace to one graph: regional
compilation (`compile_repeated_blocks`) compiles one block for every block, dynamic patterns compile without a graph
break, and the rest of each block (norms, modulation, RoPE, MLP) fuses around the op.

What a sparsified pipeline remembers (plans, masks, steps, statistics) is its `SparseSession` (`dit_sparse.session`);
`observe` installs an observing session (every call dense, its q, k, v handed to a function) for calibration.

Under diffusers' Ulysses context parallelism (`dit_sparse.parallel`) the intercepted call holds the full sequence
for this rank's heads: the call puts the tokens in the natural order when joint text makes the gathered order
differ, takes this rank's rows of a per-head mask (and its entries of per-head settings), and restores the gathered
order on the way out.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.overrides import TorchFunctionMode

from dit_sparse.attention import sparse_attention
from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import mask_for_heads, ulysses_shard
from dit_sparse.pipelines.adapters import TransformerAdapter
from dit_sparse.session import ForwardPlan, Observer, SparseSession

TRANSFORMER_HOOK = "dit_sparse.transformer"
ATTENTION_HOOK = "dit_sparse.attention"

_SDPA_FUNCTIONS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


def _refuse_copy(what: str) -> None:
    """`copy.deepcopy` or pickling reached a dit-sparse hook. A deep copy would be wrong, not just incomplete:
    diffusers' HookRegistry wraps `forward` in a closure that deepcopy keeps as is, so the copy's forward would run
    the original module's hooks and weights."""
    raise TypeError(
        f"{what} cannot be deep-copied or pickled: a copy of a sparsified model would still run the original's hooks "
        "(diffusers' hooks keep a reference to the original forward). Call dit_sparse.unsparsify(model) first, copy "
        "or save it, then sparsify each model; to save weights, model.state_dict() works while sparsified"
    )


class TransformerHook(ModelHook):
    """Per transformer: derives the plan of each forward (layout, step) and publishes it to the attention calls."""

    _is_stateful = True

    def __init__(self, session: SparseSession, adapter: TransformerAdapter, layers: list[int]):
        super().__init__()
        self.session = session
        self.adapter = adapter
        self.layers = layers
        # diffusers' `cache_context` sets the pipeline's step index on every StateManager of a stateful hook.
        self.cache_context = StateManager(_NoState)

    def __reduce_ex__(self, protocol):
        _refuse_copy("the transformer's dit-sparse hook")

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
        self.session.warn_if_steps_all_dense()
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


# ---- one self-attention module: its site, the traced interception, the call run on the host ---------------------
@dataclass(eq=False)
class _Site:
    """One hooked self-attention module: the adapter's site (name, layer), the session, its token, and the adapter's
    `skips_attention` (which calls may make no attention call).

    The token is a one-element CPU int64 tensor holding the site's number, kept in the module's `__dict__` (not a
    parameter or buffer: no state dict, `.to()` or quantization touches it). Compiled code takes it as a graph input
    like any other tensor and hands it to the custom op, whose body looks the site up by that number (so a copy of
    the token, as torch.library's checks pass, still names it). Every block thus traces to the same graph, and
    regional compilation (`compile_repeated_blocks`) compiles one block for all."""

    name: str
    layer: int
    session: SparseSession
    module: weakref.ref
    skips_attention: Callable[[dict], bool] | None = None
    token: torch.Tensor = field(init=False)

    def __post_init__(self):
        number = next(_SITE_NUMBERS)
        self.token = torch.tensor([number], dtype=torch.int64, device="cpu")  # on the host, whatever the default
        _SITES[number] = self

    def __reduce_ex__(self, protocol):
        _refuse_copy(f"the dit-sparse site of {self.name}")


_SITE_NUMBERS = itertools.count()
_SITES: "weakref.WeakValueDictionary[int, _Site]" = weakref.WeakValueDictionary()  # live sites only


def _site_of(token: torch.Tensor) -> _Site:
    site = _SITES.get(int(token[0])) if token.dtype == torch.int64 and token.numel() == 1 else None
    if site is None:
        raise RuntimeError(
            f"dit_sparse::attention got {token!r}, which is no hooked attention module's site token (its module "
            "was unsparsified, or the tensor is not one)"
        )
    return site


def _intercepted_forward(module: torch.nn.Module, forward, args: tuple, kwargs: dict):
    """`forward(*args, **kwargs)` of a hooked self-attention module, its attention call routed to the sparse path
    while a hooked transformer forward runs. Traced by torch.compile: it reads only what every block shares (the
    session and its plan) and the site's token, never the layer."""
    site = getattr(module, "_dit_sparse_site", None)
    plan = None if site is None else site.session.active
    if plan is None:
        return forward(*args, **kwargs)
    interceptor = _AttentionInterceptor(site, plan)
    with interceptor:
        output = forward(*args, **kwargs)
    if interceptor.calls == 0 and not (site.skips_attention is not None and site.skips_attention(kwargs)):
        raise RuntimeError(
            f"{site.name}: no scaled_dot_product_attention call was seen; its attention backend "
            "bypasses torch SDPA. dit-sparse needs diffusers' native attention backend on sparsified modules."
        )
    return output


class _AttentionInterceptor(TorchFunctionMode):
    """Routes the self-attention `scaled_dot_product_attention` call inside one self-attention module (keys of the
    query's own sequence) to the sparse path; any other SDPA call there (a cross-attention) runs as it is."""

    def __init__(self, site: _Site, plan: ForwardPlan):
        super().__init__()
        self.site, self.plan = site, plan  # traced code reads the site's session and token (and its name to raise)
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
        # query, key, value: (B, H, S, D), as diffusers' native backend and direct callers pass them to SDPA.
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_arguments(*args, **kwargs)
        if not query.shape[2] == key.shape[2] == value.shape[2]:
            # Not the module's self-attention: keys from another sequence (FLUX's IP-Adapter attends the image
            # tokens to its image-prompt tokens in the same module). The original call, dense.
            return func(*args, **kwargs)
        self.calls += 1
        if is_causal or dropout_p or enable_gqa or not (query.shape[:3] == key.shape[:3] == value.shape[:3]):
            raise NotImplementedError(
                f"{self.site.name}: sparse attention supports self-attention only (q, k, v of one (B, H, S)), "
                f"got q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}, is_causal={is_causal}, "
                f"dropout_p={dropout_p}, enable_gqa={enable_gqa}"
            )
        if self.plan.sparse_from is None and self.site.session.observer is None:
            return func(*args, **kwargs)  # a dense step: the original call, mask and all, in every layer
        if torch.compiler.is_compiling():
            return torch.ops.dit_sparse.attention(query, key, value, self.site.token, attn_mask, scale)
        return _site_attention(self.site, query, key, value, attn_mask, scale)


def _site_attention(site: _Site, query, key, value, attn_mask, scale) -> torch.Tensor:
    """One self-attention call of `site` in a sparse step, on the host (eagerly, also under torch.compile, as the
    custom op's body): the layer's dense call or its mask, and the sparse kernel. (B, H, S, D) in and out."""
    session, plan = site.session, site.session.active
    if plan is None:
        raise RuntimeError(f"{site.name}: dit_sparse::attention ran outside a hooked transformer forward")
    layout = plan.call_layout(query.shape[2], site.name)
    module = site.module()
    shard = None if module is None else ulysses_shard(module, site.name)
    local_heads = query.shape[1]
    heads = None if shard is None else (shard.head_offset(local_heads), local_heads)
    orders = None if shard is None else session.token_order(layout, shard.world, query.device)
    dense_args = (query, key, value, attn_mask)
    if orders is not None:  # Ulysses gathered [video_0; text_0; video_1; text_1; ...]: into [video; text]
        query, key, value = (x[:, :, orders[0]] for x in (query, key, value))
        attn_mask = _mask_in_order(attn_mask, orders[0], query.shape[2])
    text_padding_mask = _text_padding_mask(plan, site.name, attn_mask, layout, query.shape[0])
    if session.observer is not None:  # calibration: sees every call's q, k, v (B, H, S, D)
        session.observer(layer=site.layer, step=session.step, layout=layout, q=query, k=key, v=value)
    if plan.is_dense(site.layer):
        return F.scaled_dot_product_attention(*dense_args[:3], attn_mask=dense_args[3], scale=scale)
    mask = plan.mask
    if mask is None:  # a pattern that reads q and k or the layer: taken here, counted here
        mask, density = session.mask_for(layout, query.device, q=query, k=key, layer=site.layer, site=site,
                                         heads=heads)
        session.record(density)
    if heads is not None:  # this rank's rows of a per-head mask
        mask = mask_for_heads(mask, heads[0], local_heads, local_heads * shard.world)
    if plan.min_recall is not None:  # the recall guard: blocks added to this call's mask, static ones too
        video = layout.video_slice
        mask = session.guard(mask, query[:, :, video], key[:, :, video], scale)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, S, H, D)
    out = sparse_attention(q, k, v, mask, layout, text_padding_mask=text_padding_mask, scale=scale,
                           backend=plan.backend, compensate=plan.compensate).transpose(1, 2)  # (B, H, S, D)
    return out if orders is None else out[:, :, orders[1]]


def _text_padding_mask(plan: ForwardPlan, site_name: str, attn_mask, layout: VideoLayout,
                       batch: int) -> torch.Tensor | None:
    """(B, text_len) bool, True for real text tokens, from the call's key-padding mask; None without one."""
    if attn_mask is None:
        return None
    if plan.attention_mask != "key_padding":
        raise NotImplementedError(
            f"{site_name}: got an attention mask {tuple(attn_mask.shape)}, but this transformer's adapter "
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
            f"{site_name}: a key-padding attention mask must be bool (B or 1, 1, 1 or S, S) with B={batch}, "
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


# ---- torch.compile: a sparse step's attention call as one opaque op ----------------------------------------------
_OP_TAGS = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None)


@torch.library.custom_op(
    "dit_sparse::attention",
    mutates_args=(),
    schema="(Tensor query, Tensor key, Tensor value, Tensor site, Tensor? attn_mask, float? scale) -> Tensor",
    tags=_OP_TAGS,  # its body runs host logic (plans, masks, estimates): never captured into a CUDA graph
)
def _attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    site: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """What compiled graphs call in place of a sparse step's self-attention: `_site_attention` of the module whose
    token `site` is. (B, H, S, D) out, over a (B, S, H, D)-contiguous buffer (the layout the fake promises)."""
    out = _site_attention(_site_of(site), query, key, value, attn_mask, scale)
    if out.transpose(1, 2).is_contiguous():
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@_attention_op.register_fake
def _attention_fake(query, key, value, site, attn_mask, scale) -> torch.Tensor:
    batch, heads, seq_len, _ = query.shape
    return query.new_empty(batch, seq_len, heads, value.shape[-1]).transpose(1, 2)


# ---- install / remove -------------------------------------------------------------------------------------------
_INTERCEPTING_CLASSES: dict[type, type] = {}


def _refuse_module_copy(module: torch.nn.Module, protocol) -> None:
    _refuse_copy(f"sparsified {type(module).__name__} module")


def _intercepting_class(cls: type) -> type:
    """The subclass of an attention module class whose `forward` is intercepted: one per class, shared by every
    module of it (so dynamo sees one type and one `forward` across blocks), named as the class it extends."""
    if cls not in _INTERCEPTING_CLASSES:
        original = cls.forward  # the function itself: dynamo cannot trace `cls.forward` on some classes

        def forward(self, *args, **kwargs):
            return _intercepted_forward(self, original, (self, *args), kwargs)

        _INTERCEPTING_CLASSES[cls] = type(
            cls.__name__, (cls,), {"forward": forward, "__qualname__": cls.__qualname__, "__module__": cls.__module__,
                                   "_dit_sparse_extends": cls, "__reduce_ex__": _refuse_module_copy}
        )
    return _INTERCEPTING_CLASSES[cls]


class AttentionHook(ModelHook):
    """Interception for a self-attention module that already has an instance-level `forward` when `sparsify` runs
    (another HookRegistry hook, say): the class-level interception would be bypassed, so it joins the hook chain.
    Such modules recompile per block under regional compilation (each hook's bound forward is its own object)."""

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return _intercepted_forward(module, self.fn_ref.original_forward, args, kwargs)


def install(transformer: torch.nn.Module, adapter: TransformerAdapter, session: SparseSession) -> None:
    """One HookRegistry hook on the transformer (the plan of each forward); on each self-attention module the
    interception: its class swapped for the intercepting subclass of it, or a HookRegistry hook where the module
    already has an instance-level `forward`."""
    sites = adapter.attention_sites(transformer)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
        TransformerHook(session, adapter, [site.layer for site in sites]), TRANSFORMER_HOOK
    )
    for site in sites:
        module = site.module
        module._dit_sparse_site = _Site(site.name, site.layer, session, weakref.ref(module), adapter.skips_attention)
        if "forward" in module.__dict__:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(AttentionHook(), ATTENTION_HOOK)
        else:
            module.__class__ = _intercepting_class(type(module))
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


@contextlib.contextmanager
def observe(transformer: torch.nn.Module, adapter: TransformerAdapter, observer: Observer) -> Iterator[SparseSession]:
    """While the block runs, `transformer` runs dense with `observer` called on each self-attention call's q, k, v
    (`SparseSession.observing`); the hooks are removed on the way out, whatever happens. The transformer must not be
    sparsified (unsparsify it first)."""
    if session_of(transformer) is not None:
        raise ValueError(f"{type(transformer).__name__} is sparsified: call dit_sparse.unsparsify before observing it")
    session = SparseSession.observing(observer)
    install(transformer, adapter, session)
    try:
        yield session
    finally:
        remove(transformer)


def hooked_modules(transformer: torch.nn.Module) -> list[str]:
    """Qualified names of the modules under `transformer` that dit-sparse intercepts ("" is the transformer)."""
    names = []
    for name, module in transformer.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        if "_dit_sparse_site" in module.__dict__ or (registry is not None and TRANSFORMER_HOOK in registry.hooks):
            names.append(name)
    return names


def session_of(transformer: torch.nn.Module) -> SparseSession | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(TRANSFORMER_HOOK) if registry is not None else None
    return hook.session if hook is not None else None


def remove(transformer: torch.nn.Module) -> bool:
    """Remove every dit-sparse hook under `transformer` (swapped classes restored, registries left empty dropped).
    True if any was there."""
    registry = getattr(transformer, "_diffusers_hook", None)
    found = registry is not None and registry.get_hook(TRANSFORMER_HOOK) is not None
    if registry is not None:
        registry.remove_hook(TRANSFORMER_HOOK, recurse=True)
        registry.remove_hook(ATTENTION_HOOK, recurse=True)
        registry.invalidate_child_registries_cache()
    for module in transformer.modules():
        if module.__dict__.pop("_dit_sparse_site", None) is not None:
            found = True
            module.__class__ = getattr(type(module), "_dit_sparse_extends", type(module))
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
