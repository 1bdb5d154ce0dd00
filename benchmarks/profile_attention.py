"""Profiles behind the targets `benchmarks/attention.py` missed (issue 12), in one GPU run:

1. Interleaved A/B of our public `sparse_attention` (backend auto) against FlashAttention-4 called by hand on the
   same mask, Wan2.1-1.3B 480p masks (no text): the two are timed in alternating rounds, so clock or power drift
   hits both alike, and the per-round ratio says what the API itself costs.
2. Our Triton kernel dense (a full block mask) against cuDNN SDPA and FA4 dense at the same shape.
3. A torch.profiler breakdown (GPU time per kernel, and wall time per call) of the calls that missed: CogVideoX-5B
   with its 226 text tokens at densities 0.1 and 0.25 (auto), and Wan 1.3B at density 0.1 on our Triton kernel
   against FlexAttention.

    python benchmarks/profile_attention.py --out benchmarks/results

Writes attention-profile-<gpu>-<date>.json and a markdown summary beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention as bench  # noqa: E402  (benchmarks/attention.py: shapes, baselines, timing)


def _inputs(name: str, density: float | None):
    from dit_sparse.layout import VideoLayout

    _, heads, head_dim, (frames, height, width), text_len, position, valid_text, variant = bench.SHAPES[name]
    layout = VideoLayout(frames, height, width, text_len, position)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=generator) for _ in range(3))
    if density is None:
        mask = bench.load_pattern("radial")(layout, block_size=128, variant=variant)
    else:
        mask = bench.load_pattern("random_blocks")(layout, density=density, block_size=128)
    padding = None
    if text_len and valid_text < text_len:
        padding = torch.zeros(1, text_len, dtype=torch.bool, device="cuda")
        padding[:, :valid_text] = True
    return layout, q, k, v, mask.to("cuda"), padding


def _api(q, k, v, mask, layout, padding, backend="auto"):
    from dit_sparse.attention import sparse_attention

    return lambda: sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=backend)


def interleaved_ab(rounds: int) -> list[dict]:
    import triton.testing

    rows = []
    for label, density in (("random 0.1", 0.1), ("random 0.25", 0.25), ("random 0.5", 0.5), ("radial", None)):
        layout, q, k, v, mask, padding = _inputs("wan13", density)
        api = _api(q, k, v, mask, layout, padding)
        direct = bench.fa4_direct(q, k, v, mask)
        api(), direct()
        api_ms, direct_ms, ratios = [], [], []
        for i in range(rounds):
            order = (api, direct) if i % 2 == 0 else (direct, api)
            times = {fn: triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median") for fn in order}
            api_ms.append(times[api])
            direct_ms.append(times[direct])
            ratios.append(times[api] / times[direct])
        row = dict(shape="wan13", mask=label, density=round(mask.density, 4), rounds=rounds,
                   api_ms=statistics.median(api_ms), fa4_direct_ms=statistics.median(direct_ms),
                   ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        rows.append(row)
        print(f"[A/B] {label}: api {row['api_ms']:.3f} ms, fa4 direct {row['fa4_direct_ms']:.3f} ms, ratio median "
              f"{row['ratio_median']:.4f} (min {row['ratio_min']:.4f}, max {row['ratio_max']:.4f})", flush=True)
    return rows


def triton_dense() -> dict:
    from dit_sparse.blockmask import BlockMask

    layout, q, k, v, _, _ = _inputs("wan13", 0.5)
    full = BlockMask.full(layout.video_len, 128, device="cuda")
    row = dict(shape="wan13", mask="full", density=1.0,
               triton_ms=bench.bench_ms(_api(q, k, v, full, layout, None, backend="triton")),
               cudnn_ms=bench.bench_ms(bench.cudnn_dense(q, k, v)),
               fa4_dense_ms=bench.bench_ms(bench.fa4_dense(q, k, v)))
    row["triton_vs_cudnn"] = row["cudnn_ms"] / row["triton_ms"]
    print(f"[dense] triton {row['triton_ms']:.3f} ms, cudnn {row['cudnn_ms']:.3f} ms, fa4 {row['fa4_dense_ms']:.3f} "
          f"ms: triton runs at {row['triton_vs_cudnn']:.3f} of cuDNN", flush=True)
    return row


def kernel_breakdown(label: str, fn, calls: int = 10) -> dict:
    """GPU time per kernel name and wall time per call, averaged over `calls` calls after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        gpu_us = getattr(event, "self_device_time_total", 0) or 0
        if gpu_us > 0:
            kernels.append(dict(kernel=event.key[:120], ms_per_call=gpu_us / calls / 1e3, launches_per_call=event.count / calls))
    kernels.sort(key=lambda r: -r["ms_per_call"])
    gpu_total = sum(r["ms_per_call"] for r in kernels)
    wall = start.elapsed_time(end) / calls
    print(f"[profile] {label}: wall {wall:.3f} ms/call, GPU kernels {gpu_total:.3f} ms/call", flush=True)
    for r in kernels[:8]:
        print(f"    {r['ms_per_call']:8.3f} ms  x{r['launches_per_call']:.0f}  {r['kernel']}", flush=True)
    return dict(label=label, wall_ms_per_call=wall, gpu_kernel_ms_per_call=gpu_total, kernels=kernels[:15])


