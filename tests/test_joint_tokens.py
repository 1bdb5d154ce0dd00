"""Tokens beside the video grid: attention calls inside a hooked module that are not its self-attention (FLUX's
IP-Adapter) stay dense, and tokens off the grid (reference images, conditioning tokens) are attended like joint
text. Tiny random configs of the real diffusers classes, run through their pipelines or called as they call them."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import numpy as np
import PIL.Image
from diffusers import (
    AutoencoderKL,
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    LTXConditionPipeline,
    LTXVideoTransformer3DModel,
)
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

import dit_sparse
from dit_sparse.layout import VideoLayout
from test_adapters import SPARSE, _forward, attention_probe, built  # noqa: F401  (attention_probe, built: fixtures)


def _tiny_flux_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    )


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
        transformer = _tiny_flux_transformer()
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


# ---- tokens off the grid: attended like joint text ------------------------------------------------------------------
def _kontext_inputs(inputs: dict) -> dict:
    # FluxKontextPipeline's call with a 6 x 5 reference image for a 12 x 10 output: the reference's tokens after the
    # image's, its ids at frame 1 (the pipeline's own id builder).
    ids = FluxKontextPipeline._prepare_latent_image_ids(1, 12, 10, "cpu", torch.float32)
    reference_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 6, 5, "cpu", torch.float32)
    reference_ids[..., 0] = 1
    return dict(inputs, hidden_states=torch.randn(2, 12 * 10 + 6 * 5, 8), img_ids=torch.cat([ids, reference_ids]))


def _flux2_edit_inputs(inputs: dict) -> dict:
    # Flux2Pipeline's image editing: two reference images (6 x 5 and 12 x 10) at frames 10 and 20 after the image.
    references = [torch.zeros(1, 8, 6, 5), torch.zeros(1, 8, 12, 10)]
    ids = torch.cat([Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 8, 12, 10))[0],
                     Flux2Pipeline._prepare_image_ids(references)[0]]).float()
    return dict(inputs, hidden_states=torch.randn(2, 2 * 12 * 10 + 6 * 5, 8), img_ids=ids)


def _qwen_image_edit_inputs(inputs: dict) -> dict:
    # QwenImageEditPipeline: the reference image's tokens after the image's, its shape second in each sample's list.
    return dict(inputs, hidden_states=torch.randn(2, 12 * 10 + 6 * 5, 8), img_shapes=[[(1, 12, 10), (1, 6, 5)]] * 2)


def _ltx_condition_coords(frame_rate: int = 25) -> torch.Tensor:
    # LTXConditionPipeline's video_coords for a 3 x 8 x 8 latent video and one image condition at frame_index 16
    # (its 1 latent frame of extra tokens before the video's), built by the pipeline's own helpers.
    def coords(frames: int, frame_index: int) -> torch.Tensor:
        ids = LTXConditionPipeline._prepare_video_ids(1, frames, 8, 8)
        return LTXConditionPipeline._scale_video_ids(ids, 32, 8, frame_index=frame_index)

    video_coords = torch.cat([coords(1, 16), coords(3, 0)], dim=2).float()
    video_coords[:, 0] = video_coords[:, 0] * (1.0 / frame_rate)
    return video_coords.expand(2, -1, -1)  # (B, 3, N), the CFG batch


def _ltx_condition_inputs(inputs: dict) -> dict:
    inputs = {key: value for key, value in inputs.items() if key not in ("num_frames", "height", "width")}
    return dict(inputs, hidden_states=torch.randn(2, 64 + 3 * 64, 8), video_coords=_ltx_condition_coords())


@dataclass(frozen=True)
class OffGrid:
    family: str  # the test_adapters family whose transformer runs
    inputs: object  # its inputs -> the call with tokens off the grid
    layout: VideoLayout  # each self-attention call's layout
    before: int  # joint tokens before the video (text or extra), counted by hand
    after: int  # joint tokens after it


OFF_GRID = {
    "flux_kontext": OffGrid("flux", _kontext_inputs, VideoLayout(1, 12, 10, 6, "prefix", 30, "suffix"), 6, 30),
    "flux2_edit": OffGrid("flux2", _flux2_edit_inputs, VideoLayout(1, 12, 10, 6, "prefix", 150, "suffix"), 6, 150),
    "qwen_image_edit": OffGrid("qwen_image", _qwen_image_edit_inputs,
                               VideoLayout(1, 12, 10, 7, "prefix", 30, "suffix"), 7, 30),
    "ltx_condition": OffGrid("ltx_video", _ltx_condition_inputs, VideoLayout(3, 8, 8, 0, None, 64, "prefix"), 64, 0),
}


def _inputs(built, name: str):
    case = OFF_GRID[name]
    transformer, inputs, _ = built(case.family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return transformer, case.inputs(inputs)


@pytest.mark.parametrize("name", OFF_GRID)
def test_dense_method_with_tokens_off_the_grid_matches_the_unwrapped_transformer(built, name):
    transformer, inputs = _inputs(built, name)
    reference = _forward(transformer, inputs)
    dit_sparse.sparsify(transformer, "dense", block_size=16)
    try:
        dense = _forward(transformer, inputs)
    finally:
        dit_sparse.unsparsify(transformer)
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=1e-5)


def _attention_with_hand_built_mask(q, k, v, mask, before: int, after: int, text_padding_mask) -> torch.Tensor:
    """Dense SDPA with a token mask built by hand: the video x video part is `mask`'s blocks, the `before` and
    `after` joint tokens' rows and columns are full, padded text keys (the first of the prefix) masked."""
    batch, seq_len, heads = q.shape[:3]
    video = torch.arange(before, seq_len - after)
    allowed = torch.ones(batch, heads, seq_len, seq_len, dtype=torch.bool)
    allowed[:, :, video[:, None], video[None, :]] = mask.to_dense()  # (B or 1, H or 1, video, video)
    if text_padding_mask is not None:
        allowed[..., : text_padding_mask.shape[1]] &= text_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=allowed)
    return out.transpose(1, 2)


