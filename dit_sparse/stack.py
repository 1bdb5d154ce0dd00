"""The pieces `optimize` stacks on a pipeline beside sparse attention, each usable on its own, each undone exactly.

- Step caches: diffusers' own (`enable_cache` with FirstBlockCache, TaylorSeer, MagCache, FasterCache, Pyramid
  Attention Broadcast configs) or cache-dit's DBCache (`cache_dit.enable_cache`), named by a string with options
  (`"first_block:threshold=0.1"`, `"taylorseer:cache_interval=2:disable_cache_before_step=10"`) or given as a
  diffusers cache config. Papers: FirstBlockCache (ParaAttention), TaylorSeer (Liu et al. 2025, arXiv:2503.06923),
  MagCache (Ma et al. 2025, arXiv:2506.09045), FasterCache (Lv et al. 2024, arXiv:2410.19355), PAB (Zhao et al.
  2024, arXiv:2408.12588), DBCache (cache-dit).
- FP8 linear layers: torchao's dynamic FP8 quantization (`quantize_(transformer,
  Float8DynamicActivationFloat8WeightConfig())`), on GPUs with FP8 tensor cores (compute capability >= 8.9).
- torch.compile: regional (`compile_repeated_blocks(fullgraph=True)`) or the whole transformer (`Module.compile`).

What was added is remembered on each transformer (`_dit_sparse_stack`, a `StackRecord`) and on the pipeline (the
cache-dit part), so `restore` undoes only that, in the reverse order. Every check (`plan_stack`) runs before anything
changes. Why diffusers' `apply_first_block_cache(pipe.transformer, ...)` called directly can fail with "No cache
context is set": a pipeline's `transformer.cache_context(...)` hands the context to the hooks it finds through the
transformer's HookRegistry, which caches its list of child registries on first use; `enable_cache` invalidates that
list after adding its block hooks, a direct `apply_*` does not, so on a transformer that already ran under a cache
context (or was sparsified and ran) the new block hooks never get the context. `apply_cache` goes through
`enable_cache` and invalidates the list again.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from dit_sparse.options import parse_option_value

CACHE_NAMES = ("first_block", "taylorseer", "mag", "faster", "pab", "cache-dit")
COMPILE_MODES = ("regional", "full")
#: FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)
STACK_ATTRIBUTE = "_dit_sparse_stack"

#: Per cache, the settings `optimize` uses for options the user leaves unset, chosen from the tiny model's quality
#: sweep (benchmarks/compose_quality.py; benchmarks/results/compose-quality-tiny-cpu-2026-12-07: 17 frames, 25
#: steps, one prompt): the most skipping setting whose PSNR against dense stays >= 26 dB stacked with radial. mag,
#: faster, pab, cache-dit: their authors' defaults (not yet swept; mag needs the model's own ratios). A family may
#: override them (`FAMILY_CACHE_DEFAULTS`).
CACHE_DEFAULTS: dict[str, dict[str, Any]] = {
    "first_block": {"threshold": 0.1},  # 0.2 skipped 45% but fell to 16.6 dB; 0.1: 23% at 36.0 dB with radial
    "taylorseer": {"cache_interval": 4, "disable_cache_before_step": 10, "max_order": 1},  # 44% at 37.8 dB
    "mag": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
    "faster": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1, 681)},
    "pab": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
    "cache-dit": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                  "max_warmup_steps": 8},
}
#: Per adapter family, cache defaults that differ from `CACHE_DEFAULTS`.
#: Wan: TaylorSeer's default identifiers (`^blocks.*attn`, matched whole) name no Wan module (`blocks.N.attn1`), so
#: it would cache nothing; Wan's self- and cross-attention and feed-forward outputs are named instead.
FAMILY_CACHE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    family: {"taylorseer": {"cache_identifiers": [r"^blocks\.\d+\.attn1$", r"^blocks\.\d+\.attn2$",
                                                  r"^blocks\.\d+\.ffn$"]}}
    for family in ("wan", "wan_vace")
}


def parse_cache(spec: str) -> tuple[str, dict[str, Any]]:
    """`"name:key=value:key=value"` -> (name, options), values read by the one option parser
    (`parse_option_value`). ValueError naming the bad name or item and what is allowed."""
    if not isinstance(spec, str):
        raise TypeError(f"cache must be a string such as 'first_block:threshold=0.1' or a diffusers cache config, got "
                        f"{type(spec).__name__}")
    name, *items = [part.strip() for part in spec.split(":")]
    if name not in CACHE_NAMES:
        raise ValueError(f"unknown cache {name!r} in {spec!r}; allowed: {list(CACHE_NAMES)} (options after ':', "
                         "e.g. 'first_block:threshold=0.1'), or a diffusers cache config")
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"cache option {item!r} in {spec!r} is not KEY=VALUE")
        if key.strip() in options:
            raise ValueError(f"cache option {key.strip()!r} is given twice in {spec!r}")
        options[key.strip()] = parse_option_value(value)
    return name, options


def _diffusers_cache_classes() -> dict[str, type]:
    from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                                 PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig)

    return {"first_block": FirstBlockCacheConfig, "taylorseer": TaylorSeerCacheConfig, "mag": MagCacheConfig,
            "faster": FasterCacheConfig, "pab": PyramidAttentionBroadcastConfig}


def cache_name_of(config: Any) -> str | None:
    """The cache name of a diffusers cache config object (None for any other object)."""
    return next((name for name, cls in _diffusers_cache_classes().items() if isinstance(config, cls)), None)


def _make_config(cls: type, name: str, options: dict, timestep_callback) -> Any:
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"cache {name!r} has no option {unknown[0]!r}; {cls.__name__} takes {allowed}")
    if "current_timestep_callback" in allowed and options.get("current_timestep_callback") is None:
        options = {**options, "current_timestep_callback": timestep_callback}
    if "spatial_attention_timestep_skip_range" in options:
        options["spatial_attention_timestep_skip_range"] = tuple(options["spatial_attention_timestep_skip_range"])
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cache {name!r} rejects options {options}: {exc}") from exc


def _pipeline_runs_cfg_apart(pipe: Any) -> bool:
    """Whether `pipe`'s denoising loop runs the conditional and unconditional branches as two transformer calls
    (`cache_context("uncond")`, as diffusers' Wan pipelines do) rather than as one batch of two."""
    call = getattr(type(pipe), "__call__", None)
    try:
        source = inspect.getsource(call)
    except (OSError, TypeError):
        return False
    return 'cache_context("uncond"' in source


@dataclass
class CachePlan:
    """A checked cache request: its name, the diffusers config (None for cache-dit) or cache-dit's options."""

    name: str
    config: Any = None
    cache_dit_options: dict = field(default_factory=dict)


def plan_cache(pipe: Any, transformers: list, family: str | None, cache: Any) -> CachePlan | None:
    """`cache` (None, a name with options, or a diffusers cache config) checked against `pipe` and its transformers
    before anything changes; ValueError naming the cache and what refuses it."""
    if cache is None:
        return None
    for transformer in transformers:
        ours = record_of(transformer) is not None and record_of(transformer).diffusers_cache
        if getattr(transformer, "_cache_config", None) is not None and not ours:
            raise ValueError(f"{type(transformer).__name__} already has a diffusers cache "
                             f"({type(transformer._cache_config).__name__}); cache={cache!r} would be a second one: "
                             "call transformer.disable_cache() first, or leave cache out")
    pipe_ref = _weak(pipe)

    def current_timestep():
        owner = pipe_ref() if pipe_ref is not None else None
        return getattr(owner, "current_timestep", None) if owner is not None else None

    if not isinstance(cache, str):
        name = cache_name_of(cache)
        if name is None:
            raise ValueError(f"cache={cache!r} is neither a cache name {list(CACHE_NAMES)} nor a diffusers cache "
                             f"config ({[cls.__name__ for cls in _diffusers_cache_classes().values()]})")
        options, config = None, cache
    else:
        name, options = parse_cache(cache)
        config = None
    if name in ("faster", "pab") and pipe_ref is None and config is None:
        raise ValueError(f"cache {name!r} reads the pipeline's current timestep: pass the pipeline, not "
                         f"{type(pipe).__name__}, or a config with current_timestep_callback set")
    if name == "faster" and _pipeline_runs_cfg_apart(pipe):
        raise ValueError(f"cache 'faster' cannot work with {type(pipe).__name__}: diffusers' FasterCache expects the "
                         "conditional and unconditional branches in one batch, and this pipeline runs them as two "
                         "transformer calls (cache_context('uncond')); use 'first_block', 'taylorseer', 'pab' or "
                         "'cache-dit'")
    defaults = {**CACHE_DEFAULTS[name], **FAMILY_CACHE_DEFAULTS.get(family or "", {}).get(name, {})}
    if name == "cache-dit":
        try:
            import cache_dit
        except ImportError as exc:
            raise ValueError("cache 'cache-dit' needs the cache-dit package: pip install 'dit-sparse[cache]'") from exc
        options = {**defaults, **options}
        allowed = [f.name for f in dataclasses.fields(cache_dit.DBCacheConfig)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"cache 'cache-dit' has no option {unknown[0]!r}; DBCacheConfig takes {allowed}")
        return CachePlan(name, cache_dit_options=options)
    if config is None:
        cls = _diffusers_cache_classes()[name]
        if name == "mag" and "mag_ratios" not in options and not options.get("calibrate"):
            raise ValueError("cache 'mag' needs mag_ratios=[...] (model-dependent; a run with 'mag:calibrate=true' "
                             "prints them) or calibrate=true")
        config = _make_config(cls, name, {**defaults, **options}, current_timestep)
    return CachePlan(name, config=config)


def _weak(pipe: Any):
    if isinstance(pipe, (torch.nn.Module, list, tuple)):
        return None
    try:
        return weakref.ref(pipe)
    except TypeError:
        return None


def check_fp8(transformers: list, devices: list) -> None:
    """ValueError unless every transformer runs on a CUDA GPU with FP8 tensor cores and torchao is importable.
    `devices`: where each transformer's weights are (None under offloading: the current CUDA device is checked)."""
    for transformer, device in zip(transformers, devices):
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        if device is None or device.type != "cuda":
            raise ValueError(f"fp8=True needs a CUDA GPU with FP8 (compute capability >= {FP8_MIN_CAPABILITY[0]}."
                             f"{FP8_MIN_CAPABILITY[1]}: Ada, Hopper, Blackwell); {type(transformer).__name__} is on "
                             f"{device if device is not None else 'no CUDA device'}: allowed fp8=False there")
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise ValueError(f"fp8=True needs compute capability >= {FP8_MIN_CAPABILITY}; "
                             f"{torch.cuda.get_device_name(device)}"
                             f" has {capability}: allowed fp8=False there")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise ValueError("fp8=True needs torchao: pip install 'dit-sparse[fp8]'") from exc


def check_compile(compile: str | None, cache: CachePlan | None = None) -> None:
    """ValueError for an unknown mode, and for regional compilation under a step cache: diffusers' and cache-dit's
    cache decisions sit in the blocks (`torch.compiler.disable`d, data-dependent), so `compile_repeated_blocks(
    fullgraph=True)` cannot trace a block, and without fullgraph each block recompiles; the whole-model compile
    ("full") graph-breaks at those decisions and compiles the rest (tested against eager)."""
    if compile is not None and compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r}; allowed: None, {', '.join(repr(m) for m in COMPILE_MODES)}")
    if compile == "regional" and cache is not None:
        raise ValueError(f"compile='regional' cannot work with cache {cache.name!r}: the cache's hooks decide inside "
                         "each block, which a fullgraph block compile cannot trace; use compile='full' with a cache, "
                         "or compile='regional' without one")


