"""Stacked-acceleration benchmark of issue 29: sparse attention with step caches, FP8 linear layers and torch.compile,
against each peer alone, at the real configs with random weights, bf16 (benchmarks/transformer_step.py's models and
machinery).

    python -m benchmarks.compose                      # Wan2.1-1.3B, Wan2.1-14B, HunyuanVideo (H100: < 9 min)
    python -m benchmarks.compose --models wan13 --rows default radial radial+taylorseer
    python -m benchmarks.compose --compile                        # + the compiled stacks (minutes more per model)
    python -m benchmarks.compose --smoke                          # CPU run of this script's logic

A cache's decisions depend on the weights, so each row times two steps: a full step (every block computed, the
cache's hooks on) and a cached step (the cache serves: forced by a setting that always reuses, e.g. FirstBlockCache
threshold 1e9, TaylorSeer after its warm-up). The 50-step denoising time is given for two schedules:
- `fixed`: the cache's own schedule at the row's setting (TaylorSeer interval k after d full steps: d + ceil((50 -
  d) / k) full steps; FirstBlockCache / cache-dit: `FIXED_CACHED_SHARE` of the steps after the warm-up);
- `measured`: the share of blocks the tiny model's quality run skipped at the same setting
  (benchmarks/results/compose-quality-*.json, `cache_skip_share`), taken as the share of cached steps.
`speedup_vs_default` is the 50-step time of diffusers' default (eager, torch SDPA, no cache) over the row's.
Per row a per-part breakdown of the full step (torch.profiler, CUDA kernel time by name: attention kernels
(flash/fmha/sdpa/cudnn/attention/dit-sparse's block-sparse), linear layers (gemm/matmul/cutlass/fp8 scaled mm),
the rest). Writes benchmarks/results/compose-<gpu>-<date>.json (rows: model, stack, ms_full_step, ms_cached_step,
schedule, ms_50_steps, speedup_vs_default, breakdown) and a markdown table. Random weights: outputs are meaningless,
the timings are not.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import glob
import importlib.util
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.transformer_step import MODELS, SMOKE_MODELS, build, time_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50
FIXED_CACHED_SHARE = 0.5  # FirstBlockCache / cache-dit fixed schedule: half the steps after warm-up cached
WARMUP_STEPS = 10  # full steps before any cache (the TaylorSeer schedule's, applied to every cache's fixed schedule)
DEFAULT_MODELS = ("wan13", "wan14", "hunyuan")
#: stack name -> (attention method or None, cache name or None, fp8, compile, attention backend or None)
ROWS = {
    "default": (None, None, False, None, None),
    "dense-fa3": (None, None, False, None, "_flash_3"),
    "dense-cudnn": (None, None, False, None, "_native_cudnn"),
    "dense-sage": (None, None, False, None, "sage"),
    "cache-dit": (None, "cache-dit", False, None, None),
    "first_block": (None, "first_block", False, None, None),
    "taylorseer": (None, "taylorseer", False, None, None),
    "radial": ("radial", None, False, None, None),
    "draft": ("draft", None, False, None, None),
    "radial+fp8": ("radial", None, True, None, None),
    "radial+first_block": ("radial", "first_block", False, None, None),
    "radial+taylorseer": ("radial", "taylorseer", False, None, None),
    "radial+cache-dit": ("radial", "cache-dit", False, None, None),
    "draft+taylorseer": ("draft", "taylorseer", False, None, None),
    "radial+taylorseer+fp8": ("radial", "taylorseer", True, None, None),
    "radial+fp8+regional": ("radial", None, True, "regional", None),
    "radial+taylorseer+fp8+full": ("radial", "taylorseer", True, "full", None),
}
COMPILED_ROWS = tuple(name for name, row in ROWS.items() if row[3] is not None)
DEFAULT_ROWS = tuple(name for name in ROWS if name not in COMPILED_ROWS)
#: cache -> (a setting that always computes, one that always reuses after `warm` steps, the fixed-schedule setting)
CACHE_SETTINGS = {
    "first_block": ("first_block:threshold=0", "first_block:threshold=1e9", "first_block:threshold=0.1"),
    "taylorseer": ("taylorseer:cache_interval=1000000:disable_cache_before_step=1000000",
                   "taylorseer:cache_interval=1000000:disable_cache_before_step=2",
                   "taylorseer:cache_interval=2:disable_cache_before_step=10"),
    "cache-dit": ("cache-dit:residual_diff_threshold=0:max_warmup_steps=0",
                  "cache-dit:residual_diff_threshold=1e9:max_warmup_steps=1",
                  "cache-dit:residual_diff_threshold=0.08:max_warmup_steps=8"),
}
CACHE_WARM_STEPS = 3  # steps each cache's state needs before the timed cached steps (TaylorSeer: order + 1)


def _calls_in_context(model, calls: list[dict], step_index: int) -> None:
    """One denoising step: each transformer call under the cache context a pipeline sets (cond, uncond)."""
    for number, kwargs in enumerate(calls):
        with model.cache_context("cond" if number == 0 else "uncond", step_index=step_index,
                                 num_inference_steps=STEPS):
            model(**kwargs, return_dict=False)


def _kernel_part(name: str) -> str:
    lowered = name.lower()
    if any(word in lowered for word in ("flash", "fmha", "sdpa", "attention", "attn", "cudnn_", "block_sparse",
                                        "sage")):
        return "attention"
    if any(word in lowered for word in ("gemm", "matmul", "cutlass", "xmma", "sm90", "scaled_mm", "cublas", "f8f8")):
        return "linear"
    return "rest"


def breakdown(fn) -> dict:
    """CUDA kernel milliseconds of one `fn()` call by part (attention, linear, rest), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    parts = {"attention": 0.0, "linear": 0.0, "rest": 0.0}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if not torch.cuda.is_available():
            device_us = event.self_cpu_time_total if not event.key.startswith("aten::") or "mm" in event.key else 0
        parts[_kernel_part(event.key)] += device_us / 1e3
    return {part: round(ms, 2) for part, ms in parts.items()}


