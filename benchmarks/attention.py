"""Attention benchmark of issue 12: our public `sparse_attention` per backend against cuDNN SDPA dense, FA4 dense,
FA4 called directly on the same block mask, and FlexAttention (torch.compile'd) on the same block mask.

    python benchmarks/attention.py --out benchmarks/results            # the whole table (GPU, about 5 minutes)
    python benchmarks/attention.py --shapes wan13 --densities 0.25     # one row
    python benchmarks/attention.py --shapes wan13 hunyuan --densities 0.25 --no-flex --costs   # + compensation
    python benchmarks/attention.py --precision --quick --out benchmarks/results   # issue 30: bf16/fp8/int8 + accuracy

Shapes (bf16, batch 1): Wan2.1-1.3B 480p 81f (12 heads, 32,760 tokens, D 128), Wan2.1-14B 720p 81f (40 heads,
75,600), HunyuanVideo 720p 129f (24 heads, 118,800 + 256 text suffix with padding), CogVideoX-5B 720x480 49f
(48 heads, 17,550 + 226 text prefix, D 64). Masks: `random_blocks` at each density and the radial mask, 128x128 blocks.
Effective TFLOP/s = 4 * H * S_video^2 * D * density / time (dense columns: the whole sequence, density 1). Writes
attention-<gpu>-<date>.json (rows with shape, density, backend, ms, ms_cudnn, ms_flex, ...) and a markdown table.
Runs without installing the package and without diffusers (`ensure_importable`).

`--costs` adds, per shape, backend and mask (random at the first density, and radial), the cost of compensation
(`compensate=True`: the pooled pass), of the recall guard (`min_recall=0.9`: the pooled map, the added blocks and
the new mask's per-call preparation, then the call) and of both, each as a share of the same call without them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # name: (label, heads, head_dim, (frames, height, width), text_len, text_position, valid_text, radial variant)
    "wan13": ("Wan2.1-1.3B 480p 81f", 12, 128, (21, 30, 52), 0, None, 0, "wan"),
    "wan14": ("Wan2.1-14B 720p 81f", 40, 128, (21, 45, 80), 0, None, 0, "wan"),
    "hunyuan": ("HunyuanVideo 720p 129f", 24, 128, (33, 45, 80), 256, "suffix", 120, "hunyuan"),
    "cogvideox": ("CogVideoX-5B 720x480 49f", 48, 64, (13, 30, 45), 226, "prefix", 226, "wan"),
}
#: tiny shapes for a CPU smoke run of this script's own logic (`--smoke`, reference backend)
SMOKE_SHAPES = {
    "smoke-suffix": ("smoke, text suffix", 2, 16, (2, 8, 16), 40, "suffix", 20, "hunyuan"),
    "smoke-prefix": ("smoke, text prefix", 2, 16, (2, 8, 16), 40, "prefix", 40, "wan"),
}
DENSITIES = (0.1, 0.25, 0.5)


# ---- imports that work without installing the package or diffusers ---------------------------------------------


def _load(name: str, path: Path, package_dir: Path | None = None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ensure_importable() -> str:
    """Make `dit_sparse.kernels`, `dit_sparse.attention` importable: the installed package when it imports, else
    the source tree mapped by hand (no diffusers needed: dit_sparse/__init__ is skipped). Returns how."""
    try:
        import dit_sparse.attention  # noqa: F401
        import dit_sparse.kernels  # noqa: F401

        return "package"
    except Exception as error:  # diffusers missing on the GPU machine, or a teammate's module mid-edit
        reason = f"{type(error).__name__}: {error}"
    for name in [m for m in sys.modules if m == "dit_sparse" or m.startswith("dit_sparse.")]:
        del sys.modules[name]
    package = types.ModuleType("dit_sparse")
    package.__path__ = [str(ROOT / "dit_sparse")]
    sys.modules["dit_sparse"] = package
    package.kernels = _load("dit_sparse.kernels", ROOT / "kernels" / "__init__.py", ROOT / "kernels")
    patterns = types.ModuleType("dit_sparse.patterns")
    patterns.__path__ = [str(ROOT / "dit_sparse" / "patterns")]
    sys.modules["dit_sparse.patterns"] = patterns
    package.patterns = patterns
    return f"source tree ({reason})"


def load_pattern(name: str):
    """`dit_sparse.patterns.<name>.<name>` or None when the module is not there (yet)."""
    try:
        module = importlib.import_module(f"dit_sparse.patterns.{name}")
        return getattr(module, name)
    except Exception:
        path = ROOT / "dit_sparse" / "patterns" / f"{name}.py"
        if not path.exists():
            return None
        try:
            return getattr(_load(f"dit_sparse.patterns.{name}", path), name)
        except Exception:
            return None


# ---- timing ------------------------------------------------------------------------------------------------------


def bench_ms(fn) -> float:
    """Median ms: triton's do_bench for short calls, 3 timed calls after a warm-up for long ones."""
    import triton.testing

    if not torch.cuda.is_available():  # the CPU smoke run (`--smoke`): one timed call
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    if once < 30:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    times = []
    for _ in range(3):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def _try(fn, errors: list, what: str):
    try:
        return fn()
    except Exception as error:  # a column that cannot run here is reported, not fatal
        errors.append(f"{what}: {type(error).__name__}: {str(error)[:300]}")
        traceback.print_exc(limit=3)
        return None


