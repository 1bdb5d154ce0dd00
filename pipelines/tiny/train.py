"""Train the tiny reference Wan model on the shapes dataset; resumable in time-boxed chunks; export a diffusers folder.

    python -m dit_sparse.pipelines.tiny.train --checkpoint runs/tiny.pt --minutes 9 --device cuda   # repeat
    python -m dit_sparse.pipelines.tiny.train --checkpoint runs/tiny.pt --minutes 0 --export pipelines/tiny_model

The model is Wan 2.1's architecture at toy sizes, in the real diffusers/transformers classes, trained from scratch
the way Wan is trained, in two phases:

1. `AutoencoderKLWan`: reconstruction (L1, the first frame weighted as a whole latent frame) + a small KL, on
   whole videos. Not on short clips: the VAE is causal, its temporal receptive field spans most of a video, and
   trained on 9-frame clips it reconstructs frames 1-8 and falls apart after them (seen on the "mini" preset).
   Spatially it trains on 64-px crops (`vae_crop`). It starts from `init_vae` (a unit-gain signal path, zeroed
   residual branches, a small posterior variance: with PyTorch's default init the decoder's output stopped
   depending on its input within a few steps) at lr 1e-4, and trains through `vae_encode` / `vae_decode` (the
   same function as diffusers' encode / decode, in 2 causal chunks instead of one per latent frame, and without
   the output clamp, which would stop the gradient of an overshooting pixel). See pipelines/tiny/TRAINING_NOTES.md.
   Then the latents' per-channel mean and std are measured and written into the VAE's config (`latents_mean`,
   `latents_std`), which is how `WanPipeline` un-normalises latents before decoding.
2. `WanTransformer3DModel` with a tiny `UMT5EncoderModel` (word-level tokenizer), jointly, by rectified flow on the
   normalised latents: x_t = (1 - s) x_0 + s n, target n - x_0 (the "flow_prediction" that `WanPipeline`'s
   `UniPCMultistepScheduler(use_flow_sigmas=True)` integrates), timestep 1000 s, with s = shift u / (1 + (shift - 1) u),
   u ~ U(0, 1) and the scheduler's own shift. Captions are dropped to "" 10% of the time (the pipeline's negative
   prompt) so classifier-free guidance works. Text embeddings are zero-padded to 512 tokens as the pipeline does.
   An EMA of the transformer and text encoder is kept and is what gets exported.

Every run continues the checkpoint given (model, EMA, optimisers, step, RNG states, the data stream's position,
loss history, training seconds) and stops after `--minutes` (or `--chunk-steps`), saving it atomically. Runs are
reproducible: the data is a pure function of (data seed, sample index) and every random draw comes from a
checkpointed generator. `--export DIR` writes the `save_pretrained` folder (safetensors) with a model card README
(data, config, training time, loss curve, caption-following score).

Presets: "default" (the shipped model: 81 frames of 160 x 160 px = 21 x 10 x 10 = 2,100 video tokens; a checkpoint
of about 45 MiB), "mini" (the whole recipe at 48 x 48 px, 17 frames: a CPU check, about 30 min on one core) and
"smoke" (toy sizes for the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import platform
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_sparse.files import atomic_path

from .shapes import (
    BACKGROUND_COLOURS,
    DIRECTIONS,
    OPPOSITE,
    SHAPE_COLOURS,
    SHAPES,
    build_tokenizer,
    composite,
    render_videos,
    reversed_in_time,
    shape_alpha,
    video_params,
)
from . import DEFAULT_STEPS

TEXT_LEN = 512  # WanPipeline's default max_sequence_length: text embeddings are zero-padded to it
CHECKPOINT_FORMAT = 1
EXPORT_LIMIT_BYTES = 30_000_000  # what the shipped folder may weigh


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint is a checkpoint of: the video geometry, the architecture and the data seed (fixed per run)."""

    frames: int = 81
    height: int = 160
    width: int = 160
    latent_channels: int = 16
    vae_base_dim: int = 16  # the encoder's (training only)
    vae_decoder_base_dim: int = 24  # >= 22 channels at full size puts PyTorch's CPU conv3d on oneDNN (3x faster)
    vae_dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    vae_res_blocks: int = 1
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff_dim: int = 128
    heads: int = 3
    head_dim: int = 64
    layers: int = 6
    ffn_dim: int = 512
    freq_dim: int = 64
    flow_shift: float = 3.0
    data_seed: int = 0

    def __post_init__(self):
        if (self.frames - 1) % 4 or self.height % 16 or self.width % 16:
            raise ValueError(
                "frames must be 4k + 1 and height, width multiples of 16, "
                f"got {self.frames}, {self.height}, {self.width}"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.latent_channels, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)

    @property
    def video_tokens(self) -> int:
        _, frames, height, width = self.latent_shape
        return frames * (height // 2) * (width // 2)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: may be changed between chunks with flags (the change is recorded in the history)."""

    vae_steps: int = 6000
    vae_max_minutes: float = 4.0  # the VAE phase also ends after this much training (vae_steps becomes its step)
    dit_steps: int = 100000  # an upper bound: chunks end by time, and the EMA is exported whenever they stop
    vae_batch_size: int = 4
    vae_clip_frames: int = 81  # frames of the VAE's training clips (cut from the full videos): whole videos, see above
    vae_crop: int = 64  # side of the VAE's square training crops, in pixels (0: whole frames), see Trainer.crop
    vae_lr: float = 1e-4  # with init_vae; 5e-4 and up collapse the decoder to a constant (TRAINING_NOTES.md)
    kl_weight: float = 1e-4  # on the mean KL per latent element, against the mean L1 per pixel value
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    pool_size: int = 2048  # encoded videos the transformer samples from; 0: encode each batch afresh
    pool_refresh: int = 2  # new videos encoded into the pool per step (the oldest are replaced); 8 cost 77% of a step
    stats_videos: int = 256  # videos encoded to measure the latents' mean and std
    log_every: int = 50
    # The direction words' weak signal (TRAINING_NOTES.md, "The transformer does not read the direction words"):
    shape_weight: float = 0.0  # extra flow-loss weight on the latent cells the shape covers (weight 1 + this)
    pair_reversed: bool = False  # each drawn video comes with its time-reversed twin, under the same noise and sigma

    def __post_init__(self):
        if self.shape_weight < 0:
            raise ValueError(f"shape_weight must be >= 0, got {self.shape_weight!r}")
        if self.pair_reversed:
            odd = {name: getattr(self, name) for name in ("batch_size", "pool_size", "pool_refresh")}
            odd = {name: value for name, value in odd.items() if value % 2}
            if odd:
                raise ValueError(f"pair_reversed needs even batch_size, pool_size and pool_refresh, got {odd}")


PRESETS = {
    "default": (ModelConfig(), TrainConfig()),
    "smoke": (
        ModelConfig(
            frames=9,
            height=32,
            width=32,
            latent_channels=4,
            vae_base_dim=4,
            vae_decoder_base_dim=4,
            vae_dim_mult=(1, 1, 1, 1),
            text_dim=16,
            text_layers=1,
            text_heads=2,
            text_ff_dim=32,
            heads=2,
            head_dim=12,
            layers=1,
            ffn_dim=32,
            freq_dim=16,
        ),
        TrainConfig(
            vae_steps=2,
            dit_steps=3,
            vae_batch_size=2,
            batch_size=2,
            warmup_steps=2,
            pool_size=4,
            pool_refresh=1,
            stats_videos=4,
            log_every=1,
        ),
    ),  # fmt: skip
    "mini": (  # a CPU-sized check of the whole recipe (about 45 min on one core; too short for a good VAE)
        ModelConfig(
            frames=17,
            height=48,
            width=48,
            latent_channels=8,
            vae_decoder_base_dim=16,
            text_dim=32,
            text_heads=2,
            text_ff_dim=64,
            heads=2,
            head_dim=32,
            layers=4,
            ffn_dim=256,
            freq_dim=32,
        ),
        TrainConfig(
            vae_steps=1000,
            vae_max_minutes=22.0,
            dit_steps=2500,
            vae_batch_size=4,
            vae_clip_frames=17,
            batch_size=32,
            warmup_steps=100,
            pool_size=512,
            pool_refresh=4,
            stats_videos=64,
            log_every=50,
        ),
    ),  # fmt: skip
}


#: The `TrainConfig` fields a flag may set, for a new run or between chunks of one.
FLAG_FIELDS = (
    "vae_steps", "vae_max_minutes", "dit_steps", "batch_size", "vae_batch_size", "vae_crop", "vae_lr", "lr",
    "pool_size", "pool_refresh", "log_every", "shape_weight", "pair_reversed",
)  # fmt: skip


# ---- the model -----------------------------------------------------------------------------------------------------
def build_components(config: ModelConfig, seed: int = 0, vae_init: bool = True) -> dict:
    """Freshly initialised pipeline components (weights from `seed`; the global RNG is left as it was). `vae_init`:
    apply `init_vae` (False: PyTorch's default init, for A/B experiments)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=config.text_dim,
                d_kv=config.text_dim // config.text_heads,
                d_ff=config.text_ff_dim,
                num_layers=config.text_layers,
                num_heads=config.text_heads,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                dropout_rate=0.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=config.heads,
            attention_head_dim=config.head_dim,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            text_dim=config.text_dim,
            freq_dim=config.freq_dim,
            ffn_dim=config.ffn_dim,
            num_layers=config.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
        torch.nn.init.zeros_(transformer.proj_out.weight)  # start as the zero velocity: a calm first step
        torch.nn.init.zeros_(transformer.proj_out.bias)
        vae = AutoencoderKLWan(
            base_dim=config.vae_base_dim,
            decoder_base_dim=config.vae_decoder_base_dim,
            z_dim=config.latent_channels,
            dim_mult=list(config.vae_dim_mult),
            num_res_blocks=config.vae_res_blocks,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * config.latent_channels,  # measured after the VAE phase
            latents_std=[1.0] * config.latent_channels,
        )
        if vae_init:
            init_vae(vae)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=config.flow_shift
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
    }


def init_vae(vae, zero_residuals: bool = True, logvar_bias: float | None = -6.0, unit_gain: bool = True) -> None:
    """Training-friendly init of a fresh `AutoencoderKLWan` (weights only; the architecture stays diffusers'). See
    pipelines/tiny/TRAINING_NOTES.md for the experiments behind it.

    - `unit_gain`: the convolutions on the signal path (conv_in/out, the resamplers, the shortcuts; not the residual
      branches) get a variance-preserving init (Kaiming normal, linear gain, zero bias) and `quant_conv` /
      `post_quant_conv` start as the identity. PyTorch's default conv init shrinks activations by about sqrt(3) per
      layer, so the latent reached the decoder's residual stream at an RMS of ~0.09 while the residual branches (which
      RMS-normalise their input, so see only its direction) add O(1), input-independent terms: within ~15 steps the
      decoder's output stopped depending on its input at all (a constant colour) and stayed there.
    - `zero_residuals`: zero the last conv of every residual block (and the middle blocks' attention output
      projection), so each block starts as its shortcut and the latent's signal is not swamped at the start.
    - `logvar_bias`: the posterior's log-variance bias (the second half of `quant_conv`'s outputs): a posterior that
      starts at unit variance buries the latent means in noise (the H200 run's logvar never left ~0 in 346 steps).
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock

    with torch.no_grad():
        if unit_gain:
            branch = set()
            for module in vae.modules():
                if isinstance(module, WanResidualBlock):
                    branch |= {module.conv1, module.conv2}
                elif isinstance(module, WanAttentionBlock):
                    branch |= {module.to_qkv, module.proj}
            for module in vae.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module not in branch:
                    if module in (vae.quant_conv, vae.post_quant_conv):
                        torch.nn.init.dirac_(module.weight)
                    else:
                        torch.nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                    torch.nn.init.zeros_(module.bias)
        if zero_residuals:
            for module in vae.modules():
                if isinstance(module, WanResidualBlock):
                    torch.nn.init.zeros_(module.conv2.weight)
                    torch.nn.init.zeros_(module.conv2.bias)
                elif isinstance(module, WanAttentionBlock):
                    torch.nn.init.zeros_(module.proj.weight)
                    torch.nn.init.zeros_(module.proj.bias)
        if logvar_bias is not None:
            z_dim = vae.config.z_dim
            vae.quant_conv.bias[z_dim:] = logvar_bias


def vae_encode(vae, videos: torch.Tensor):
    """`vae.encode(videos).latent_dist` computed in two causal chunks (the first frame, then all the others) instead
    of diffusers' 1 + 4 + 4 + ... frame chunks: the same outputs (the causal convolutions' caches carry the previous
    frames across the chunk boundary exactly as between diffusers' chunks) and the same gradients, in 2 encoder calls
    instead of 1 + (T - 1) / 4 (GPU kernel launches, not FLOPs, dominate at training sizes). (B, 3, T, H, W) with
    T = 4k + 1."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    cache = [None] * vae._cached_conv_counts["encoder"]
    chunks = [vae.encoder(videos[:, :, :1], feat_cache=cache, feat_idx=[0])]
    if videos.shape[2] > 1:
        chunks.append(vae.encoder(videos[:, :, 1:], feat_cache=cache, feat_idx=[0]))
    return DiagonalGaussianDistribution(vae.quant_conv(torch.cat(chunks, dim=2)))


def vae_decode(vae, latents: torch.Tensor, clamp: bool = False, chunked: bool = False) -> torch.Tensor:
    """`vae.decode(latents).sample` without its final clamp to [-1, 1] (for training: a clamp gives no gradient to an
    output that overshoots, and the data's saturated colours sit at exactly -1 or 1), in two causal chunks (the first
    latent frame, then the others; the same outputs as diffusers' one-latent-frame chunks) unless `chunked`."""
    cache = [None] * vae._cached_conv_counts["decoder"]
    x = vae.post_quant_conv(latents)
    if chunked:
        pieces = [x[:, :, i : i + 1] for i in range(x.shape[2])]
    else:
        pieces = [x[:, :, :1]] + ([x[:, :, 1:]] if x.shape[2] > 1 else [])
    out = torch.cat(
        [vae.decoder(piece, feat_cache=cache, feat_idx=[0], first_chunk=i == 0) for i, piece in enumerate(pieces)],
        dim=2,
    )
    return out.clamp(-1.0, 1.0) if clamp else out


def encode_latents(vae, videos: torch.Tensor, chunk: int = 16, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Normalised latents `(B, C, F, h, w)` float32 of videos `(B, 3, T, H, W)` in [-1, 1]: the posterior mean
    (`vae_encode`, `chunk` videos at a time, each under `autocast()`), standardised by the VAE config's stats."""
    latents = []
    for start in range(0, videos.shape[0], chunk):
        with autocast():
            latents.append(vae_encode(vae, videos[start : start + chunk]).mode().float())
    mean, std = (
        torch.tensor(vae.config[name], device=videos.device).view(1, -1, 1, 1, 1)
        for name in ("latents_mean", "latents_std")
    )
    return (torch.cat(latents) - mean) / std


def latent_shape_masks(alpha: torch.Tensor) -> torch.Tensor:
    """The latent cells a shape touches, `(B, F, H / 8, W / 8)` in [0, 1], from its pixel coverage `alpha`
    `(B, T, H, W)` (`shape_alpha`): the maximum over each cell's 8 x 8 pixels and its frames, grouped as the causal
    VAE groups them (the first latent frame is frame 0 alone, each later one the next 4 frames)."""
    batch, frames, height, width = alpha.shape
    if (frames - 1) % 4 or height % 8 or width % 8:
        raise ValueError(f"alpha must be (B, 4k + 1, 8m, 8n), got {tuple(alpha.shape)}")
    later = alpha[:, 1:].reshape(batch, (frames - 1) // 4, 4, height, width).amax(dim=2)
    return F.max_pool2d(torch.cat([alpha[:, :1], later], dim=1), 8)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encode_text(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """Caption embeddings as `WanPipeline` makes them: `(B, TEXT_LEN, text_dim)`, zero past each caption's tokens."""
    tokens = tokenizer(captions, padding="longest", return_tensors="pt")
    mask = tokens.attention_mask.to(device)  # (B, L)
    hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state * mask[..., None]  # (B, L, D)
    return F.pad(hidden, (0, 0, 0, TEXT_LEN - hidden.shape[1]))


def flow_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's time shift applied to u in [0, 1]: more of the training where sampling spends its steps."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def flow_matching_inputs(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow as `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)` samples it:
    the noisy latents (1 - s) x0 + s noise, the transformer's timestep 1000 s, and the target velocity noise - x0
    (so that x0 = noisy - s * velocity, the scheduler's x0 estimate). x0, noise `(B, C, F, h, w)`; sigma `(B,)`."""
    s = sigma.view(-1, 1, 1, 1, 1)
    return (1.0 - s) * x0 + s * noise, sigma * 1000.0, noise - x0


# ---- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    """The training state (models, EMA, optimisers, generator, data position, history) and the two phases' steps."""

    def __init__(
        self, model_config: ModelConfig, train_config: TrainConfig, device: torch.device, seed: int,
        compile_transformer: bool = False,
    ):  # fmt: skip
        self.model_config, self.train_config, self.device, self.seed = model_config, train_config, device, seed
        components = build_components(model_config, seed)
        self.tokenizer, self.scheduler = components["tokenizer"], components["scheduler"]
        self.vae = components["vae"].to(device)
        self.transformer = components["transformer"].to(device)
        # The transformer's training forward: torch.compile'd on request (same parameters; checkpoints and exports
        # keep using `self.transformer`, so their keys are unchanged). The tiny model's step is launch-bound.
        self.transformer_forward = torch.compile(self.transformer) if compile_transformer else self.transformer
        self.text_encoder = components["text_encoder"].to(device)
        self.ema = [p.detach().clone() for p in self._dit_parameters()]
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=train_config.vae_lr, betas=(0.9, 0.99))
        self.dit_optimizer = torch.optim.AdamW(
            self._dit_parameters(), lr=train_config.lr, betas=(0.9, 0.99), weight_decay=train_config.weight_decay
        )
        self.generator = torch.Generator(device).manual_seed(seed)
        self.vae_step = self.dit_step = 0
        self.next_index = 0  # the next dataset index to draw: the data stream's position
        self.latent_stats_done = False
        self.history: list[dict] = []  # {"phase", "step", "loss", ...} per log interval; config changes too
        self.seconds = {"vae": 0.0, "dit": 0.0}
        self.data_seconds = 0.0  # of the transformer phase, in this chunk: rendering and encoding its batches
        self.pool = None  # the transformer phase's encoded videos, rebuilt from `next_index` on resume
        self.pool_drawn = False  # whether the pool's first P videos were drawn (a resume then re-encodes, not draws)
        self.warmup_start = 0  # the transformer step the lr warmup counts from (a compact resume restarts it)
        self.checkpoint_device = None  # the device type of the checkpoint resumed from, if any

    # ---- bookkeeping
    def _dit_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.transformer.parameters()) + list(self.text_encoder.parameters())

    @property
    def phase(self) -> str:
        if self.vae_step < self.train_config.vae_steps:
            return "vae"
        return "dit" if self.dit_step < self.train_config.dit_steps else "done"

    def _clock(self) -> float:
        """time.monotonic() once the device has finished its queued work (to time the data side of a step)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.monotonic()

    def autocast(self):
        enabled = self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def state_dict(self, compact: bool = False) -> dict:
        """Everything a resume needs. `compact`: without the raw transformer and text-encoder weights and without
        the optimiser state (about the export's size instead of 2.4x it, to carry a run from one session to the
        next): a resume from it restarts those weights from their EMA, with a fresh optimiser and a new lr warmup."""
        if compact and self.phase == "vae":
            raise ValueError(
                f"a compact checkpoint needs the VAE phase finished (step {self.vae_step} of "
                f"{self.train_config.vae_steps}): it keeps no optimiser state, and the VAE has no EMA to restart from"
            )
        state = {
            "format": CHECKPOINT_FORMAT,
            "model_config": dataclasses.asdict(self.model_config),
            "train_config": dataclasses.asdict(self.train_config),
            "seed": self.seed,
            "vae": self.vae.state_dict(),
            "vae_config": dict(self.vae.config),
            "transformer": self.transformer.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema": [p.cpu() for p in self.ema],
            "vae_optimizer": _compact(self.vae_optimizer.state_dict()) if self.phase == "vae" else None,
            "dit_optimizer": _compact(self.dit_optimizer.state_dict()),
            "generator": self.generator.get_state(),  # every random draw of training comes from it
            "device_type": self.device.type,
            "vae_step": self.vae_step,
            "dit_step": self.dit_step,
            "next_index": self.next_index,
            "latent_stats_done": self.latent_stats_done,
            "pool_drawn": self.pool_drawn,
            "history": self.history,
            "seconds": self.seconds,
            "warmup_start": self.warmup_start,
            "compact": compact,
        }
        if compact:
            state.update(transformer=None, text_encoder=None, dit_optimizer=None)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(
            latents_mean=state["vae_config"]["latents_mean"], latents_std=state["vae_config"]["latents_std"]
        )
        for ema, saved in zip(self.ema, state["ema"]):
            ema.copy_(saved)
        compact = state.get("compact", False)
        self.warmup_start = state["dit_step"] if compact else state.get("warmup_start", 0)
        if compact:  # the weights restart from their EMA, the optimiser afresh with a new warmup
            with torch.no_grad():
                for param, ema in zip(self._dit_parameters(), self.ema):
                    param.copy_(ema)
        else:
            self.transformer.load_state_dict(state["transformer"])
            self.text_encoder.load_state_dict(state["text_encoder"])
            self.dit_optimizer.load_state_dict(state["dit_optimizer"])
        if state["vae_optimizer"] is not None:
            self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.checkpoint_device = state["device_type"]
        if state["device_type"] == self.device.type:
            self.generator.set_state(state["generator"])
        else:  # a CUDA generator's state does not fit a CPU one: a fresh stream, deterministic in the step
            self.generator.manual_seed(self.seed + 1_000_003 * (state["vae_step"] + state["dit_step"] + 1))
            print(f"note: checkpoint from {state['device_type']}, running on {self.device.type}: new noise stream")
        self.vae_step, self.dit_step = state["vae_step"], state["dit_step"]
        self.next_index, self.latent_stats_done = state["next_index"], state["latent_stats_done"]
        self.pool_drawn = state["pool_drawn"]
        self.history, self.seconds = state["history"], state["seconds"]
        if compact:
            self.history.append({"phase": self.phase, "step": self.dit_step, "resumed": "compact (EMA weights)"})

    def set_train_config(self, train_config: TrainConfig) -> None:
        """Adopt changed flags between chunks; the change is recorded in the history."""
        changed = {k: v for k, v in dataclasses.asdict(train_config).items() if getattr(self.train_config, k) != v}
        if not changed:
            return
        self.history.append({"phase": self.phase, "step": self._step(), "changed": changed})
        self.train_config = train_config
        for group in self.vae_optimizer.param_groups:
            group["lr"] = train_config.vae_lr
        for group in self.dit_optimizer.param_groups:
            group["weight_decay"] = train_config.weight_decay
        if {"pool_size", "pair_reversed"} & changed.keys():  # the pool's layout changes: rebuilt at the next batch
            self.pool = None

    def _step(self) -> int:
        return self.vae_step if self.phase == "vae" else self.dit_step

    # ---- data
    def _take_indices(self, count: int) -> list[int]:
        indices = list(range(self.next_index, self.next_index + count))
        self.next_index += count
        return indices

    def render(self, indices: list[int], frames: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """Videos `(B, 3, T, H, W)` in [-1, 1] on the device, and their captions."""
        params = [video_params(self.model_config.data_seed, index) for index in indices]
        videos, captions, _ = self._render(params, frames)
        return videos, captions

    def _render(self, params: list, frames: int | None = None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Videos `(B, 3, T, H, W)` in [-1, 1] on the device, captions, and the shapes' coverage `(B, T, H, W)`."""
        config = self.model_config
        alpha = shape_alpha(params, frames or config.frames, config.height, config.width, self.device)
        videos = composite(params, alpha).permute(0, 4, 1, 2, 3) * 2.0 - 1.0
        return videos, [p.caption for p in params], alpha

    def _members(self) -> int:
        """Videos per drawn dataset index in the transformer phase: 2 (it and its time-reversed twin) or 1."""
        return 2 if self.train_config.pair_reversed else 1

    def render_training(self, indices: list[int]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """The transformer phase's videos of `indices`: each video (followed by its time-reversed twin when
        `pair_reversed`), its normalised latent `(N, C, F, h, w)`, captions and `latent_shape_masks` `(N, F, h, w)`."""
        params = [video_params(self.model_config.data_seed, index) for index in indices]
        if self._members() == 2:
            params = [member for p in params for member in (p, reversed_in_time(p))]
        videos, captions, alpha = self._render(params)
        return self.encode(videos), captions, latent_shape_masks(alpha)

    @torch.no_grad()
    def encode(self, videos: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Normalised latents `(B, C, F, h, w)` float32 (`encode_latents` under the training autocast)."""
        return encode_latents(self.vae, videos, chunk, self.autocast)

    # ---- phase 1: the VAE
    def vae_train_step(self) -> float:
        config = self.train_config
        self.vae.train()
        indices = self._take_indices(config.vae_batch_size)
        videos, _ = self.render(indices)  # (B, 3, T, H, W)
        clip = min(config.vae_clip_frames, videos.shape[2])
        start = int(torch.randint(videos.shape[2] - clip + 1, (1,), generator=self.generator, device=self.device))
        videos = self.crop(videos[:, :, start : start + clip], indices, config.vae_crop)
        with self.autocast():
            posterior = vae_encode(self.vae, videos)  # = vae.encode(videos).latent_dist, in 2 chunks, see there
            reconstruction = vae_decode(self.vae, posterior.sample(generator=self.generator))  # unclamped
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        per_frame = (reconstruction.float() - videos).abs().mean(dim=(0, 1, 3, 4))  # (T,)
        weights = torch.ones_like(per_frame)
        weights[0] = 4.0  # the first frame is a latent frame of its own: weigh it as the 4 of any other latent frame
        loss = (per_frame * weights).sum() / weights.sum() + config.kl_weight * kl
        self.vae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), config.grad_clip)
        self.vae_optimizer.step()
        self.vae_step += 1
        return loss.item()

    def crop(self, videos: torch.Tensor, indices: list[int], size: int) -> torch.Tensor:
        """Square `size`-pixel crops of every frame of `videos` (B, 3, T, H, W), at offsets that are multiples of the
        VAE's 8x spatial stride: half of them around the shape's path (its centre mid-clip, jittered by up to a
        quarter crop), half anywhere. The VAE is convolutional, so crops train the weights whole frames use, at a
        fraction of the cost (the attention of its middle block sees fewer positions, which it does not depend on)."""
        _, _, frames, height, width = videos.shape
        if not size or size >= min(height, width):
            return videos
        draws = torch.rand(len(indices), 3, generator=self.generator, device=self.device).tolist()
        crops = []
        for video, index, (near_shape, u, v) in zip(videos, indices, draws):
            if near_shape < 0.5:
                x, y = video_params(self.model_config.data_seed, index).centres(frames, height, width)[frames // 2]
                left, top = x - size / 2 + (u - 0.5) * size / 2, y - size / 2 + (v - 0.5) * size / 2
            else:
                left, top = u * (width - size), v * (height - size)
            left, top = (min(max(int(round(c / 8)) * 8, 0), (limit - size) // 8 * 8) for c, limit in
                         ((left, width), (top, height)))  # fmt: skip
            crops.append(video[:, :, top : top + size, left : left + size])
        return torch.stack(crops)

    @torch.no_grad()
    def measure_latent_stats(self) -> None:
        """Per-channel mean and std of the trained VAE's latents over fresh videos, into the VAE's config."""
        self.vae.eval()
        self.vae.register_to_config(
            latents_mean=[0.0] * self.model_config.latent_channels,
            latents_std=[1.0] * self.model_config.latent_channels,
        )
        latents = []
        for start in range(0, self.train_config.stats_videos, 16):
            count = min(16, self.train_config.stats_videos - start)
            latents.append(self.encode(self.render(self._take_indices(count))[0]))
        latents = torch.cat(latents).transpose(0, 1).flatten(1)  # (C, N)
        mean, std = latents.mean(dim=1), latents.std(dim=1).clamp_min(1e-3)
        self.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        self.latent_stats_done = True
        self.history.append({"phase": "stats", "step": 0, "latents_mean": mean.tolist(), "latents_std": std.tolist()})

    # ---- phase 2: the transformer and text encoder
    def _pool_slots(self, indices: list[int]) -> list[int]:
        """The pool slots of dataset videos `indices` (and of their twins, right after each, when paired)."""
        members = self._members()
        pairs = self.train_config.pool_size // members
        return [members * (index % pairs) + member for index in indices for member in range(members)]

    def _fill_pool(self) -> None:
        """Build the pool: dataset video i (and its twin) in `_pool_slots([i])`. The first time, new videos are drawn
        to fill it; on a resume the last ones drawn are re-encoded, which is the pool as it was (it always holds the
        last ones drawn)."""
        size = self.train_config.pool_size
        drawn = size // self._members()
        if not self.pool_drawn or self.next_index < drawn:
            self._take_indices(drawn)
            self.pool_drawn = True
        indices = list(range(self.next_index - drawn, self.next_index))
        latents = torch.empty((size, *self.model_config.latent_shape), device=self.device)
        masks = torch.empty((size, *self.model_config.latent_shape[1:]), device=self.device)
        captions = [""] * size
        step = 16 // self._members()  # videos rendered and encoded at a time
        for start in range(0, drawn, step):
            self._write_pool((latents, captions, masks), indices[start : start + step])
        self.pool = (latents, captions, masks)

    def _write_pool(self, pool: tuple, indices: list[int]) -> None:
        latents, captions, masks = pool
        slots = self._pool_slots(indices)
        new_latents, new_captions, new_masks = self.render_training(indices)
        latents[slots], masks[slots] = new_latents, new_masks
        for slot, caption in zip(slots, new_captions):
            captions[slot] = caption

    def batch(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """A training batch of normalised latents, captions and latent shape masks: from the pool (refreshed first),
        or fresh. When paired, twins are adjacent (rows 2i and 2i + 1)."""
        config = self.train_config
        members = self._members()
        if config.pool_size == 0:
            return self.render_training(self._take_indices(config.batch_size // members))
        if self.pool is None:
            self._fill_pool()
        if config.pool_refresh:
            self._write_pool(self.pool, self._take_indices(config.pool_refresh // members))
        latents, captions, masks = self.pool
        pairs = torch.randint(
            config.pool_size // members, (config.batch_size // members,), generator=self.generator, device=self.device
        )
        slots = (pairs[:, None] * members + torch.arange(members, device=self.device)).flatten()
        return latents[slots], [captions[i] for i in slots.tolist()], masks[slots]

    def dit_train_step(self) -> torch.Tensor:
        """One transformer step; the loss comes back as a device tensor, read only at log time (no sync per step)."""
        config = self.train_config
        self.transformer.train()
        self.text_encoder.train()
        self.vae.eval()
        started = self._clock()
        x0, captions, masks = self.batch()  # (B, C, F, h, w), B, (B, F, h, w)
        self.data_seconds += self._clock() - started
        members, draws = self._members(), x0.shape[0] // self._members()  # twins share noise, sigma and dropout
        drop = torch.rand(draws, generator=self.generator, device=self.device) < config.caption_dropout
        drop = drop.repeat_interleave(members)
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        u = torch.rand(draws, generator=self.generator, device=self.device).repeat_interleave(members)
        noise = torch.randn((draws, *x0.shape[1:]), generator=self.generator, device=self.device)
        noise = noise.repeat_interleave(members, dim=0)
        noisy, timestep, target = flow_matching_inputs(x0, noise, flow_sigmas(u, self.model_config.flow_shift))
        lr = config.lr * min(1.0, (self.dit_step - self.warmup_start + 1) / max(config.warmup_steps, 1))
        for group in self.dit_optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            text = encode_text(self.tokenizer, self.text_encoder, captions, self.device)
            velocity = self.transformer_forward(
                hidden_states=noisy, timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]
        squared = (velocity.float() - target) ** 2
        loss = squared.mean()  # what is logged: the plain flow loss, comparable across recipes
        objective = loss
        if config.shape_weight:
            weight = 1.0 + config.shape_weight * masks[:, None]  # (B, 1, F, h, w)
            objective = (squared * weight).mean() / weight.mean()
        self.dit_optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(self._dit_parameters(), config.grad_clip)
        self.dit_optimizer.step()
        self.dit_step += 1
        decay = min(config.ema_decay, (1.0 + self.dit_step) / (10.0 + self.dit_step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self._dit_parameters()], 1.0 - decay)
        return loss.detach()

    # ---- probes and export
    @contextlib.contextmanager
    def ema_weights(self):
        """The transformer and text encoder hold their EMA weights (in eval mode) inside the block, their training
        weights and mode again after it."""
        params = self._dit_parameters()
        saved = [p.detach().clone() for p in params]
        modes = [module.training for module in (self.transformer, self.text_encoder)]
        with torch.no_grad():
            for param, ema in zip(params, self.ema):
                param.copy_(ema)
        self.transformer.eval()
        self.text_encoder.eval()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param.copy_(value)
            for module, mode in zip((self.transformer, self.text_encoder), modes):
                module.train(mode)

    def probe(self, n: int = 16) -> dict[str, float]:
        """`caption_sensitivity` of the EMA weights, on the training device (no copies: seconds on a GPU)."""
        self.vae.eval()
        parts = {"vae": self.vae, "tokenizer": self.tokenizer, "text_encoder": self.text_encoder}
        with self.ema_weights():
            pipe = types.SimpleNamespace(transformer=self.transformer, **parts)
            return caption_sensitivity(pipe, self.model_config, n=n, device=self.device)

    def pipeline(self, use_ema: bool = True):
        """A `WanPipeline` of CPU copies of the models (the EMA weights for the transformer and text encoder)."""
        from diffusers import WanPipeline

        transformer, text_encoder = copy.deepcopy(self.transformer).cpu(), copy.deepcopy(self.text_encoder).cpu()
        if use_ema:
            with torch.no_grad():
                for param, ema in zip(list(transformer.parameters()) + list(text_encoder.parameters()), self.ema):
                    param.copy_(ema)
        modules = (copy.deepcopy(self.vae).cpu(), transformer, text_encoder)
        for module in modules:
            module.eval()
        return WanPipeline(
            tokenizer=self.tokenizer, text_encoder=text_encoder, vae=modules[0], scheduler=self.scheduler,
            transformer=transformer,
        )  # fmt: skip


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def _compact(optimizer_state: dict) -> dict:
    """An optimiser state with Adam's moments in bfloat16 (CPU): a third off the checkpoint, so that it crosses the
    device machine's transfer limits (16 MiB a file, 64 MiB a call) in 3 parts. `load_state_dict` casts them back to
    the parameters' float32; a resume is exact but for that rounding."""
    state = {
        index: {
            name: value.to("cpu", torch.bfloat16) if name in ("exp_avg", "exp_avg_sq") else value.cpu()
            for name, value in values.items()
        }
        for index, values in optimizer_state["state"].items()
    }
    return {**optimizer_state, "state": state}


def save_checkpoint(trainer: Trainer, path: str, compact: bool = False) -> None:
    """Write the checkpoint (`compact`: see `Trainer.state_dict`) atomically (a temporary file renamed over `path`)."""
    with atomic_path(path) as tmp:
        torch.save(trainer.state_dict(compact=compact), tmp)


def open_trainer(args: argparse.Namespace, device: torch.device) -> Trainer:
    """The trainer of `args.checkpoint` (resumed) or a fresh one of `args.preset`, with the flags' overrides."""
    state = None
    if args.checkpoint and os.path.exists(args.checkpoint):
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint {args.checkpoint!r} has format {state.get('format')}, not {CHECKPOINT_FORMAT}"
            )
        model_config = ModelConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()}
        )
        if args.preset is not None and dataclasses.asdict(PRESETS[args.preset][0]) != dataclasses.asdict(model_config):
            raise ValueError(
                f"checkpoint {args.checkpoint!r} is not of preset {args.preset!r}; drop --preset to resume"
            )
        train_config = TrainConfig(**state["train_config"])
        seed = state["seed"]
    else:
        model_config, train_config = PRESETS[args.preset or "default"]
        seed = args.seed
    overrides = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    trainer = Trainer(model_config, train_config, device, seed, compile_transformer=args.compile)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"resumed {args.checkpoint}: vae step {trainer.vae_step}, transformer step {trainer.dit_step}")
    trainer.set_train_config(dataclasses.replace(trainer.train_config, **overrides))
    return trainer


# ---- the loop ------------------------------------------------------------------------------------------------------
def train(
    trainer: Trainer, deadline: float, chunk_steps: int | None, checkpoint: str | None, save_every: float,
    probe_every: float = 0.0,
) -> None:
    """Train until the schedule is done, the deadline (time.monotonic()) passes, or `chunk_steps` steps ran; every
    `probe_every` seconds of the transformer phase (0: never), and at the end, log `Trainer.probe`."""
    config, device = trainer.train_config, trainer.device
    if trainer.phase != "done" and time.monotonic() < deadline and chunk_steps != 0:
        trainer.history.append({"phase": trainer.phase, "step": trainer._step(), "chunk": _device_text(device)})
    steps = 0
    window: list[float] = []
    window_start = last_save = last_probe = time.monotonic()
    while trainer.phase != "done" and time.monotonic() < deadline and (chunk_steps is None or steps < chunk_steps):
        phase = trainer.phase
        if phase == "dit" and not trainer.latent_stats_done:
            _measure_latent_stats(trainer)
            continue
        started = time.monotonic()
        loss = trainer.vae_train_step() if phase == "vae" else trainer.dit_train_step()
        trainer.seconds[phase] += time.monotonic() - started
        if phase == "vae" and trainer.phase == "vae" and trainer.seconds["vae"] >= config.vae_max_minutes * 60.0:
            print(f"[vae] {config.vae_max_minutes} min of VAE training: the VAE phase ends at step {trainer.vae_step}")
            trainer.set_train_config(dataclasses.replace(config, vae_steps=trainer.vae_step))
            config = trainer.train_config
        window.append(loss)
        steps += 1
        step, total = (trainer.vae_step, config.vae_steps) if phase == "vae" else (trainer.dit_step, config.dit_steps)
        if step % config.log_every == 0 or step == total or trainer.phase != phase:
            elapsed = time.monotonic() - window_start
            mean = sum(float(loss) for loss in window) / len(window)
            trainer.history.append({"phase": phase, "step": step, "loss": mean, "seconds": trainer.seconds[phase]})
            memory = f", {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
            data = f", data {trainer.data_seconds / elapsed:.0%}" if phase == "dit" else ""
            batch = config.vae_batch_size if phase == "vae" else config.batch_size
            rate = len(window) / elapsed
            print(
                f"[{phase}] step {step}/{total} loss {mean:.4f} ({rate:.2f} steps/s, {rate * batch:.0f} samples/s"
                f"{data}{memory}; "
                f"{trainer.seconds[phase] / 60:.1f} min in this phase)",
                flush=True,
            )
            window, window_start, trainer.data_seconds = [], time.monotonic(), 0.0
        if phase == "vae" and trainer.phase != "vae":
            _measure_latent_stats(trainer)  # now, so that a checkpoint never holds a finished VAE without its stats
        if probe_every and phase == "dit" and time.monotonic() - last_probe > probe_every:
            _log_probe(trainer)
            last_probe = time.monotonic()
        if checkpoint and time.monotonic() - last_save > save_every:
            save_checkpoint(trainer, checkpoint)
            last_save = time.monotonic()
    if probe_every and steps and trainer.dit_step and trainer.phase != "vae":
        _log_probe(trainer)


def _log_probe(trainer: Trainer) -> None:
    losses = trainer.probe()
    trainer.history.append({"phase": "probe", "step": trainer.dit_step, "sensitivity": losses})
    print(f"[probe] step {trainer.dit_step}: flow loss by caption: {_losses_text(losses)}", flush=True)


def _measure_latent_stats(trainer: Trainer) -> None:
    started = time.monotonic()
    trainer.measure_latent_stats()
    trainer.seconds["vae"] += time.monotonic() - started
    print(f"latents: mean {[round(v, 3) for v in trainer.vae.config.latents_mean]}")
    print(f"latents: std  {[round(v, 3) for v in trainer.vae.config.latents_std]}")


# ---- the exported folder -----------------------------------------------------------------------------------------
def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def export(
    trainer: Trainer, folder: str, score_prompts: int, steps: int, guidance: float, device: torch.device
) -> dict:
    """Write the `save_pretrained` folder, load it back with `WanPipeline.from_pretrained`, score caption following
    on it, and write the model card (README.md), the loss curves (loss.png) and samples.png."""
    from diffusers import WanPipeline

    from .caption_score import caption_following

    if not trainer.latent_stats_done:
        raise ValueError(f"the VAE phase is not finished (step {trainer.vae_step}): train on before exporting")
    os.makedirs(folder, exist_ok=True)
    trainer.pipeline().save_pretrained(folder, safe_serialization=True)
    pipe = WanPipeline.from_pretrained(folder).to(device)  # float32, as saved
    config = trainer.model_config
    result = None
    if score_prompts:
        result = caption_following(
            pipe, n=score_prompts, frames=config.frames, height=config.height, width=config.width, steps=steps,
            guidance=guidance,
        )  # fmt: skip
        result["reconstructed_ok"] = reconstruction_following(pipe.vae, config, score_prompts, device)
        result["sensitivity"] = caption_sensitivity(pipe, config, device=device)
        _write_samples(result, os.path.join(folder, "samples.png"))
        print(
            f"caption following: {result['n_ok']}/{score_prompts} (the same prompts' true videos through the VAE: "
            f"{result['reconstructed_ok']}/{score_prompts})"
        )
        print(f"flow loss by caption: {_losses_text(result['sensitivity'])}")
    _write_loss_curve(trainer.history, os.path.join(folder, "loss.png"))
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as file:
        file.write(model_card(trainer, result, steps, guidance))
    size = folder_bytes(folder)
    print(f"exported {folder}: {size / 2**20:.1f} MiB")
    if size > EXPORT_LIMIT_BYTES:
        print(f"warning: {folder} is over the {EXPORT_LIMIT_BYTES / 1e6:.0f} MB the package may ship")
    return {"bytes": size, "score": result}


def _evaluation_videos(config: ModelConfig, n: int, device) -> tuple[list, torch.Tensor]:
    """The evaluation prompts' parameters and true videos `(n, 3, T, H, W)` in [-1, 1] on `device`."""
    from .caption_score import EVALUATION_SEED

    params = [video_params(EVALUATION_SEED, index) for index in range(n)]
    videos = render_videos(params, config.frames, config.height, config.width, device)
    return params, videos.permute(0, 4, 1, 2, 3) * 2.0 - 1.0


#: Each direction turned by 90 degrees, for `caption_sensitivity` (with `OPPOSITE`: the axis vs the sign).
PERPENDICULAR = {
    name: next(other for other, (ox, oy) in DIRECTIONS.items() if (ox, oy) == (-dy, dx))
    for name, (dx, dy) in DIRECTIONS.items()
}


@torch.no_grad()
def caption_sensitivity(
    pipe, config: ModelConfig, n: int = 16, sigmas: tuple[float, ...] = (0.5, 0.8, 0.95), device="cpu", seed: int = 0
) -> dict[str, float]:
    """Does the transformer read each part of the caption? Its flow-matching loss on the evaluation prompts' true
    videos (`n` of them, the same noise for every variant, averaged over `sigmas`) when conditioned on the true
    captions, on the captions with the direction reversed ("up" -> "down", "up and left" -> "down and right"), turned
    by 90 degrees ("right" -> "down": the axis changes too) or the colour changed, and on "" (the unconditional
    branch). A model that ignores the direction words has `opposite direction` == `true`: a cheap early warning, read
    without sampling, that caption following will be at chance for direction (about 3 / 10) whatever the video
    quality; `perpendicular direction` > `opposite direction` == `true` means it reads the axis but not the sign."""
    params, videos = _evaluation_videos(config, n, device)
    x0 = encode_latents(pipe.vae, videos, chunk=4)
    colours = list(SHAPE_COLOURS)
    variants = {
        "true": [p.caption for p in params],
        "opposite direction": [dataclasses.replace(p, direction=OPPOSITE[p.direction]).caption for p in params],
        "perpendicular direction": [
            dataclasses.replace(p, direction=PERPENDICULAR[p.direction]).caption for p in params
        ],
        "other colour": [
            dataclasses.replace(p, colour=colours[(colours.index(p.colour) + 3) % len(colours)]).caption
            for p in params
        ],
        "no caption": [""] * n,
    }
    generator = torch.Generator().manual_seed(seed)
    losses = dict.fromkeys(variants, 0.0)
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator).to(device)
        noisy, timestep, target = flow_matching_inputs(x0, noise, torch.full((n,), sigma, device=device))
        for name, captions in variants.items():
            text = encode_text(pipe.tokenizer, pipe.text_encoder, captions, device)
            velocity = pipe.transformer(
                hidden_states=noisy, timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]
            losses[name] += F.mse_loss(velocity.float(), target).item() / len(sigmas)
    return losses


def _losses_text(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in losses.items())


@torch.no_grad()
def reconstruction_following(vae, config: ModelConfig, n: int, device) -> int:
    """How many of the evaluation prompts' true videos still follow their captions after a VAE round trip (encode,
    decode): the most the transformer can reach, to tell a VAE shortfall from a transformer one."""
    from .caption_score import score

    params, videos = _evaluation_videos(config, n, device)
    decoded = []
    for video in videos:  # (3, T, H, W) in [-1, 1]
        output = vae.decode(vae.encode(video[None]).latent_dist.mode()).sample[0]
        decoded.append(((output.permute(1, 2, 3, 0) + 1.0) * 127.5).round().clamp(0, 255).byte().cpu().numpy())
    return score(decoded, [p.caption for p in params])[0]


def _device_text(device: torch.device) -> str:
    """A device, its GPU's name, and the torch and Python versions, for the history and the model card."""
    name = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    return f"{name}, torch {torch.__version__}, Python {platform.python_version()}"


def _recipe_text(train_config: TrainConfig) -> str:
    """The model card's words for the direction recipe of the last chunk (TRAINING_NOTES.md), if any."""
    parts = []
    if train_config.shape_weight:
        parts.append(f"the flow loss weighs the latent cells the shape covers by {1 + train_config.shape_weight:g}")
    if train_config.pair_reversed:
        parts.append("each video is trained next to its time-reversed twin under the same noise")
    return f" In the last chunk {' and '.join(parts)} (the direction words' signal, TRAINING_NOTES.md)." if parts else ""


def _history_change(entry: dict) -> str:
    """A model card line for a history entry of a flag change or a compact resume."""
    what = entry.get("resumed") or ", ".join(f"{key}={value}" for key, value in entry["changed"].items())
    return f"- {entry['phase']} step {entry['step']:,}: {'resumed from a ' if 'resumed' in entry else ''}{what}"


def _write_loss_curve(history: list[dict], path: str) -> None:
    """Both phases' loss against step, log scale, as a PNG drawn with OpenCV (no plotting library needed)."""
    import cv2
    import numpy as np

    panels = []
    for phase, title in (("vae", "VAE: L1 + KL"), ("dit", "transformer: flow-matching MSE")):
        points = np.array([(e["step"], e["loss"]) for e in history if e.get("phase") == phase and "loss" in e])
        panels.append(_plot_panel(points, title, cv2, np))
    cv2.imwrite(path, np.concatenate(panels, axis=1))


def _plot_panel(points, title: str, cv2, np, width: int = 420, height: int = 280):
    """One white panel: the curve (steps on x, log10 loss on y), axis box, decade ticks and the title."""
    panel = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 58, width - 12, 28, height - 34
    font, black, gray = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0), (200, 200, 200)
    cv2.putText(panel, title, (left, 18), font, 0.45, black, 1, cv2.LINE_AA)
    cv2.rectangle(panel, (left, top), (right, bottom), black, 1)
    if len(points) == 0:
        return panel
    steps, losses = points[:, 0], np.log10(np.maximum(points[:, 1], 1e-8))
    low, high = np.floor(losses.min() * 2) / 2, np.ceil(losses.max() * 2) / 2 + 1e-9
    last = max(steps.max(), 1.0)
    xs = left + (steps / last) * (right - left)
    ys = bottom - (losses - low) / (high - low) * (bottom - top)
    for tick in np.arange(low, high, 0.5):
        y = int(bottom - (tick - low) / (high - low) * (bottom - top))
        cv2.line(panel, (left, y), (right, y), gray, 1)
        cv2.putText(panel, f"{10**tick:.3g}", (4, y + 4), font, 0.38, black, 1, cv2.LINE_AA)
    curve = np.stack([xs, ys], axis=1).round().astype(np.int32)
    cv2.polylines(panel, [curve], False, (180, 80, 20), 1, cv2.LINE_AA)
    cv2.putText(panel, "0", (left - 4, bottom + 16), font, 0.38, black, 1, cv2.LINE_AA)
    cv2.putText(panel, f"step {int(last)}", (right - 80, bottom + 16), font, 0.38, black, 1, cv2.LINE_AA)
    return panel