def measured_shares() -> dict:
    """cache setting -> the tiny model's measured skip share (the newest compose-quality file's rows with radial)."""
    files = sorted(glob.glob(str(ROOT / "benchmarks" / "results" / "compose-quality-tiny-*.json")))
    shares = {}
    for path in files:
        for row in json.loads(Path(path).read_text()).get("rows", []):
            if row.get("cache") and row.get("cache_skip_share") is not None:
                shares[row["cache"]] = row["cache_skip_share"]
    return shares


def fixed_schedule(cache: str | None) -> tuple[int, int, str]:
    """(full steps, cached steps, description) of 50 under the cache's fixed schedule."""
    if cache is None:
        return STEPS, 0, "50 full steps"
    if cache == "taylorseer":
        full = WARMUP_STEPS + math.ceil((STEPS - WARMUP_STEPS) / 2)
        return full, STEPS - full, f"TaylorSeer interval 2 after {WARMUP_STEPS} full steps: {full} full"
    cached = round((STEPS - WARMUP_STEPS) * FIXED_CACHED_SHARE)
    return STEPS - cached, cached, f"{WARMUP_STEPS} full, then {FIXED_CACHED_SHARE:.0%} of the rest cached"


@contextlib.contextmanager
def stacked(model, spec, stack_name: str, cache_setting: str | None, notes: list):
    """`model` with the row's stack (attention, cache at `cache_setting`, fp8, compile, backend); undone on exit."""
    import dit_sparse

    attention, cache, fp8, compile_mode, backend = ROWS[stack_name]
    shell = None
    try:
        if backend is not None:
            model.set_attention_backend(backend)
        if cache == "cache-dit":
            shell = _cache_dit_on(model, cache_setting)
            cache_setting = None
        dit_sparse.optimize(model, attention, cache=cache_setting, fp8=fp8, compile=compile_mode,
                            **({"dense_steps": 0} if attention else {}))
        yield model
    finally:
        dit_sparse.restore(model)
        if shell is not None:
            import cache_dit

            cache_dit.disable_cache(shell)
        if backend is not None:
            model.reset_attention_backend()


def _cache_dit_on(model, setting: str):
    """cache-dit's DBCache on the bare transformer (`cache_dit.enable_cache(transformer)`: its transformer-only mode,
    a persistent cache context, refreshed for a run of `STEPS` steps)."""
    import cache_dit

    from dit_sparse import stack

    _, options = stack.parse_cache(setting)
    config = cache_dit.DBCacheConfig(**{**stack.CACHE_DEFAULTS["cache-dit"], **options, "num_inference_steps": STEPS})
    cache_dit.enable_cache(model, cache_config=config)
    return model


def alternating_inputs(calls: list[dict]) -> list[list[dict]]:
    """Two steps' inputs that differ (the latents negated): a cache compares each step with the one before, and on
    identical inputs every setting reuses (FirstBlockCache at threshold 0 saw a change of exactly 0 and skipped its
    "always computes" step in an H100 run); alternating them keeps a full step full."""
    return [calls, [dict(kwargs, hidden_states=-kwargs["hidden_states"]) for kwargs in calls]]