# ---- baselines ---------------------------------------------------------------------------------------------------


def cudnn_dense(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

    return run


def fa4_dense(q, k, v):
    from flash_attn.cute import flash_attn_func

    return lambda: flash_attn_func(q, k, v)


def fa4_direct(q, k, v, mask):
    """FA4 on the video tokens with the mask's block lists prepared once: what calling FA4 by hand costs."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    from dit_sparse.kernels import fa4

    t = fa4.to_fa4_block_sparse(mask)
    sparse = BlockSparseTensorsTorch(*fa4._per_batch_and_head(mask, t, q.shape[0], q.shape[2]),
                                     block_size=t.block_size)
    return lambda: flash_attn_func(q, k, v, block_sparse_tensors=sparse, return_lse=True)


_flex_compiled = None


def flex_sparse(q, k, v, mask):
    """FlexAttention, torch.compile'd, over the video tokens with the same kept blocks as full blocks."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    bm, hm, n_q, max_kept = mask.kv_block_indices.shape
    n_kv = mask.n_kv_blocks
    full_indices = torch.zeros(bm, hm, n_q, n_kv, dtype=torch.int32, device=q.device)
    full_indices[..., :max_kept] = mask.kv_block_indices
    flex_mask = FlexBlockMask.from_kv_blocks(
        torch.zeros(bm, hm, n_q, dtype=torch.int32, device=q.device),
        torch.zeros(bm, hm, n_q, n_kv, dtype=torch.int32, device=q.device),
        mask.kv_block_counts.to(q.device),
        full_indices,
        BLOCK_SIZE=(mask.q_block_size, mask.kv_block_size),
        seq_lengths=(mask.seq_len, mask.seq_len),
    )
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return lambda: _flex_compiled(qt, kt, vt, block_mask=flex_mask)


def fa4_text_as_blocks(q, k, v, mask, layout):
    """Text as extra kept blocks (suffix text only): one FA4 call over the joint sequence, every query block keeping
    its video blocks plus the text blocks, text query blocks keeping all. Timing only: padding is not expressible."""
    from dit_sparse.blockmask import BlockMask

    block = mask.q_block_size
    n = math.ceil(layout.seq_len / block)
    first_text_block = layout.video_len // block
    video_blocks = mask.to_block_dense()[0, 0]  # (n_video, n_video)
    joint = torch.zeros(n, n, dtype=torch.bool, device=q.device)
    joint[: video_blocks.shape[0], : video_blocks.shape[1]] = video_blocks
    joint[:, first_text_block:] = True
    joint[first_text_block:, :] = True
    joint_mask = BlockMask.from_block_dense(joint, layout.seq_len, block)
    return fa4_direct(q, k, v, joint_mask)


# ---- one shape ---------------------------------------------------------------------------------------------------


def random_inputs(layout, heads: int, head_dim: int, valid_text: int, device, dtype=torch.bfloat16):
    """q, k, v `(1, S, H, D)` of `layout` (seed 0) and the text padding mask `(1, text_len)` bool, True for the first
    `valid_text` text tokens; None when every text token is valid (CogVideoX attends to all of its 226)."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, heads, head_dim, device=device, dtype=dtype, generator=generator)
               for _ in range(3))
    padding = None
    if layout.text_len and valid_text < layout.text_len:
        padding = torch.zeros(1, layout.text_len, dtype=torch.bool, device=device)
        padding[:, :valid_text] = True
    return q, k, v, padding


def run_shape(name: str, densities, backends, args, rows: list, notes: list):
    from dit_sparse import kernels
    from dit_sparse.attention import sparse_attention
    from dit_sparse.layout import VideoLayout

    label, heads, head_dim, (frames, height, width), text_len, text_position, valid_text, variant = \
        {**SHAPES, **SMOKE_SHAPES}[name]
    layout = VideoLayout(frames, height, width, text_len, text_position)
    seq, video_len = layout.seq_len, layout.video_len
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v, padding = random_inputs(layout, heads, head_dim, valid_text, device)
    video = layout.video_slice
    qv, kv, vv = q[:, video], k[:, video], v[:, video]
    errors: list[str] = []
    dense_flops = 4 * heads * seq * seq * head_dim

    ms_cudnn = _try(lambda: bench_ms(cudnn_dense(q, k, v)), errors, f"{name} cudnn")
    ms_fa4_dense = _try(lambda: bench_ms(fa4_dense(q, k, v)), errors, f"{name} fa4 dense") if args.fa4 else None
    print(f"[{name}] cudnn dense {ms_cudnn} ms, fa4 dense {ms_fa4_dense} ms", flush=True)

    masks = []
    random_blocks = load_pattern("random_blocks")
    for density in densities:
        masks.append((f"random {density}", density, random_blocks(layout, density=density, block_size=128)))
    if args.radial:
        radial = load_pattern("radial")
        if radial is None:
            notes.append(f"{name}: radial mask skipped: dit_sparse.patterns.radial is not importable")
        else:
            m = _try(lambda: radial(layout, block_size=128, decay_factor=1.0, variant=variant), errors,
                     f"{name} radial mask")
            if m is not None:
                masks.append(("radial", None, m))

    for mask_name, target, mask in masks:
        mask = mask.to(device)
        density = mask.density
        flops = 4 * heads * video_len * video_len * head_dim * density
        row_common = dict(shape=name, label=label, heads=heads, head_dim=head_dim, seq_video=video_len,
                          text_len=text_len, valid_text=valid_text if text_len else 0, mask=mask_name,
                          density=round(density, 4), target_density=target, ms_cudnn=ms_cudnn,
                          ms_fa4_dense=ms_fa4_dense)
        ms_flex = _try(lambda: bench_ms(flex_sparse(qv, kv, vv, mask)), errors, f"{name} {mask_name} flex") \
            if args.flex else None
        ms_direct = _try(lambda: bench_ms(fa4_direct(qv, kv, vv, mask)), errors, f"{name} {mask_name} fa4 direct") \
            if args.fa4 else None
        row_common.update(ms_flex=ms_flex, ms_fa4_direct=ms_direct)
        for backend in backends:
            resolved = _try(lambda: kernels.resolve_backend(backend, qv, mask), errors, f"{name} {backend}")
            if resolved is None:
                continue

            def call(backend=backend):
                return sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=backend)

            ms = _try(lambda: bench_ms(call), errors, f"{name} {mask_name} {backend}")
            if ms is None:
                continue
            row = dict(row_common, backend=backend, resolved_backend=resolved, ms=ms,
                       tflops=flops / ms / 1e9,
                       speedup_vs_cudnn=(ms_cudnn / ms) if ms_cudnn else None,
                       per_density=(ms_cudnn / ms * density) if ms_cudnn else None,
                       vs_flex=(ms_flex / ms) if ms_flex else None,
                       vs_fa4_direct=(ms / ms_direct) if ms_direct else None)
            rows.append(row)
            print(f"[{name}] {mask_name:12s} d={density:.3f} {backend:8s}({resolved}) {ms:8.3f} ms "
                  f"x{row['speedup_vs_cudnn'] or 0:.2f} vs cudnn, flex {ms_flex}, fa4 direct {ms_direct}", flush=True)

    # Extras on the first random mask: the cost of a token permutation, and text as extra kept blocks.
    mask = masks[1][2].to(device) if len(masks) > 1 else masks[0][2].to(device)
    perm = layout.tile_permutation((1, 8, 16), device=device)
    from dit_sparse.blockmask import BlockMask

    permuted = BlockMask(mask.kv_block_indices, mask.kv_block_counts, mask.seq_len, mask.q_block_size,
                         mask.kv_block_size, perm)
    for backend in backends:
        def call(backend=backend):
            return sparse_attention(q, k, v, permuted, layout, text_padding_mask=padding, backend=backend)

        ms = _try(lambda: bench_ms(call), errors, f"{name} permuted {backend}")
        if ms is not None:
            rows.append(dict(shape=name, label=label, mask="random+tile permutation (1,8,16)",
                             density=round(mask.density, 4), backend=backend, ms=ms, ms_cudnn=ms_cudnn,
                             tflops=4 * heads * video_len**2 * head_dim * mask.density / ms / 1e9,
                             speedup_vs_cudnn=(ms_cudnn / ms) if ms_cudnn else None, heads=heads,
                             head_dim=head_dim, seq_video=video_len, text_len=text_len))
            print(f"[{name}] permuted {backend} {ms:.3f} ms", flush=True)
    if args.fa4 and text_position == "suffix":
        ms = _try(lambda: bench_ms(fa4_text_as_blocks(q, k, v, mask, layout)), errors, f"{name} text as blocks")
        if ms is not None:
            rows.append(dict(shape=name, label=label, mask="random, text as extra kept blocks (FA4, no padding)",
                             density=round(mask.density, 4), backend="fa4-joint-blocks", ms=ms, ms_cudnn=ms_cudnn,
                             heads=heads, head_dim=head_dim, seq_video=video_len, text_len=text_len))
            print(f"[{name}] text as extra kept blocks (fa4 joint) {ms:.3f} ms", flush=True)
    if args.costs:
        cost_masks = [entry for entry in masks if entry[0] == "radial"] + [entry for entry in masks if entry[1]][:1]
        run_costs(name, label, cost_masks, backends, q, k, v, padding, layout, rows, errors)
    notes.extend(errors)
    del q, k, v
    torch.cuda.empty_cache()


#: the recall guard's target in the cost rows
COST_MIN_RECALL = 0.9


def run_costs(name, label, masks, backends, q, k, v, padding, layout, rows: list, errors: list):
    """Rows for the cost of compensation and of the recall guard: the same `sparse_attention` call with and without
    them, per backend and mask; `cost_share` = (ms - plain ms) / plain ms."""
    from dit_sparse import kernels
    from dit_sparse.attention import sparse_attention
    from dit_sparse.patterns.recall import guard_recall

    video = layout.video_slice
    qh, kh = q[:, video].transpose(1, 2), k[:, video].transpose(1, 2)  # (B, H, S, D) as the hooks give the guard
    for mask_name, _, mask in masks:
        mask = mask.to(q.device)
        for backend in backends:
            resolved = _try(lambda: kernels.resolve_backend(backend, q[:, video], mask), errors, f"{name} {backend}")
            if resolved is None:
                continue

            def call(compensate=False, guard=False, backend=backend, mask=mask):
                used = guard_recall(mask, qh, kh, COST_MIN_RECALL)[0] if guard else mask
                return sparse_attention(q, k, v, used, layout, text_padding_mask=padding, backend=backend,
                                        compensate=compensate)

            variants = {"plain": {}, "compensate": dict(compensate=True), f"guard {COST_MIN_RECALL}": dict(guard=True),
                        f"compensate + guard {COST_MIN_RECALL}": dict(compensate=True, guard=True)}
            timings = {}
            for variant, options in variants.items():
                timings[variant] = _try(lambda: bench_ms(lambda: call(**options)), errors,
                                        f"{name} {mask_name} {backend} {variant}")
            guarded = _try(lambda: guard_recall(mask, qh, kh, COST_MIN_RECALL)[0].density, errors, f"{name} guard")
            plain = timings["plain"]
            for variant, ms in timings.items():
                if ms is None:
                    continue
                share = (ms - plain) / plain if plain else None
                rows.append(dict(shape=name, label=label, mask=mask_name, variant=variant, cost_row=True,
                                 density=round(mask.density, 4),
                                 guarded_density=round(guarded, 4) if guarded is not None and "guard" in variant
                                 else None,
                                 backend=backend, resolved_backend=resolved, ms=ms, ms_plain=plain, cost_share=share))
                print(f"[{name}] cost {mask_name:10s} {backend:8s}({resolved}) {variant:24s} {ms:8.3f} ms "
                      f"({'-' if share is None else f'{share:+.1%}'} of the plain call)", flush=True)


# ---- report ------------------------------------------------------------------------------------------------------


def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [
        f"# Attention benchmark, {result['gpu']}, {result['date']}",
        "",
        f"`{result['command']}`; torch {result['torch']}, triton {result['triton']}, flash-attn-4 {result['fa4']}, "
        f"bf16, batch 1. Ratios are to cuDNN SDPA dense (whole sequence, text included, no padding mask) in the "
        "same run; `per density` = speedup x density (1.0 = perfectly proportional). `vs FA4 direct` = our time "
        "through `sparse_attention` (text, padding, permutation included) over FA4 called by hand on the video "
        "tokens only. Flex = FlexAttention compiled, same kept blocks, video tokens only.",
        "",
        "| shape | mask | density | backend | ms | TFLOP/s | vs cuDNN | per density | cuDNN ms | FA4 dense ms "
        "| FA4 direct ms | vs FA4 direct | Flex ms | vs Flex |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("cost_row"):
            continue
        backend = r["backend"] + (f" ({r['resolved_backend']})" if r.get("resolved_backend") not in (None, r["backend"])
                                  else "")
        lines.append(
            f"| {r['shape']} | {r['mask']} | {_fmt(r.get('density'), 3)} | {backend} | {_fmt(r['ms'])} | "
            f"{_fmt(r.get('tflops'), 0)} | {_fmt(r.get('speedup_vs_cudnn'))} | {_fmt(r.get('per_density'))} | "
            f"{_fmt(r.get('ms_cudnn'))} | {_fmt(r.get('ms_fa4_dense'))} | {_fmt(r.get('ms_fa4_direct'))} | "
            f"{_fmt(r.get('vs_fa4_direct'), 3)} | {_fmt(r.get('ms_flex'))} | {_fmt(r.get('vs_flex'))} |"
        )
    return "\n".join(lines + cost_table(result) + report_tail(result)) + "\n"


def cost_table(result: dict) -> list[str]:
    """The `--costs` rows: compensation and the recall guard as a share of the same call without them."""
    costs = [r for r in result["rows"] if r.get("cost_row")]
    if not costs:
        return []
    lines = ["", "Cost of compensation (`compensate=True`) and of the recall guard (`min_recall`), the same "
             "`sparse_attention` call with and without them (the guard's time includes its pooled map, the added "
             "blocks and the new mask's per-call preparation by the backend):", "",
             "| shape | mask | density | guarded density | backend | variant | ms | plain ms | cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in costs:
        backend = r["backend"] + (f" ({r['resolved_backend']})" if r.get("resolved_backend") not in (None, r["backend"])
                                  else "")
        share = "-" if r.get("cost_share") is None else f"{r['cost_share']:+.1%}"
        lines.append(f"| {r['shape']} | {r['mask']} | {_fmt(r.get('density'), 3)} | "
                     f"{_fmt(r.get('guarded_density'), 3)} | {backend} | {r['variant']} | {_fmt(r['ms'], 3)} | "
                     f"{_fmt(r.get('ms_plain'), 3)} | {share} |")
    return lines


def report_tail(result: dict) -> list[str]:
    """The markdown lines every attention report ends with: the autotuner's choices, then notes and errors."""
    lines = []
    if result.get("triton_configs"):
        lines += ["", "Triton configs kept by the autotuner (BLOCK_M, BLOCK_N, warps, stages):", ""]
        lines += [f"- `{key}`: {value}" for key, value in result["triton_configs"].items()]
    if result.get("notes"):
        lines += ["", "Notes and errors:", ""] + [f"- {note}" for note in result["notes"]]
    return lines


# ---- issue 30: precisions ------------------------------------------------------------------------------------

#: (column, precision, DIT_SPARSE_FP8_PV, DIT_SPARSE_FP8_QK, backend): our low-precision variants beside bf16.
PRECISION_VARIANTS = (
    ("auto bf16", "bf16", None, None, "auto"),
    ("triton bf16", "bf16", None, None, "triton"),
    ("fp8 int8-QK fp8-PV", "fp8", "fp8", "int8", "auto"),
    ("fp8 int8-QK bf16-PV", "fp8", "bf16", "int8", "auto"),
    ("fp8 e4m3-QK fp8-PV", "fp8", "fp8", "e4m3", "auto"),
    ("fp8 e4m3-QK bf16-PV", "fp8", "bf16", "e4m3", "auto"),
    ("int8 fp16-PV", "int8", None, None, "auto"),
)
#: `--quick`: the defaults of each precision and fp8's PV alternative.
QUICK_VARIANTS = ("auto bf16", "triton bf16", "fp8 int8-QK fp8-PV", "fp8 int8-QK bf16-PV", "fp8 e4m3-QK fp8-PV",
                  "int8 fp16-PV")
PRECISION_SHAPES = ("wan13", "wan14", "hunyuan", "tiny")  # tiny: the accuracy of q, k, v captured from the tiny model


class _switches:
    """DIT_SPARSE_FP8_PV / DIT_SPARSE_FP8_QK set for one variant, restored after."""

    def __init__(self, pv, qk):
        self.values = {"DIT_SPARSE_FP8_PV": pv, "DIT_SPARSE_FP8_QK": qk}

    def __enter__(self):
        import os

        self.saved = {key: os.environ.get(key) for key in self.values}
        for key, value in self.values.items():
            if value is not None:
                os.environ[key] = value

    def __exit__(self, *exc):
        import os

        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sage_dense(q, k, v):
    """SageAttention's dense kernel (`pip install sageattention`, the Triton release), (B, S, H, D) in."""
    from sageattention import sageattn

    return lambda: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def realistic_inputs(layout, heads: int, head_dim: int, device, dtype=torch.bfloat16):
    """q, k, v with a DiT's statistics for the accuracy table: K with a large per-channel offset (what smoothing
    removes), V with a per-channel offset, scores of std about 1.5 (seed 1)."""
    g = torch.Generator(device=device).manual_seed(1)
    shape = (1, layout.seq_len, heads, head_dim)
    q = torch.randn(shape, device=device, generator=g) * 1.2
    k = torch.randn(shape, device=device, generator=g) * 1.2 + 4 * torch.randn(1, 1, heads, head_dim, device=device,
                                                                                 generator=g)
    v = torch.randn(shape, device=device, generator=g) + torch.randn(1, 1, heads, head_dim, device=device, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _cosine_rel_l2(out, expected):
    a, b = out.float().flatten(), expected.float().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0)), float((a - b).norm() / b.norm())


