"""Transformer-step benchmark of issue 9: one denoising step (the transformer calls of one step, CFG as each pipeline
makes them) at the real configs with random weights, bf16, eager and torch.compile'd.

    python benchmarks/transformer_step.py                                   # every model (GPU; long)
    python benchmarks/transformer_step.py --models wan13 --modes eager      # one model, one mode (fits 10 minutes)
    python benchmarks/transformer_step.py --smoke                           # CPU run of this script's logic
    python benchmarks/transformer_step.py --models hunyuan wan14 --modes eager regional --methods radial \
        --precisions bf16 fp8                                               # issue 30's fp8 rows

Each model and mode can run as its own command (rows merge into the day's file): a compiled row compiles the whole
transformer once per method (minutes at these sizes), so on machines with a per-command time limit split compiled
runs by `--methods` too, e.g. `--models wan13 --modes compiled --methods radial`; a regional row compiles one block
per block class (a sparsified model's blocks share one graph). Each row is saved as soon as it
is timed; `--resume` keeps the rows the day's file has and times only the missing ones (against the kept baselines),
so a command cut off by its time limit continues where it stopped.

Models: Wan2.1-1.3B 480p 81f (2 calls per step: cond, uncond), Wan2.1-14B 720p 81f (2 calls), HunyuanVideo 720p
129f (1 call: guidance-distilled; 256 text tokens, 120 real), CogVideoX1.5-5B 1360x768 81f (1 call, CFG batched:
batch 2), CogVideoX-5B 720x480 49f (`cogvideox5b`, the same), FLUX.1-dev 2048x2048 (1 call: guidance-distilled).
Beyond issue 9's five (`--models`, not run by default): HunyuanVideo-1.5 480p 121f (`hunyuan15`, 2 calls: its
guider's CFG), Qwen-Image 1328x1328 (`qwen_image`, 2 calls: true CFG with a negative prompt), FLUX.2-dev 2048x2048
(`flux2`, 1 call: guidance-distilled), Mochi 1 848x480 163f (`mochi`, 1 call, CFG batched: batch 2;
not `--modes regional`: diffusers' Mochi attention drops each sample's text padding by value, a graph break).
Per model and mode (eager; compiled = `torch.compile(transformer)` after `sparsify`; regional =
`transformer.compile_repeated_blocks(fullgraph=True)` after `sparsify`, one compiled block per block class):
- `diffusers`: the unwrapped transformer, diffusers' default attention (torch SDPA): the baseline, `ms_dense`;
- `skip-attention`: the same forward with the self-attention calls returning v (through our hooks; cross-attention
  kept): `attention_share = 1 - ms_skip / ms_dense`;
- `dense`: our dense path (a full block mask through `sparse_attention`: text, padding and kernel ours);
- every sparse method of the project that applies to the family (`--methods`; family defaults, e.g. radial's
  `hunyuan` variant), with `density` its mean kept fraction, `speedup = ms_dense / ms_sparse`, the Amdahl ceiling
  `1 / ((1 - share) + share * density / 0.9)` and the fraction of it reached; `attention_ms` (the step minus the
  skip-attention step) against the dense attention time says whether attention or the rest holds a row back.
Writes benchmarks/results/transformer_step-<gpu>-<date>.json (rows with model, method, density, ms_dense,
ms_sparse, speedup, attention_share, ...; merged with the same day's file, so models can run in separate commands)
and a markdown table beside it. Random weights: the outputs are meaningless, the timings are not.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_EFFICIENCY = 0.9  # the Amdahl ceiling's allowance: a sparse kernel at 90% of proportional speed


@dataclass(frozen=True)
class ModelSpec:
    """One model at one size: its diffusers class and config, and the transformer calls of one denoising step."""

    label: str
    class_name: str
    config: dict
    calls: Callable[[torch.device, torch.dtype], list[dict]]  # keyword arguments of each call of one step


def _randn(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


def _wan_calls(frames, height, width, text_dim=4096, channels=16):
    def calls(device, dtype):
        # WanPipeline: the conditional and the unconditional branch are two calls of batch 1.
        return [
            dict(hidden_states=_randn(1, channels, frames, height, width, device=device, dtype=dtype),
                 timestep=torch.tensor([999.0], device=device),
                 encoder_hidden_states=_randn(1, 512, text_dim, device=device, dtype=dtype))
            for _ in range(2)
        ]

    return calls


def _hunyuan_calls(frames, height, width, text_len=256, valid_text=120, text_dim=4096, pooled=768, channels=16):
    def calls(device, dtype):
        # HunyuanVideoPipeline: guidance-distilled, one call of batch 1 (true CFG is off by default).
        mask = torch.arange(text_len, device=device)[None] < valid_text  # (1, text_len) bool: the prompt's tokens
        return [dict(hidden_states=_randn(1, channels, frames, height, width, device=device, dtype=dtype),
                     timestep=torch.tensor([999], device=device),
                     encoder_hidden_states=_randn(1, text_len, text_dim, device=device, dtype=dtype),
                     encoder_attention_mask=mask,
                     pooled_projections=_randn(1, pooled, device=device, dtype=dtype),
                     guidance=torch.tensor([6000.0], device=device, dtype=dtype))]

    return calls


def _cogvideox_calls(frames, height, width, text_len, head_dim, patch_size_t=None, text_dim=4096, channels=16):
    def calls(device, dtype):
        # CogVideoXPipeline: CFG batches the two branches into one call of batch 2; RoPE over the video tokens.
        video_len = (frames // (patch_size_t or 1)) * (height // 2) * (width // 2)
        rope = tuple(torch.randn(video_len, head_dim, device=device) for _ in range(2))  # (cos, sin)
        return [dict(hidden_states=_randn(2, frames, channels, height, width, device=device, dtype=dtype),
                     encoder_hidden_states=_randn(2, text_len, text_dim, device=device, dtype=dtype),
                     timestep=torch.tensor([999, 999], device=device), image_rotary_emb=rope)]

    return calls


def _flux_calls(height, width, text_len=512, text_dim=4096, pooled=768, channels=64):
    def calls(device, dtype):
        # FluxPipeline (dev): guidance-distilled, one call of batch 1; latents packed 2x2 into (B, h*w, 64).
        ids = torch.zeros(height, width, 3, device=device)
        ids[..., 1], ids[..., 2] = torch.arange(height, device=device)[:, None], torch.arange(width, device=device)
        return [dict(hidden_states=_randn(1, height * width, channels, device=device, dtype=dtype),
                     encoder_hidden_states=_randn(1, text_len, text_dim, device=device, dtype=dtype),
                     pooled_projections=_randn(1, pooled, device=device, dtype=dtype),
                     timestep=torch.tensor([1.0], device=device, dtype=dtype),
                     guidance=torch.tensor([3.5], device=device, dtype=dtype),
                     img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_len, 3, device=device))]

    return calls


def _hunyuan15_calls(frames, height, width, text_lens=(120, 4), text_len=1000, glyph_len=256, image_tokens=729,
                     text_dim=3584, glyph_dim=1472, image_dim=1152, channels=65):
    def calls(device, dtype):
        # HunyuanVideo15Pipeline, text to video: CFG by its guider, two calls of batch 1 (the prompt, the empty negative
        # prompt: `text_lens` real tokens of the 1000 the Qwen2.5-VL prompt is padded to, int64 masks as the tokenizer
        # gives them); no quoted glyph text, so byT5's 256 tokens are all masked; SigLIP's 729 image tokens are zeros;
        # the latents carry the (empty) image condition and its mask: 32 + 32 + 1 channels.
        return [dict(hidden_states=_randn(1, channels, frames, height, width, device=device, dtype=dtype),
                     timestep=torch.tensor([999.0], device=device, dtype=dtype),
                     encoder_hidden_states=_randn(1, text_len, text_dim, device=device, dtype=dtype),
                     encoder_attention_mask=(torch.arange(text_len, device=device)[None] < valid).long(),
                     encoder_hidden_states_2=torch.zeros(1, glyph_len, glyph_dim, device=device, dtype=dtype),
                     encoder_attention_mask_2=torch.zeros(1, glyph_len, dtype=torch.long, device=device),
                     image_embeds=torch.zeros(1, image_tokens, image_dim, device=device, dtype=dtype))
                for valid in text_lens]
    return calls


def _qwen_image_calls(height, width, text_lens=(128, 8), text_dim=3584, channels=64):
    def calls(device, dtype):
        # QwenImagePipeline with a negative prompt (true CFG, as its model card runs it): two calls of batch 1, each
        # prompt at its own length (one prompt is never padded, so the pipeline passes no mask); latents packed 2x2.
        return [dict(hidden_states=_randn(1, height * width, channels, device=device, dtype=dtype),
                     timestep=torch.tensor([0.999], device=device, dtype=dtype),
                     encoder_hidden_states=_randn(1, text_len, text_dim, device=device, dtype=dtype),
                     encoder_hidden_states_mask=None, img_shapes=[[(1, height, width)]])
                for text_len in text_lens]
    return calls


def _flux2_calls(height, width, text_len=512, text_dim=15360, channels=128):
    def calls(device, dtype):
        # Flux2Pipeline (dev): guidance-distilled, one call of batch 1; latents packed 2x2 into (B, h*w, 128); ids
        # (B, N, 4) int64 = (frame, row, column, layer), the text's tokens along the layer axis.
        grid = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
        image_ids = torch.stack([torch.zeros_like(grid[0]), *grid, torch.zeros_like(grid[0])], dim=-1)
        text_ids = torch.zeros(text_len, 4, dtype=torch.long, device=device)
        text_ids[:, 3] = torch.arange(text_len, device=device)
        return [dict(hidden_states=_randn(1, height * width, channels, device=device, dtype=dtype),
                     encoder_hidden_states=_randn(1, text_len, text_dim, device=device, dtype=dtype),
                     timestep=torch.tensor([0.999], device=device, dtype=dtype),
                     guidance=torch.tensor([4.0], device=device), img_ids=image_ids.reshape(1, -1, 4),
                     txt_ids=text_ids[None])]
    return calls


def _mochi_calls(frames, height, width, text_lens=(0, 60), text_len=256, text_dim=4096, channels=12):
    def calls(device, dtype):
        # MochiPipeline: CFG batches the empty negative prompt (its mask all False, as the pipeline sets it for "")
        # and the prompt into one call of batch 2; T5's 256 tokens, `text_lens` of them real.
        mask = torch.arange(text_len, device=device)[None] < torch.tensor(text_lens, device=device)[:, None]
        return [dict(hidden_states=_randn(2, channels, frames, height, width, device=device, dtype=dtype),
                     encoder_hidden_states=_randn(2, text_len, text_dim, device=device, dtype=dtype),
                     timestep=torch.tensor([999.0, 999.0], device=device, dtype=dtype), encoder_attention_mask=mask)]
    return calls


_WAN = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
            qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)
_COGVIDEOX_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                     time_embed_dim=512, text_embed_dim=4096, num_layers=42, patch_size=2,
                     use_rotary_positional_embeddings=True)

MODELS = {
    # latents: Wan/HunyuanVideo/CogVideoX VAEs compress 4x in time (+1), 8x in space; FLUX 8x, then packs 2x2.
    "wan13": ModelSpec("Wan2.1-1.3B 480p 81f", "WanTransformer3DModel",
                       dict(_WAN, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
                       _wan_calls(21, 60, 104)),
    "wan14": ModelSpec("Wan2.1-14B 720p 81f", "WanTransformer3DModel",
                       dict(_WAN, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
                       _wan_calls(21, 90, 160)),
    "hunyuan": ModelSpec("HunyuanVideo 720p 129f", "HunyuanVideoTransformer3DModel", {},  # diffusers' defaults
                         _hunyuan_calls(33, 90, 160)),
    # CogVideoX 1.5 pairs latent frames (patch_size_t 2); its pipeline pads 21 latent frames to 22.
    "cogvideox15": ModelSpec("CogVideoX1.5-5B 1360x768 81f", "CogVideoXTransformer3DModel",
                             dict(_COGVIDEOX_5B, patch_size_t=2, max_text_seq_length=224, patch_bias=False,
                                  sample_width=170, sample_height=96, sample_frames=81),
                             _cogvideox_calls(22, 96, 170, text_len=224, head_dim=64, patch_size_t=2)),
    "cogvideox5b": ModelSpec("CogVideoX-5B 720x480 49f", "CogVideoXTransformer3DModel",
                             dict(_COGVIDEOX_5B, max_text_seq_length=226),
                             _cogvideox_calls(13, 60, 90, text_len=226, head_dim=64)),
    "flux": ModelSpec("FLUX.1-dev 2048x2048", "FluxTransformer2DModel", dict(guidance_embeds=True),
                      _flux_calls(128, 128)),
    # The classes' defaults are these checkpoints' configs. HunyuanVideo-1.5's VAE compresses 16x in space (the
    # pipeline's default size for the 480p model: 848 x 480); Qwen-Image's and FLUX.2's 8x, then pack 2x2.
    "hunyuan15": ModelSpec("HunyuanVideo-1.5 480p 121f", "HunyuanVideo15Transformer3DModel", {},
                           _hunyuan15_calls(31, 30, 53)),
    "qwen_image": ModelSpec("Qwen-Image 1328x1328", "QwenImageTransformer2DModel", {}, _qwen_image_calls(83, 83)),
    "flux2": ModelSpec("FLUX.2-dev 2048x2048", "Flux2Transformer2DModel", {}, _flux2_calls(128, 128)),
    # Mochi's VAE compresses 6x in time, 8x in space; its transformer patches 2 x 2.
    "mochi": ModelSpec("Mochi 1 848x480 163f", "MochiTransformer3DModel", {}, _mochi_calls(28, 60, 106)),
}
DEFAULT_MODELS = ("wan13", "wan14", "hunyuan", "cogvideox15", "flux")

#: tiny configs of the same classes for a CPU run of the script's logic (`--smoke`)
SMOKE_MODELS = {
    "smoke-wan": ModelSpec("smoke Wan", "WanTransformer3DModel",
                           dict(_WAN, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                                text_dim=32, freq_dim=32, rope_max_seq_len=32),
                           _wan_calls(3, 8, 8, text_dim=32)),
    "smoke-hunyuan": ModelSpec("smoke HunyuanVideo", "HunyuanVideoTransformer3DModel",
                               dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                    num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=16,
                                    pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)),
                               _hunyuan_calls(3, 16, 16, text_len=8, valid_text=5, text_dim=16, pooled=8, channels=4)),
    "smoke-flux": ModelSpec("smoke FLUX", "FluxTransformer2DModel",
                            dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                 axes_dims_rope=(4, 6, 6), guidance_embeds=True),
                            _flux_calls(12, 10, text_len=6, text_dim=16, pooled=8, channels=8)),
    "smoke-hunyuan15": ModelSpec("smoke HunyuanVideo-1.5", "HunyuanVideo15Transformer3DModel",
                                 dict(in_channels=5, out_channels=2, num_attention_heads=2, attention_head_dim=16,
                                      num_layers=2, num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8,
                                      image_embed_dim=12, rope_axes_dim=(4, 6, 6)),
                                 _hunyuan15_calls(3, 8, 8, text_lens=(5, 2), text_len=7, glyph_len=3, image_tokens=5,
                                                  text_dim=16, glyph_dim=8, image_dim=12, channels=5)),
    "smoke-qwen-image": ModelSpec("smoke Qwen-Image", "QwenImageTransformer2DModel",
                                  dict(in_channels=8, out_channels=2, num_layers=2, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
                                  _qwen_image_calls(12, 10, text_lens=(7, 3), text_dim=16, channels=8)),
    "smoke-flux2": ModelSpec("smoke FLUX.2", "Flux2Transformer2DModel",
                             dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=8,
                                  axes_dims_rope=(4, 4, 4, 4)),
                             _flux2_calls(12, 10, text_len=6, text_dim=16, channels=8)),
    "smoke-mochi": ModelSpec("smoke Mochi", "MochiTransformer3DModel",
                             dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                  pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                  max_sequence_length=8),
                             _mochi_calls(3, 16, 16, text_lens=(0, 5), text_len=8, text_dim=16, channels=4)),
}


# ---- models ------------------------------------------------------------------------------------------------------


def build(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights at `spec`'s config, in `dtype` where `from_pretrained(torch_dtype=dtype)` would put them
    (the class's `_keep_in_fp32_modules` stay fp32), built on `device`."""
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**spec.config)
    finally:
        torch.set_default_dtype(previous)
    keep = getattr(cls, "_keep_in_fp32_modules", None) or []
    for name, parameter in model.named_parameters():  # built in `dtype` already; buffers stay as built
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.float32 if any(p in name.split(".") for p in keep) else dtype)
    return model.eval().requires_grad_(False)


