"""Quality of every sparse method against dense on a CPU (issues 5 and 6): PSNR and SSIM of each method's video
against the dense video of the same pipeline, prompt and seed, at densities near 0.1, 0.25 and 0.5.

    python -m benchmarks.quality --out benchmarks/results                       # the shipped tiny model
    python -m benchmarks.quality --model-dir DIR --out benchmarks/results       # another tiny-model export
    python -m benchmarks.quality --random --out /tmp/q                          # the tiny RANDOM pipeline, fast

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


def radial_options(layout) -> list[tuple[float, float]]:
    """(decay factor, mask density) over `DECAY_GRID`."""
    from dit_sparse.patterns import radial

    return [(decay, radial(layout, block_size=BLOCK, decay_factor=decay).density) for decay in DECAY_GRID]


def window_options(layout, exact: bool) -> list[tuple[tuple[int, int, int], float, float]]:
    """(window, block density, unevenness) of every `neighborhood` window of odd sizes over the layout's axes;
    unevenness: the spread of the covered fractions of the three axes (0: the window covers each axis alike)."""
    from dit_sparse.patterns import neighborhood

    sizes = (layout.frames, layout.height, layout.width)
    options = []
    for window in itertools.product(*(range(1, n + 1, 2) for n in sizes)):
        density = neighborhood(layout, window=window, tile=TILE, exact=exact).density
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


def main(argv=None) -> int:
    import dit_sparse
    from dit_sparse.eval.metrics import ssim  # the eval suite's SSIM (uint8 frames, luma)
    from dit_sparse.files import write_atomic
    from dit_sparse.video import psnr  # on the float frames: finer than uint8 for near-identical videos

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--model-dir", default=None, help="a tiny-model export folder (default: the shipped one)")
    parser.add_argument("--random", action="store_true", help="the tiny RANDOM pipeline at a small size (fast)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--note", default=None, help="a line for the results file (e.g. which export this was)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="which rows to run (default: all)")
    parser.add_argument("--refresh", nargs="+", type=int, default=[1],
                        help="the estimated methods' (draft, reorder cluster) refresh periods in steps, a row each")
    args = parser.parse_args(argv)
    if any(period < 1 for period in args.refresh):
        parser.error(f"--refresh periods must be >= 1 steps, got {args.refresh}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, label, settings = _pipeline(args.model_dir, args.random)
    pipe.set_progress_bar_config(disable=True)
    steps = args.steps or settings["steps"]
    size, prompts = settings["size"], settings["prompts"]
    call = dict(size, num_inference_steps=steps, output_type="np")
    layout = _layout(size)

    def render(prompt: str) -> np.ndarray:
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **call).frames[0]

    def calibrated(folder: str, method: str, name: str, **options):
        return dit_sparse.calibrate(
            pipe, list(settings["calibration"]), method, block_size=BLOCK, pipe_kwargs=dict(size,
            num_inference_steps=steps), steps=list(range(0, steps, max(steps // 4, 1))), path=Path(folder) / name,
            progress=False, **options,
        )  # fmt: skip

    start = time.time()
    dense = {prompt: render(prompt) for prompt in prompts}
    print(f"dense: {time.time() - start:.0f} s", flush=True)
    axes_profile, vdit_profiles = None, {}
    with tempfile.TemporaryDirectory() as folder:
        if "reorder-axes" in args.methods:
            axes_profile = calibrated(folder, "reorder", "axes.json", strategy="axes", target_recall=0.9)
        if "vdit" in args.methods:
            vdit_profiles = {bound: calibrated(folder, "vdit", f"vdit-{bound}.json", tile=TILE, max_error=bound)
                             for bound in VDIT_MAX_ERRORS}
    radials, windows = radial_options(layout), {exact: window_options(layout, exact) for exact in (False, True)}

    rows = []

    def run(target: float, name: str, method: str | None, options: dict, profile=None, note: str = "") -> dict:
        if profile is not None:
            dit_sparse.sparsify(pipe, profile=profile, **options)
        else:
            dit_sparse.sparsify(pipe, method, **options)
        videos = {prompt: render(prompt) for prompt in prompts}
        stats = dit_sparse.sparsity_stats(pipe)
        dit_sparse.unsparsify(pipe)
        row = dict(method=name, target_density=target, density=round(stats["density"], 4),
                   psnr_db=round(float(np.mean([psnr(dense[p], videos[p]) for p in prompts])), 3),
                   ssim=round(float(np.mean([ssim(dense[p], videos[p]) for p in prompts])), 4),
                   options={k: v for k, v in options.items() if k != "layer_density"}, note=note)
        if "mask_builds" in stats:  # estimated methods: how many masks were estimated (the rest reused per refresh)
            row["mask_builds"] = stats["mask_builds"]
        rows.append(row)
        print(row, flush=True)
        return row

    def every_refresh(name: str) -> list[tuple[str, dict]]:
        """(row name, options) per --refresh period; the name says the period unless it is the default alone."""
        if args.refresh == [1]:
            return [(name, {})]
        return [(f"{name} refresh {period}", dict(refresh=period)) for period in args.refresh]

    for target in sorted(args.densities):
        if "radial" in args.methods:
            decay, radial_density = _nearest(radials, target)
            run(target, "radial", "radial", dict(block_size=BLOCK, decay_factor=decay),
                note=f"decay_factor {decay} (mask density {radial_density:.3f}, nearest on the grid)")
        neighborhoods = ((False, "neighborhood (tile, STA)"), (True, "neighborhood (exact, NATTEN)"))
        for exact, name in neighborhoods if "neighborhood" in args.methods else []:
            window, density = pick_window(windows[exact], target)
            run(target, name, "neighborhood", dict(window=window, tile=TILE, exact=exact),
                note=f"window {window} (block density {density:.3f}; the most even window within 15% of the target)")
        for name, refresh in every_refresh("draft") if "draft" in args.methods else []:
            run(target, name, "draft", dict(density=target, tile=TILE, **refresh))
        if "reorder-axes" in args.methods:
            run(target, "reorder (axes, profile)", None, dict(density=target, layer_density=None), axes_profile)
        for name, refresh in every_refresh("reorder (cluster)") if "reorder-cluster" in args.methods else []:
            run(target, name, "reorder", dict(strategy="cluster", density=target, block_size=BLOCK, **refresh))
    for bound, profile in vdit_profiles.items():
        row = run(0.0, f"vdit (max_error {bound})", None, {}, profile, note=f"profile searched at max_error {bound}")
        row["target_density"] = min(args.densities, key=lambda t: abs(t - row["density"]))
    rows.sort(key=lambda r: (r["target_density"], r["method"]))

    date = datetime.date.today().isoformat()
    result = dict(
        command="python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv),
        model=label, model_dir=args.model_dir, date=date, torch=torch.__version__, python=platform.python_version(),
        device="cpu", threads=torch.get_num_threads(), size=size, steps=steps, block_size=BLOCK, tile=list(TILE),
        prompts=list(prompts), calibration_prompts=list(settings["calibration"]), seed=0,
        axes_profile=None if axes_profile is None else axes_profile.entries, methods=args.methods,
        refresh=args.refresh, seconds=round(time.time() - start, 1), rows=rows, note=args.note,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subset = "" if sorted(args.methods) == sorted(METHODS) and args.refresh == [1] else "-subset"
    stem = f"quality-{'tiny' if settings is TRAINED else 'random'}{subset}-cpu-{date}"
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1))
    write_atomic(out / f"{stem}.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    size = result["size"]
    lines = [
        f"# Sparse methods vs dense: PSNR / SSIM, {result['model']}, CPU, {result['date']}",
        "",
        f"`{result['command']}`; torch {result['torch']}, {result['threads']} threads, {result['seconds']:.0f} s. "
        f"{size['num_frames']} frames at {size['height']} x {size['width']}, {result['steps']} steps, CFG, seed 0, "
        f"blocks of {result['block_size']} tokens (tiles {tuple(result['tile'])}); mean over "
        f"{len(result['prompts'])} prompts of PSNR (dB) and SSIM (11 x 11 Gaussian, sigma 1.5) of each video against "
        "the dense video. `density`: the mean kept fraction over every self-attention call (the kernel's work). "
        "Radial and the neighborhood windows reach a density through their decay factor or window (the nearest on a "
        "grid); vdit's through its search bound, listed under the nearest target.",
        *(["", f"**Note:** {result['note']}"] if result.get("note") else []),
        "",
        "| target density | method | density | PSNR dB | SSIM | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['target_density']} | {r['method']} | {r['density']:.3f} | {r['psnr_db']:.2f} | "
                     f"{r['ssim']:.4f} | {r.get('note', '')} |")
    if "untrained" in result["model"]:
        lines += ["", "The model is untrained (random weights): its attention is diffuse and its videos noise-like, "
                      "so these numbers measure fidelity to the dense computation, not visual quality."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