@dataclass(eq=False)
class StackRecord:
    """What `optimize` added to one transformer, for `restore` to undo: the diffusers cache it enabled, the weights
    FP8 quantization replaced (module, original parameter), the compile mode, the counting hooks' handles."""

    cache: str | None = None
    diffusers_cache: bool = False
    fp8_weights: list = field(default_factory=list)
    compile: str | None = None
    counter_handles: list = field(default_factory=list)
    forwards: int = 0
    attention_runs: int = 0
    sites: int = 0


def record_of(transformer: torch.nn.Module) -> StackRecord | None:
    return transformer.__dict__.get(STACK_ATTRIBUTE)


def _record(transformer: torch.nn.Module) -> StackRecord:
    record = record_of(transformer)
    if record is None:
        record = StackRecord()
        transformer.__dict__[STACK_ATTRIBUTE] = record
    return record


def apply_cache(pipe: Any, transformers: list, plan: CachePlan) -> None:
    """The planned cache on `pipe`: cache-dit on the pipeline (`cache_dit.enable_cache`), a diffusers cache through
    each transformer's `enable_cache` (which refreshes the hook registry's child list the cache context reaches)."""
    from diffusers.hooks import HookRegistry

    if plan.name == "cache-dit":
        import cache_dit

        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**plan.cache_dit_options))
    else:
        for transformer in transformers:
            transformer.enable_cache(plan.config)
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    for transformer in transformers:
        record = _record(transformer)
        record.cache, record.diffusers_cache = plan.name, plan.name != "cache-dit"