@pytest.mark.parametrize("method, options", [("random", SPARSE), ("draft", dict(density=0.4, tile=(1, 4, 4)))],
                         ids=["random", "draft"])  # a static mask, and one estimated from the video's q and k
@pytest.mark.parametrize("name", OFF_GRID)
def test_tokens_off_the_grid_see_and_are_seen_by_every_token(built, name, method, options, attention_probe):
    case = OFF_GRID[name]
    transformer, inputs = _inputs(built, name)
    reference = _forward(transformer, inputs)
    dit_sparse.sparsify(transformer, method, **options)
    try:
        sparse = _forward(transformer, inputs)
        assert 0 < dit_sparse.sparsity_stats(transformer)["density"] < 1
    finally:
        dit_sparse.unsparsify(transformer)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, reference, atol=1e-3)
    assert attention_probe
    for q, k, v, mask, layout, text_padding_mask, out in attention_probe:
        assert layout == case.layout and q.shape[1] == case.before + layout.video_len + case.after
        assert mask.density < 1 and mask.to_dense().shape[-1] == layout.video_len
        expected = _attention_with_hand_built_mask(q, k, v, mask, case.before, case.after, text_padding_mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---- the same through the pipelines themselves: FluxKontextPipeline and LTXConditionPipeline ------------------------
def _kontext_pipeline():
    """FluxKontextPipeline editing a 12 x 10 pixel image into a 24 x 20 one (1x VAE, 2x2 packing): 6 x 5 reference
    tokens after the 12 x 10 image's."""
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, shift_factor=0.0)
    pipe = FluxKontextPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, None, None, _tiny_flux_transformer())
    image = PIL.Image.fromarray((np.random.rand(12, 10, 3) * 255).astype(np.uint8))
    prompt = dict(prompt_embeds=torch.randn(1, 6, 16), pooled_prompt_embeds=torch.randn(1, 8))

    def run():
        return pipe(image=image, **prompt, height=24, width=20, max_area=24 * 20, _auto_resize=False,
                    num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    return pipe, run, VideoLayout(1, 12, 10, 6, "prefix", 30, "suffix"), (6, 30)


def _ltx_condition_pipeline():
    """LTXConditionPipeline making 9 frames of 32 x 32 pixels (3 x 8 x 8 latents) with an image condition at frame 4:
    its latent frame (64 tokens) before the video's, CFG batched."""
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
        cross_attention_dim=24, num_layers=2, caption_channels=16,
    )
    vae = AutoencoderKLLTXVideo(  # 4x spatial and temporal compression
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False,
    )
    pipe = LTXConditionPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, transformer)
    condition = LTXVideoCondition(image=torch.rand(1, 3, 32, 32), frame_index=4)
    prompt = dict(prompt_embeds=torch.randn(1, 6, 16), prompt_attention_mask=torch.ones(1, 6),
                  negative_prompt_embeds=torch.randn(1, 6, 16), negative_prompt_attention_mask=torch.ones(1, 6))

    def run():
        return pipe(conditions=[condition], **prompt, height=32, width=32, num_frames=9, num_inference_steps=2,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    return pipe, run, VideoLayout(3, 8, 8, 0, None, 64, "prefix"), (64, 0)


@pytest.mark.parametrize("build", [_kontext_pipeline, _ltx_condition_pipeline], ids=["flux_kontext", "ltx_condition"])
def test_pipelines_with_tokens_off_the_grid_run_dense_exactly_and_sparse_on_the_grid(build, attention_probe):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe, run, layout, (before, after) = build()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = run()
        dit_sparse.sparsify(pipe, "dense", block_size=16)
        try:
            dense = run()
            dense_calls = len(attention_probe)
            dit_sparse.sparsify(pipe, "random", **SPARSE)
            sparse = run()
        finally:
            dit_sparse.unsparsify(pipe)
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, reference, atol=1e-3)
    assert dense_calls == 4 and len(attention_probe) == 8  # 2 blocks x 2 steps per method
    for q, k, v, mask, call_layout, text_padding_mask, out in attention_probe[dense_calls:]:
        assert call_layout == layout and mask.density < 1
        expected = _attention_with_hand_built_mask(q, k, v, mask, before, after, text_padding_mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_position, extra_position",
                         [("prefix", "suffix"), ("suffix", "prefix"), (None, "prefix")])
