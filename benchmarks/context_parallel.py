"""One video across GPUs (issue 10): the transformer step of one GPU against N GPUs under diffusers' Ulysses
context parallelism, dense and sparse, at a real config with random weights (bf16).

    torchrun --nproc_per_node 2 benchmarks/context_parallel.py                      # Wan2.1-1.3B 480p 81f (2 GPUs)
    torchrun --nproc_per_node 2 benchmarks/context_parallel.py --models wan13 hunyuan
    torchrun --nproc_per_node 2 benchmarks/context_parallel.py --smoke              # CPU (gloo) run of the logic

Per model and method (`diffusers`: the unwrapped transformer, diffusers' default attention; then each sparse method,
family defaults): rank 0 times the step on its GPU alone (`ms_1gpu`), then every rank enables context parallelism
(`dit_sparse.enable_context_parallel`, `ContextParallelConfig(ulysses_degree=N)`) and the step is timed across the N
GPUs (`ms_ngpu`, the slowest rank). `cp_speedup = ms_1gpu / ms_ngpu` at the same density (target >= 1.7 on 2 GPUs);
`speedup_vs_1gpu_diffusers` = the 1-GPU diffusers step over this row's N-GPU step (sparse and parallel together).
Agreement: the N-GPU output against the 1-GPU output of the same method (`rel_l2`, `max_abs_diff`); in bf16 the
dense rows give the noise floor (different GEMM shapes round differently). Writes
benchmarks/results/context_parallel-<gpu>-x<N>-<date>.json and .md (merged with the same day's file by model and
method). Random weights: the outputs are meaningless, the timings and the agreement are not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformer_step import MODELS, SMOKE_MODELS, _fmt, build, earlier_rows, step  # noqa: E402  (the same specs, weights and calls)

CP_SPEEDUP_TARGET = 1.7


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(model, calls, device, warmup: int, repeats: int, parallel: bool) -> float:
    """Median ms of `repeats` steps after `warmup`; under context parallelism every rank starts together and the
    step ends when the slowest rank does."""
    with torch.no_grad():
        for _ in range(warmup):
            step(model, calls)
        times = []
        for _ in range(repeats):
            _sync(device)
            if parallel:
                dist.barrier()
            start = time.perf_counter()
            step(model, calls)
            _sync(device)
            elapsed = torch.tensor([(time.perf_counter() - start) * 1e3])
            if parallel:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed))
    return float(statistics.median(times))


def first_output(model, calls) -> torch.Tensor:
    with torch.no_grad():
        return model(**calls[0], return_dict=False)[0].float()


def agreement(out: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = out - reference
    return {"rel_l2": float(diff.norm() / reference.norm().clamp_min(1e-12)),
            "max_abs_diff": float(diff.abs().max()), "max_abs_ref": float(reference.abs().max())}


def run_model(key: str, spec, args, device, dtype, world: int, rank: int) -> list[dict]:
    import diffusers

    import dit_sparse

    torch.manual_seed(0)  # the same weights and inputs on every rank
    model = build(spec, device, dtype)
    torch.manual_seed(1)
    calls = spec.calls(device, dtype)
    methods = [("diffusers", None)] + [(m, m) for m in args.methods]
    rows = {label: dict(model=spec.label, model_key=key, method=label, world=world) for label, _ in methods}
    reference = {}
    if rank == 0:  # one GPU: the model as it is, rank 0 alone
        for label, method in methods:
            if method is not None:
                dit_sparse.sparsify(model, method, **args.method_options.get(method, {}))
                dit_sparse.sparsity_stats(model, reset=True)
            rows[label]["ms_1gpu"] = time_step(model, calls, device, args.warmup, args.repeats, parallel=False)
            rows[label]["density"] = dit_sparse.sparsity_stats(model)["density"] if method else 1.0
            reference[label] = first_output(model, calls).cpu()
            dit_sparse.unsparsify(model)
            print(f"   1 GPU  {label:10s} {rows[label]['ms_1gpu']:9.1f} ms", flush=True)
    dist.barrier()
    dit_sparse.enable_context_parallel(model, diffusers.ContextParallelConfig(ulysses_degree=world))
    for label, method in methods:
        if method is not None:
            dit_sparse.sparsify(model, method, **args.method_options.get(method, {}))
            dit_sparse.sparsity_stats(model, reset=True)
        ms = time_step(model, calls, device, args.warmup, args.repeats, parallel=True)
        density = dit_sparse.sparsity_stats(model)["density"] if method else 1.0
        out = first_output(model, calls).cpu()
        dit_sparse.unsparsify(model)
        if rank == 0:
            row = rows[label]
            row.update(ms_ngpu=ms, density_ngpu=density, cp_speedup=row["ms_1gpu"] / ms,
                       speedup_vs_1gpu_diffusers=rows["diffusers"]["ms_1gpu"] / ms, **agreement(out, reference[label]))
            print(f"   {world} GPUs {label:10s} {ms:9.1f} ms  x{row['cp_speedup']:.2f} of 1 GPU, rel_l2 "
                  f"{row['rel_l2']:.2e}", flush=True)
    del model, calls
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def findings(rows: list[dict]) -> list[str]:
    lines = []
    dense_noise = {r["model_key"]: r["rel_l2"] for r in rows if r["method"] == "diffusers" and "rel_l2" in r}
    for r in rows:
        if "cp_speedup" not in r or r["method"] == "diffusers":
            continue
        verdict = "met" if r["cp_speedup"] >= CP_SPEEDUP_TARGET else "MISSED"
        noise = dense_noise.get(r["model_key"])
        lines.append(
            f"{r['model']} {r['method']}: {r['world']} GPUs {r['cp_speedup']:.2f}x of 1 GPU at density "
            f"{r['density']:.3f} (target >= {CP_SPEEDUP_TARGET}: {verdict}); {r['speedup_vs_1gpu_diffusers']:.2f}x of "
            f"the 1-GPU diffusers step; output rel L2 {r['rel_l2']:.2e} against 1 GPU"
            + ("" if noise is None else f" (dense diffusers across GPUs: {noise:.2e})")
        )
    return lines


def markdown(result: dict) -> str:
    lines = [
        f"# Context parallel benchmark, {result['world']} x {result['gpu']}, {result['date']}",
        "",
        "; ".join(f"`{c}`" for c in result["commands"]) + f"; torch {result['torch']}, diffusers "
        f"{result['diffusers']}, {result['dtype']}, random weights at the real configs. One denoising step = the "
        "transformer calls of one step (Wan: cond + uncond). `1 GPU`: rank 0 alone; `N GPUs`: diffusers' Ulysses "
        "context parallelism (`ContextParallelConfig(ulysses_degree=N)`), sparse attention on each rank's heads.",
        "",
        "| model | method | density | ms 1 GPU | ms N GPUs | N-GPU speedup | vs 1-GPU diffusers | rel L2 vs 1 GPU "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['method']} | {_fmt(r.get('density'), 3)} | {_fmt(r.get('ms_1gpu'), 0)} "
            f"| {_fmt(r.get('ms_ngpu'), 0)} | {_fmt(r.get('cp_speedup'))} | {_fmt(r.get('speedup_vs_1gpu_diffusers'))} "
            f"| {_fmt(r.get('rel_l2'), 4)} | {_fmt(r.get('max_abs_diff'), 4)} |"
        )
    if result.get("findings"):
        lines += ["", "Findings:", ""] + [f"- {line}" for line in result["findings"]]
    return "\n".join(lines) + "\n"


def _merge(path: Path, result: dict) -> dict:
    """The same day's file with this run's rows replacing those it ran again (same model and method)."""
    earlier, rows = earlier_rows(path, result["rows"], lambda r: (r["model_key"], r["method"]))
    if earlier is None:
        return result
    commands = [c for c in earlier.get("commands", []) if c not in result["commands"]] + result["commands"]
    return dict(result, rows=rows, commands=commands, findings=findings(rows))


def main(argv=None) -> int:
    import diffusers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["wan13"], choices=[*MODELS, *SMOKE_MODELS])
    parser.add_argument("--methods", nargs="+", default=["radial"], help="sparse methods after diffusers' dense")
    parser.add_argument("--method-options", type=json.loads, default={},
                        help='JSON per method, e.g. \'{"radial": {"dense_steps": 0}}\'')
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp one)")
    parser.add_argument("--smoke", action="store_true", help="CPU (gloo) run of the logic on a tiny model")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        print("launch with torchrun: torchrun --nproc_per_node 2 benchmarks/context_parallel.py")
        return 1
    if args.smoke:
        args.models = [m for m in args.models if m in SMOKE_MODELS] or ["smoke-wan"]
        args.method_options = {"radial": {"block_size": 16}, **args.method_options}
        dist.init_process_group("gloo")
        torch.accelerator.device_count = lambda: 1  # diffusers asks the (absent) accelerator for a device count
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (--smoke runs the logic on CPU)")
        return 1
    else:
        dist.init_process_group("nccl")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    rank, world = dist.get_rank(), dist.get_world_size()
    command = "torchrun --nproc_per_node {} benchmarks/context_parallel.py {}".format(
        world, " ".join(sys.argv[1:] if argv is None else argv)).strip()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    result = dict(commands=[command], gpu=gpu, world=world, date=date, torch=torch.__version__,
                  diffusers=diffusers.__version__, dtype=str(dtype), python=platform.python_version(),
                  warmup=args.warmup, repeats=args.repeats, rows=[])
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "dit-sparse-smoke" if args.smoke else ROOT / "benchmarks" / "results")
    stem = f"context_parallel-{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}-x{world}-{date}"
    for key in args.models:
        spec = {**MODELS, **SMOKE_MODELS}[key]
        if rank == 0:
            print(f"== {spec.label} on {world} x {gpu}", flush=True)
        result["rows"] += run_model(key, spec, args, device, dtype, world, rank)
        if rank == 0:  # written after every model, so a run cut short keeps its rows
            out.mkdir(parents=True, exist_ok=True)
            result["findings"] = findings(result["rows"])
            merged = _merge(out / f"{stem}.json", result)
            (out / f"{stem}.json").write_text(json.dumps(merged, indent=1))
            (out / f"{stem}.md").write_text(markdown(merged))
    if rank == 0:
        print(markdown(merged))
        print(f"written: {out / stem}.json and .md")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