def step(model, calls: list[dict]) -> None:
    for kwargs in calls:
        model(**kwargs, return_dict=False)


# ---- timing ------------------------------------------------------------------------------------------------------


def time_steps(fn, repeats: int) -> float:
    """Median ms of `repeats` calls of `fn` (already warmed up)."""
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


@contextlib.contextmanager
def compiled(model, mode: str, **options):
    """The module to call in `mode`: the model (eager), `torch.compile(model)` (compiled), or the model with its
    repeated blocks compiled in place (regional, diffusers' `compile_repeated_blocks(fullgraph=True)`; for a class
    that names no repeated blocks, such as CogVideoX's, every block of its block lists; undone on exit so the next
    row starts from the eager model). `options` go to each compile call (tests pass a `backend`)."""
    if mode == "compiled":
        yield torch.compile(model, **options)
    elif mode == "regional":
        if model._repeated_blocks:
            model.compile_repeated_blocks(fullgraph=True, **options)
        else:
            for blocks in model.children():
                for block in blocks if isinstance(blocks, torch.nn.ModuleList) else []:
                    block.compile(fullgraph=True, **options)
        try:
            yield model
        finally:
            for module in model.modules():
                module._compiled_call_impl = None
    else:
        yield model


@contextlib.contextmanager
def attention_skipped():
    """Every sparse_attention call of the hooks returns a copy of v: the forward without self-attention's cost (a
    copy, not v itself: a custom op's output may not alias its input)."""
    import dit_sparse.hooks

    original = dit_sparse.hooks.sparse_attention
    dit_sparse.hooks.sparse_attention = lambda q, k, v, *args, **kwargs: v.clone()
    try:
        yield
    finally:
        dit_sparse.hooks.sparse_attention = original