def count_attention_runs(transformer: torch.nn.Module, attention_modules: list) -> None:
    """Count forwards of `transformer` and the self-attention computations its cache let run (a forward pre-hook on
    each attention module's query projection, which runs only when the attention is computed, not when a cache
    serves the block or the attention output): `cache_stats` reads them."""
    record = _record(transformer)
    record.sites = len(attention_modules)

    def on_forward(module, args, kwargs=None):
        record.forwards += 1

    def on_attention(module, args):
        record.attention_runs += 1

    record.counter_handles.append(transformer.register_forward_pre_hook(on_forward))
    for module in attention_modules:
        projection = getattr(module, "to_q", None)
        if isinstance(projection, torch.nn.Module):
            record.counter_handles.append(projection.register_forward_pre_hook(on_attention))


def cache_stats(transformers: list, reset: bool = False) -> dict | None:
    """The cache's share of skipped work over `transformers` since the last reset: `cache`, `cache_skipped_blocks`
    (self-attention computations a cache served instead: one per transformer block per forward) and
    `cache_skip_share` (their share of all); None when `optimize` put no cache there."""
    records = [r for r in (record_of(t) for t in transformers) if r is not None and r.cache is not None]
    if not records:
        return None
    expected = sum(r.forwards * r.sites for r in records)
    skipped = expected - sum(r.attention_runs for r in records)
    stats = {"cache": records[0].cache, "cache_skipped_blocks": skipped,
             "cache_skip_share": skipped / expected if expected else None}
    if reset:
        for r in records:
            r.forwards = r.attention_runs = 0
    return stats


