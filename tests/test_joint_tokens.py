"""Tokens beside the video grid: attention calls inside a hooked module that are not its self-attention (FLUX's
IP-Adapter) stay dense, and tokens off the grid (reference images, conditioning tokens) are attended like joint
text. Tiny random configs of the real diffusers classes, run through their pipelines or called as they call them."""

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import dit_sparse
from test_adapters import SPARSE, attention_probe  # noqa: F401  (a fixture)


# ---- FLUX IP-Adapter: its image-prompt cross-attention inside the self-attention module stays dense ----------------
_IMAGE_EMBED_DIM = 8


def _ip_adapter_state_dict(transformer: FluxTransformer2DModel) -> dict:
    """Random IP-Adapter weights in the format `_load_ip_adapter_weights` reads (as diffusers' own FLUX tests build
    them): an image projection to 4 tokens of `joint_attention_dim`, and per dual-stream block the to_k_ip / to_v_ip
    projections of those tokens."""
    cross_dim, inner_dim = transformer.config.joint_attention_dim, transformer.inner_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cross_dim, _IMAGE_EMBED_DIM) * 0.3, "proj.bias": torch.randn(4 * cross_dim),
        "norm.weight": torch.ones(cross_dim), "norm.bias": torch.zeros(cross_dim),
    }
    ip_adapter = {}
    for i in range(len(transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{i}.{name}.weight"] = torch.randn(inner_dim, cross_dim) * 0.3
            ip_adapter[f"{i}.{name}.bias"] = torch.randn(inner_dim) * 0.3
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.fixture(scope="module")
def flux_ip_adapter_pipeline():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
        pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, None, None, transformer)
        transformer._load_ip_adapter_weights(_ip_adapter_state_dict(transformer), low_cpu_mem_usage=False)
        image_embeds = torch.randn(1, 1, _IMAGE_EMBED_DIM)
        prompt = dict(prompt_embeds=torch.randn(1, 6, 16), pooled_prompt_embeds=torch.randn(1, 8))
    pipe.set_progress_bar_config(disable=True)
    return pipe, prompt, image_embeds


def _flux_latents(pipe, prompt, image_embeds, ip_adapter_scale: float = 1.0) -> torch.Tensor:
    pipe.set_ip_adapter_scale(ip_adapter_scale)
    with torch.no_grad():
        return pipe(
            **prompt, ip_adapter_image_embeds=[image_embeds], negative_ip_adapter_image_embeds=[image_embeds],
            height=24, width=24, num_inference_steps=2, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images  # (1, 12 * 12, 16) packed latents


def test_flux_ip_adapter_cross_attention_stays_dense_under_every_method(flux_ip_adapter_pipeline, attention_probe):
    pipe, prompt, image_embeds = flux_ip_adapter_pipeline
    reference = _flux_latents(pipe, prompt, image_embeds)
    # The IP-Adapter's second SDPA call (image tokens x its 4 tokens) is in the output: scale 0 changes it.
    assert not torch.allclose(_flux_latents(pipe, prompt, image_embeds, ip_adapter_scale=0.0), reference, atol=1e-4)
    dit_sparse.sparsify(pipe, "dense", block_size=16)
    try:
        dense = _flux_latents(pipe, prompt, image_embeds)
        dense_calls = len(attention_probe)
        dit_sparse.sparsify(pipe, "random", **SPARSE)
        sparse = _flux_latents(pipe, prompt, image_embeds)
    finally:
        dit_sparse.unsparsify(pipe)
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, reference, atol=1e-4)
    # Only the self-attention calls took the sparse path: 2 sites x 2 steps per method, each over text + image.
    assert dense_calls == 4 and len(attention_probe) == 8
    assert all(q.shape[1] == 6 + 12 * 12 for q, *_ in attention_probe)
    assert torch.equal(_flux_latents(pipe, prompt, image_embeds), reference)