class _BackendLog(logging.Handler):
    """Collects the kernel dispatch's "backend chosen" lines (logged once per backend, device and reason)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_model(name: str, spec: ModelSpec, args, device, dtype, rows: list, notes: list,
              done: dict | None = None, save: Callable[[], None] = lambda: None) -> None:
    """Time every method of `args` on one model in each mode, appending a row per (mode, method) to `rows` and
    calling `save` after each. Rows in `done` (`_row_key` -> row, from `--resume`) are not run again: their times
    serve as this run's baselines."""
    import dit_sparse
    from dit_sparse.pipelines.adapters import find_adapter

    print(f"== {spec.label}", flush=True)
    started = time.time()
    model = build(spec, device, dtype)
    calls = spec.calls(device, dtype)
    adapter = find_adapter(model)
    print(f"   built in {time.time() - started:.1f} s", flush=True)
    methods = [("diffusers", None, {}), ("skip-attention", "dense", {}), ("dense", "dense", {})]
    for method in args.methods:
        if method in adapter.unsupported_methods:
            notes.append(f"{spec.label}: {method} skipped ({adapter.unsupported_methods[method]})")
            continue
        options = args.method_options.get(method, {})
        for precision in getattr(args, "precisions", ["bf16"]):  # a low precision: its own row, "<method> fp8"
            label = method if precision == "bf16" else f"{method} {precision}"
            methods.append((label, method, options if precision == "bf16" else {**options, "precision": precision}))

    baseline: dict[str, float] = {}  # mode -> ms of the diffusers step
    skipped: dict[str, float] = {}  # mode -> ms of the skip-attention step
    for mode in args.modes:
        for label, method, options in methods:
            row = dict(model=spec.label, model_key=name, mode=mode, method=label, options=options)
            earlier = (done or {}).get(_row_key(row))
            if earlier is not None and earlier.get("options", {}) == options:
                print(f"   {mode:8s} {label:15s} {earlier['ms_sparse']:10.1f} ms  (--resume: from the day's file)")
                if label == "diffusers":
                    baseline[mode] = earlier["ms_sparse"]
                if label == "skip-attention":
                    skipped[mode] = earlier["ms_sparse"]
                continue
            try:
                torch._dynamo.reset()
                if method is None:
                    dit_sparse.unsparsify(model)
                else:
                    dit_sparse.sparsify(model, method, **options)
                context = attention_skipped() if label == "skip-attention" else contextlib.nullcontext()
                with torch.no_grad(), context, compiled(model, mode) as runner:
                    warm = time.time()
                    for _ in range(args.warmup):
                        step(runner, calls)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    row["warmup_s"] = round(time.time() - warm, 1)
                    if method is not None:
                        dit_sparse.sparsity_stats(model, reset=True)
                    ms = time_steps(lambda: step(runner, calls), args.repeats)
                    stats = dit_sparse.sparsity_stats(model) if method is not None else None
            except Exception as error:  # a row that cannot run here is reported, not fatal
                traceback.print_exc(limit=4)
                notes.append(f"{spec.label} {mode} {label}: {type(error).__name__}: {str(error)[:300]}")
                continue
            finally:
                dit_sparse.unsparsify(model)
            row["ms_sparse"] = ms
            if label == "diffusers":
                baseline[mode] = ms
            if label == "skip-attention":
                skipped[mode] = ms
            _complete(row, baseline, skipped, stats, label)
            rows.append(row)
            save()
            print(f"   {mode:8s} {label:15s} {ms:10.1f} ms  density {_fmt(row.get('density'), 3)}  speedup "
                  f"{_fmt(row.get('speedup'))}  of ceiling {_fmt(row.get('of_ceiling'))}", flush=True)
    del model, calls
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _complete(row: dict, baseline: dict, skipped: dict, stats: dict | None, label: str) -> None:
    """Fill in density, speedups, the attention share and the Amdahl ceiling from the same mode's baselines."""
    mode, ms = row["mode"], row["ms_sparse"]
    row["density"] = 1.0 if stats is None or label == "skip-attention" else stats["density"]
    row["ms_dense"] = baseline.get(mode)
    if row["ms_dense"]:
        row["speedup"] = row["ms_dense"] / ms
    if baseline.get("eager"):
        row["speedup_vs_eager_diffusers"] = baseline["eager"] / ms
    if row["ms_dense"] and mode in skipped:
        share = max(0.0, 1.0 - skipped[mode] / row["ms_dense"])
        row["attention_share"] = share
        row["attention_ms_dense"] = row["ms_dense"] - skipped[mode]
        if label not in ("diffusers", "skip-attention"):
            row["attention_ms"] = ms - skipped[mode]
            row["amdahl_ceiling"] = 1.0 / ((1.0 - share) + share * row["density"] / KERNEL_EFFICIENCY)
            row["of_ceiling"] = row["speedup"] / row["amdahl_ceiling"]


