"""`sparsify` / `unsparsify`: wrap a diffusers pipeline's self-attention in one line, and restore it exactly."""

from __future__ import annotations

from typing import Any

import torch

from dit_sparse import hooks
from dit_sparse.config import MethodConfig, make_config
from dit_sparse.pipelines.adapters import find_adapter, supported_classes

#: diffusers attention backends that end in torch's scaled_dot_product_attention, which dit-sparse intercepts.
_NATIVE_BACKENDS = (None, "native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


def _transformers_of(obj: Any, *, require_adapter: bool) -> list[torch.nn.Module]:
    """The transformer(s) of a pipeline, a transformer, or a list of them (Wan 2.2's two experts)."""
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _transformers_of(item, require_adapter=require_adapter)]
    if isinstance(obj, torch.nn.Module):
        if require_adapter and find_adapter(obj) is None:
            raise ValueError(
                f"no dit-sparse adapter for transformer class {type(obj).__name__!r}; supported: {supported_classes()}"
            )
        return [obj]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        modules = [m for m in components.values() if isinstance(m, torch.nn.Module)]
        found = [m for m in modules if find_adapter(m) is not None]
        if not found and require_adapter:
            classes = sorted({type(m).__name__ for m in modules})
            raise ValueError(
                f"no dit-sparse adapter for pipeline {type(obj).__name__!r} (its modules: {classes}); "
                f"supported transformer classes: {supported_classes()}"
            )
        return found if require_adapter else modules
    raise TypeError(
        f"sparsify takes a diffusers pipeline, a transformer or a list of transformers, got {type(obj).__name__}"
    )


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


def sparsify(pipe: Any, method: str | MethodConfig = "radial", **options) -> Any:
    """Route the self-attention of `pipe`'s transformer(s) through block-sparse attention; returns `pipe`.

    `pipe` is a diffusers pipeline, a transformer, or a list of transformers. `method` is a method name
    (`"dense"`, `"radial"`, `"random"`) or a config from `dit_sparse.config`; `options` override its fields, e.g.
    `sparsify(pipe, "radial", dense_steps=12, dense_layers=1)`. Sparsifying again replaces the earlier setting.
    Works with `enable_model_cpu_offload()`. Every check happens before anything is changed.
    """
    config = make_config(method, **options)
    transformers = _transformers_of(pipe, require_adapter=True)
    plan = []
    for transformer in transformers:
        adapter = find_adapter(transformer)
        sites = adapter.attention_sites(transformer)
        _check_attention_backend(transformer, sites)
        plan.append((transformer, adapter))
    unsparsify(pipe)
    session = hooks.SparseSession(config)
    for transformer, adapter in plan:
        hooks.install(transformer, adapter, session)
    return pipe


def unsparsify(pipe: Any) -> Any:
    """Remove every dit-sparse hook from `pipe`; its output is then bit-identical to a pipeline never wrapped."""
    for transformer in _transformers_of(pipe, require_adapter=False):
        hooks.remove(transformer)
    return pipe


def sparsity_stats(pipe: Any, reset: bool = False) -> dict:
    """Method, mean kept fraction (`density`, dense calls count 1.0) and number of self-attention calls so far.

    Counts accumulate over pipeline calls until `reset=True` (which returns the counts, then clears them).
    """
    for transformer in _transformers_of(pipe, require_adapter=False):
        session = hooks.session_of(transformer)
        if session is not None:
            stats = session.stats()
            if reset:
                session.reset_stats()
            return stats
    raise ValueError(f"{type(pipe).__name__} is not sparsified: call dit_sparse.sparsify first")
