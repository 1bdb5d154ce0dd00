"""Neighborhood-window benchmark of issue 6: `neighborhood` masks, tile-aligned (STA, whole tiles) and exact (NATTEN,
partial blocks masked inside), at windows giving densities near 0.1 / 0.25 / 0.5, through our public
`sparse_attention` (auto and triton) against cuDNN SDPA dense and FlexAttention (torch.compile'd) on the same mask.

    python benchmarks/windows.py --out benchmarks/results      # GPU: Wan2.1-1.3B 480p and HunyuanVideo 720p
    python benchmarks/windows.py --smoke --out /tmp/windows    # CPU: this script's logic on tiny shapes

Shapes (bf16, batch 1, from benchmarks/attention.py): Wan2.1-1.3B 480p 81f (12 heads, 21 x 30 x 52 = 32,760 tokens,
D 128), HunyuanVideo 720p 129f (24 heads, 33 x 45 x 80 = 118,800 + 256 text suffix, 120 of them real). Tiles
(1, 8, 16): one 128-token block. The windows (`WINDOWS`) were picked on a CPU from a grid of window shapes for the
block density (the kernel's work) nearest each target; `density` is that work, `token density` the fraction of
(query, key) pairs the window allows (smaller for exact windows: partial blocks are computed whole and masked).
FlexAttention gets the same kept blocks over the video tokens, already in the mask's tile order (the gather is not
timed), whole blocks as its full blocks; an exact mask's partial blocks carry a mask_mod with the same token boxes.
`vs Flex` > 1: ours is faster. On shapes without text, our output is also compared with Flex's (`max_abs_diff_vs_flex`).
Writes windows-<gpu>-<date>.json (rows) and .md (a table), after every shape.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attention as bench  # noqa: E402  (benchmarks/attention.py: shapes, imports, timing, baselines)

ROOT = bench.ROOT
TILE = (1, 8, 16)
TARGETS = (0.1, 0.25, 0.5)

#: shape -> variant -> [(target density, window, stride, dilation)], windows in tokens (frames, rows, columns)
WINDOWS = {
    "wan13": {
        "tile": [(0.1, (3, 24, 48), (1, 1, 1), (1, 1, 1)), (0.25, (7, 24, 48), (1, 1, 1), (1, 1, 1)),
                 (0.5, (11, 30, 48), (1, 1, 1), (1, 1, 1))],
        "exact": [(0.1, (3, 19, 31), (1, 1, 1), (1, 1, 1)), (0.25, (7, 19, 31), (1, 1, 1), (1, 1, 1)),
                  (0.5, (11, 21, 37), (1, 1, 1), (1, 1, 1))],
    },
    "hunyuan": {
        "tile": [(0.1, (11, 24, 48), (1, 1, 1), (1, 1, 1)), (0.25, (27, 24, 48), (1, 1, 1), (1, 1, 1)),
                 (0.5, (27, 32, 64), (1, 1, 1), (1, 1, 1))],
        "exact": [(0.1, (5, 27, 49), (1, 1, 1), (1, 1, 1)), (0.25, (13, 27, 49), (1, 1, 1), (1, 1, 1)),
                  (0.5, (27, 27, 49), (1, 1, 1), (1, 1, 1))],
    },
}
#: tiny shapes for `--smoke` (CPU, reference backend, FlexAttention eager): one without text (checked against Flex),
#: one with a padded text suffix; tiles (1, 4, 4)
SMOKE_SHAPES = {
    "smoke-video": ("smoke, video only", 2, 16, (3, 12, 16), 0, None, 0, "wan"),
    "smoke-text": ("smoke, text suffix", 2, 16, (2, 8, 12), 24, "suffix", 12, "hunyuan"),
}
SMOKE_TILE = (1, 4, 4)
SMOKE_WINDOWS = {
    "tile": [(0.25, (1, 8, 8), (1, 1, 1), (1, 1, 1)), (0.5, (3, 8, 12), (1, 1, 1), (1, 1, 1))],
    "exact": [(0.25, (1, 5, 7), (1, 1, 1), (1, 1, 1)), (0.5, (3, 7, 9), (1, 2, 1), (1, 1, 2))],
}


# ---- FlexAttention on an exact window ------------------------------------------------------------------------------


_flex_compiled = None


def flex_window(q, k, v, mask, compiled: bool = True):
    """FlexAttention over the video tokens (already in the mask's blocked order): the mask's whole blocks as full
    blocks, its partial blocks under a mask_mod with the same token boxes. The mask_mod agrees with the block lists
    everywhere (for whole-block masks it looks the block up), so eager Flex, which applies only the mask_mod, computes
    the same attention: the `--smoke` check. Returns a callable."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import flex_attention

    if mask.kv_block_counts.shape[:2] != (1, 1):
        raise ValueError("flex_window takes a mask shared over batch and heads (as neighborhood masks are)")
    device, q_block, kv_block = q.device, mask.q_block_size, mask.kv_block_size
    kept, partial = mask.to_block_dense().to(device), mask.to_block_partial().to(device)  # (1, 1, n_q, n_kv)

    def lists(blocks):
        counts = blocks.sum(-1, dtype=torch.int32)
        order = torch.sort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
        return counts.contiguous(), order.contiguous()

    partial_counts, partial_indices = lists(partial)
    full_counts, full_indices = lists(kept & ~partial)
    if mask.has_token_boxes:
        boxes = mask.token_boxes.to(device)
        padded = mask.n_q_blocks * q_block  # compiled Flex may evaluate the mask_mod past seq_len: allow nothing there

        def pad(x):
            return torch.nn.functional.pad(x, (0, 0, 0, padded - x.shape[0]))

        lo, hi, coords, steps = pad(boxes.query_lo), pad(boxes.query_hi), pad(boxes.key_coords), boxes.step

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = q_idx >= 0
            for axis, step in enumerate(steps):
                low, c = lo[q_idx, axis], coords[kv_idx, axis]
                axis_ok = (c >= low) & (c < hi[q_idx, axis])
                if step > 1:
                    axis_ok = axis_ok & ((c - low) % step == 0)
                allowed = allowed & axis_ok
            return allowed
    else:
        kept_blocks = kept[0, 0]

        def mask_mod(b, h, q_idx, kv_idx):
            return kept_blocks[q_idx // q_block, kv_idx // kv_block]

    flex_mask = FlexBlockMask.from_kv_blocks(
        partial_counts, partial_indices, full_counts, full_indices, BLOCK_SIZE=(q_block, kv_block),
        mask_mod=mask_mod, seq_lengths=(mask.seq_len, mask.seq_len),
    )
    if compiled and _flex_compiled is None:
        # One compiled Flex for every mask of the run: each new mask_mod (and shape) recompiles it, more than dynamo's
        # default limit of 8, past which it would run Flex eagerly (S x S scores: out of memory at HunyuanVideo).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    function = _flex_compiled if compiled else flex_attention
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: function(qt, kt, vt, block_mask=flex_mask)


# ---- one shape -----------------------------------------------------------------------------------------------------


def run_shape(name: str, args, rows: list, notes: list) -> None:
    from dit_sparse import kernels
    from dit_sparse.attention import sparse_attention
    from dit_sparse.layout import VideoLayout

    neighborhood = bench.load_pattern("neighborhood")
    label, heads, head_dim, (frames, height, width), text_len, text_position, valid_text, _ = \
        {**bench.SHAPES, **SMOKE_SHAPES}[name]
    layout = VideoLayout(frames, height, width, text_len, text_position)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v, padding = bench.random_inputs(layout, heads, head_dim, valid_text, device, dtype)
    video = layout.video_slice
    errors: list[str] = []
    ms_cudnn = None
    if device.type == "cuda":
        ms_cudnn = bench._try(lambda: bench.bench_ms(bench.cudnn_dense(q, k, v)), errors, f"{name} cudnn")
    print(f"[{name}] {label}: {layout.video_len} video tokens, cuDNN dense {ms_cudnn} ms", flush=True)

    tile, table = (SMOKE_TILE, SMOKE_WINDOWS) if args.smoke else (TILE, WINDOWS[name])
    for variant in args.variants:
        for target, window, stride, dilation in table[variant]:
            if target not in args.targets and not args.smoke:
                continue
            start = time.perf_counter()
            mask = bench._try(lambda: neighborhood(layout, window=window, stride=stride, dilation=dilation, tile=tile,
                                                   exact=variant == "exact"), errors, f"{name} {variant} {window}")
            if mask is None:
                continue
            build_s = time.perf_counter() - start
            mask = mask.to(device)
            density = mask.density  # the work: kept blocks at their true sizes
            token_density = _allowed_pairs(mask, layout, window, stride, dilation, variant) / layout.video_len**2
            kept_blocks = int(mask.kv_block_counts.sum())
            partial_blocks = int(mask.kv_block_partial.sum()) if mask.has_token_boxes else 0
            flops = 4 * heads * layout.video_len**2 * head_dim * density
            mask_name = f"{variant} {window[0]}x{window[1]}x{window[2]}" + (
                f" s{stride} d{dilation}" if (stride, dilation) != ((1, 1, 1), (1, 1, 1)) else "")
            common = dict(shape=name, label=label, heads=heads, head_dim=head_dim, seq_video=layout.video_len,
                          text_len=text_len, valid_text=valid_text if text_len else 0, variant=variant,
                          mask=mask_name, window=list(window), stride=list(stride), dilation=list(dilation),
                          tile=list(tile), target_density=target, density=round(density, 4),
                          token_density=round(token_density, 4),
                          partial_fraction=round(partial_blocks / max(kept_blocks, 1), 4),
                          mask_build_s=round(build_s, 3), ms_cudnn=ms_cudnn)

            # FlexAttention on the video tokens, pre-permuted into the mask's order (same kept blocks).
            perm = mask.permutation
            qv, kv, vv = ((x[:, video].index_select(1, perm) if perm is not None else x[:, video]).contiguous()
                          for x in (q, k, v))
            flex = None
            if args.flex:
                flex = bench._try(lambda: flex_window(qv, kv, vv, mask, compiled=not args.smoke), errors,
                                  f"{name} {mask_name} flex mask")
            ms_flex = bench._try(lambda: bench.bench_ms(flex), errors, f"{name} {mask_name} flex") if flex else None
            common["ms_flex"] = ms_flex

            for backend in args.backends:
                resolved = bench._try(lambda: kernels.resolve_backend(backend, q[:, video], mask), errors,
                                      f"{name} {mask_name} {backend}")
                if resolved is None:
                    continue

                def call(backend=backend):
                    return sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=backend)

                ms = bench._try(lambda: bench.bench_ms(call), errors, f"{name} {mask_name} {backend}")
                if ms is None:
                    continue
                row = dict(common, backend=backend, resolved_backend=resolved, ms=ms, tflops=flops / ms / 1e9,
                           speedup_vs_cudnn=(ms_cudnn / ms) if ms_cudnn else None,
                           per_density=(ms_cudnn / ms * density) if ms_cudnn else None,
                           vs_flex=(ms_flex / ms) if ms_flex else None)
                if flex is not None and text_len == 0:
                    # Same attention, two implementations: Flex's output (blocked order) put back in token order.
                    flex_out = flex().transpose(1, 2)
                    if perm is not None:
                        flex_out = flex_out.index_select(1, torch.argsort(perm))
                    row["max_abs_diff_vs_flex"] = float((call().float() - flex_out.float()).abs().max())
                rows.append(row)
                print(f"[{name}] {mask_name:28s} d={density:.3f} (tokens {token_density:.3f}, partial "
                      f"{common['partial_fraction']:.2f}) {backend:9s}({resolved}) {ms:9.3f} ms "
                      f"x{row['speedup_vs_cudnn'] or 0:.2f} vs cuDNN, Flex {ms_flex}", flush=True)
    notes.extend(errors)


def _allowed_pairs(mask, layout, window, stride, dilation, variant) -> int:
    """(query, key) pairs the window allows: every query sees the product of its clamped window sizes (NATTEN's full
    window) for exact masks; tile-aligned masks keep their blocks whole."""
    if variant == "tile":
        return round(mask.density * layout.video_len**2)
    effective_window = sys.modules[bench.load_pattern("neighborhood").__module__].effective_window
    return layout.video_len * math.prod(effective_window(layout, window, stride, dilation)[0])


# ---- report --------------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    fmt = bench._fmt
    lines = [
        f"# Neighborhood-window benchmark, {result['gpu']}, {result['date']}",
        "",
        f"`{result['command']}`; torch {result['torch']}, triton {result['triton']}, flash-attn-4 {result['fa4']}, "
        f"{result['dtype']}, batch 1, tiles {result['tile']}. Ratios are to cuDNN SDPA dense (whole sequence, text "
        "included, no padding mask) in the same run. `density`: kept blocks at their true sizes (the kernel's work); "
        "`tokens`: pairs the window allows; `partial`: share of kept blocks masked inside (exact windows); "
        "`per density` = speedup x density. Flex = FlexAttention compiled, same kept blocks (and token boxes as a "
        "mask_mod), video tokens only, pre-permuted; `vs Flex` > 1 means ours is faster.",
        "",
        "| shape | window | density | tokens | partial | backend | ms | TFLOP/s | vs cuDNN | per density | cuDNN ms "
        "| Flex ms | vs Flex | mask build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        backend = r["backend"] + (f" ({r['resolved_backend']})" if r["resolved_backend"] != r["backend"] else "")
        lines.append(
            f"| {r['shape']} | {r['mask']} | {fmt(r['density'], 3)} | {fmt(r['token_density'], 3)} | "
            f"{fmt(r['partial_fraction'])} | {backend} | {fmt(r['ms'])} | {fmt(r.get('tflops'), 0)} | "
            f"{fmt(r.get('speedup_vs_cudnn'))} | {fmt(r.get('per_density'))} | {fmt(r.get('ms_cudnn'))} | "
            f"{fmt(r.get('ms_flex'))} | {fmt(r.get('vs_flex'))} | {fmt(r.get('mask_build_s'))} |"
        )
    diffs = [r["max_abs_diff_vs_flex"] for r in result["rows"] if "max_abs_diff_vs_flex" in r]
    if diffs:
        lines += ["", f"Outputs against FlexAttention's (shapes without text): max abs difference {max(diffs):.2e}."]
    return "\n".join(lines + bench.report_tail(result)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(WINDOWS), choices=list(WINDOWS))
    parser.add_argument("--variants", nargs="+", default=["tile", "exact"], choices=["tile", "exact"])
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS), help="densities from WINDOWS")
    parser.add_argument("--backends", nargs="+", default=["auto", "triton"])
    parser.add_argument("--no-flex", dest="flex", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="CPU run of the script's logic on tiny shapes")
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; later shapes are skipped")
    args = parser.parse_args(argv)
    how = bench.ensure_importable()
    print(f"dit_sparse from: {how}", flush=True)
    if args.smoke:  # reference backend, FlexAttention eager (its compiled CPU path is slow to build)
        args.shapes, args.backends = list(SMOKE_SHAPES), ["reference"]
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (--smoke runs the script's logic on CPU)")
        return 1
    try:
        fa4_version = importlib.metadata.version("flash-attn-4")
    except Exception as error:
        fa4_version = f"unavailable ({type(error).__name__})"
    import triton

    from dit_sparse.kernels import triton_block_sparse

    rows, notes = [], []
    start = time.time()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"windows-{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}-{date}"
    command = "python benchmarks/windows.py " + " ".join(sys.argv[1:] if argv is None else argv)
    previous = out / f"{stem}.json"
    if previous.exists():  # a run of other shapes the same day (e.g. one shape per call): keep its rows
        earlier = json.loads(previous.read_text())
        rows = [row for row in earlier.get("rows", []) if row["shape"] not in args.shapes]
        notes = [note for note in earlier.get("notes", []) if not any(note.startswith(n) for n in args.shapes)]
        command = "; ".join([earlier.get("command", ""), command]) if rows else command
    result = dict(
        command=command,
        gpu=gpu, date=date, torch=torch.__version__, triton=triton.__version__, fa4=fa4_version,
        python=platform.python_version(), dtype="bf16" if gpu != "cpu" else "fp32",
        tile=list(SMOKE_TILE if args.smoke else TILE),
        capability=list(torch.cuda.get_device_capability()) if gpu != "cpu" else None,
        imported_from=how, rows=rows, notes=notes,
    )
    for name in args.shapes:
        if time.time() - start > args.time_budget:
            notes.append(f"{name}: skipped, the run passed its time budget of {args.time_budget} s")
            continue
        run_shape(name, args, rows, notes)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the shape's q, k, v and masks are gone with run_shape's frame
        result.update(seconds=round(time.time() - start, 1), triton_configs=triton_block_sparse.chosen_configs())
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