# ---- report ------------------------------------------------------------------------------------------------------

TARGETS = (
    # (model key, modes (None: any), speedup wanted against the eager diffusers step, what the issue asks)
    ("hunyuan", None, 3.0, "HunyuanVideo 720p >= 3x per step against diffusers' default"),
    ("wan14", None, 2.0, "Wan2.1-14B 720p >= 2x"),
    ("wan13", ("compiled", "regional"), 2.0, "with torch.compile, Wan2.1-1.3B 480p >= 2x"),
)


def findings(rows: list[dict]) -> list[str]:
    """Targets met or missed, and for every sparse row under 90% of its ceiling what holds it back."""
    lines = []
    sparse = [r for r in rows if r["method"] not in ("diffusers", "skip-attention", "dense")]
    for key, mode, wanted, text in TARGETS:
        candidates = [r for r in sparse if r["model_key"] == key and (mode is None or r["mode"] in mode)]
        related = [r for r in candidates if r.get("speedup_vs_eager_diffusers") is not None]
        if not related:
            lines.append(f"{text}: not measured in this file" + (
                f" (no eager diffusers row of the model: its {', '.join(sorted({r['mode'] for r in candidates}))} "
                "rows give their speedup against diffusers in the same mode only)" if candidates else ""))
            continue
        best = max(related, key=lambda r: r["speedup_vs_eager_diffusers"])
        got = best["speedup_vs_eager_diffusers"]
        verdict = "met" if got >= wanted else "MISSED"
        lines.append(f"{text}: {verdict}, best {got:.2f}x ({best['method']}, {best['mode']}, density "
                     f"{best['density']:.3f})")
    for r in sparse:
        if r.get("of_ceiling") is None or r["of_ceiling"] >= 0.9:
            continue
        ideal_attention = r["attention_ms_dense"] * r["density"] / KERNEL_EFFICIENCY
        lines.append(
            f"{r['model']} {r['mode']} {r['method']}: {r['of_ceiling']:.0%} of its Amdahl ceiling "
            f"({r['speedup']:.2f}x of {r['amdahl_ceiling']:.2f}x); attention took {r['attention_ms']:.0f} ms where "
            f"{ideal_attention:.0f} ms would reach the ceiling (dense attention {r['attention_ms_dense']:.0f} ms), "
            f"the rest of the step {r['ms_sparse'] - r['attention_ms']:.0f} ms"
        )
    return lines


