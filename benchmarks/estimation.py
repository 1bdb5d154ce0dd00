"""Estimation benchmark of issue 5: what the dynamic methods (`draft`, `reorder` axes / cluster) cost to choose
their blocks, as a share of dense cuDNN attention, and their attention time with the estimate included vs dense.

    python -m benchmarks.estimation --out benchmarks/results              # the whole table (H200, a few minutes)
    python -m benchmarks.estimation --shapes wan13 --densities 0.25       # one shape, one density
    python -m benchmarks.estimation --smoke                               # CPU: the script's logic on tiny shapes
    python -m benchmarks.estimation --cpu --shapes wan13 --densities 0.25 --refresh 1   # CPU proxy: estimates only

Shapes (bf16, batch 1, random q, k, v): Wan2.1-1.3B 480p 81f (12 heads, 21 x 30 x 52 = 32,760 tokens, D 128) and
HunyuanVideo 720p 129f (24 heads, 33 x 45 x 80 = 118,800 + 256 text suffix, 120 valid). Per method:
- `estimate ms`: building the BlockMask from q, k (pooling, draft map, selection; k-means and centroid map for
  cluster: `cold` = random seeds, relocation passes and Lloyd steps (`reorder._cold_start`), the first refresh of a
  generation; `warm` = kmeans_iters steps from the previous centroids, every later refresh). `share` = estimate / cuDNN dense (target
  <= 5%). `amortized` divides it by `--refresh` (the mask reused in between). The cluster rows run the k-means
  engine `auto` picks (the fused Triton kernels on CUDA) unless DIT_SPARSE_KMEANS is set; the rows marked `torch
  k-means` force the PyTorch engine (the reference), so one run compares the two.
- `attention ms`: `sparse_attention` with that mask (per-head orders gathered and scattered in the dispatch);
  `total vs dense` = cuDNN dense / (estimate / refresh + attention).
- `syncs`: host syncs one estimate makes (CUDA: warnings of `torch.cuda.set_sync_debug_mode("warn")` around one
  call; target 0, a few on a cold start or a first call are the memoised constants' copies); `kernels`: CUDA kernels
  one estimate launches (torch.profiler), the overhead that dominates at these sizes.
- `--cpu`: the estimates alone at the real shapes on the CPU in fp32 (no dense, no attention): a rough proxy of the
  work, not GPU time. `--estimate-only` skips the attention timings on the GPU too.
Random q, k have no structure, so the chosen blocks are arbitrary; the costs are those of real inputs of the shape.
Writes estimation-<gpu>-<date>.json and .md. Imports `dit_sparse` as `benchmarks/attention.py` does (no diffusers).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

try:  # run as `python -m benchmarks.estimation` or as a file
    from benchmarks.attention import _fmt, _try, bench_ms, cudnn_dense, ensure_importable, random_inputs, report_tail
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.attention import _fmt, _try, bench_ms, cudnn_dense, ensure_importable, random_inputs, report_tail

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # name: (label, heads, head_dim, (frames, height, width), text_len, text_position, valid_text)
    "wan13": ("Wan2.1-1.3B 480p 81f", 12, 128, (21, 30, 52), 0, None, 0),
    "hunyuan": ("HunyuanVideo 720p 129f", 24, 128, (33, 45, 80), 256, "suffix", 120),
}
SMOKE_SHAPES = {"smoke": ("smoke, text suffix", 2, 16, (3, 8, 16), 24, "suffix", 12)}
DENSITIES = (0.1, 0.25, 0.5)


def _methods(heads: int, smoke: bool):
    """(name, method options) of each estimate; smoke shapes use blocks of 16."""
    from dit_sparse.patterns.reorder import AXIS_ORDERS

    block = 16 if smoke else 128
    tile = (1, 4, 4) if smoke else (1, 8, 16)
    mixed_axes = tuple(AXIS_ORDERS[h % len(AXIS_ORDERS)] for h in range(heads))  # per-head orders, as calibrated
    return [
        ("draft", dict(kind="draft", tile=tile)),
        ("reorder axes (per-head orders)", dict(kind="axes", axes=mixed_axes, block_size=block)),
        ("reorder cluster (cold)", dict(kind="cluster", block_size=block, warm=False)),
        ("reorder cluster (warm)", dict(kind="cluster", block_size=block, warm=True)),
        ("reorder cluster (cold, torch k-means)", dict(kind="cluster", block_size=block, warm=False, kmeans="torch")),
        ("reorder cluster (warm, torch k-means)", dict(kind="cluster", block_size=block, warm=True, kmeans="torch")),
    ]


def _estimator(layout, q, k, density: float, options: dict):
    """A no-argument function that builds the mask from q, k (B, H, S, D) video tokens, and the mask it builds."""
    from dit_sparse.patterns import draft, reorder_axes, reorder_cluster
    from dit_sparse.patterns.reorder import forced_kmeans_engine

    kind = options["kind"]
    if kind == "draft":
        def estimate():
            return draft(layout, q, k, density=density, tile=options["tile"])
    elif kind == "axes":
        def estimate():
            return reorder_axes(layout, q, k, axes=options["axes"], density=density, block_size=options["block_size"])
    else:
        engine = options.get("kmeans")
        state = None
        if options["warm"]:
            with forced_kmeans_engine(engine):
                state = reorder_cluster(layout, q, k, density=density, block_size=options["block_size"])[1]

        def estimate():
            with forced_kmeans_engine(engine):
                return reorder_cluster(layout, q, k, density=density, block_size=options["block_size"],
                                       state=state)[0]
    return estimate, estimate()


def count_syncs(fn) -> int | None:
    """Host syncs one call of `fn` makes: the warnings of torch.cuda's sync debug mode (CUDA only; None elsewhere)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def count_kernels(fn) -> int | None:
    """CUDA kernels one call of `fn` launches, from torch.profiler (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type.name == "CUDA")


def run_shape(name: str, args, rows: list, notes: list) -> None:
    from dit_sparse.attention import sparse_attention
    from dit_sparse.layout import VideoLayout

    label, heads, head_dim, (frames, height, width), text_len, text_position, valid_text = \
        {**SHAPES, **SMOKE_SHAPES}[name]
    layout = VideoLayout(frames, height, width, text_len, text_position)
    video_layout = VideoLayout(frames, height, width)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v, padding = random_inputs(layout, heads, head_dim, valid_text, device, dtype)
    video = layout.video_slice
    qh, kh = (x[:, video].transpose(1, 2) for x in (q, k))  # (B, H, S_video, D), as the hooks pass them
    errors: list[str] = []
    if device.type == "cuda":
        ms_dense = _try(lambda: bench_ms(cudnn_dense(q, k, v)), errors, f"{name} cudnn")
    elif args.cpu:  # the CPU proxy: estimates only
        ms_dense = None
    else:  # the smoke run: SDPA's default CPU kernel stands in for cuDNN
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        ms_dense = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
    print(f"[{name}] dense {ms_dense} ms", flush=True)
    for method, options in _methods(heads, name in SMOKE_SHAPES):
        for density in args.densities:
            built = _try(lambda: _estimator(video_layout, qh, kh, density, options), errors, f"{name} {method}")
            if built is None:
                continue
            estimate, mask = built
            ms_estimate = _try(lambda: bench_ms(estimate), errors, f"{name} {method} estimate")
            syncs = _try(lambda: count_syncs(estimate), errors, f"{name} {method} syncs")
            kernels = _try(lambda: count_kernels(estimate), errors, f"{name} {method} kernels")

            def attend(mask=mask):
                return sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=args.backend)

            ms_attention = None
            if not (args.estimate_only or args.cpu):
                ms_attention = _try(lambda: bench_ms(attend), errors, f"{name} {method} attention")
            if ms_estimate is None:
                continue
            for refresh in args.refresh:
                total = None if ms_attention is None else ms_estimate / refresh + ms_attention
                row = dict(shape=name, label=label, heads=heads, seq_video=layout.video_len, text_len=text_len,
                           method=method, target_density=density, density=round(mask.density, 4),
                           per_head_order=mask.per_head_order, refresh=refresh, ms_dense=ms_dense,
                           ms_estimate=ms_estimate, ms_attention=ms_attention, ms_total=total, syncs=syncs,
                           kernels=kernels,
                           estimate_share=(ms_estimate / ms_dense) if ms_dense else None,
                           amortized_share=(ms_estimate / refresh / ms_dense) if ms_dense else None,
                           total_speedup=(ms_dense / total) if ms_dense and total else None,
                           attention_speedup=(ms_dense / ms_attention) if ms_dense and ms_attention else None)
                rows.append(row)
            share = f"{ms_estimate / ms_dense:.1%} of dense" if ms_dense else "no dense"
            print(f"[{name}] {method:32s} d={density:.2f} estimate {ms_estimate:8.3f} ms ({share}), syncs {syncs}, "
                  f"kernels {kernels}, attention {_fmt(ms_attention, 3)} ms", flush=True)
    notes.extend(errors)
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(result: dict) -> str:
    lines = [
        f"# Dynamic-mask estimation benchmark, {result['gpu']}, {result['date']}",
        "",
        f"`{result['command']}`; torch {result['torch']}, triton {result['triton']}, backend `{result['backend']}`, "
        f"{result['dtype']}, batch 1, random q, k, v. `share` = estimate / dense attention (cuDNN SDPA over the "
        "whole sequence; target <= 5%); `amortized` = share / refresh; `total vs dense` = dense / (estimate / "
        "refresh + sparse attention).",
        "",
        "| shape | method | density | refresh | estimate ms | share | amortized | syncs | kernels | attention ms | "
        "attention vs dense | total ms | total vs dense | dense ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['density']:.3f} | {r['refresh']} | {_fmt(r['ms_estimate'], 3)} | "
            f"{_fmt(100 * r['estimate_share'] if r['estimate_share'] is not None else None, 1)}% | "
            f"{_fmt(100 * r['amortized_share'] if r['amortized_share'] is not None else None, 1)}% | "
            f"{'-' if r.get('syncs') is None else r['syncs']} | {'-' if r.get('kernels') is None else r['kernels']} | "
            f"{_fmt(r['ms_attention'], 3)} | {_fmt(r['attention_speedup'])} | {_fmt(r['ms_total'], 3)} | "
            f"{_fmt(r['total_speedup'])} | {_fmt(r['ms_dense'], 3)} |"
        )
    return "\n".join(lines + report_tail(result)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES) + list(SMOKE_SHAPES))
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--refresh", nargs="+", type=int, default=[1, 5], help="refresh periods to amortize over")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="CPU run of the script's logic on a tiny shape")
    parser.add_argument("--cpu", action="store_true", help="CPU proxy: the estimates alone at real shapes, fp32")
    parser.add_argument("--estimate-only", action="store_true", help="skip the sparse attention timings")
    args = parser.parse_args(argv)
    how = ensure_importable()
    print(f"dit_sparse from: {how}", flush=True)
    if args.smoke:
        args.shapes, args.backend = list(SMOKE_SHAPES), "reference"
    elif not torch.cuda.is_available() and not args.cpu:
        print("no CUDA GPU: nothing to benchmark (--smoke runs the script's logic on CPU, --cpu the estimates)")
        return 1
    try:
        triton_version = importlib.import_module("triton").__version__
    except Exception as error:  # the CPU smoke run may have no triton
        triton_version = f"unavailable ({type(error).__name__})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu"
    date = datetime.date.today().isoformat()
    rows, notes = [], []
    result = dict(
        command="python -m benchmarks.estimation " + " ".join(sys.argv[1:] if argv is None else argv),
        gpu=gpu, date=date, torch=torch.__version__, triton=triton_version, python=platform.python_version(),
        dtype="bf16" if gpu != "cpu" else "fp32", backend=args.backend,
        capability=list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
        imported_from=how, rows=rows, notes=notes,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"estimation-{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}-{date}"
    start = time.time()
    for name in args.shapes:
        run_shape(name, args, rows, notes)
        result["seconds"] = round(time.time() - start, 1)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))  # after every shape: a cut run keeps rows
        (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