def accuracy_rows(q, k, v, mask, layout, padding, variants, errors: list, *, shape: str, label: str, mask_name: str,
                  inputs: str) -> list[dict]:
    """The accuracy table's rows for one input and mask: each low-precision variant of `variants` against the
    reference backend (fp32 accumulation of the same inputs and mask); a variant that fails is noted in `errors`."""
    from dit_sparse.attention import sparse_attention

    expected = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend="reference")
    rows = []
    for column, precision, pv, qk, backend in variants:
        if precision == "bf16":
            continue
        with _switches(pv, qk):
            out = _try(lambda: sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=backend,
                                                precision=precision), errors, f"{shape} {inputs} accuracy {column}")
        if out is None:
            continue
        cosine, rel = _cosine_rel_l2(out, expected)
        rows.append(dict(shape=shape, label=label, mask=mask_name, density=round(mask.density, 4), inputs=inputs,
                         variant=column, cosine=cosine, rel_l2=rel, within_bounds=cosine >= 0.999 and rel <= 0.03))
        print(f"[{shape}] accuracy {mask_name} {inputs:8s} {column:22s} cosine {cosine:.6f} rel L2 {rel:.4f}",
              flush=True)
    return rows


#: (layer, step) of the shipped tiny model's self-attention calls whose q, k, v the accuracy table also takes (of its
#: 6 layers and 25 steps: the first, a middle and the last layer, early, middle and late in the denoising)
CAPTURED_CALLS = ((0, 0), (2, 12), (5, 24))