def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    lines = [
        f"# Transformer step benchmark, {result['gpu']}, {result['date']}",
        "",
        "; ".join(f"`{c}`" for c in result.get("commands", [result["command"]])) + f"; torch {result['torch']}, diffusers {result['diffusers']}, {result['dtype']}, random "
        f"weights at the real configs. One denoising step = the transformer calls of one step as the pipeline makes "
        f"them (Wan: cond + uncond, 2 calls; CogVideoX: one call of batch 2; HunyuanVideo, FLUX: one call). "
        f"`ms dense` = diffusers' default in the same mode; `share` = self-attention's share of that step (the "
        f"step with it skipped); ceiling = 1 / ((1 - share) + share x density / {KERNEL_EFFICIENCY}).",
        "",
        "| model | mode | method | density | ms dense | ms | speedup | vs eager diffusers | attention share "
        "| attention ms | Amdahl ceiling | of ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['method']} | {_fmt(r.get('density'), 3)} "
            f"| {_fmt(r.get('ms_dense'), 0)} | {_fmt(r['ms_sparse'], 0)} | {_fmt(r.get('speedup'))} "
            f"| {_fmt(r.get('speedup_vs_eager_diffusers'))} | {_fmt(r.get('attention_share'))} "
            f"| {_fmt(r.get('attention_ms'), 0)} | {_fmt(r.get('amdahl_ceiling'))} | {_fmt(r.get('of_ceiling'))} |"
        )
    for title, key in (("Findings", "findings"), ("Notes and errors", "notes")):
        if result.get(key):
            lines += ["", f"{title}:", ""] + [f"- {line}" for line in result[key]]
    return "\n".join(lines) + "\n"