def _write_samples(result: dict, path: str) -> None:
    """A strip per scored video: its first, middle and last frame (PNG, via OpenCV)."""
    import cv2
    import numpy as np

    rows = [np.concatenate([video[0], video[len(video) // 2], video[-1]], axis=1) for video in result["videos"]]
    cv2.imwrite(path, cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))


def model_card(trainer: Trainer, result: dict | None, steps: int, guidance: float) -> str:
    config, train_config = trainer.model_config, trainer.train_config
    sizes = {
        "transformer": parameter_count(trainer.transformer),
        "vae": parameter_count(trainer.vae),
        "text_encoder": parameter_count(trainer.text_encoder),
    }
    last = {phase: next((e for e in reversed(trainer.history) if e.get("phase") == phase and "loss" in e), None)
            for phase in ("vae", "dit")}  # fmt: skip
    # where the chunks ran (recorded by `train`; a checkpoint from before that records only its last device type)
    chunks = list(dict.fromkeys(e["chunk"] for e in trainer.history if "chunk" in e))
    trained_on = ", ".join(chunks) or trainer.checkpoint_device or _device_text(trainer.device)
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-video",
        "tags: [wan, tiny, synthetic-data, dit-sparse]",
        "---",
        "",
        "# tiny-shapes-wan",
        "",
        "A tiny Wan 2.1 text-to-video model (`WanPipeline`: `WanTransformer3DModel`, `AutoencoderKLWan`, a tiny "
        "`UMT5EncoderModel` with a word-level tokenizer, `UniPCMultistepScheduler`) trained from scratch on "
        "procedural videos of one coloured shape moving in a straight line. It is dit-sparse's reference model: small "
        "enough to ship and to render on a laptop CPU, trained, so its attention has real structure to sparsify.",
        "",
        "```python",
        "from dit_sparse.pipelines import tiny",
        "pipe = tiny.load()  # WanPipeline.from_pretrained on this folder",
        f'video = pipe("a red circle moves right on a blue background", num_frames={config.frames}, '
        f"height={config.height}, width={config.width}, num_inference_steps={steps}, "
        f"guidance_scale={guidance}).frames[0]",
        "```",
        "",
        "## Data",
        "",
        f"`dit_sparse.pipelines.tiny.shapes` (seed {config.data_seed}; {trainer.next_index:,} videos drawn): "
        f"{len(SHAPES)} shapes ({', '.join(SHAPES)}) in {len(SHAPE_COLOURS)} colours ({', '.join(SHAPE_COLOURS)}), "
        f"moving {len(DIRECTIONS)} ways ({', '.join(DIRECTIONS)}) at a constant speed over a plain background or a "
        f"vertical or horizontal gradient ({len(BACKGROUND_COLOURS)} colours, never the shape's). Captions: "
        '"a red circle moves right on a blue background", "a green triangle moves up and left on a white to gray '
        'vertical gradient".',
        "",
        "## Config",
        "",
        f"- Video: {config.frames} frames of {config.width} x {config.height} px -> latents "
        f"{config.latent_shape} -> {config.video_tokens:,} video tokens per transformer call.",
        f"- Parameters: transformer {sizes['transformer']:,}, VAE {sizes['vae']:,}, "
        f"text encoder {sizes['text_encoder']:,}.",
        "",
        "- Model (`tiny.train.ModelConfig`): " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items()),
        "- Training (`tiny.train.TrainConfig`, as of the last chunk): "
        + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(train_config).items()),
        "",
        "## Training",
        "",
        f"`python -m dit_sparse.pipelines.tiny.train` (seed {trainer.seed}), trained on {trained_on}, exported on "
        f"{_device_text(trainer.device)}: VAE {trainer.vae_step:,} steps in {trainer.seconds['vae'] / 60:.1f} "
        f"min, then transformer + text encoder {trainer.dit_step:,} steps in {trainer.seconds['dit'] / 60:.1f} min "
        f"(batch {train_config.batch_size}). Rectified flow (target noise - x0), Wan's time shift "
        f"{config.flow_shift}, caption dropout {train_config.caption_dropout}, "
        f"EMA {train_config.ema_decay} (exported).{_recipe_text(train_config)}",
        "",
    ]
    changes = [_history_change(entry) for entry in trainer.history if "changed" in entry or "resumed" in entry]
    if changes:
        lines += ["Changes between chunks (step of their phase):", "", *changes, ""]
    for phase, name in (("vae", "VAE"), ("dit", "transformer")):
        if last[phase]:
            lines.append(f"- Final {name} loss (mean of the last log interval): {last[phase]['loss']:.4f}")
    lines += ["", "![loss curves (log scale)](loss.png)"]
    lines += ["", "## Caption following", ""]
    if result is None:
        lines.append("Not scored.")
    else:
        lines += [
            f"**{result['n_ok']} / {len(result['prompts'])}** prompts followed: rendered at {config.frames} frames, "
            f"{config.width} x {config.height} px, {steps} steps, guidance {guidance}, "
            f"seeds 0..{len(result['prompts']) - 1}, "
            "checked with OpenCV (`dit_sparse.pipelines.tiny.caption_score`: the main blob's colour is the caption's, "
            "its centroid moves within 45 degrees of the captioned direction by at least 10% of the frame).",
            "",
            f"The ceiling set by the VAE: the same prompts' true videos, encoded and decoded, pass "
            f"{result['reconstructed_ok']} / {len(result['prompts'])}.",
            "",
            "Which words the transformer reads (`tiny.train.caption_sensitivity`: the flow loss on 16 evaluation "
            "videos, same noise, sigmas 0.5 / 0.8 / 0.95, by the caption it is given; equal losses mean the words "
            f"that differ are ignored): {_losses_text(result['sensitivity'])}.",
            "",
            "| prompt | ok | colour found | displacement (px) | angle error | note |",
            "|---|---|---|---|---|---|",
        ]
        for prompt, d in zip(result["prompts"], result["details"]):
            lines.append(
                f"| {prompt} | {'yes' if d['ok'] else 'no'} | {d['colour']} | {d['displacement']} | "
                f"{d['angle_error']} | {d['reason']} |"
            )
        lines += ["", "First, middle and last frames: ![samples](samples.png)"]
    return "\n".join(lines) + "\n"


