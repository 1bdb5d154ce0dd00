"""Quality of the dynamic methods (issue 5) on a CPU: PSNR and SSIM of each method's video against the dense video
of the same pipeline, prompt and seed, at densities 0.1, 0.25 and 0.5, next to `radial` at the nearest density its
decay factor reaches.

    python -m benchmarks.quality_dynamic --out benchmarks/results          # about 2 minutes on one CPU core

Model: the trained tiny model when `dit_sparse.pipelines.tiny` has its weights, else the UNTRAINED tiny random Wan
pipeline (`pipelines/tiny_random.py`): its videos are noise-like, so its numbers check the machinery and rank the
masks' fidelity to dense attention, not visual quality. Every run: 17 frames at 128 x 128 (5 latent frames of 8 x 8
tokens, 320 video tokens), blocks of 16 tokens (draft tiles (1, 4, 4)), CFG. `reorder` axes runs from a profile
calibrated on other prompts (`dit_sparse.calibrate`); draft and cluster estimate per call (`refresh=1`).
Radial's density is set by its decay factor and block size, not asked for: for each target the decay factor (from a
grid) whose mask density is nearest is used, and the achieved density is reported. On 5 latent frames radial's
window floor (one block) and frame-0 sink keep it at 0.83 or more, so every method also runs at that density: the
row where all four compare at the same density.
"""

from __future__ import annotations

import argparse
import datetime
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
PROMPTS = ("a red fox runs across a snowy field", "a small boat drifts on a calm blue lake at sunset")
CALIBRATION_PROMPTS = ("a bird flies over the forest", "a car drives on a city street at night")
SIZE = dict(num_frames=17, height=128, width=128)
BLOCK = 16
DECAY_GRID = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)


def _pipeline():
    from dit_sparse.pipelines import tiny, tiny_random

    if tiny.available():
        return tiny.load(), tiny.TINY_LABEL
    return tiny_random.build_tiny_wan_pipeline(seed=0), tiny_random.TINY_RANDOM_LABEL


def _radial_decay(layout, target: float) -> tuple[float, float]:
    """(decay factor, mask density) of the radial mask nearest to `target` density over `DECAY_GRID`."""
    from dit_sparse.patterns import radial

    options = [(decay, radial(layout, block_size=BLOCK, decay_factor=decay).density) for decay in DECAY_GRID]
    return min(options, key=lambda option: abs(option[1] - target))


def main(argv=None) -> int:
    import dit_sparse
    from dit_sparse.eval.metrics import ssim  # the eval suite's SSIM (uint8 frames, luma)
    from dit_sparse.video import psnr  # on the float frames: finer than uint8 for near-identical videos

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per video")
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe, label = _pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(SIZE, num_inference_steps=args.steps, output_type="np")
    layout = dit_sparse.VideoLayout(5, 8, 8)

    def render(prompt: str) -> np.ndarray:
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **call).frames[0]

    start = time.time()
    dense = {prompt: render(prompt) for prompt in PROMPTS}
    with tempfile.TemporaryDirectory() as folder:
        axes_profile = dit_sparse.calibrate(
            pipe, list(CALIBRATION_PROMPTS), "reorder", strategy="axes", block_size=BLOCK, target_recall=0.9,
            pipe_kwargs=dict(SIZE, num_inference_steps=args.steps), steps=list(range(0, args.steps, 2)),
            path=Path(folder) / "axes.json", progress=False,
        )
    rows = []
    radial_floor = _radial_decay(layout, 0.0)[1]  # radial cannot go sparser on 5 latent frames: compare there too
    for target in sorted(set(args.densities) | {round(radial_floor, 3)}):
        decay, radial_density = _radial_decay(layout, target)
        methods = {
            "draft": ("draft", dict(density=target, tile=(1, 4, 4)), None),
            "reorder (axes, profile)": (None, dict(density=target), axes_profile),
            "reorder (cluster)": ("reorder", dict(strategy="cluster", density=target, block_size=BLOCK), None),
            "radial": ("radial", dict(block_size=BLOCK, decay_factor=decay), None),
        }
        for name, (method, options, profile) in methods.items():
            if profile is not None:
                # The profile's per-head orders, at the target density for every head.
                dit_sparse.sparsify(pipe, profile=profile, layer_density=None, **options)
            else:
                dit_sparse.sparsify(pipe, method, **options)
            videos = {prompt: render(prompt) for prompt in PROMPTS}
            stats = dit_sparse.sparsity_stats(pipe)
            dit_sparse.unsparsify(pipe)
            row = dict(method=name, target_density=target, density=round(stats["density"], 4),
                       psnr_db=round(float(np.mean([psnr(dense[p], videos[p]) for p in PROMPTS])), 3),
                       ssim=round(float(np.mean([ssim(dense[p], videos[p]) for p in PROMPTS])), 4),
                       options={k: v for k, v in options.items()})
            if name == "radial":
                row["note"] = f"decay_factor {decay} (mask density {radial_density:.3f}, nearest on the grid)"
            rows.append(row)
            print(row, flush=True)
    date = datetime.date.today().isoformat()
    result = dict(
        command="python -m benchmarks.quality_dynamic " + " ".join(sys.argv[1:] if argv is None else argv),
        model=label, date=date, torch=torch.__version__, python=platform.python_version(), device="cpu",
        size=SIZE, steps=args.steps, block_size=BLOCK, prompts=list(PROMPTS), seed=0,
        axes_profile=dict(entries=axes_profile.entries, calibration_prompts=list(CALIBRATION_PROMPTS)),
        seconds=round(time.time() - start, 1), rows=rows,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"quality-dynamic-cpu-{date}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [
        f"# Dynamic methods vs dense: PSNR / SSIM, {result['model']}, CPU, {result['date']}",
        "",
        f"`{result['command']}`; torch {result['torch']}. {result['size']['num_frames']} frames at "
        f"{result['size']['height']} x {result['size']['width']}, {result['steps']} steps, CFG, seed 0, "
        f"blocks of {result['block_size']} tokens; mean over {len(result['prompts'])} prompts of PSNR (dB) and SSIM "
        "(11 x 11 Gaussian, sigma 1.5) of each video against the dense video. `density`: mean kept fraction over "
        "every self-attention call. Radial's density comes from its decay factor (nearest on a grid).",
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