def _row_key(row: dict) -> tuple:
    return row.get("model_key"), row.get("mode"), row.get("method")


def relate_to_eager_diffusers(rows: list[dict]) -> None:
    """Set every row's `speedup_vs_eager_diffusers` from the eager diffusers row of its model, wherever it was run."""
    eager = {r["model_key"]: r["ms_sparse"] for r in rows if r.get("mode") == "eager" and r["method"] == "diffusers"}
    for r in rows:
        if r.get("model_key") in eager:
            r["speedup_vs_eager_diffusers"] = eager[r["model_key"]] / r["ms_sparse"]


def earlier_rows(path: Path, rows: list, key) -> tuple[dict | None, list]:
    """The same day's earlier results file (None when absent or unreadable) and its rows, those this run made again
    (same `key(row)`) replaced by `rows`."""
    try:
        earlier = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        earlier = None
    if earlier is None:
        return None, rows
    ran = {key(r) for r in rows}
    return earlier, [r for r in earlier.get("rows", []) if key(r) not in ran] + rows


def _merge(path: Path, result: dict) -> dict:
    """The same day's earlier file with this run's rows replacing those it ran again (same model, mode and method)."""
    earlier, rows = earlier_rows(path, result["rows"], _row_key)
    if earlier is None:
        return result
    relate_to_eager_diffusers(rows)
    models = {r["model_key"] for r in result["rows"]}
    notes = [n for n in earlier.get("notes", []) if not any(n.startswith(MODELS_ALL[m].label) for m in models)]
    commands = [c for c in earlier.get("commands", [earlier.get("command")]) if c]
    commands += [result["command"]] if result["command"] not in commands else []
    merged = dict(result, rows=rows, notes=notes + result["notes"], commands=commands)
    merged["findings"] = findings(rows)
    return merged