# ---- the command line --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dit_sparse.pipelines.tiny.train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file: resumed if it exists, written at the end")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="model/data preset for a new run (default)"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed for a new run (default 0)")
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="stop this chunk after this many minutes (default 10)"
    )
    parser.add_argument("--chunk-steps", type=int, default=None, help="stop this chunk after this many steps")
    parser.add_argument("--save-every", type=float, default=4.0, help="minutes between checkpoints (default 4)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="transformer batch size")
    parser.add_argument("--vae-batch-size", type=int, default=None, help="VAE batch size")
    parser.add_argument("--vae-crop", type=int, default=None, help="VAE training crop side in pixels (0: whole frames)")
    parser.add_argument("--lr", type=float, default=None, help="transformer + text encoder learning rate")
    parser.add_argument("--vae-lr", type=float, default=None, help="VAE learning rate")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE steps in all")
    parser.add_argument("--vae-max-minutes", type=float, default=None, help="VAE training time that ends its phase")
    parser.add_argument("--dit-steps", type=int, default=None, help="transformer steps in all")
    parser.add_argument("--pool-size", type=int, default=None, help="encoded videos to sample batches from (0: none)")
    parser.add_argument("--pool-refresh", type=int, default=None, help="new videos encoded into the pool each step")
    parser.add_argument("--log-every", type=int, default=None, help="steps per log line / loss-history point")
    parser.add_argument(
        "--shape-weight", type=float, default=None,
        help="extra flow-loss weight on the latent cells the shape covers (default 0: the plain flow loss)",
    )  # fmt: skip
    parser.add_argument(
        "--pair-reversed", action=argparse.BooleanOptionalAction, default=None,
        help="draw each video with its time-reversed twin (the opposite direction), under the same noise",
    )  # fmt: skip
    parser.add_argument(
        "--probe-every", type=float, default=0.0,
        help="minutes between caption_sensitivity probes of the EMA weights in the log (default 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--compact", default=None, metavar="PATH",
        help="also write a compact checkpoint here at the end (EMA weights, no optimiser state: about the export's "
        "size, to carry a run between sessions); --checkpoint PATH resumes from it",
    )  # fmt: skip
    parser.add_argument(
        "--export", default=None, metavar="DIR", help="write the save_pretrained folder here at the end"
    )
    parser.add_argument("--score-prompts", type=int, default=10, help="caption prompts to score for the card (0: none)")
    parser.add_argument(
        "--score-steps", type=int, default=DEFAULT_STEPS,
        help=f"denoising steps of the scored renders (default {DEFAULT_STEPS})",
    )  # fmt: skip
    parser.add_argument("--score-guidance", type=float, default=5.0, help="CFG scale of the scored renders (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer's training forward (this chunk only)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick its fastest conv3d kernels
    trainer = open_trainer(args, device)
    config = trainer.model_config
    print(
        f"model: {config.video_tokens} video tokens per sample; transformer {parameter_count(trainer.transformer):,}, "
        f"VAE {parameter_count(trainer.vae):,}, text encoder {parameter_count(trainer.text_encoder):,} parameters; "
        f"device {device}; phase {trainer.phase}"
    )
    reserve = 90.0 if args.export else 20.0  # seconds kept for saving (and exporting) inside --minutes
    deadline = started + max(args.minutes * 60.0 - reserve, 0.0)
    train(trainer, deadline, args.chunk_steps, args.checkpoint, args.save_every * 60.0, args.probe_every * 60.0)
    save_checkpoint(trainer, args.checkpoint)
    print(
        f"saved {args.checkpoint}: vae step {trainer.vae_step}, transformer step {trainer.dit_step} ({trainer.phase})"
    )
    if args.compact:
        save_checkpoint(trainer, args.compact, compact=True)
        print(f"saved {args.compact} (compact): {os.path.getsize(args.compact) / 2**20:.1f} MiB")
    if args.export:
        export(trainer, args.export, args.score_prompts, args.score_steps, args.score_guidance, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