def run_model(name: str, spec, args, device, dtype, rows: list, notes: list) -> None:
    model = build(spec, device, dtype)
    inputs = alternating_inputs(spec.calls(device, dtype))
    shares = measured_shares()
    counter = iter(range(10**9))

    def step():
        index = next(counter)
        _calls_in_context(model, inputs[index % 2], index)

    baseline_50 = None
    for stack_name in args.rows:
        attention, cache, fp8, compile_mode, backend = ROWS[stack_name]
        if backend is not None and args.smoke:
            notes.append(f"{spec.label} {stack_name}: a GPU attention backend; not in a CPU smoke run")
            continue
        if backend == "sage" and importlib.util.find_spec("sageattention") is None:
            notes.append(f"{spec.label} {stack_name}: sageattention is not importable; row skipped")
            continue
        if cache == "cache-dit" and importlib.util.find_spec("cache_dit") is None:
            notes.append(f"{spec.label} {stack_name}: cache-dit is not installed; row skipped")
            continue
        if fp8 and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
            notes.append(f"{spec.label} {stack_name}: no FP8 GPU; row skipped")
            continue
        began = time.time()
        gc.collect()
        if torch.cuda.is_available():  # each row's own peak (a cache's stored features show in it)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            settings = CACHE_SETTINGS.get(cache, (None, None, None))
            with stacked(model, spec, stack_name, settings[0], notes):
                for _ in range(args.warmup):
                    step()
                ms_full = time_steps(step, args.repeats)
                parts = breakdown(step)
            ms_cached = None
            if cache is not None:
                with stacked(model, spec, stack_name, settings[1], notes):
                    for _ in range(CACHE_WARM_STEPS + args.warmup):
                        step()
                    ms_cached = time_steps(step, args.repeats)
        except Exception as exc:  # a row that cannot run here (a backend not installed): noted, the run goes on
            peak = (f" (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated)"
                    if torch.cuda.is_available() else "")
            notes.append(f"{spec.label} {stack_name}: {type(exc).__name__}{peak}: {str(exc)[:300]}")
            traceback.print_exc()
            continue
        schedules = {}
        full, cached, text = fixed_schedule(cache)
        schedules["fixed"] = dict(full_steps=full, cached_steps=cached, text=text,
                                  ms_50_steps=round(full * ms_full + cached * (ms_cached or 0), 1))
        share = shares.get(settings[2]) if cache else None
        if share is not None:
            cached = round(STEPS * share)
            schedules["measured"] = dict(full_steps=STEPS - cached, cached_steps=cached,
                                         text=f"tiny-model skip share {share:.2f} at {settings[2]}",
                                         ms_50_steps=round((STEPS - cached) * ms_full + cached * ms_cached, 1))
        if stack_name == "default":
            baseline_50 = schedules["fixed"]["ms_50_steps"]
        best = min(s["ms_50_steps"] for s in schedules.values())
        row = dict(model=spec.label, stack=stack_name, ms_full_step=round(ms_full, 2),
                   ms_cached_step=None if ms_cached is None else round(ms_cached, 2), schedule=schedules,
                   speedup_vs_default=None if baseline_50 is None else round(baseline_50 / best, 2),
                   breakdown_full_step_ms=parts, seconds=round(time.time() - began, 1),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None)
        rows.append(row)
        print(row, flush=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown(result: dict) -> str:
    lines = [f"# Stacked accelerations: {result['gpu']}, {result['date']}", "", f"`{result['command']}`", "",
             "| model | stack | full step ms | cached step ms | 50 steps ms (fixed) | 50 steps ms (measured) | "
             "speedup | attention / linear / rest ms |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        measured = r["schedule"].get("measured", {}).get("ms_50_steps", "-")
        parts = r["breakdown_full_step_ms"]
        lines.append(f"| {r['model']} | {r['stack']} | {r['ms_full_step']} | {r['ms_cached_step'] or '-'} | "
                     f"{r['schedule']['fixed']['ms_50_steps']} | {measured} | {r['speedup_vs_default']} | "
                     f"{parts['attention']} / {parts['linear']} / {parts['rest']} |")
    lines += ["", *[f"- {note}" for note in result["notes"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import diffusers

    from dit_sparse.files import write_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=[*MODELS, *SMOKE_MODELS])
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                        help=f"stacks to time (default: {', '.join(DEFAULT_ROWS)}; 'default' is the baseline)")
    parser.add_argument("--compile", action="store_true", help=f"also the compiled rows {COMPILED_ROWS}")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="CPU run of the script's logic on the tiny Wan config")
    args = parser.parse_args(argv)
    args.rows = args.rows or [*DEFAULT_ROWS, *(COMPILED_ROWS if args.compile else ())]
    if "default" not in args.rows:
        args.rows.insert(0, "default")
    if args.smoke:
        args.models = ["smoke-wan"]
        device, dtype = torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (--smoke runs the script's logic on CPU)")
        return 1
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    rows, notes = [], []
    if importlib.util.find_spec("flash_attn_interface") is None and not args.smoke:
        notes.append("FA3 (flash_attn_interface) not importable: the dense-fa3 row fails and is noted; dit-sparse "
                     "rows use the kernel registry's best available backend (triton where FA4 is absent)")
    result = dict(command="python -m benchmarks.compose " + " ".join(sys.argv[1:] if argv is None else argv),
                  gpu=gpu, date=date, torch=torch.__version__, diffusers=diffusers.__version__,
                  python=platform.python_version(), steps=STEPS, rows=rows, notes=notes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"compose-{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}-{date}"
    start = time.time()
    for name in args.models:
        spec = {**MODELS, **SMOKE_MODELS}[name]
        print(f"== {spec.label}", flush=True)
        run_model(name, spec, args, device, dtype, rows, notes)
        result["seconds"] = round(time.time() - start, 1)
        # written after every model: a run cut short by its time limit keeps the models it finished
        write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
        write_atomic(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))
    print(f"written: {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