MODELS_ALL = {**MODELS, **SMOKE_MODELS}
MODES = {
    "eager": "no compilation",
    "compiled": "torch.compile(transformer), the whole transformer in one compilation",
    "regional": "transformer.compile_repeated_blocks(fullgraph=True): one block compiled for every block of its "
                "class, diffusers' recommendation (a fraction of the compile time)",
}


def main(argv=None) -> int:
    import diffusers

    from dit_sparse.patterns import CONFIGS
    from dit_sparse.files import write_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS_ALL))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=list(MODES),
                        help="; ".join(f"{mode}: {text}" for mode, text in MODES.items()))
    parser.add_argument("--methods", nargs="+", default=[m for m in CONFIGS if m != "dense"],
                        help="sparse methods after diffusers, skip-attention and dense (default: all of the project)")
    parser.add_argument("--method-options", type=json.loads, default={},
                        help='JSON per method, e.g. \'{"random": {"density": 0.25}}\'')
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps; the median is kept")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; --smoke: a temp one)")
    parser.add_argument("--smoke", action="store_true", help="CPU run of the script's logic on tiny models")
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds; later models are skipped")
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=("bf16", "fp8", "int8"),
                        help="the sparse methods' precisions (issue 30): each beyond bf16 adds a '<method> <precision>' "
                             "row, e.g. --methods radial --precisions bf16 fp8")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows the day's file already has (same model, mode, method and options) instead "
                             "of running them again; their times are the baselines of the new rows. Rows are saved "
                             "one by one, so a run cut off by a time limit can be resumed")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models = [m for m in args.models if m in SMOKE_MODELS] or list(SMOKE_MODELS)
        device, dtype = torch.device("cpu"), torch.float32
        args.method_options = {"random": {"block_size": 16}, "radial": {"block_size": 16}, **args.method_options}
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark (--smoke runs the script's logic on CPU)")
        return 1
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    backend_log = _BackendLog()
    logging.getLogger("dit_sparse").addHandler(backend_log)
    logging.getLogger("dit_sparse").setLevel(logging.INFO)

    rows, notes = [], []
    start = time.time()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    default_out = Path(tempfile.gettempdir()) / "dit-sparse-smoke" if args.smoke else ROOT / "benchmarks" / "results"
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    stem = f"transformer_step-{gpu.replace('NVIDIA ', '').replace(' ', '-').lower()}-{date}"
    result = dict(
        command="python benchmarks/transformer_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        gpu=gpu, date=date, torch=torch.__version__, diffusers=diffusers.__version__, dtype=str(dtype),
        python=platform.python_version(), warmup=args.warmup, repeats=args.repeats, rows=rows, notes=notes,
    )
    path = out / f"{stem}.json"
    done = {}
    if args.resume:
        earlier, _ = earlier_rows(path, [], _row_key)
        done = {_row_key(r): r for r in (earlier or {}).get("rows", [])}
    merged = result

    def save() -> None:  # after every row, so a run cut short still leaves its rows
        nonlocal merged
        result.update(seconds=round(time.time() - start, 1), findings=findings(rows),
                      kernel_backends=sorted(set(backend_log.lines)))
        merged = _merge(path, result)
        write_atomic(path, json.dumps(merged, indent=1))
        write_atomic(out / f"{stem}.md", markdown(merged))

    for name in args.models:
        if time.time() - start > args.time_budget:
            notes.append(f"{MODELS_ALL[name].label}: skipped, the run passed its time budget of {args.time_budget} s")
            continue
        run_model(name, MODELS_ALL[name], args, device, dtype, rows, notes, done=done, save=save)
        save()
    print(markdown(merged))
    print(f"written: {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
