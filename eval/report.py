"""The eval's outputs: results.json / results.csv, a Pareto plot, mask plots, side-by-side videos, report.md/.html.

Every file is written atomically (a temporary file in the same folder, renamed over the target), so an interrupted
report never leaves a half-written file in place of a good one. report.md and report.html link their pictures and
videos by relative paths, so the output folder can be moved or published as it is; report.html has its style
inline and needs no network.
"""

from __future__ import annotations

import csv
import datetime
import html
import io
import json
import math
import os
import platform

import numpy as np

from dit_sparse.eval.render import stack_spec
from dit_sparse.eval.runner import BASELINE, CACHE_FIELDS, RESULT_FIELDS, EvalPlan, row_label
from dit_sparse.files import write_atomic
from dit_sparse.pipelines.models import RANDOM_WEIGHTS, TINY, TINY_RANDOM, random_weights_origin

#: The side-by-side videos' third column shows |method - baseline| times a gain: a power of two chosen per prompt so
#: that the 99.9th percentile of the largest difference reaches full brightness, at most `MAX_DIFF_GAIN` (shown in
#: the column's label; one gain for every row, so rows compare).
MAX_DIFF_GAIN = 128
#: imageio-ffmpeg quality of the side-by-side mp4s (4 ~ x264 CRF 30): for viewing only; metrics use lossless frames.
SIDE_BY_SIDE_QUALITY = 4
LABEL_HEIGHT = 14
#: JPEG quality of the side-by-side stills (noise-like frames make PNGs large)
STILL_QUALITY = 85

METRIC_NOTES = [
    ("baseline", "the pipeline as diffusers runs it (no dit-sparse): the reference of every fidelity and speed figure"),
    ("density", "mean kept fraction of the self-attention blocks over the attention calls (dense steps/layers: 1)"),
    ("seconds", "end-to-end seconds of one pipeline call (text encoding, denoising, VAE decode)"),
    ("s/step", "denoising seconds per step, from the first transformer call to the last step's end"),
    ("speedup", "baseline time over method time, end to end and per step (ratios of totals over the same videos)"),
    ("attention share", "GPU only: time inside the self-attention modules (CUDA events) over the denoising time"),
    ("peak memory", "GPU: torch.cuda.max_memory_allocated; CPU: peak resident set size of the process, sampled"),
    ("cache skipped", "under a step cache: the share of the self-attention computations the cache served instead"),
    ("PSNR", "dB against the baseline's frames (lossless), over all frames, pixels and channels; higher is closer"),
    ("SSIM", "Wang et al. 2004 (11x11 Gaussian, sigma 1.5) on BT.601 luma, per frame, averaged; 1 is identical"),
    ("LPIPS / CLIP", "learnt metrics, computed only when their package and weights are available offline"),
    ("flicker", "VBench temporal flickering: 1 - mean |frame difference| / 255; 1 is static"),
    ("smoothness", "VBench motion smoothness, odd frames re-created by Farneback-flow interpolation instead of AMT"),
    ("dynamic", "VBench dynamic degree on Farneback flow instead of RAFT: the fraction of videos that move"),
    ("flow px", "mean Farneback flow magnitude between consecutive frames, pixels per frame"),
]


def metric_notes(means: list[dict]) -> list[tuple[str, str]]:
    """`METRIC_NOTES`, the cache's only where a row ran under one."""
    cached = any(mean.get("cache_skip_share") is not None for mean in means)
    return [(name, text) for name, text in METRIC_NOTES if name != "cache skipped" or cached]