def quantize_fp8(transformer: torch.nn.Module) -> None:
    """torchao dynamic FP8 (activations and weights, per row) on `transformer`'s bf16 linear layers whose sizes FP8
    GEMMs take (multiples of 16); the original weights are kept for `restore` (they stay allocated while quantized).
    Layers a model keeps in fp32 (diffusers' `_keep_in_fp32_modules`, e.g. Wan's time and condition embedders) stay
    as they are: torchao's per-row scales take bf16 weights only (an H100 run of benchmarks/compose.py stopped on
    them)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def takes_fp8(module, name):
        return (isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.bfloat16
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    record = _record(transformer)
    record.fp8_weights = [(m, m.weight) for _, m in transformer.named_modules() if takes_fp8(m, "")]
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=takes_fp8)


def compile_transformer(transformer: torch.nn.Module, mode: str, backend: Any = "inductor") -> None:
    """Regional (`compile_repeated_blocks(fullgraph=True)`: one compiled block per block class) or whole-model
    (`Module.compile()`) compilation with torch.compile's `backend`, in place."""
    if mode == "regional":
        transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
    else:
        transformer.compile(backend=backend)
    _record(transformer).compile = mode


def undo(pipe: Any, transformers: list) -> None:
    """Undo what `optimize` added to `pipe` and its transformers, last first: compilation, FP8 weights, counting
    hooks, the diffusers cache it enabled, cache-dit; the hook registries and instance forwards a removed hook
    leaves behind are dropped, so the modules are as before."""
    cache_dit_used = False
    for transformer in transformers:
        record = transformer.__dict__.pop(STACK_ATTRIBUTE, None)
        if record is None:
            continue
        if record.compile is not None:
            for module in transformer.modules():
                module._compiled_call_impl = None
        for module, weight in record.fp8_weights:
            module.weight = weight
        for handle in record.counter_handles:
            handle.remove()
        if record.diffusers_cache and getattr(transformer, "_cache_config", None) is not None:
            transformer.disable_cache()
        cache_dit_used = cache_dit_used or record.cache == "cache-dit"
    if cache_dit_used:
        import cache_dit

        cache_dit.disable_cache(pipe)
    for transformer in transformers:
        drop_empty_registries(transformer)


def drop_empty_registries(transformer: torch.nn.Module) -> None:
    """Drop the empty HookRegistry diffusers leaves on a module whose hooks were all removed, and the instance
    `forward` it leaves there (the class's own forward, or a dit-sparse intercepting class's, bound)."""
    for module in transformer.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is None or registry.hooks:
            continue
        del module._diffusers_hook
        forward = module.__dict__.get("forward")
        function = getattr(forward, "__func__", None)
        bound_here = getattr(forward, "__self__", None) is module and (
            function is type(module).forward or getattr(function, "_dit_sparse_intercepting", False))
        stale_hook = isinstance(forward, functools.partial) and "HookRegistry" in forward.func.__qualname__
        if bound_here or stale_hook:
            del module.forward