def test_sparse_attention_gives_extra_tokens_dense_rows_and_columns(text_position, extra_position):
    # 72 video tokens (a per-head random block mask, empty rows too), 10 text tokens (the second prompt padded) and
    # 9 extra tokens on the other side: the rule checked against SDPA with a token mask built by index.
    from test_attention import _random_block_mask, _random_qkv, _sdpa

    g = torch.Generator().manual_seed(4)
    text_len = 10 if text_position else 0
    layout = VideoLayout(3, 4, 6, text_len, text_position, 9, extra_position)
    q, k, v = _random_qkv(2, layout.seq_len, 2, 32, g)
    mask = _random_block_mask(layout.video_len, 16, 2, g, density=0.4, empty_rows=True)
    text_valid = None
    before = text_len if text_position == "prefix" else 9  # the joint tokens before the video
    video = torch.arange(before, before + 72)
    allowed = torch.ones(2, 2, layout.seq_len, layout.seq_len, dtype=torch.bool)
    allowed[:, :, video[:, None], video[None, :]] = mask.to_dense()
    if text_len:
        text_valid = torch.ones(2, text_len, dtype=torch.bool)
        text_valid[1, 6:] = False
        text = torch.arange(text_len) + (0 if text_position == "prefix" else 9 + 72)
        allowed[:, :, :, text] &= text_valid[:, None, None, :]
    out = dit_sparse.sparse_attention(q, k, v, mask, layout, text_padding_mask=text_valid, backend="reference")
    torch.testing.assert_close(out, _sdpa(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_layout_places_extra_tokens_on_the_other_side_of_the_video_from_the_text():
    kontext = VideoLayout(1, 3, 4, text_len=5, text_position="prefix", extra_len=6, extra_position="suffix")
    assert (kontext.text_slice, kontext.video_slice, kontext.extra_slice) == (slice(0, 5), slice(5, 17),
                                                                               slice(17, 23))
    assert kontext.seq_len == 23 and kontext.joint_len == 11 and kontext.prefix_len == 5
    conditioned = VideoLayout(2, 3, 4, extra_len=6, extra_position="prefix")  # LTXConditionPipeline's
    assert (conditioned.extra_slice, conditioned.video_slice, conditioned.text_slice) == (slice(0, 6), slice(6, 30),
                                                                                          slice(30, 30))
    with pytest.raises(ValueError, match="extra tokens must sit on the other side of the video from the text"):
        VideoLayout(1, 3, 4, text_len=5, text_position="prefix", extra_len=6, extra_position="prefix")
    with pytest.raises(ValueError, match="extra_position must be 'prefix' or 'suffix' exactly when extra_len > 0"):
        VideoLayout(1, 3, 4, extra_len=6)
    with pytest.raises(ValueError, match="extra_len must be an int >= 0, got -1"):
        VideoLayout(1, 3, 4, extra_len=-1, extra_position="suffix")


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_gathered_order_keeps_the_extra_tokens_with_the_video(world):
    # Ulysses splits the transformer's hidden states ([image; reference image]) and the text into equal shares per
    # rank; each rank's gathered share is [its text; its hidden states].
    layout = VideoLayout(2, 4, 4, text_len=8, text_position="prefix", extra_len=8, extra_position="suffix")
    natural = torch.arange(layout.seq_len)
    text, hidden = natural[:8], natural[8:]
    gathered = torch.cat([part for t, h in zip(text.chunk(world), hidden.chunk(world)) for part in (t, h)])
    assert torch.equal(gathered[dit_sparse.parallel.gathered_order(layout, world)], natural)