def _json_safe(value):
    """inf / nan as the strings "inf" / "nan" (JSON has no such numbers); numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return value


# ---- the run's description ---------------------------------------------------------------------------------------
def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            name = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{device} ({name}, {torch.get_num_threads()} torch thread(s))"


def describe_run(plan: EvalPlan, notes: list[str]) -> dict:
    """What the report must always state: model, settings, device, versions, and the notes of the run."""
    import cv2
    import diffusers
    import torch

    from dit_sparse.pipelines.tiny.random_tiny import TINY_RANDOM_LABEL

    try:
        from importlib.metadata import version

        dit_sparse_version = version("dit-sparse")
    except Exception:
        dit_sparse_version = "unknown"
    model_note = None
    origin = random_weights_origin(plan.model)
    if plan.model_label == TINY_RANDOM_LABEL or origin is not None:
        model_note = f"random weights (UNTRAINED): {RANDOM_WEIGHTS}; the VBench-style dimensions describe noise"
        model_note += f" (drawn for {origin})" if origin else ""
    return {
        "model": plan.model_label,
        "model_note": model_note,
        "suite": {"name": plan.suite.name, "source": plan.suite.source, "prompts": len(plan.suite.prompts)},
        "methods": {m.name: m.options for m in plan.methods},
        **({"stack": plan.stack} if plan.stack else {}),
        **({"stacks": list(plan.stacks)} if plan.stacks else {}),
        "settings": {
            "seeds": list(plan.seeds), "frames": plan.frames, "height": plan.height, "width": plan.width,
            "steps": plan.steps, "guidance": plan.guidance, "fps": plan.fps, "dtype": plan.dtype,
            "warmup_steps": plan.warmup_steps,
        },  # fmt: skip
        "device": _device_name(plan.device),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "dit-sparse": dit_sparse_version, "numpy": np.__version__, "opencv": cv2.__version__,
        },  # fmt: skip
        "command": reproduce_command(plan),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": list(notes),
    }


def reproduce_command(plan: EvalPlan) -> str:
    """A `dit-sparse eval` command line that renders the same videos (options that differ from the defaults)."""
    import shlex

    from dit_sparse.patterns import make_config
    from dit_sparse.eval.suites import BUILT_IN

    name = plan.suite.name
    suite = name if name in BUILT_IN or name.startswith("vbench") else plan.suite.source
    from dit_sparse.pipelines.tiny.random_tiny import TINY_RANDOM_LABEL

    model = plan.model or TINY
    if model == TINY and plan.model_label == TINY_RANDOM_LABEL:
        model = TINY_RANDOM  # what ran: the trained model was not there
    words = ["dit-sparse", "eval", "--model", model, "--methods", ",".join(m.name for m in plan.methods),
             "--suite", suite, "--seeds", ",".join(map(str, plan.seeds)), "--frames", plan.frames, "--height",
             plan.height, "--width", plan.width, "--steps", plan.steps, "--guidance", plan.guidance, "--fps", plan.fps,
             "--device", plan.device, "--dtype", plan.dtype, "--warmup-steps", plan.warmup_steps]  # fmt: skip
    if not plan.side_by_side_videos:
        words.append("--no-videos")
    if plan.stack.get("cache"):
        words += ["--cache", plan.stack["cache"]]
    words += ["--fp8"] * bool(plan.stack.get("fp8")) + (["--compile", plan.stack["compile"]]
                                                       if plan.stack.get("compile") else [])
    for spec in plan.methods:
        defaults = make_config(spec.name).options()
        for key, value in spec.options.items():
            if defaults.get(key) != value:
                text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
                words.append(f"--option={spec.name}.{key}={text}")
    if plan.stacks:
        words += ["--stacks", *(stack_spec(stack) for stack in plan.stacks)]  # last: it takes the words after it
    return " ".join(shlex.quote(str(word)) for word in words)


# ---- results files -----------------------------------------------------------------------------------------------
def write_results(output_dir: str, run: dict, results: list[dict], means: list[dict]) -> None:
    """results.json (run, per-video rows, per-row means) and results.csv (the rows, then the means; in a `--stacks`
    run also each row's label, stack (JSON) and cache skips)."""
    payload = {"run": run, "means": means, "videos": results}
    write_atomic(os.path.join(output_dir, "results.json"), json.dumps(_json_safe(payload), indent=1) + "\n")
    fields = [*RESULT_FIELDS, "identical", "config"]
    if "stacks" in run:
        fields[fields.index("method") + 1 : fields.index("method") + 1] = ["label", "stack"]
        fields += CACHE_FIELDS
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in [*results, *means]:
        out = _json_safe({field: row.get(field) for field in fields})
        out["config"] = "" if row.get("config") is None else json.dumps(row["config"], sort_keys=True)
        if "stack" in out:
            out["stack"] = json.dumps(row["stack"], sort_keys=True)
        writer.writerow({key: "" if value is None else value for key, value in out.items()})
    write_atomic(os.path.join(output_dir, "results.csv"), buffer.getvalue())


# ---- pictures ----------------------------------------------------------------------------------------------------
def _save_figure(figure, path: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_atomic(path, buffer.getvalue())


PARETO_MARKERS = "osD^vP*X<>"


def pareto_points(means: list[dict]) -> list[dict]:
    """The rows' (speedup, PSNR) points, each named by its row (`method`: the row label, a method with its stack in
    a `--stacks` run); x is the per-step speedup where measured, else end to end."""
    points = []
    for mean in means:
        if mean["method"] == BASELINE or mean["psnr"] is None:
            continue
        speed = mean["step_speedup"] if mean["step_speedup"] is not None else mean["speedup"]
        points.append({"method": row_label(mean), "speedup": speed, "psnr": mean["psnr"], "density": mean["density"]})
    return points


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both speedup and PSNR, by speedup."""
    def beats(q, p):
        return q["speedup"] >= p["speedup"] and q["psnr"] >= p["psnr"] and (q["speedup"], q["psnr"]) != (
            p["speedup"], p["psnr"])  # fmt: skip

    front = [p for p in points if not any(beats(q, p) for q in points)]
    return sorted(front, key=lambda p: p["speedup"])


def pareto_plot(means: list[dict], path: str, title: str) -> str:
    """Speedup vs PSNR per row (matplotlib, no pyplot), the Pareto front joined; infinite PSNR drawn at the top."""
    from matplotlib.figure import Figure

    points = pareto_points(means)
    finite = [p["psnr"] for p in points if math.isfinite(p["psnr"])]
    top = (max(finite) if finite else 40.0) + 5.0
    shown = [{**p, "y": p["psnr"] if math.isfinite(p["psnr"]) else top} for p in points]
    figure = Figure(figsize=(6.4, 4.8), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    front = pareto_front([{**p, "psnr": p["y"]} for p in shown])
    if len(front) > 1:
        axes.plot([p["speedup"] for p in front], [p["psnr"] for p in front], color="#fb8500", lw=1.5, zorder=1,
                  label="Pareto front")  # fmt: skip
    # one colour and marker per row, named in the legend: labels beside close points would overlap
    for index, point in enumerate(shown):
        density = "" if point["density"] is None else f", density {point['density']:.2f}"
        label = point["method"] + (" (identical)" if not math.isfinite(point["psnr"]) else "") + density
        axes.scatter(point["speedup"], point["y"], s=60, zorder=2, label=label, color=f"C{index % 10}",
                     marker=PARETO_MARKERS[index % len(PARETO_MARKERS)], edgecolors="#023047", linewidths=0.6)
    axes.axvline(1.0, color="#888888", lw=0.8, ls="--", label="baseline speed")
    if any(not math.isfinite(p["psnr"]) for p in points):
        axes.axhline(top, color="#bbbbbb", lw=0.6, ls=":")
    axes.set_xlabel("speedup over the baseline (per denoising step)")
    axes.set_ylabel("PSNR vs baseline (dB, mean over videos)")
    axes.set_title(title, fontsize=9)
    axes.margins(x=0.25, y=0.15)
    # three entries a line fit labels of up to ~40 characters (a method's); a method with a stack needs fewer
    longest = max((len(text) for text in axes.get_legend_handles_labels()[1]), default=0)
    columns = 3 if longest <= 40 else 2 if longest <= 60 else 1
    figure.legend(fontsize=8, loc="outside lower center", ncols=columns, frameon=False)
    return _save_figure(figure, path)


def mask_plots(means: list[dict], folder: str) -> dict[str, str | None]:
    """Per method, a `plot_mask` PNG of its block mask at the eval's layout (head 0), or None with the reason kept
    in the returned dict's `<method>:note`. One per method: a stack leaves the mask as it is (the first of the
    method's rows that recorded its layout draws it)."""
    from dit_sparse.layout import VideoLayout
    from dit_sparse.patterns import build_mask, is_static, make_config
    from dit_sparse.plot import plot_mask

    plots = {}
    for mean in means:
        name = mean["method"]
        if name == BASELINE or plots.get(name):
            continue
        if mean["layout"] is None or mean["config"] is None:
            plots[name], plots[f"{name}:note"] = None, "no layout recorded"
            continue
        config = make_config(name, **mean["config"])
        if not is_static(config):
            plots[name], plots[f"{name}:note"] = None, "its mask depends on q and k (built per call)"
            continue
        layout = VideoLayout(*mean["layout"])
        plots[name] = _save_figure(plot_mask(build_mask(layout, config), layout), os.path.join(folder, f"{name}.png"))
    return plots


def _labelled(frames: np.ndarray, label: str) -> np.ndarray:
    """Frames `(T, H, W, 3)` with a white strip on top carrying `label`."""
    import cv2

    strip = np.full((frames.shape[0], LABEL_HEIGHT, frames.shape[2], 3), 255, np.uint8)
    for frame in strip:
        cv2.putText(frame, label, (2, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, frames], axis=1)


def difference_gain(reference: np.ndarray, videos: dict[str, np.ndarray]) -> int:
    """The power-of-two gain that brings the 99.9th percentile of the largest |video - reference| near 255."""
    spread = max(
        (float(np.percentile(np.abs(v.astype(np.int16) - reference.astype(np.int16)), 99.9)) for v in videos.values()),
        default=0.0,
    )
    if spread <= 0:
        return 1
    return int(min(MAX_DIFF_GAIN, max(1, 2 ** math.floor(math.log2(255.0 / spread)))))


def side_by_side(reference: np.ndarray, videos: dict[str, np.ndarray], gain: int | None = None) -> np.ndarray:
    """A grid video: one row per entry of `videos` (a method, or a method with a stack), columns baseline | method |
    |method - baseline| x gain (`difference_gain` when None); uint8 `(T, H', W', 3)`, padded to multiples of 16."""
    gain = difference_gain(reference, videos) if gain is None else gain
    rows = []
    for name, video in videos.items():
        difference = np.abs(video.astype(np.int16) - reference.astype(np.int16)) * gain
        difference = np.clip(difference, 0, 255).astype(np.uint8)
        rows.append(np.concatenate([
            _labelled(reference, "baseline"), _labelled(video, name), _labelled(difference, f"|diff| x{gain}"),
        ], axis=2))  # fmt: skip
    grid = np.concatenate(rows, axis=1)
    pad_h, pad_w = (-grid.shape[1]) % 16, (-grid.shape[2]) % 16  # H.264 wants even sizes; 16 avoids rescaling
    return np.pad(grid, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=255)


def write_side_by_sides(plan: EvalPlan, results: list[dict], folder: str) -> list[dict]:
    """Per prompt (its first seed), a row per report row: the side-by-side mp4 (unless `plan.side_by_side_videos` is
    False: "video" is then None) and a JPEG of its middle frame; returns their entries."""
    import cv2

    from dit_sparse.eval.render import slugify
    from dit_sparse.eval.runner import load_frames
    from dit_sparse.video import write_mp4

    entries = []
    seed = plan.seeds[0]
    for index, prompt in enumerate(plan.suite.prompts):
        rows = {row_label(r): r for r in results if r["prompt"] == prompt.prompt and r["seed"] == seed}
        reference = load_frames(plan, rows[BASELINE])
        videos = {row.label: load_frames(plan, rows[row.label]) for row in plan.rows()}
        grid = side_by_side(reference, videos)
        stem = f"{index:02d}-{slugify(prompt.prompt)}"
        os.makedirs(folder, exist_ok=True)
        video_path = None
        if plan.side_by_side_videos:
            video_path = write_mp4(grid, os.path.join(folder, f"{stem}.mp4"), plan.fps, quality=SIDE_BY_SIDE_QUALITY)
        middle = cv2.cvtColor(grid[len(grid) // 2], cv2.COLOR_RGB2BGR)
        _, jpeg = cv2.imencode(".jpg", middle, [cv2.IMWRITE_JPEG_QUALITY, STILL_QUALITY])
        still_path = write_atomic(os.path.join(folder, f"{stem}.jpg"), jpeg.tobytes())
        entries.append({"prompt": prompt.prompt, "category": prompt.category, "seed": seed, "video": video_path,
                        "still": still_path})  # fmt: skip
    return entries


# ---- formatting --------------------------------------------------------------------------------------------------
def fmt(field: str, value) -> str:
    """A table cell."""
    if value is None:
        return "-"
    if field == "psnr":
        return "identical" if not math.isfinite(value) else f"{value:.2f}"
    if field in ("speedup", "step_speedup"):
        return f"{value:.2f}x"
    if field == "dynamic":
        return ("yes" if value else "no") if isinstance(value, bool) else f"{value:.2f}"
    if field in ("attention_share", "cache_skip_share"):
        return f"{100 * value:.0f}%"
    if field == "peak_memory_mb":
        return f"{value:,.0f}"
    if field in ("seconds", "seconds_per_step"):
        return f"{value:.3f}"
    if field == "flow_px":
        return f"{value:.2f}"
    if isinstance(value, float):
        fine = field in ("ssim", "lpips", "temporal_flickering", "motion_smoothness")
        return f"{value:.4f}" if fine else f"{value:.3f}"
    return str(value)


#: (field, column title) of the summary table and of the per-row tables (`method`: the row's label, `row_label`)
SUMMARY_COLUMNS = [
    ("method", "method"), ("videos", "videos"), ("density", "density"), ("seconds", "seconds"),
    ("seconds_per_step", "s/step"), ("speedup", "speedup"), ("step_speedup", "step speedup"),
    ("attention_share", "attention share"), ("cache_skip_share", "cache skipped"), ("peak_memory_mb", "peak MB"),
    ("psnr", "PSNR dB"), ("ssim", "SSIM"),
    ("lpips", "LPIPS"), ("clip_score", "CLIP"), ("temporal_flickering", "flicker"),
    ("motion_smoothness", "smoothness"), ("dynamic", "dynamic"), ("flow_px", "flow px"),
]  # fmt: skip
VIDEO_COLUMNS = [("prompt", "prompt"), ("seed", "seed")] + [
    c for c in SUMMARY_COLUMNS if c[0] not in ("method", "videos")
]


def _present(columns, rows):
    """Drop the columns no row has a value for (LPIPS without weights, attention share on CPU)."""
    return [(f, t) for f, t in columns if f in ("method", "prompt") or any(r.get(f) is not None for r in rows)]


def _setting_lines(run: dict) -> list[tuple[str, str]]:
    s = run["settings"]
    stacks = run.get("stacks")
    return [
        ("model", run["model"]),
        ("suite", f"{run['suite']['name']}: {run['suite']['prompts']} prompts ({run['suite']['source']})"),
        ("settings", f"{s['frames']} frames at {s['width']}x{s['height']} px, {s['steps']} steps, guidance "
                     f"{s['guidance']}, seeds {s['seeds']}, {s['dtype']}, "
                     f"{s['warmup_steps']} warm-up step(s) per method{' and stack' if stacks else ''}"),
        *((("stacks", f"{', '.join(map(stack_spec, stacks))}: each method once per stack"),) if stacks else ()),
        ("device", run["device"]),
        ("versions", ", ".join(f"{k} {v}" for k, v in run["versions"].items())),
        ("date", run["date"]),
        *((("command", run["command"]),) if run["command"] else ()),
    ]  # fmt: skip


def _relative(path: str, output_dir: str) -> str:
    return os.path.relpath(path, output_dir).replace(os.sep, "/")


# ---- report.md ---------------------------------------------------------------------------------------------------
def _cell(row: dict, field: str) -> str:
    """A table cell of `row`; the `method` column names the row (`row_label`: with its stack in a `--stacks` run)."""
    return fmt(field, row_label(row) if field == "method" else row.get(field))


def _md_table(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, f).replace("|", "\\|") for f, _ in columns) + " |")
    return lines


def render_markdown(run, means, results, plan: EvalPlan, files: dict) -> str:
    out = files["output_dir"]
    lines = [f"# dit-sparse eval: {run['suite']['name']} suite, {run['model']}", ""]
    if run["model_note"]:
        lines += [f"> **{run['model']}**: {run['model_note']}.", ""]
    lines += [f"- **{name}**: {value}" for name, value in _setting_lines(run)]
    lines += ["", "## Summary (mean over videos)", ""]
    lines += _md_table(_present(SUMMARY_COLUMNS, means), means)
    lines += ["", f"![speed vs PSNR]({_relative(files['pareto'], out)})", ""]
    lines += ["## Methods", ""]
    for spec in plan.rows():
        lines += [f"### {spec.label}", "", f"Options: `{json.dumps(spec.options, sort_keys=True)}`", ""]
        if spec.stack:
            lines += [f"Stacked on it (`optimize`): `{json.dumps(spec.stack, sort_keys=True)}`", ""]
        mask = files["masks"].get(spec.method)
        if mask:
            lines += [f"![{spec.method} mask]({_relative(mask, out)})", ""]
        elif files["masks"].get(f"{spec.method}:note"):
            lines += [f"No mask plot: {files['masks'][spec.method + ':note']}.", ""]
        rows = [r for r in results if row_label(r) == spec.label]
        lines += _md_table(_present(VIDEO_COLUMNS, rows), rows) + [""]
    lines += ["## Side by side", "", "Each row: baseline | method | |method - baseline| amplified by the gain in its "
              "label. Videos are for viewing (H.264); the metrics use the lossless frames.", ""]
    for entry in files["side_by_side"]:
        video = f": [video]({_relative(entry['video'], out)})" if entry["video"] else " (middle frame; no video)"
        lines += [f"**{entry['prompt']}** (seed {entry['seed']}){video}", "",
                  f"![{entry['prompt']}]({_relative(entry['still'], out)})", ""]  # fmt: skip
    lines += ["## What the columns mean", ""] + [f"- **{name}**: {text}" for name, text in metric_notes(means)]
    if run["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in run["notes"]]
    return "\n".join(lines) + "\n"


# ---- report.html -------------------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1d2433;
padding:0 1rem;line-height:1.45}
h1{font-size:1.5rem}h2{margin-top:2.2rem;border-bottom:1px solid #dde3ea;padding-bottom:.2rem}
.settings{background:#f4f7fa;border:1px solid #dde3ea;border-radius:6px;padding:.6rem 1rem}
.settings dt{font-weight:600;float:left;clear:left;width:6.5rem}.settings dd{margin-left:7rem}
.warn{background:#fff4e5;border:1px solid #ffb766;border-radius:6px;padding:.5rem 1rem}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}th,td{border:1px solid #dde3ea;padding:.25rem .5rem}
th{background:#023047;color:#fff;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#f7f9fb}.plots{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.plots img{max-width:100%;border:1px solid #dde3ea}figure{margin:0}figcaption{font-size:.85rem;color:#555}
.mask img{width:320px}.sbs video,.sbs img{image-rendering:pixelated;max-width:100%;border:1px solid #dde3ea}
code{background:#eef2f6;padding:0 .25rem;border-radius:3px}
"""


def _html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = []
    for row in rows:
        cells = []
        for field, _ in columns:
            value = _cell(row, field)
            cls = "" if field in ("method", "prompt") else ' class="num"'
            cells.append(f"<td{cls}>{html.escape(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(run, means, results, plan: EvalPlan, files: dict) -> str:
    out = files["output_dir"]
    esc = html.escape
    title = f"dit-sparse eval: {run['suite']['name']} suite, {run['model']}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{STYLE}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]  # fmt: skip
    if run["model_note"]:
        parts.append(f"<p class='warn'><b>{esc(run['model'])}</b>: {esc(run['model_note'])}.</p>")
    parts.append("<dl class='settings'>" + "".join(
        f"<dt>{esc(name)}</dt><dd>{esc(value)}</dd>" for name, value in _setting_lines(run)) + "</dl>")  # fmt: skip
    parts += ["<h2>Summary</h2><p>Means over the videos; speedups are ratios of total times against the baseline.</p>",
              _html_table(_present(SUMMARY_COLUMNS, means), means),
              f"<div class='plots'><figure><img src='{esc(_relative(files['pareto'], out))}' alt='speed vs PSNR'>"
              "<figcaption>Speed against fidelity; the Pareto front joins the methods no other beats on both."
              "</figcaption></figure></div>"]  # fmt: skip
    parts.append("<h2>Methods</h2>")
    for spec in plan.rows():
        options = esc(json.dumps(spec.options, sort_keys=True))
        parts.append(f"<h3>{esc(spec.label)}</h3><p>Options: <code>{options}</code></p>")
        mask = files["masks"].get(spec.method)
        if mask:
            parts.append(f"<figure class='mask'><img src='{esc(_relative(mask, out))}' alt='{esc(spec.method)} mask'>"
                         "<figcaption>Kept key blocks per query block (head 0) at this eval's layout."
                         "</figcaption></figure>")  # fmt: skip
        elif files["masks"].get(f"{spec.method}:note"):
            parts.append(f"<p>No mask plot: {esc(files['masks'][spec.method + ':note'])}.</p>")
        rows = [r for r in results if row_label(r) == spec.label]
        parts.append(_html_table(_present(VIDEO_COLUMNS, rows), rows))
    parts.append("<h2>Side by side</h2><p>Each row: baseline | method | |method &minus; baseline| amplified by the "
                 "gain in its label (one per prompt, a power of two). Videos are for viewing (H.264); the metrics use "
                 "the lossless frames.</p>")
    for entry in files["side_by_side"]:
        still = esc(_relative(entry["still"], out))
        if entry["video"]:
            view = (f"<video src='{esc(_relative(entry['video'], out))}' poster='{still}' controls loop muted "
                    "playsinline></video>")
        else:
            view = f"<img src='{still}' alt='middle frame'>"
        parts.append(f"<figure class='sbs'><figcaption><b>{esc(entry['prompt'])}</b> (seed {entry['seed']})"
                     f"</figcaption>{view}</figure>")  # fmt: skip
    parts.append("<h2>What the columns mean</h2><ul>" + "".join(
        f"<li><b>{esc(name)}</b>: {esc(text)}</li>" for name, text in metric_notes(means)) + "</ul>")  # fmt: skip
    if run["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in run["notes"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---- everything --------------------------------------------------------------------------------------------------
def write_report(plan: EvalPlan, results: list[dict], means: list[dict], notes: list[str]) -> dict:
    """Write every output into `plan.output_dir`; returns their paths."""
    out = plan.output_dir
    run = describe_run(plan, notes)
    write_results(out, run, results, means)
    files = {
        "output_dir": out,
        "results_json": os.path.join(out, "results.json"),
        "results_csv": os.path.join(out, "results.csv"),
        "pareto": pareto_plot(means, os.path.join(out, "pareto.png"), f"{run['model']}, {run['device']}"),
        "masks": mask_plots(means, os.path.join(out, "masks")),
        "side_by_side": write_side_by_sides(plan, results, os.path.join(out, "side_by_side")),
    }
    files["report_md"] = write_atomic(os.path.join(out, "report.md"), render_markdown(run, means, results, plan, files))
    files["report_html"] = write_atomic(os.path.join(out, "report.html"), render_html(run, means, results, plan, files))
    return files