def tiny_captures(device, calls=CAPTURED_CALLS, steps: int = 25, size=(81, 160, 160)
                  ) -> tuple[list[tuple[str, object, tuple]], str | None]:
    """([(name, layout, (q, k, v))], why none): the q, k, v (B, S, H, D) bf16 of the self-attention `calls` (layer,
    step) from one render of the shipped tiny model (by default at its training size and steps; the quality suite's
    first prompt, seed 0; the first call of each step, the conditional one), observed on the way through dense
    attention."""
    from dit_sparse import hooks
    from dit_sparse.eval.suites import tiny_suite
    from dit_sparse.pipelines import tiny
    from dit_sparse.pipelines.adapters import find_adapter

    if not tiny.available():
        return [], f"no tiny model at {tiny.MODEL_DIR}"
    pipe = tiny.load(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    captured = {}

    def observer(layer, step, layout, q, k, v):
        if (layer, step) in calls and (layer, step) not in captured:
            captured[layer, step] = (layout, tuple(x.transpose(1, 2).to(torch.bfloat16).contiguous()
                                                   for x in (q, k, v)))

    with hooks.observe(pipe.transformer, find_adapter(pipe.transformer), observer):
        frames, height, width = size
        pipe(tiny_suite().prompts[0].prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
             generator=torch.Generator(device).manual_seed(0), output_type="latent")
    del pipe
    return [(f"tiny layer {layer} step {step}", *captured[layer, step]) for layer, step in sorted(captured)], None


def run_captured_accuracy(variants, accuracy: list, notes: list) -> None:
    """The accuracy table's rows for q, k, v captured from the tiny model: each low-precision variant against the
    reference on a random 0.25-density mask and the radial mask of the tiny layout (blocks of 64)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    captures, why = tiny_captures(device)
    if why:
        notes.append(f"tiny-model captured q/k/v: skipped, {why}")
    for name, layout, (q, k, v) in captures:
        masks = [("random 0.25", load_pattern("random_blocks")(layout, density=0.25, block_size=64)),
                 ("radial", load_pattern("radial")(layout, block_size=64, decay_factor=1.0))]
        for mask_name, mask in masks:
            accuracy += accuracy_rows(q, k, v, mask.to(device), layout, None, variants, notes, shape="tiny",
                                      label=name, mask_name=mask_name, inputs=name)


def run_precision_shape(name: str, densities, variants, args, rows: list, accuracy: list, notes: list):
    """Issue 30's table for one shape: cuDNN / FA4 / SageAttention dense, then each of our `variants` on the random
    masks, the radial mask and the full mask; the accuracy of the low precisions against the reference (fp32
    accumulation of the bf16 inputs) on the 0.25-density and radial masks, for plain and DiT-like inputs."""
    from dit_sparse.attention import sparse_attention
    from dit_sparse.blockmask import BlockMask
    from dit_sparse.kernels import triton_block_sparse, triton_quantize
    from dit_sparse.layout import VideoLayout

    label, heads, head_dim, (frames, height, width), text_len, text_position, valid_text, variant = \
        {**SHAPES, **SMOKE_SHAPES}[name]
    layout = VideoLayout(frames, height, width, text_len, text_position)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v, padding = random_inputs(layout, heads, head_dim, valid_text, device)
    video_len, errors = layout.video_len, []
    ms_cudnn = _try(lambda: bench_ms(cudnn_dense(q, k, v)), errors, f"{name} cudnn")
    ms_fa4_dense = _try(lambda: bench_ms(fa4_dense(q, k, v)), errors, f"{name} fa4 dense") if args.fa4 else None
    ms_sage = None
    if importlib.util.find_spec("sageattention") is None:
        notes.append(f"{name}: SageAttention column skipped: the `sageattention` package is not importable")
    else:
        ms_sage = _try(lambda: bench_ms(sage_dense(q, k, v)), errors, f"{name} sageattention dense")
    print(f"[{name}] dense: cudnn {ms_cudnn} ms, fa4 {ms_fa4_dense} ms, sageattention {ms_sage} ms", flush=True)

    masks = [(f"random {d}", load_pattern("random_blocks")(layout, density=d, block_size=128)) for d in densities]
    radial = load_pattern("radial")
    if radial is not None:
        m = _try(lambda: radial(layout, block_size=128, decay_factor=1.0, variant=variant), errors, f"{name} radial")
        if m is not None:
            masks.append(("radial", m))
    masks.append(("full", BlockMask.full(video_len, 128)))
    for mask_name, mask in masks:
        mask = mask.to(device)
        density = mask.density
        flops = 4 * heads * video_len * video_len * head_dim * density
        times = {}
        for column, precision, pv, qk, backend in variants:
            with _switches(pv, qk):
                def call(backend=backend, precision=precision):
                    return sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=backend,
                                            precision=precision)

                ms = _try(lambda: bench_ms(call), errors, f"{name} {mask_name} {column}")
                ms_prepass = None
                if ms is not None and precision != "bf16" and device.type == "cuda":
                    perm = None if mask.permutation is None else mask.permutation.int()
                    video = layout.video_slice
                    ms_prepass = _try(lambda: bench_ms(lambda: triton_quantize.quantize(
                        q[:, video], k[:, video], v[:, video], perm, mask.q_block_size, mask.kv_block_size, precision,
                        pv or "fp8", qk if precision == "fp8" else "int8")), errors, f"{name} {column} pre-pass")
            if ms is None:
                continue
            times[column] = ms
            rows.append(dict(shape=name, label=label, heads=heads, head_dim=head_dim, seq_video=video_len,
                             text_len=text_len, mask=mask_name, density=round(density, 4), variant=column,
                             precision=precision, fp8_pv=pv, fp8_qk=qk, backend=backend, ms=ms,
                             ms_prepass=ms_prepass, tflops=flops / ms / 1e9, ms_cudnn=ms_cudnn,
                             ms_fa4_dense=ms_fa4_dense, ms_sage_dense=ms_sage,
                             vs_auto_bf16=(times["auto bf16"] / ms) if "auto bf16" in times else None,
                             vs_triton_bf16=(times["triton bf16"] / ms) if "triton bf16" in times else None,
                             vs_cudnn=(ms_cudnn / ms) if ms_cudnn else None,
                             vs_sage_dense=(ms_sage / ms) if ms_sage else None))
            print(f"[{name}] {mask_name:11s} d={density:.3f} {column:22s} {ms:8.3f} ms (pre-pass {ms_prepass}) "
                  f"x{rows[-1]['vs_auto_bf16'] or 0:.2f} vs auto bf16", flush=True)
        if mask_name not in (f"random {densities[len(densities) // 2]}", "radial") or args.no_accuracy:
            continue
        for inputs_name, (qa, ka, va) in (("randn", (q, k, v)), ("dit-like", realistic_inputs(layout, heads, head_dim,
                                                                                                  device))):
            accuracy += accuracy_rows(qa, ka, va, mask, layout, padding, variants, errors, shape=name, label=label,
                                      mask_name=mask_name, inputs=inputs_name)
    notes.extend(errors)
    notes.append(f"triton configs: {triton_block_sparse.chosen_configs()}")
    del q, k, v
    torch.cuda.empty_cache()


def precision_markdown(result: dict) -> str:
    lines = [f"# Attention by precision (issue 30), {result['gpu']}, {result['date']}", "",
             f"`{result['command']}`; torch {result['torch']}, triton {result['triton']}, sageattention "
             f"{result['sageattention']}. bf16 inputs, batch 1, through `sparse_attention` (text and padding "
             "included). `vs auto bf16`: our bf16 `auto` path on the same mask over this row; the pre-pass is "
             "included in `ms` and shown alone.", "",
             "| shape | mask | density | variant | ms | pre-pass ms | TFLOP/s | vs auto bf16 | vs triton bf16 | "
             "vs cuDNN dense | vs Sage dense | cuDNN ms | FA4 dense ms | Sage dense ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['mask']} | {_fmt(r['density'], 3)} | {r['variant']} | {_fmt(r['ms'])} | "
                     f"{_fmt(r.get('ms_prepass'), 3)} | {_fmt(r.get('tflops'), 0)} | {_fmt(r.get('vs_auto_bf16'))} | "
                     f"{_fmt(r.get('vs_triton_bf16'))} | {_fmt(r.get('vs_cudnn'))} | {_fmt(r.get('vs_sage_dense'))} | "
                     f"{_fmt(r.get('ms_cudnn'))} | {_fmt(r.get('ms_fa4_dense'))} | {_fmt(r.get('ms_sage_dense'))} |")
    return "\n".join(lines + report_tail(result)) + "\n"


def accuracy_markdown(result: dict) -> str:
    lines = [f"# Low-precision accuracy (issue 30), {result['gpu']}, {result['date']}", "",
             f"`{result['command']}`. Each low-precision variant against the reference backend (the same bf16 inputs "
             "and mask, fp32 accumulation); bounds: cosine >= 0.999, relative L2 <= 3%. `randn`: q, k, v N(0, 1); "
             "`dit-like`: K and V with per-channel offsets, scores of std about 1.5.", "",
             "| shape | mask | density | inputs | variant | cosine | rel L2 | within bounds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["accuracy"]:
        lines.append(f"| {r['shape']} | {r['mask']} | {_fmt(r['density'], 3)} | {r['inputs']} | {r['variant']} | "
                     f"{r['cosine']:.6f} | {r['rel_l2']:.4f} | {'yes' if r['within_bounds'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main_precision(args, argv, how: str) -> int:
    """`--precision`: issue 30's speed table and accuracy table, written after every shape."""
    import triton

    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        args.fa4 = False
    try:
        sage_version = importlib.metadata.version("sageattention")
    except Exception as error:
        sage_version = f"unavailable ({type(error).__name__})"
    variants = [v for v in PRECISION_VARIANTS if not args.quick or v[0] in QUICK_VARIANTS]
    shapes = [s for s in args.shapes or PRECISION_SHAPES if s in PRECISION_SHAPES or s in SMOKE_SHAPES]
    if args.smoke:
        variants = [("reference bf16", "bf16", None, None, "reference"),
                    ("reference fp8", "fp8", "fp8", "int8", "reference")]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = gpu.replace("NVIDIA ", "").replace(" ", "-").lower()
    result = dict(command="python benchmarks/attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  gpu=gpu, date=date, torch=torch.__version__, triton=triton.__version__, sageattention=sage_version,
                  capability=list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
                  imported_from=how, rows=[], accuracy=[], notes=[])
    start = time.time()
    for name in shapes:
        if time.time() - start > args.time_budget:
            result["notes"].append(f"{name}: skipped, the run passed its time budget of {args.time_budget} s")
            continue
        if name == "tiny":
            run_captured_accuracy(variants, result["accuracy"], result["notes"])
        else:
            run_precision_shape(name, args.densities, variants, args, result["rows"], result["accuracy"],
                                result["notes"])
        result["seconds"] = round(time.time() - start, 1)
        (out / f"attention-precision-{tag}-{date}.json").write_text(json.dumps(result, indent=1))
        (out / f"attention-precision-{tag}-{date}.md").write_text(precision_markdown(result))
        (out / f"lowbit-accuracy-{tag}-{date}.json").write_text(json.dumps(
            {key: result[key] for key in ("command", "gpu", "date", "torch", "triton", "accuracy")}, indent=1))
        (out / f"lowbit-accuracy-{tag}-{date}.md").write_text(accuracy_markdown(result))
    print(precision_markdown(result))
    print(accuracy_markdown(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=[*SHAPES, *SMOKE_SHAPES, "tiny"],
                        help="default: every real shape (with --precision, and `tiny`: captured q/k/v accuracy)")
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--backends", nargs="+", default=["auto", "triton"])
    parser.add_argument("--no-fa4", dest="fa4", action="store_false")
    parser.add_argument("--no-flex", dest="flex", action="store_false")
    parser.add_argument("--no-radial", dest="radial", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="CPU run of the script's logic on tiny shapes")
    parser.add_argument("--costs", action="store_true",
                        help="add rows for the cost of compensation and of the recall guard (min_recall)")
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; later shapes are skipped")
    parser.add_argument("--precision", action="store_true",
                        help="issue 30's tables instead: bf16 / fp8 / int8 columns and the accuracy of each")
    parser.add_argument("--quick", action="store_true", help="with --precision: the main variants only")
    parser.add_argument("--no-accuracy", action="store_true", help="with --precision: speed only")
    args = parser.parse_args(argv)
    how = ensure_importable()
    print(f"dit_sparse from: {how}", flush=True)
    if args.precision:
        if args.smoke:  # the smoke shapes, and the tiny model's captured q/k/v when asked for
            args.shapes, args.fa4 = [*SMOKE_SHAPES, *(["tiny"] if "tiny" in (args.shapes or ()) else [])], False
        elif not torch.cuda.is_available():
            print("no CUDA GPU: nothing to benchmark (--smoke runs the script's logic on CPU)")
            return 1
        return main_precision(args, argv, how)
    if args.shapes and "tiny" in args.shapes:
        parser.error("--shapes tiny (the tiny model's captured q/k/v) goes with --precision")
    if args.smoke:
        args.shapes, args.backends, args.fa4, args.flex = list(SMOKE_SHAPES), ["reference"], False, False
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (--smoke runs the script's logic on CPU)")
        return 1
    args.shapes = args.shapes or list(SHAPES)
    try:
        import flash_attn.cute  # noqa: F401

        fa4_version = importlib.metadata.version("flash-attn-4")
    except Exception as error:
        fa4_version, args.fa4 = f"unavailable ({type(error).__name__})", False
    import triton

    from dit_sparse.kernels import triton_block_sparse

    rows, notes = [], []
    start = time.time()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"attention-{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}-{date}"
    result = dict(
        command="python benchmarks/attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
        gpu=gpu, date=date, torch=torch.__version__, triton=triton.__version__, fa4=fa4_version,
        python=platform.python_version(),
        capability=list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
        imported_from=how, rows=rows, notes=notes,
    )
    for name in args.shapes:
        if time.time() - start > args.time_budget:
            notes.append(f"{name}: skipped, the run passed its time budget of {args.time_budget} s")
            continue
        run_shape(name, args.densities, args.backends, args, rows, notes)
        # Written after every shape, so a run cut short still leaves its rows.
        result.update(seconds=round(time.time() - start, 1), triton_configs=triton_block_sparse.chosen_configs())
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
