"""CPU A/B experiments for the tiny model's VAE recipe (see pipelines/tiny/TRAINING_NOTES.md).

    python benchmarks/vae_recipe.py --variants 'base;recipe;{"lr":2e-4,"unit_gain":true}' --steps 200 --size 48 --frames 9
    python benchmarks/vae_recipe.py --probe   # the plain-colour collapse probe

Trains the real tiny `AutoencoderKLWan` config (ModelConfig's VAE dims) on small videos of the shapes dataset with one
torch thread, from PyTorch's default init plus the variant's `init_vae` parts, and reports on 8 held-out videos (the
caption evaluation seed): L1 of the mode reconstruction, the constant-mean-colour L1, and the shape's visibility
through `caption_score.score` (blob colour and motion).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dit_sparse.pipelines.tiny import train as tt
from dit_sparse.pipelines.tiny.caption_score import EVALUATION_SEED, score
from dit_sparse.pipelines.tiny.shapes import render_videos, video_params

BASE = dict(
    lr=5e-4, betas=(0.9, 0.99), clamp=True, fast=False, sample=True, logvar_bias=None, kl=1e-4, first_weight=4.0,
    loss="l1", batch=4, zero_init=False, unit_gain=False, clip=1.0, wd=0.01,
)  # fmt: skip
VARIANTS = {
    "base": {},  # the H200 run's recipe
    "lr2e-3": dict(lr=2e-3),
    "noclamp": dict(clamp=False),
    "fast": dict(clamp=False, fast=True),  # 2-chunk encode/decode (equal outputs), no clamp
    "mode": dict(sample=False),
    "lv-8": dict(logvar_bias=-8.0),
    "zero": dict(zero_init=True),
    "gain": dict(unit_gain=True),  # variance-preserving signal path: the latent reaches the decoder at unit scale
    "gainzero": dict(unit_gain=True, zero_init=True),
    "recipe": dict(lr=1e-4, clamp=False, fast=True, zero_init=True, unit_gain=True, logvar_bias=-6.0),  # tiny.train's
    "recipe-mode": dict(lr=1e-4, clamp=False, fast=True, zero_init=True, unit_gain=True, sample=False),
}


def videos_of(seed: int, indices: list[int], frames: int, size: int) -> tuple[torch.Tensor, list[str]]:
    params = [video_params(seed, i) for i in indices]
    videos = render_videos(params, frames, size, size).permute(0, 4, 1, 2, 3) * 2.0 - 1.0
    return videos, [p.caption for p in params]


@torch.no_grad()
def evaluate(vae, videos: torch.Tensor, captions: list[str]) -> dict:
    vae.eval()
    out = vae.decode(vae.encode(videos).latent_dist.mode()).sample
    vae.train()
    l1 = (out - videos).abs().mean().item()
    const = (videos.mean(dim=(2, 3, 4), keepdim=True) - videos).abs().mean().item()
    frames = [((v.permute(1, 2, 3, 0) + 1.0) * 127.5).round().clamp(0, 255).byte().numpy() for v in out]
    n_ok, details = score(frames, captions)
    return dict(l1=round(l1, 4), const=round(const, 4), ok=n_ok, colour=sum(d["colour_ok"] for d in details))


def run(name: str, steps: int, size: int, frames: int, evals: list[int], seed: int = 0) -> dict:
    options = {**BASE, **VARIANTS[name]} if name in VARIANTS else {**BASE, **json.loads(name)}
    config = dict(frames=frames, height=size, width=size)
    model_config = tt.ModelConfig(**config)
    vae = tt.build_components(model_config, seed, vae_init=False)["vae"]  # PyTorch's default init, then:
    tt.init_vae(vae, zero_residuals=options["zero_init"], logvar_bias=options["logvar_bias"],
                unit_gain=options["unit_gain"])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=options["lr"], betas=tuple(options["betas"]),
                                  weight_decay=options["wd"])  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    held_out = videos_of(EVALUATION_SEED, list(range(8)), frames, size)
    results, started, index = [], time.monotonic(), 0
    for step in range(1, steps + 1):
        videos, _ = videos_of(0, list(range(index, index + options["batch"])), frames, size)
        index += options["batch"]
        if options["fast"]:
            posterior = tt.vae_encode(vae, videos)
        else:
            posterior = vae.encode(videos).latent_dist
        z = posterior.sample(generator=generator) if options["sample"] else posterior.mode()
        out = tt.vae_decode(vae, z, clamp=options["clamp"]) if options["fast"] else vae.decode(z).sample
        if not options["clamp"] and not options["fast"]:
            out = tt.vae_decode(vae, z, clamp=False, chunked=True)
        error = out - videos
        if options["loss"] == "l1":
            per = error.abs()
        elif options["loss"] == "l2":
            per = error.square()
        else:
            per = error.abs() + error.square()
        per_frame = per.mean(dim=(0, 1, 3, 4))
        weights = torch.ones_like(per_frame)
        weights[0] = options["first_weight"]
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1.0 - posterior.logvar).mean()
        loss = (per_frame * weights).sum() / weights.sum() + options["kl"] * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if options["clip"]:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), options["clip"])
        optimizer.step()
        if step in evals:
            seconds = (time.monotonic() - started) / step
            result = dict(step=step, loss=round(loss.item(), 4), s_per_step=round(seconds, 2))
            result.update(evaluate(vae, *held_out))
            results.append(result)
            print(name, result, flush=True)
    return {"name": name, "options": options, "results": results}


def plain_colour_probe(unit_gain: bool, zero_init: bool, steps: int = 30, lr: float = 1e-3) -> list[dict]:
    """Train on single frames of plain random colours (a trivial identity) and report how much the decoded colour
    varies with the input colour (std over 8 test colours; the target's is ~0.43): 0 means the decoder collapsed to a
    constant. Then a red-vs-blue forward-hook trace: the relative difference of each top-level module's output."""
    vae = tt.build_components(tt.ModelConfig(frames=17, height=32, width=32), 0, vae_init=False)["vae"]
    tt.init_vae(vae, zero_residuals=zero_init, logvar_bias=None, unit_gain=unit_gain)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    test = torch.rand(8, 3, 1, 1, 1, generator=torch.Generator().manual_seed(1)).mul(2).sub(1).expand(8, 3, 1, 32, 32)
    rows = []
    for step in range(1, steps + 1):
        x = torch.rand(4, 3, 1, 1, 1, generator=generator).mul(2).sub(1).expand(4, 3, 1, 32, 32).contiguous()
        loss = (tt.vae_decode(vae, tt.vae_encode(vae, x).mode()) - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            with torch.no_grad():
                out = tt.vae_decode(vae, tt.vae_encode(vae, test).mode())
            rows.append(dict(step=step, colour_std=round(out.mean(dim=(2, 3, 4)).std(0).mean().item(), 3)))
            print(dict(unit_gain=unit_gain, zero_init=zero_init, **rows[-1]), flush=True)
    outputs: dict[str, list] = {}
    names = ["encoder.conv_out", "quant_conv", "post_quant_conv", "decoder.conv_in", "decoder.mid_block",
             "decoder.up_blocks.0", "decoder.up_blocks.3", "decoder"]  # fmt: skip
    hooks = [vae.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, []).append(o))
             for n in names]  # fmt: skip
    red, blue = (torch.tensor(c).view(1, 3, 1, 1, 1).expand(1, 3, 1, 32, 32) for c in ([1.0, -1, -1], [-1.0, -1, 1]))
    with torch.no_grad():
        for x in (red, blue):
            tt.vae_decode(vae, tt.vae_encode(vae, x).mode())
    for hook in hooks:
        hook.remove()
    for name in names:
        a, b = outputs[name][0], outputs[name][-1]
        print(f"  {name:22s} rms {a.square().mean().sqrt().item():.3f}  red-vs-blue rel diff "
              f"{((a - b).norm() / a.norm()).item():.4f}")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="base")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--evals", default="50,100,150")
    parser.add_argument("--seed", type=int, default=0, help="weights and sampling-noise seed")
    parser.add_argument("--out", default=None, help="append results as JSON lines here")
    parser.add_argument("--probe", action="store_true", help="the plain-colour collapse probe instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe:
        for unit_gain, zero_init in ((False, False), (True, True)):
            plain_colour_probe(unit_gain, zero_init)
        return
    evals = [int(s) for s in args.evals.split(",")]
    for name in args.variants.split(";"):
        result = run(name, args.steps, args.size, args.frames, evals, args.seed)
        if args.out:
            with open(args.out, "a") as file:
                file.write(json.dumps({**result, "size": args.size, "frames": args.frames, "seed": args.seed}) + "\n")


if __name__ == "__main__":
    main()
