"""`dit-sparse eval`: the suite rendered by the baseline and each method, scored, and reported (resumable)."""

from __future__ import annotations

import argparse
import os

from dit_sparse.eval import render
from dit_sparse.eval.runner import DEFAULT_FRAMES, DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_WARMUP_STEPS
from dit_sparse.pipelines import tiny
from dit_sparse.pipelines.models import MODEL_HELP


def add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    """Add the `eval` command's own arguments to its parser (`dit_sparse.cli` adds --device, --dtype, --fps,
    --threads)."""
    evaluate.add_argument("--model", default=None, help=MODEL_HELP)
    evaluate.add_argument("--methods", default=None, help="comma-separated methods (default: every method)")
    evaluate.add_argument("--suite", default="tiny", help="tiny, standard, vbench[:DIMENSION] or a .txt/.json file")
    evaluate.add_argument("--seeds", default="0", help="comma-separated noise seeds (default 0)")
    from dit_sparse.cli import add_stack_arguments  # --cache, --fp8, --compile: one meaning in render and eval

    add_stack_arguments(evaluate)
    evaluate.add_argument(
        "--stacks", nargs="+", default=None, metavar="SPEC",
        help=f"compare stacks in one run: each method rendered once per stack, a report row each; a SPEC is "
             f"{render.STACK_SPEC_HELP} (e.g. --stacks none cache=first_block:threshold=0.1 cache=taylorseer+fp8); "
             "not with --cache, --fp8, --compile",
    )  # fmt: skip
    model_size = (f"the tiny trained model's own: {render.DEFAULT_FRAMES} frames, {render.DEFAULT_HEIGHT} px, "
                  f"{tiny.DEFAULT_STEPS} steps; other models: {DEFAULT_FRAMES} frames, {DEFAULT_SIZE} px, "
                  f"{DEFAULT_STEPS} steps")
    evaluate.add_argument("--frames", type=int, default=None, help=f"4k+1 (default: {model_size})")
    evaluate.add_argument("--height", type=int, default=None, help="multiple of 16 (default: as --frames says)")
    evaluate.add_argument("--width", type=int, default=None, help="multiple of 16 (default: as --frames says)")
    evaluate.add_argument("--steps", type=int, default=None, help="denoising steps (default: as --frames says)")
    evaluate.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default 5.0)")
    evaluate.add_argument(
        "--option", action="append", default=[], metavar="METHOD.KEY=VALUE", help="a method option (repeatable)"
    )
    evaluate.add_argument("--block-size", type=int, default=None, help="block size of every method that has one")
    evaluate.add_argument(
        "--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS,
        help=f"steps of the untimed warm-up call per method (default {DEFAULT_WARMUP_STEPS}; 0: none)",
    )  # fmt: skip
    evaluate.add_argument("--output-dir", default="eval-out", help="where the report goes (default eval-out/)")
    evaluate.add_argument(
        "--cache-dir", default=None, help="rendered videos and their manifest (default OUTPUT/videos)"
    )
    evaluate.add_argument(
        "--score-workers", type=int, default=None,
        help="processes that compute the frame metrics (default: one per CPU core; about 30 s a video at 480p)",
    )
    evaluate.add_argument(
        "--no-videos", dest="side_by_side_videos", action="store_false",
        help="the report's side-by-sides as still frames only, no mp4s (at real sizes each mp4 is tens of MB)",
    )
    evaluate.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from dit_sparse.eval import metrics
    from dit_sparse.eval.report import write_report
    from dit_sparse.eval.runner import make_plan, method_means, render_all, row_label, score_videos, score_workers
    from dit_sparse.pipelines.models import resolve_model_label

    plan = make_plan(
        suite=args.suite, methods=args.methods, options=args.option, block_size=args.block_size, model=args.model,
        seeds=args.seeds, frames=args.frames, height=args.height, width=args.width, steps=args.steps,
        guidance=args.guidance, fps=args.fps, device=args.device, dtype=args.dtype, warmup_steps=args.warmup_steps,
        output_dir=args.output_dir, cache_dir=args.cache_dir, side_by_side_videos=args.side_by_side_videos,
        stack=render.stack_from_args(args), stacks=args.stacks,
    )  # fmt: skip
    score_workers(1, args.score_workers)  # a bad value fails before anything renders
    render.check_output_dir(plan.output_dir)
    render.check_output_dir(plan.cache_dir, "--cache-dir")
    notes = []
    if not plan.device.startswith("cuda"):
        notes.append(
            "CPU run: attention runs on the PyTorch reference path, so the speed columns show the machinery, not "
            "dit-sparse's GPU speed (see benchmarks/results for that); attention share is measured on GPU only"
        )
    _, model_note = resolve_model_label(plan.model)
    if model_note:
        print(model_note)
        notes.append(model_note.removeprefix("note: "))
    videos, rows = len(plan.videos()), plan.rows()
    print(
        f"model: {plan.model_label}; suite {plan.suite.name} ({len(plan.suite.prompts)} prompts) x {len(plan.seeds)} "
        f"seed(s); baseline + {', '.join(row.label for row in rows)}: {videos * (1 + len(rows))} videos"
    )
    finished = render_all(plan)
    optional, skipped = metrics.optional_metrics(plan.device)
    for note in skipped:
        print(f"note: {note}")
    notes += skipped
    results = score_videos(plan, finished, optional, workers=args.score_workers)
    means = method_means(plan, results)
    files = write_report(plan, results, means, notes)
    width = max(14, *(len(row_label(mean)) + 1 for mean in means))
    print(f"\n{'method':<{width}} {'density':>8} {'s/step':>8} {'speedup':>8} {'PSNR':>9} {'SSIM':>7}")
    for mean in means:
        density = "-" if mean["density"] is None else f"{mean['density']:.3f}"
        step = "-" if mean["seconds_per_step"] is None else f"{mean['seconds_per_step']:.3f}"
        speed = "-" if mean["step_speedup"] is None else f"{mean['step_speedup']:.2f}x"
        psnr = "-" if mean["psnr"] is None else ("inf" if mean["psnr"] == float("inf") else f"{mean['psnr']:.2f}")
        ssim = "-" if mean["ssim"] is None else f"{mean['ssim']:.4f}"
        print(f"{row_label(mean):<{width}} {density:>8} {step:>8} {speed:>8} {psnr:>9} {ssim:>7}")
    print(f"report: {os.path.join(plan.output_dir, 'report.html')} (and report.md, results.json, results.csv)")
    return 0