def breakdowns() -> list[dict]:
    out = []
    for density in (0.1, 0.25):
        layout, q, k, v, mask, padding = _inputs("cogvideox", density)
        out.append(kernel_breakdown(f"cogvideox random {density}, sparse_attention auto (text included)",
                                    _api(q, k, v, mask, layout, padding)))
        video = layout.video_slice
        out.append(kernel_breakdown(f"cogvideox random {density}, FA4 direct on the video tokens",
                                    bench.fa4_direct(q[:, video], k[:, video], v[:, video], mask)))
        out.append(kernel_breakdown(f"cogvideox dense, cuDNN SDPA", bench.cudnn_dense(q, k, v)))
    layout, q, k, v, mask, padding = _inputs("wan13", 0.1)
    out.append(kernel_breakdown("wan13 random 0.1, sparse_attention triton", _api(q, k, v, mask, layout, None, "triton")))
    out.append(kernel_breakdown("wan13 random 0.1, FlexAttention compiled", bench.flex_sparse(q, k, v, mask)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(bench.ROOT / "benchmarks" / "results"))
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    how = bench.ensure_importable()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return 1
    import importlib.metadata

    import triton

    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    result = dict(command="python benchmarks/profile_attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  gpu=gpu, date=date, torch=torch.__version__, triton=triton.__version__,
                  fa4=importlib.metadata.version("flash-attn-4"), imported_from=how)
    result["interleaved_ab"] = interleaved_ab(args.rounds)
    result["triton_dense"] = triton_dense()
    result["breakdowns"] = breakdowns()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"attention-profile-{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}-{date}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Attention profiles, {gpu}, {date}", "", f"`{result['command']}`; torch {result['torch']}, "
             f"triton {result['triton']}, flash-attn-4 {result['fa4']}, bf16, batch 1.", "",
             "## Our API (auto = FA4) against FA4 called directly, interleaved rounds, Wan2.1-1.3B 480p", "",
             "| mask | density | API ms | FA4 direct ms | ratio median | min | max |", "|---|---|---|---|---|---|---|"]
    for r in result["interleaved_ab"]:
        lines.append(f"| {r['mask']} | {r['density']:.3f} | {r['api_ms']:.3f} | {r['fa4_direct_ms']:.3f} | "
                     f"{r['ratio_median']:.4f} | {r['ratio_min']:.4f} | {r['ratio_max']:.4f} |")
    d = result["triton_dense"]
    lines += ["", "## Our Triton kernel dense (full mask), Wan2.1-1.3B 480p", "",
              f"Triton {d['triton_ms']:.3f} ms, cuDNN {d['cudnn_ms']:.3f} ms, FA4 dense {d['fa4_dense_ms']:.3f} ms: "
              f"Triton runs at {d['triton_vs_cudnn']:.3f} of cuDNN's speed.", "", "## Kernel breakdowns", ""]
    for b in result["breakdowns"]:
        lines += [f"### {b['label']}", "", f"wall {b['wall_ms_per_call']:.3f} ms per call, GPU kernels "
                  f"{b['gpu_kernel_ms_per_call']:.3f} ms per call", "", "| ms per call | launches | kernel |",
                  "|---|---|---|"]
        lines += [f"| {r['ms_per_call']:.3f} | {r['launches_per_call']:.0f} | `{r['kernel']}` |" for r in b["kernels"][:8]]
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
