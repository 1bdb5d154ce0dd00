"""`sparsify` / `unsparsify`: wrap a diffusers pipeline's self-attention in one line, and restore it exactly."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from dit_sparse import hooks, kernels
from dit_sparse.config import MethodConfig
from dit_sparse.patterns import is_static, make_config
from dit_sparse.pipelines.adapters import find_adapter, transformers_of
from dit_sparse.profile import Profile
from dit_sparse.session import SparseSession

#: diffusers attention backends that end in torch's scaled_dot_product_attention, which dit-sparse intercepts.
_NATIVE_BACKENDS = (None, "native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


def _check_attention_backend(transformer: torch.nn.Module, sites) -> None:
    for site in sites:
        processor = getattr(site.module, "processor", None)
        backend = getattr(processor, "_attention_backend", None)
        backend = getattr(backend, "value", backend)
        if backend not in _NATIVE_BACKENDS:
            raise ValueError(
                f"{type(transformer).__name__}.{site.name} uses attention backend {backend!r}; dit-sparse needs one "
                f"of diffusers' native backends {[b for b in _NATIVE_BACKENDS if b]} (or none set) on the modules "
                "it sparsifies"
            )


def _weights_device(transformer: torch.nn.Module) -> torch.device | None:
    """Where `transformer` runs, when its weights say so: None under offloading (accelerate's hooks, as
    `enable_model_cpu_offload` sets; diffusers' group offloading), which moves them per call, and on meta."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if hasattr(module, "_hf_hook") or (registry is not None and "group_offloading" in registry.hooks):
            return None
    weight = next(transformer.parameters(), None)
    return None if weight is None or weight.device.type == "meta" else weight.device


def _config_for(transformer: torch.nn.Module, adapter, method: str | MethodConfig, options: dict) -> MethodConfig:
    """The config `transformer` runs: a method name takes its family's defaults for the options the user left unset
    (radial's `hunyuan` variant on HunyuanVideo); a config object is taken as given."""
    if isinstance(method, str):
        options = {**adapter.default_options.get(method, {}), **options}
    config = make_config(method, **options)
    reason = adapter.unsupported_methods.get(config.method)
    if reason is not None:
        raise ValueError(f"method {config.method!r} does not apply to {type(transformer).__name__}: {reason}")
    return config


def _profile_config(profile, method, options: dict) -> tuple[Profile, MethodConfig]:
    profile = profile if isinstance(profile, Profile) else Profile.load(profile)
    if method is not None and (method.method if isinstance(method, MethodConfig) else method) != profile.method:
        raise ValueError(f"the profile is for method {profile.method!r}; sparsify was asked for {method!r} "
                         "(leave the method out to use the profile's)")
    return profile, profile.config(**options)


def sparsify(pipe: Any, method: str | MethodConfig | None = None, *, profile=None, **options) -> Any:
    """Route the self-attention of `pipe`'s transformer(s) through block-sparse attention; returns `pipe`.

    `pipe` is a diffusers pipeline, a transformer, or a list of transformers. `method` is a method name
    (`"dense"`, `"radial"`, `"random"`, ...: `dit_sparse.CONFIGS`) or a config from `dit_sparse.patterns`; `options` override its fields, e.g.
    `sparsify(pipe, "radial", dense_steps=12, dense_layers=1)`; no method means `"radial"`. A method name takes the
    model family's defaults for options you do not set (radial uses its `hunyuan` variant on HunyuanVideo); a config
    object is used as given. `profile` (a `dit_sparse.Profile` or the path of one `calibrate` wrote) gives the method
    and its per-layer, per-head settings (checked against each transformer: class, layers, heads); `options` then
    override the rest (e.g. `refresh=5`).
    Sparsifying again replaces the earlier setting. Works with `enable_model_cpu_offload()` and, sparsified first,
    with `torch.compile`. Every check happens before anything is changed; an empty list is a ValueError; a named
    `backend` (e.g. "fa4") is checked against the device the transformer's weights are on (move the pipeline there
    first), except under model CPU offload, where the weights do not say where it runs: the first attention call
    checks it then. A setting that leaves the method nothing to do (`dense_layers` covering every block,
    `dense_steps` every step of a run, a `block_size` holding the whole video) is warned about once on the
    `dit_sparse` logger (`dit_sparse.session`).
    """
    if profile is not None:
        profile, profile_config = _profile_config(profile, method, options)
    else:
        method = "radial" if method is None else method
        make_config(method, **options)  # the user's own method and options, checked first
    transformers = transformers_of(pipe, require_adapter=True)
    plan = []
    for transformer in transformers:
        adapter = find_adapter(transformer)
        sites = adapter.attention_sites(transformer)
        _check_attention_backend(transformer, sites)
        if profile is not None:
            profile.check(transformer, adapter)
            config = profile_config
        else:
            config = _config_for(transformer, adapter, method, options)
        device = _weights_device(transformer)
        if device is not None:
            kernels.check_backend(config.backend, device)
        plan.append((transformer, adapter, sites, config))
    pipeline = _pipeline_ref(pipe)
    unsparsify(pipe)
    sessions: list[SparseSession] = []  # transformers with one config share steps, masks and statistics
    for transformer, adapter, sites, config in plan:
        session = next((s for s in sessions if s.config == config), None)
        if session is None:
            session = SparseSession(config, pipeline=pipeline)
            sessions.append(session)
        hooks.install(transformer, adapter, session)
        session.warn_if_layers_all_dense(type(transformer).__name__, [site.layer for site in sites])
    return pipe


def _pipeline_ref(pipe: Any) -> weakref.ref | None:
    """A weak reference to `pipe` when it is a pipeline (its scheduler tells a run's step count), else None."""
    if isinstance(pipe, (torch.nn.Module, list, tuple)):
        return None
    try:
        return weakref.ref(pipe)
    except TypeError:  # an object that takes no weak references (a namespace of components): no step count
        return None


def unsparsify(pipe: Any) -> Any:
    """Remove every dit-sparse hook from `pipe`; its output is then bit-identical to a pipeline never wrapped."""
    for transformer in transformers_of(pipe, require_adapter=False):
        hooks.remove(transformer)
    return pipe


def sparsity_stats(pipe: Any, reset: bool = False) -> dict:
    """Method, mean kept fraction (`density`, dense calls count 1.0), number of self-attention calls so far
    (`attention_calls`) and how many of them ran the method's mask (`sparse_calls`; the rest were dense by
    `dense_steps` / `dense_layers`: 0 means the method never ran, which `sparsify` or the run also warns about).

    Counts one call per self-attention module per transformer forward, over every transformer of `pipe`; the counts
    accumulate over pipeline calls until `reset=True` (which returns the counts, then clears them). Dynamic methods
    (`draft`, `reorder`) add `mask_builds`: how many masks were estimated (the rest were reused per `refresh`);
    per-layer ones (`vdit`) too: how many were built (one per layout and layer). With the recall guard
    (`min_recall`), `density` includes the blocks it added, and the stats add `guard_added_density` (the density it
    added, mean over the sparse calls) and `guard_calls` (how many calls it changed); both are summed on the device
    per call and read here once.
    """
    sessions = []
    for transformer in transformers_of(pipe, require_adapter=False):
        session = hooks.session_of(transformer)
        if session is not None and all(session is not seen for seen in sessions):
            sessions.append(session)
    if not sessions:
        raise ValueError(f"{type(pipe).__name__} is not sparsified: call dit_sparse.sparsify first")
    calls = sum(session.attention_calls for session in sessions)
    kept = sum(float(session.kept_fraction_sum) for session in sessions)  # dynamic masks add device tensors
    guard_added = sum(float(session.guard_added_sum) for session in sessions)
    kept += guard_added
    stats = {"method": sessions[0].config.method, "density": kept / calls if calls else None, "attention_calls": calls,
             "sparse_calls": sum(session.sparse_calls for session in sessions)}
    if not is_static(sessions[0].config):
        stats["mask_builds"] = sum(session.mask_builds for session in sessions)
    if sessions[0].config.min_recall is not None:
        sparse = stats["sparse_calls"]
        stats["guard_added_density"] = guard_added / sparse if sparse else None
        stats["guard_calls"] = sum(int(session.guard_calls_sum) for session in sessions)
    if reset:
        for session in sessions:
            session.reset_stats()
    return stats
