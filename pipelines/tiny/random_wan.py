"""A random-weight Wan 2.1 text-to-video pipeline folder at a real model's size, for timing `dit-sparse eval` on a GPU
without downloading weights:

    python -m dit_sparse.pipelines.tiny.random_wan --config wan2.1-1.3b --out wan13-random
    dit-sparse eval --model wan13-random --suite tiny --frames 81 --height 480 --width 832 --steps 8 --device cuda

The transformer has Wan2.1-T2V-1.3B's exact config (as `benchmarks/transformer_step.py`'s "wan13") and the VAE
Wan 2.1's (diffusers' `AutoencoderKLWan` defaults), so denoising and decoding cost what the real model's do. The text
side is a toy: the word-level tokenizer of the tiny model and a one-layer UMT5 encoder with the real width (4096,
the transformer's `text_dim`) instead of umt5-xxl: it runs once per video and is no part of what dit-sparse changes.
The videos are noise; only speed (and agreement between methods) means anything.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from dit_sparse.files import write_atomic
from dit_sparse.pipelines.models import RANDOM_WEIGHTS_MARKER

#: Transformer configs by name; "smoke" is a toy of the same classes for tests.
_WAN = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
            qk_norm="rms_norm_across_heads", cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024)  # fmt: skip
CONFIGS = {
    "wan2.1-1.3b": {
        "transformer": dict(_WAN, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
        "vae": {},  # AutoencoderKLWan's defaults are Wan 2.1's VAE
        "flow_shift": 3.0,  # diffusers' Wan 2.1 480p setting
    },
    "smoke": {
        "transformer": dict(_WAN, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32,
                            freq_dim=32),  # fmt: skip
        "vae": dict(base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=0),
        "flow_shift": 3.0,
    },
}


def build_random_wan_pipeline(config: str = "wan2.1-1.3b", seed: int = 0, device: str = "cpu"):
    """A `WanPipeline` with random weights (drawn from `seed`) at the named size, built on `device` in float32."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from dit_sparse.pipelines.tiny.random_tiny import build_tiny_tokenizer

    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; allowed: {sorted(CONFIGS)}")
    spec = CONFIGS[config]
    text_dim = spec["transformer"]["text_dim"]
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer), d_model=text_dim, d_kv=64, d_ff=256, num_layers=1,
                num_heads=max(1, text_dim // 64), relative_attention_num_buckets=32,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
        transformer = WanTransformer3DModel(**spec["transformer"])
        vae = AutoencoderKLWan(**spec["vae"])
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=spec["flow_shift"]
    )
    for module in (text_encoder, transformer, vae):
        module.eval()
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


def save_random_wan(out: str, config: str = "wan2.1-1.3b", seed: int = 0, dtype: str = "bfloat16",
                    device: str = "cpu") -> str:  # fmt: skip
    """Build the pipeline and `save_pretrained` it (safetensors) into `out`, which must not hold a model yet."""
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if os.path.exists(os.path.join(out, "model_index.json")):
        raise ValueError(f"{out!r} already holds a pipeline (model_index.json); choose another folder")
    pipe = build_random_wan_pipeline(config, seed, device)
    pipe.to(dtype=getattr(torch, dtype))
    pipe.save_pretrained(out, safe_serialization=True)
    # Says what the folder is to whoever reads it later (an eval report puts it in its header).
    marker = {"config": config, "seed": seed, "dtype": dtype, "weights": "random (untrained)"}
    write_atomic(os.path.join(out, RANDOM_WEIGHTS_MARKER), json.dumps(marker, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder to write (a diffusers pipeline folder)")
    parser.add_argument("--config", default="wan2.1-1.3b", choices=sorted(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="where to draw the weights (cuda is faster; about 6 GB)")
    args = parser.parse_args(argv)
    path = save_random_wan(args.out, args.config, args.seed, args.dtype, args.device)
    print(f"wrote a random-weight {args.config} Wan pipeline to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
