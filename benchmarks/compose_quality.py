"""Quality of stacked accelerations on the shipped tiny model (issue 29): each step cache alone and stacked with
sparse attention (radial, draft), PSNR/SSIM of its video against dense and the share of block computations the cache
skipped (`sparsity_stats`'s `cache_skip_share`).

    python -m benchmarks.compose_quality --out benchmarks/results                      # the full sweep
    python -m benchmarks.compose_quality --device cuda --out benchmarks/results        # the same on a GPU
    python -m benchmarks.compose_quality --frames 33 --prompts 1 --caches first_block --out /tmp/q   # a small subset

Model, size, steps and prompts are benchmarks/quality.py's (the trained tiny model at 81 frames of 160 x 160, 25
steps; `--random` for the untrained one); `--frames` shortens the video for a quick run. Rows: dense sparse methods
alone (the reference for the stacked rows' share of the loss), each cache setting of `SWEEP` alone, and each with
radial and draft. The per-cache defaults of `dit_sparse.stack.CACHE_DEFAULTS` are picked from this table (the most
skipping setting whose PSNR against dense stays >= 26 dB stacked with radial): docs/stack.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.quality import BLOCK, _pipeline  # the quality benchmark's model and settings

ROOT = Path(__file__).resolve().parents[1]
#: Per cache, the settings swept (cache strings as `optimize` takes them).
SWEEP = {
    "first_block": ["first_block:threshold=0.03", "first_block:threshold=0.05", "first_block:threshold=0.1",
                    "first_block:threshold=0.2"],
    "taylorseer": ["taylorseer:cache_interval=2:disable_cache_before_step=5",
                   "taylorseer:cache_interval=2:disable_cache_before_step=10",
                   "taylorseer:cache_interval=3:disable_cache_before_step=10",
                   "taylorseer:cache_interval=4:disable_cache_before_step=10"],
    "pab": ["pab:spatial_attention_block_skip_range=2", "pab:spatial_attention_block_skip_range=3"],
    "cache-dit": ["cache-dit:residual_diff_threshold=0.05", "cache-dit:residual_diff_threshold=0.08",
                  "cache-dit:residual_diff_threshold=0.12"],
}
#: The attention methods each cache is stacked with (None: the cache alone).
ATTENTION = {None: {}, "radial": dict(block_size=BLOCK), "draft": dict(block_size=BLOCK, density=0.25)}


def main(argv=None) -> int:
    import dit_sparse
    from dit_sparse.eval.metrics import ssim
    from dit_sparse.files import write_atomic
    from dit_sparse.video import psnr

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--model-dir", default=None, help="a tiny-model export folder (default: the shipped one)")
    parser.add_argument("--random", action="store_true", help="the tiny RANDOM pipeline (fast, noise-like videos)")
    parser.add_argument("--device", default="cpu", help="torch device (cuda: float32 on the GPU)")
    parser.add_argument("--frames", type=int, default=None, help="frames (4k+1; default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--prompts", type=int, default=None, help="how many of the prompts (default: all)")
    parser.add_argument("--caches", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    parser.add_argument("--attention", nargs="+", default=["none", *[m for m in ATTENTION if m]],
                        choices=["none", *[m for m in ATTENTION if m]])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        parser.error(f"--frames must be 4k+1, got {args.frames}")
    if args.threads:
        torch.set_num_threads(args.threads)
    skipped = [name for name in args.caches if name == "cache-dit" and not _has("cache_dit")]
    caches = [name for name in args.caches if name not in skipped]
    pipe, label, settings = _pipeline(args.model_dir, args.random)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    size = dict(settings["size"], **({"num_frames": args.frames} if args.frames else {}))
    steps = args.steps or settings["steps"]
    prompts = settings["prompts"][: args.prompts] if args.prompts else settings["prompts"]
    call = dict(size, num_inference_steps=steps, output_type="np")

    def render(prompt: str) -> np.ndarray:
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **call).frames[0]

    start = time.time()
    dense = {prompt: render(prompt) for prompt in prompts}
    print(f"dense: {time.time() - start:.0f} s", flush=True)
    attention_names = [None if name == "none" else name for name in args.attention]
    runs = [(None, name) for name in attention_names if name is not None]
    runs += [(cache, name) for cache_name in caches for cache in SWEEP[cache_name] for name in attention_names]
    rows = []
    for number, (cache, attention) in enumerate(runs, 1):
        began = time.time()
        dit_sparse.optimize(pipe, attention, cache=cache, **ATTENTION[attention])
        try:
            videos = {prompt: render(prompt) for prompt in prompts}
            stats = dit_sparse.sparsity_stats(pipe)
        finally:
            dit_sparse.restore(pipe)
        row = dict(cache=cache, attention=attention, density=None if stats.get("density") is None else
                   round(stats["density"], 4), cache_skip_share=None if stats.get("cache_skip_share") is None else
                   round(stats["cache_skip_share"], 4),
                   psnr_db=round(float(np.mean([psnr(dense[p], videos[p]) for p in prompts])), 3),
                   ssim=round(float(np.mean([ssim(dense[p], videos[p]) for p in prompts])), 4),
                   seconds=round(time.time() - began, 1))
        rows.append(row)
        print(f"[{number}/{len(runs)}] {row}", flush=True)
    result = dict(
        benchmark="compose_quality",
        command=" ".join(["python -m benchmarks.compose_quality", *(sys.argv[1:] if argv is None else argv)]),
        date=datetime.date.today().isoformat(), model=label, device=args.device, size=size, steps=steps,
        prompts=list(prompts), torch=torch.__version__, python=platform.python_version(),
        skipped=[f"{name}: package not installed" for name in skipped], rows=rows,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "random" if args.random else "tiny"
    stem = out / f"compose-quality-{kind}-{args.device.split(':')[0]}-{result['date']}"
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(result))
    print(f"wrote {stem}.json and .md", flush=True)
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def markdown(result: dict) -> str:
    lines = [f"# Stacked quality: {result['model']}, {result['device']}, {result['date']}", "",
             f"`{result['command']}`; {result['size']}, {result['steps']} steps, prompts {result['prompts']}.", "",
             "| cache | attention | density | cache skip share | PSNR (dB) | SSIM | s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        density = r["density"] if r["density"] is not None else "-"
        lines.append(f"| {r['cache'] or '-'} | {r['attention'] or '-'} | {density} "
                     f"| {r['cache_skip_share'] if r['cache_skip_share'] is not None else '-'} | {r['psnr_db']} "
                     f"| {r['ssim']} | {r['seconds']} |")
    lines += [f"Skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
