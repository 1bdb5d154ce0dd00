"""Quality of every sparse method against dense on a CPU (issues 5 and 6): PSNR and SSIM of each method's video
against the dense video of the same pipeline, prompt and seed, at densities near 0.1, 0.25 and 0.5.

    python -m benchmarks.quality --out benchmarks/results                       # the shipped tiny model
    python -m benchmarks.quality --model-dir DIR --out benchmarks/results       # another tiny-model export
    python -m benchmarks.quality --random --out /tmp/q                          # the tiny RANDOM pipeline, fast
    python -m benchmarks.quality --device cuda --prompts 8 --seeds 2 --block-sizes 16,32 \
        --variants plain,compensate,recall0.9 --out benchmarks/results                 # issue 31's measure
    python -m benchmarks.quality --warmup --prompts 8 --densities 0.25 --out benchmarks/results   # dense warm-up

Model: the trained tiny model (`dit_sparse.pipelines.tiny`, or `--model-dir`), at its training size: 81 frames of
160 x 160 px (21 latent frames of 10 x 10 tokens, 2,100 video tokens), 25 steps, CFG 5, prompts from its caption
vocabulary. `--random`, or no trained model: the UNTRAINED tiny random Wan pipeline at 17 frames of 128 x 128 (5 x 8 x
8 tokens), 8 steps; its videos are noise-like, so its numbers check the machinery, not visual quality.

Blocks of 16 tokens, tiles (1, 4, 4) (one block). Per target density:
- `draft` (DraftAttention) and `reorder` cluster (Sparse VideoGen2) estimate per call (`refresh=1`) at the target;
- `reorder` axes (PAROAttention) runs from a profile calibrated on other prompts, every head at the target;
- `radial` (Radial Attention): its density follows from its decay factor, so the factor (from a grid) whose mask is
  nearest the target is used;
- `neighborhood` tile-aligned (STA) and exact (NATTEN): the window (from a grid) whose block density is nearest;
- `vdit` (Sparse-vDiT): profiles searched at several `max_error` bounds; each lands at its own density, and is listed
  under the nearest target.
Each row reports the density actually run (mean kept fraction over every self-attention call).

`--prompts N` takes the first N captions of the tiny model's quality suite (`dit_sparse.eval.suites.tiny_suite`, in
its caption vocabulary), `--seeds K` seeds 0..K-1; the dense video of each (prompt, seed) is rendered once and reused
by every row. `--block-sizes` runs every row per block size (tiles of one block: (1, 4, 4) for 16, (1, 4, 8) for 32).
`--variants` runs every row per option set given to the method's config (`plain`: none, `compensate`:
`compensate=True`, `recall0.9`: `min_recall=0.9`, `fp8` / `int8`: `precision=...`, on the CPU through the
reference backend's emulation); a config without such a field skips that variant, saying so.
`--warmup`: per method and target density, `dense_steps` at 0/10/20/30% of the steps x `dense_layers` 0/1/2, with the
official settings (radial 12 of 50 steps and 1 layer; Sparse VideoGen2, `reorder` cluster, 30% of the steps) as
anchors; each row gives PSNR, the attention work (the mean kept fraction, dense calls counting 1) and PSNR per unit
of work. `--max-videos` / `--budget-s` stop after that many sparse videos or seconds and write the rows done so far.
LPIPS is reported where its package and AlexNet weights are on disk (`dit_sparse.eval.metrics.optional_metrics`),
else the results file says why not.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DENSITIES = (0.1, 0.25, 0.5)
METHODS = ("radial", "neighborhood", "draft", "reorder-axes", "reorder-cluster", "vdit")
BLOCK = 16
TILE = (1, 4, 4)
DECAY_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
VDIT_MAX_ERRORS = (0.05, 0.1, 0.2, 0.4)
#: draft / vdit tiles of one block, per block size
TILES = {16: (1, 4, 4), 32: (1, 4, 8), 64: (1, 8, 8), 128: (1, 8, 16)}
#: option sets given to every method's config, per variant name
VARIANTS = {"plain": {}, "compensate": {"compensate": True}, "recall0.9": {"min_recall": 0.9},
            "fp8": {"precision": "fp8"}, "int8": {"precision": "int8"}}
#: the dense warm-up grid: dense_steps as a share of the steps, dense_layers
WARMUP_STEP_SHARES = (0.0, 0.1, 0.2, 0.3)
WARMUP_LAYERS = (0, 1, 2)
#: the official warm-up settings (share of the steps dense, dense layers): Radial Attention's scripts run 12 of 50
#: steps and the first layer dense; Sparse VideoGen2 the first 30% of the steps.
OFFICIAL_WARMUP = {"radial": (12 / 50, 1), "reorder-cluster": (0.3, 0)}
#: (size, steps, prompts, calibration prompts) per model kind
TRAINED = dict(
    size=dict(num_frames=81, height=160, width=160), steps=25,
    prompts=("a red circle moves right on a blue background", "a yellow triangle moves down and left on a green "
             "to white vertical gradient"),
    calibration=("a white square moves up on a black background", "an orange circle moves left on a purple "
                 "background"),
)  # fmt: skip
RANDOM = dict(
    size=dict(num_frames=17, height=128, width=128), steps=8,
    prompts=("a red fox runs across a snowy field", "a small boat drifts on a calm blue lake at sunset"),
    calibration=("a bird flies over the forest", "a car drives on a city street at night"),
)


def _pipeline(model_dir: str | None, random: bool):
    """(pipeline, label, settings): the trained tiny model (or the export at `model_dir`), else the random one."""
    from dit_sparse.pipelines import tiny
    from dit_sparse.pipelines.tiny import random_tiny

    if not random and (model_dir or tiny.available()):
        return tiny.load(folder=model_dir or tiny.MODEL_DIR), tiny.TINY_LABEL, TRAINED
    return random_tiny.build_tiny_wan_pipeline(seed=0), random_tiny.TINY_RANDOM_LABEL, RANDOM


def _layout(size: dict):
    """The Wan transformer's video grid at `size` (VAE 4x in time, 8x in space; patch 2x2)."""
    import dit_sparse

    return dit_sparse.VideoLayout((size["num_frames"] - 1) // 4 + 1, size["height"] // 16, size["width"] // 16)


def _nearest(options: list[tuple], target: float) -> tuple:
    """The option (..., density) whose density is nearest `target`."""
    return min(options, key=lambda option: abs(option[-1] - target))


def radial_options(layout, block_size: int = BLOCK) -> list[tuple[float, float]]:
    """(decay factor, mask density) over `DECAY_GRID`."""
    from dit_sparse.patterns import radial

    return [(decay, radial(layout, block_size=block_size, decay_factor=decay).density) for decay in DECAY_GRID]


def window_options(layout, exact: bool, tile: tuple = TILE) -> list[tuple[tuple[int, int, int], float, float]]:
    """(window, block density, unevenness) of every `neighborhood` window of odd sizes over the layout's axes;
    unevenness: the spread of the covered fractions of the three axes (0: the window covers each axis alike)."""
    from dit_sparse.patterns import neighborhood

    sizes = (layout.frames, layout.height, layout.width)
    options = []
    for window in itertools.product(*(range(1, n + 1, 2) for n in sizes)):
        density = neighborhood(layout, window=window, tile=tile, exact=exact).density
        fractions = [k / n for k, n in zip(window, sizes) if n > 1]
        options.append((window, density, max(fractions) - min(fractions)))
    return options


def pick_window(options: list[tuple], target: float, tolerance: float = 0.15) -> tuple[tuple[int, int, int], float]:
    """(window, density): the most even window whose density is within `tolerance` x target of the target, else the
    nearest in density. Even windows are the natural ones (a neighborhood, not a line of pixels through time)."""
    near = [o for o in options if abs(o[1] - target) <= tolerance * target]
    if near:
        window, density, _ = min(near, key=lambda o: (o[2], abs(o[1] - target)))
    else:
        window, density, _ = min(options, key=lambda o: abs(o[1] - target))
    return window, density


def _listed(values: list[str], kind=str) -> list:
    """Values given as `a b`, `a,b` or both, flattened and converted by `kind`."""
    return [kind(value) for item in values for value in item.split(",") if value]


class _OutOfBudget(Exception):
    """--max-videos or --budget-s reached: the rows done so far are written."""


def tiny_suite_prompts(n: int) -> list[str]:
    """The first `n` prompts of the tiny model's quality suite (its caption vocabulary)."""
    from dit_sparse.eval.suites import tiny_suite

    return [p.prompt for p in tiny_suite().prompts[:n]]


def supported_options(method: str, options: dict) -> bool:
    """Whether `method`'s config has every field in `options` (a variant such as `compensate=True`)."""
    import dataclasses

    import dit_sparse

    base = method.split("-")[0]
    fields = {field.name for field in dataclasses.fields(dit_sparse.CONFIGS[base])}
    return set(options) <= fields


def warmup_grid(steps: int, official: tuple[float, int] | None) -> list[tuple[int, int, bool]]:
    """(dense_steps, dense_layers, official?) over the warm-up grid, with the official setting added if it is off it."""
    grid = [(round(share * steps), layers, False) for share in WARMUP_STEP_SHARES for layers in WARMUP_LAYERS]
    grid = list(dict.fromkeys(grid))
    if official is not None:
        anchor = (round(official[0] * steps), official[1])
        grid = [(s, l, o or (s, l) == anchor) for s, l, o in grid]
        if anchor not in [(s, l) for s, l, _ in grid]:
            grid.append((*anchor, True))
    return grid


def main(argv=None) -> int:
    import dit_sparse
    from dit_sparse.eval.metrics import optional_metrics, ssim  # the eval suite's SSIM (uint8 frames, luma)
    from dit_sparse.files import write_atomic
    from dit_sparse.video import psnr  # on the float frames: finer than uint8 for near-identical videos

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--model-dir", default=None, help="a tiny-model export folder (default: the shipped one)")
    parser.add_argument("--random", action="store_true", help="the tiny RANDOM pipeline at a small size (fast)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the pipeline runs")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--size", default=None, help="FRAMES,HEIGHT,WIDTH instead of the model's size")
    parser.add_argument("--densities", nargs="+", default=[",".join(map(str, DENSITIES))],
                        help="target densities (`0.1 0.25` or `0.1,0.25`)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--note", default=None, help="a line for the results file (e.g. which export this was)")
    parser.add_argument("--methods", nargs="+", default=[",".join(METHODS)],
                        help=f"which rows to run, of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--refresh", nargs="+", type=int, default=[1],
                        help="the estimated methods' (draft, reorder cluster) refresh periods in steps, a row each")
    parser.add_argument("--prompts", type=int, default=None,
                        help="the first N prompts of the tiny quality suite (default: the model's 2 prompts)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..K-1 per prompt")
    parser.add_argument("--block-sizes", default=str(BLOCK), help="block sizes, a run of every row each (`16,32`)")
    parser.add_argument("--variants", default="plain", help=f"option sets per row, of {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", action="store_true",
                        help="the dense warm-up sweep (dense_steps 0/10/20/30%% x dense_layers 0/1/2) per method")
    parser.add_argument("--max-videos", type=int, default=None, help="stop after this many sparse videos")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting rows after this many seconds")
    args = parser.parse_args(argv)
    methods, densities = _listed(args.methods), _listed(args.densities, float)
    block_sizes, variants = _listed([args.block_sizes], int), _listed([args.variants])
    for name, values, allowed in (("--methods", methods, METHODS), ("--variants", variants, VARIANTS),
                                  ("--block-sizes", block_sizes, TILES)):
        if not values or any(value not in allowed for value in values):
            parser.error(f"{name} must be some of {', '.join(map(str, allowed))}, got {values}")
    if any(period < 1 for period in args.refresh):
        parser.error(f"--refresh periods must be >= 1 steps, got {args.refresh}")
    if args.seeds < 1 or (args.prompts is not None and not 1 <= args.prompts <= 24):
        parser.error(f"--seeds must be >= 1 and --prompts 1..24, got {args.seeds} and {args.prompts}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, label, settings = _pipeline(args.model_dir, args.random)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps or settings["steps"]
    size = settings["size"]
    if args.size:
        size = dict(zip(("num_frames", "height", "width"), _listed([args.size], int)))
    prompts = list(settings["prompts"]) if args.prompts is None else tiny_suite_prompts(args.prompts)
    seeds = list(range(args.seeds))
    call = dict(size, num_inference_steps=steps, output_type="np")
    layout = _layout(size)
    metrics, metric_notes = optional_metrics(args.device)
    lpips_metric = metrics.get("lpips")
    metric_notes = [note for note in metric_notes if note.startswith("LPIPS")]
    start = time.time()
    counter = {"sparse": 0}

    def render(prompt: str, seed: int, what: str) -> np.ndarray:
        begun = time.time()
        frames = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **call).frames[0]
        print(f"{what}, prompt {prompts.index(prompt) + 1}/{len(prompts)}, seed {seed}: {time.time() - begun:.1f} s "
              f"(total {time.time() - start:.0f} s)", flush=True)
        return frames

    def calibrated(folder: str, method: str, name: str, block: int, **options):
        return dit_sparse.calibrate(
            pipe, list(settings["calibration"]), method, block_size=block, pipe_kwargs=dict(size,
            num_inference_steps=steps), steps=list(range(0, steps, max(steps // 4, 1))), path=Path(folder) / name,
            progress=False, **options,
        )  # fmt: skip

    videos = [(prompt, seed) for prompt in prompts for seed in seeds]
    dense = {key: render(*key, "dense") for key in videos}
    rows, skipped, stopped = [], [], None

    def run(target, name, block, variant, method, options, profile=None, note="", extra=None) -> dict | None:
        if (args.max_videos is not None and counter["sparse"] + len(videos) > args.max_videos) or (
                args.budget_s is not None and time.time() - start > args.budget_s):
            raise _OutOfBudget(f"--max-videos {args.max_videos}" if args.max_videos is not None else
                               f"--budget-s {args.budget_s}")
        # each variant against the same plain row: compensation only where the variant asks for it, whatever the
        # method's default
        options = dict(options, **{"compensate": False, **VARIANTS[variant]})
        if options.get("precision", "bf16") != "bf16" and args.device == "cpu":
            options["backend"] = "reference"  # the CPU emulates low precision only where asked for by name
        if not supported_options(method, VARIANTS[variant]):
            skipped.append(f"{name} {variant}: the {method.split('-')[0]} config has no {sorted(VARIANTS[variant])}")
            return None
        if profile is not None:
            dit_sparse.sparsify(pipe, profile=profile, **options)
        else:
            dit_sparse.sparsify(pipe, method.split("-")[0], **options)
        what = f"{name} b{block} {variant} @{target}"
        out = {key: render(*key, what) for key in videos}
        counter["sparse"] += len(videos)
        stats = dit_sparse.sparsity_stats(pipe)
        dit_sparse.unsparsify(pipe)
        row = dict(method=name, block_size=block, variant=variant, target_density=target,
                   density=round(stats["density"], 4),
                   psnr_db=round(float(np.mean([psnr(dense[k], out[k]) for k in videos])), 3),
                   psnr_min_db=round(float(np.min([psnr(dense[k], out[k]) for k in videos])), 3),
                   ssim=round(float(np.mean([ssim(dense[k], out[k]) for k in videos])), 4),
                   lpips=None if lpips_metric is None else
                   round(float(np.mean([lpips_metric(dense[k], out[k]) for k in videos])), 4),
                   options={k: v for k, v in options.items() if k != "layer_density"}, note=note, **(extra or {}))
        for key in ("mask_builds", "guard_added_density", "guard_calls"):
            if key in stats:
                row[key] = stats[key]
        rows.append(row)
        print(row, flush=True)
        return row

    def every_refresh(name: str) -> list[tuple[str, dict]]:
        """(row name, options) per --refresh period; the name says the period unless it is the default alone."""
        if args.refresh == [1]:
            return [(name, {})]
        return [(f"{name} refresh {period}", dict(refresh=period)) for period in args.refresh]

    def method_rows(target, block, radials, windows, axes_profile):
        """(row name, method, options, profile, note) of each method at `target` with blocks of `block`."""
        tile = TILES[block]
        if "radial" in methods:
            decay, radial_density = _nearest(radials, target)
            yield ("radial", "radial", dict(block_size=block, decay_factor=decay), None,
                   f"decay_factor {decay} (mask density {radial_density:.3f}, nearest on the grid)")
        neighborhoods = ((False, "neighborhood (tile, STA)"), (True, "neighborhood (exact, NATTEN)"))
        for exact, name in neighborhoods if "neighborhood" in methods else []:
            window, density = pick_window(windows[exact], target)
            yield (name, "neighborhood", dict(window=window, tile=tile, exact=exact), None,
                   f"window {window} (block density {density:.3f}; the most even window within 15% of the target)")
        for name, refresh in every_refresh("draft") if "draft" in methods else []:
            yield name, "draft", dict(density=target, tile=tile, **refresh), None, ""
        if "reorder-axes" in methods:
            yield "reorder (axes, profile)", "reorder-axes", dict(density=target, layer_density=None), axes_profile, ""
        for name, refresh in every_refresh("reorder (cluster)") if "reorder-cluster" in methods else []:
            yield name, "reorder-cluster", dict(strategy="cluster", density=target, block_size=block, **refresh), None, ""

    profiles = {}
    try:
        for block in block_sizes:
            tile = TILES[block]
            axes_profile, vdit_profiles = None, {}
            with tempfile.TemporaryDirectory() as folder:
                if "reorder-axes" in methods:
                    axes_profile = calibrated(folder, "reorder", "axes.json", block, strategy="axes",
                                              target_recall=0.9)
                if "vdit" in methods and not args.warmup:
                    vdit_profiles = {bound: calibrated(folder, "vdit", f"vdit-{bound}.json", block, tile=tile,
                                                       max_error=bound) for bound in VDIT_MAX_ERRORS}
            if axes_profile is not None:
                profiles[block] = axes_profile.entries
            radials = radial_options(layout, block)
            windows = {exact: window_options(layout, exact, tile) for exact in (False, True)}
            for target in sorted(densities):
                for name, method, options, profile, note in list(method_rows(target, block, radials, windows,
                                                                              axes_profile)):
                    if not args.warmup:
                        for variant in variants:
                            run(target, name, block, variant, method, options, profile, note)
                        continue
                    key = method if method in OFFICIAL_WARMUP else None
                    for dense_steps, dense_layers, official in warmup_grid(steps, OFFICIAL_WARMUP.get(key)):
                        for variant in variants:
                            row = run(target, name, block, variant, method,
                                      dict(options, dense_steps=dense_steps, dense_layers=dense_layers), profile,
                                      note, extra=dict(dense_steps=dense_steps, dense_layers=dense_layers,
                                                       official=official))
                            if row is not None:
                                row["psnr_per_work"] = round(row["psnr_db"] / row["density"], 3)
            for bound, profile in vdit_profiles.items():
                for variant in variants:
                    row = run(0.0, f"vdit (max_error {bound})", block, variant, "vdit", {}, profile,
                              note=f"profile searched at max_error {bound}")
                    if row is not None:
                        row["target_density"] = min(densities, key=lambda t: abs(t - row["density"]))
    except _OutOfBudget as reason:
        stopped = f"stopped by {reason} after {counter['sparse']} sparse videos; the rows above are complete"
        print(stopped, flush=True)
    rows.sort(key=lambda r: (r["block_size"], r["target_density"], r["method"], r["variant"],
                             r.get("dense_steps", 0), r.get("dense_layers", 0)))

    date = datetime.date.today().isoformat()
    device = args.device if args.device == "cpu" else torch.cuda.get_device_name().replace(" ", "-")
    result = dict(
        command="python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv),
        model=label, model_dir=args.model_dir, date=date, torch=torch.__version__, python=platform.python_version(),
        device=device, threads=torch.get_num_threads(), size=size, steps=steps, block_sizes=block_sizes,
        tiles={block: list(TILES[block]) for block in block_sizes}, prompts=prompts,
        calibration_prompts=list(settings["calibration"]), seeds=seeds, variants=variants, warmup=args.warmup,
        axes_profiles=profiles or None, methods=methods, refresh=args.refresh,
        videos=dict(dense=len(dense), sparse=counter["sparse"]), seconds=round(time.time() - start, 1), rows=rows,
        skipped=skipped, stopped=stopped, metric_notes=metric_notes,
        lpips_note=None if lpips_metric is not None else "; ".join(metric_notes) or "LPIPS not available",
        note=args.note,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full = sorted(methods) == sorted(METHODS) and args.refresh == [1] and stopped is None
    stem = "-".join(filter(None, [
        "quality", "tiny" if settings is TRAINED else "random", "warmup" if args.warmup else "",
        "" if full else "subset", "cpu" if args.device == "cpu" else "cuda", date,
    ]))  # fmt: skip
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1))
    write_atomic(out / f"{stem}.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    size = result["size"]
    tiles = ", ".join(f"{block}: {tuple(tile)}" for block, tile in result["tiles"].items())
    lines = [
        f"# Sparse methods vs dense: PSNR / SSIM, {result['model']}, {result['device']}, {result['date']}",
        "",
        f"`{result['command']}`; torch {result['torch']}, {result['threads']} threads, {result['seconds']:.0f} s, "
        f"{result['videos']['dense']} dense and {result['videos']['sparse']} sparse videos. "
        f"{size['num_frames']} frames at {size['height']} x {size['width']}, {result['steps']} steps, CFG, "
        f"seeds {result['seeds']}, blocks of {result['block_sizes']} tokens (tiles {tiles}); mean over "
        f"{len(result['prompts'])} prompts x {len(result['seeds'])} seeds of PSNR (dB; `min`: the worst video) and "
        "SSIM (11 x 11 Gaussian, sigma 1.5) of each video against the dense video of its prompt and seed. "
        "`density`: the mean kept fraction over every self-attention call (the kernel's work; dense calls count 1). "
        "Radial and the neighborhood windows reach a density through their decay factor or window (the nearest on a "
        "grid); vdit's through its search bound, listed under the nearest target. `variant`: the options added to "
        "each method's config (plain: none; compensate: `compensate=True`; recall0.9: `min_recall=0.9`; fp8 / int8: "
        "`precision=...`, on a CPU through the reference backend's emulation of the kernel's quantization).",
        *(["", f"**Note:** {result['note']}"] if result.get("note") else []),
        *(["", f"**Stopped:** {result['stopped']}"] if result.get("stopped") else []),
        *[f"\n{note}." for note in result.get("metric_notes", [])],
        *(["", "Skipped: " + "; ".join(result["skipped"]) + "."] if result.get("skipped") else []),
        "",
    ]
    if result.get("warmup"):
        lines += [
            "Dense warm-up: `dense_steps` of the run's steps and `dense_layers` first blocks dense; `PSNR / work`: PSNR "
            "over the density (the attention work). `official`: the official setting (radial 12 of 50 steps and 1 "
            "layer, Sparse VideoGen2 30% of the steps), scaled to this run's steps.",
            "",
            "| block | target density | method | variant | dense_steps | dense_layers | work | PSNR dB | PSNR / work "
            "| SSIM | official |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(f"| {r['block_size']} | {r['target_density']} | {r['method']} | {r['variant']} | "
                         f"{r['dense_steps']} | {r['dense_layers']} | {r['density']:.3f} | {r['psnr_db']:.2f} | "
                         f"{r['psnr_per_work']:.1f} | {r['ssim']:.4f} | {'yes' if r['official'] else ''} |")
    else:
        lines += [
            "| block | target density | method | variant | density | PSNR dB | PSNR min | SSIM | LPIPS | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lpips = "-" if r.get("lpips") is None else f"{r['lpips']:.4f}"
            lines.append(f"| {r['block_size']} | {r['target_density']} | {r['method']} | {r['variant']} | "
                         f"{r['density']:.3f} | {r['psnr_db']:.2f} | {r['psnr_min_db']:.2f} | {r['ssim']:.4f} | "
                         f"{lpips} | {r.get('note', '')} |")
    if "untrained" in result["model"]:
        lines += ["", "The model is untrained (random weights): its attention is diffuse and its videos noise-like, "
                      "so these numbers measure fidelity to the dense computation, not visual quality."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
