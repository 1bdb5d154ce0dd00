"""The HunyuanVideo, HunyuanVideo 1.5, CogVideoX, FLUX.1, FLUX.2, Qwen-Image, LTX-Video, LTX-2 and Mochi adapters,
and the Wan derivatives (ChronoEdit, SkyReels-V2, Wan VACE, Wan-Animate), on tiny random configs of the real diffusers
transformer classes (built in code, called directly as their pipelines call them, CFG batch of 2)."""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    ChronoEditTransformer3DModel,
    CogVideoXTransformer3DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    QwenImageTransformer2DModel,
    SkyReelsV2Transformer3DModel,
    WanAnimateTransformer3DModel,
    WanVACETransformer3DModel,
)

import dit_sparse
import dit_sparse.hooks
import dit_sparse.session
from dit_sparse.hooks import hooked_modules
from dit_sparse.layout import VideoLayout

SPARSE = dict(density=0.3, block_size=16)  # "random" keeps ~30% of the 16-token key blocks, the diagonal always


def _left_aligned_mask(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]  # (B, total) bool


def _hunyuan_video():
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    )
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 16, 16), timestep=torch.tensor([700, 700]),
        encoder_hidden_states=torch.randn(2, 7, 16), encoder_attention_mask=_left_aligned_mask([5, 3], 7),
        pooled_projections=torch.randn(2, 8), guidance=torch.tensor([6000.0, 6000.0]),
    )
    return transformer, inputs


def _hunyuan_video_15():
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, num_refiner_layers=1,
        patch_size=2, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
        rope_axes_dim=(4, 6, 6),
    )
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 16, 16), timestep=torch.tensor([700.0, 700.0]),
        encoder_hidden_states=torch.randn(2, 7, 16), encoder_attention_mask=_left_aligned_mask([5, 7], 7),
        encoder_hidden_states_2=torch.randn(2, 3, 8), encoder_attention_mask_2=_left_aligned_mask([3, 2], 3),
        image_embeds=torch.zeros(2, 5, 12),  # text-to-video: the 5 image tokens are padding
    )
    return transformer, inputs


def _cogvideox(patch_size_t=None):
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, max_text_seq_length=8, use_rotary_positional_embeddings=patch_size_t is not None,
    )
    frames = 3 if patch_size_t is None else 4  # latent frames; 1.5 pairs them (patch_size_t 2)
    inputs = dict(
        hidden_states=torch.randn(2, frames, 4, 16, 16), encoder_hidden_states=torch.randn(2, 8, 16),
        timestep=torch.tensor([700, 700]),
    )
    return transformer, inputs


def _flux_ids(frames: int, height: int, width: int) -> torch.Tensor:
    grid = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3).float()  # (N, 3) = (frame, row, column), as FluxPipeline's ids


def _flux():
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    )
    inputs = dict(
        hidden_states=torch.randn(2, 12 * 10, 8), encoder_hidden_states=torch.randn(2, 6, 16),
        pooled_projections=torch.randn(2, 8), timestep=torch.tensor([0.7, 0.7]), img_ids=_flux_ids(1, 12, 10),
        txt_ids=torch.zeros(6, 3),
    )
    return transformer, inputs


def _flux2_ids(frame: int, height: int, width: int) -> torch.Tensor:
    # (N, 4) = (frame, row, column, layer), as Flux2Pipeline's ids: the image at frame 0, references at 10, 20, ...
    return F.pad(_flux_ids(1, height, width), (0, 1)) + torch.tensor([frame, 0, 0, 0])


def _flux2():
    transformer = Flux2Transformer2DModel(
        in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=8, axes_dims_rope=(4, 4, 4, 4),
    )
    text_ids = F.pad(torch.arange(6.0)[:, None], (3, 0))  # (0, 0, 0, token)
    inputs = dict(
        hidden_states=torch.randn(2, 12 * 10, 8), encoder_hidden_states=torch.randn(2, 6, 16),
        timestep=torch.tensor([0.7, 0.7]), img_ids=_flux2_ids(0, 12, 10), txt_ids=text_ids,
        guidance=torch.tensor([4.0, 4.0]),
    )
    return transformer, inputs


def _qwen_image():
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=8, out_channels=2, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    )
    inputs = dict(  # QwenImagePipeline's call: the prompts padded to 7 tokens, one 12 x 10 image per sample
        hidden_states=torch.randn(2, 12 * 10, 8), encoder_hidden_states=torch.randn(2, 7, 16),
        encoder_hidden_states_mask=_left_aligned_mask([5, 3], 7), timestep=torch.tensor([0.7, 0.7]),
        img_shapes=[[(1, 12, 10)]] * 2,
    )
    return transformer, inputs


def _ltx_video():
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
        cross_attention_dim=24, num_layers=2, caption_channels=16,
    )
    inputs = dict(
        hidden_states=torch.randn(2, 3 * 8 * 8, 8), encoder_hidden_states=torch.randn(2, 6, 16),
        timestep=torch.tensor([700, 700]), encoder_attention_mask=torch.ones(2, 6), num_frames=3, height=8, width=8,
    )
    return transformer, inputs


def _ltx2_video():
    # Audio and video in one transformer, with the perturbed-attention processors of spatio-temporal guidance.
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=16, perturbed_attn=True,
    )
    inputs = dict(
        hidden_states=torch.randn(2, 3 * 8 * 8, 8), audio_hidden_states=torch.randn(2, 5, 4),
        encoder_hidden_states=torch.randn(2, 6, 16), audio_encoder_hidden_states=torch.randn(2, 6, 16),
        timestep=torch.tensor([700.0, 700.0]), encoder_attention_mask=torch.ones(2, 6),
        audio_encoder_attention_mask=torch.ones(2, 6), num_frames=3, height=8, width=8, audio_num_frames=5,
    )
    return transformer, inputs


def _mochi():
    transformer = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu", max_sequence_length=8,
    )
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 16, 16), encoder_hidden_states=torch.randn(2, 8, 16),
        timestep=torch.tensor([700, 700]), encoder_attention_mask=_left_aligned_mask([5, 8], 8),
    )
    return transformer, inputs


_WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32,
    freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
)


def _wan_derivative(cls, **config):
    """A Wan-architecture transformer (tiny) and the inputs its pipelines pass (latents B, C, F, H, W)."""
    transformer = cls(**_WAN_CONFIG, **config)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 3, 16, 16), timestep=torch.tensor([700, 700]),
        encoder_hidden_states=torch.randn(2, 7, 32),
    )
    return transformer, inputs


def _wan_vace():
    transformer, inputs = _wan_derivative(WanVACETransformer3DModel, vace_layers=[0, 1], vace_in_channels=8)
    # The control latents (VACE's conditioning video and mask), one frame short: padded to the video's tokens.
    inputs["control_hidden_states"] = torch.randn(2, 8, 2, 16, 16)
    return transformer, inputs


def _wan_animate():
    # Latents of 4 channels: the noisy video, the reference and previous-segment latents and their mask (2 x 4 + 4
    # channels), over the reference frame and 2 frames; the pose over those 2; 5 face frames of 4 x 4 pixels, which
    # the face encoder's two stride-2 convolutions bring to 2 (plus the padding frame for the reference).
    transformer = WanAnimateTransformer3DModel(
        **{**_WAN_CONFIG, "in_channels": None, "out_channels": 4}, latent_channels=4, image_dim=8,
        motion_encoder_channel_sizes={"4": 8}, motion_encoder_size=4, motion_style_dim=8, motion_dim=4,
        motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=1,
        motion_encoder_batch_size=4,
    )
    inputs = dict(
        hidden_states=torch.randn(2, 12, 3, 16, 16), timestep=torch.tensor([700, 700]),
        encoder_hidden_states=torch.randn(2, 7, 32), encoder_hidden_states_image=torch.randn(2, 4, 8),
        pose_hidden_states=torch.randn(2, 4, 2, 16, 16), face_pixel_values=torch.randn(2, 3, 5, 4, 4),
    )
    return transformer, inputs


@dataclass(frozen=True)
class Family:
    build: Callable
    sites: tuple[str, ...]
    video: VideoLayout  # the video tokens of the inputs
    text_position: str | None
    text_lens: tuple[int, ...]  # per attention call of one module (Mochi attends one batch element at a time)
    padded_text: bool = False  # the inputs' text has padding the model must not attend to
    text_mask: str = "encoder_attention_mask"  # the argument that carries that padding


FAMILIES = {
    "hunyuan_video": Family(
        _hunyuan_video, ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"), VideoLayout(3, 8, 8),
        "suffix", (7,), padded_text=True,
    ),
    "hunyuan_video_15": Family(
        _hunyuan_video_15, ("transformer_blocks.0.attn", "transformer_blocks.1.attn"), VideoLayout(3, 8, 8),
        "suffix", (5 + 3 + 7,), padded_text=True,
    ),
    "cogvideox": Family(
        _cogvideox, ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"), VideoLayout(3, 8, 8), "prefix", (8,)
    ),
    "cogvideox_15": Family(
        lambda: _cogvideox(patch_size_t=2), ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"),
        VideoLayout(2, 8, 8), "prefix", (8,),
    ),
    "flux": Family(
        _flux, ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"), VideoLayout(1, 12, 10), "prefix", (6,)
    ),
    "flux2": Family(
        _flux2, ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"), VideoLayout(1, 12, 10), "prefix",
        (6,),
    ),
    "qwen_image": Family(
        _qwen_image, ("transformer_blocks.0.attn", "transformer_blocks.1.attn"), VideoLayout(1, 12, 10), "prefix", (7,),
        padded_text=True, text_mask="encoder_hidden_states_mask",
    ),
    "ltx_video": Family(
        _ltx_video, ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"), VideoLayout(3, 8, 8), None, (0,)
    ),
    "ltx2_video": Family(
        _ltx2_video, ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"), VideoLayout(3, 8, 8), None, (0,)
    ),
    "chronoedit": Family(
        lambda: _wan_derivative(ChronoEditTransformer3DModel), ("blocks.0.attn1", "blocks.1.attn1"),
        VideoLayout(3, 8, 8), None, (0,),
    ),
    "skyreels_v2": Family(
        lambda: _wan_derivative(SkyReelsV2Transformer3DModel), ("blocks.0.attn1", "blocks.1.attn1"),
        VideoLayout(3, 8, 8), None, (0,),
    ),
    "wan_animate": Family(  # the face adapters (face_adapter.0, .1: cross-attention to the motion) stay dense
        _wan_animate, ("blocks.0.attn1", "blocks.1.attn1"), VideoLayout(3, 8, 8), None, (0,),
    ),
    "wan_vace": Family(
        _wan_vace, ("blocks.0.attn1", "blocks.1.attn1", "vace_blocks.0.attn1", "vace_blocks.1.attn1"),
        VideoLayout(3, 8, 8), None, (0,),
    ),
    "mochi": Family(
        _mochi, ("transformer_blocks.0.attn1", "transformer_blocks.1.attn1"), VideoLayout(3, 8, 8), "suffix", (5, 8),
        padded_text=True,
    ),
}


@pytest.fixture(scope="module")
def built():
    """Each family's transformer (weights from seed 0), its inputs and its unwrapped output; built once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                transformer, inputs = FAMILIES[name].build()
            transformer.eval()
            cache[name] = (transformer, inputs, _forward(transformer, inputs))
        return cache[name]

    return get


def _forward(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]




@pytest.fixture
def attention_probe(monkeypatch):
    """Records every `sparse_attention` call the hooks make: (q, k, v, mask, layout, text_padding_mask, out)."""
    calls = []
    original = dit_sparse.hooks.sparse_attention

    def probe(q, k, v, mask, layout=None, *, text_padding_mask=None, **kwargs):
        out = original(q, k, v, mask, layout, text_padding_mask=text_padding_mask, **kwargs)
        calls.append((q, k, v, mask, layout, text_padding_mask, out))
        return out

    monkeypatch.setattr(dit_sparse.hooks, "sparse_attention", probe)
    return calls


def _attention_with_explicit_mask(q, k, v, mask, layout, text_padding_mask) -> torch.Tensor:
    """Dense SDPA with the token-level mask the rules give: video rows keep `mask`'s blocks, every row sees every
    valid text key, text rows see every valid key. q, k, v (B, S, H, D)."""
    batch, seq_len = q.shape[:2]
    video, text = layout.video_slice, layout.text_slice
    allowed = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    allowed[:, video, video] = mask.to_dense()[:, 0]  # shared over heads
    allowed[:, :, text] = True
    allowed[:, text, :] = True
    key_valid = torch.ones(batch, seq_len, dtype=torch.bool)
    if text_padding_mask is not None:
        key_valid[:, text] = text_padding_mask
    allowed &= key_valid[:, None, :]
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=allowed[:, None])
    return out.transpose(1, 2)


@pytest.mark.parametrize("name", FAMILIES)
def test_dense_method_matches_the_unwrapped_transformer(built, name):
    transformer, inputs, reference = built(name)
    dit_sparse.sparsify(transformer, "dense", block_size=16)
    try:
        assert hooked_modules(transformer) == ["", *FAMILIES[name].sites]
        output = _forward(transformer, inputs)
        stats = dit_sparse.sparsity_stats(transformer)
    finally:
        dit_sparse.unsparsify(transformer)
    calls = len(FAMILIES[name].sites)
    assert stats == {"method": "dense", "density": 1.0, "attention_calls": calls, "sparse_calls": calls}
    torch.testing.assert_close(output, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_sparse_method_changes_the_output_and_unsparsify_restores_it_bit_identically(built, name):
    transformer, inputs, reference = built(name)
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    sparse = _forward(transformer, inputs)
    assert 0 < dit_sparse.sparsity_stats(transformer)["density"] < 1
    dit_sparse.unsparsify(transformer)
    assert hooked_modules(transformer) == []
    assert all("forward" not in module.__dict__ for module in transformer.modules())
    assert not torch.allclose(sparse, reference, atol=1e-3)
    assert torch.equal(_forward(transformer, inputs), reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_text_tokens_see_and_are_seen_by_every_token(built, name, attention_probe):
    family = FAMILIES[name]
    transformer, inputs, _ = built(name)
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        _forward(transformer, inputs)
    finally:
        dit_sparse.unsparsify(transformer)
    assert len(attention_probe) == len(family.sites) * len(family.text_lens)
    for i, (q, k, v, mask, layout, text_padding_mask, out) in enumerate(attention_probe):
        text_len = family.text_lens[i % len(family.text_lens)]
        video = family.video
        text_position = family.text_position if text_len else None
        assert layout == VideoLayout(video.frames, video.height, video.width, text_len, text_position)
        assert mask.density < 1
        expected = _attention_with_explicit_mask(q, k, v, mask, layout, text_padding_mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [name for name, family in FAMILIES.items() if family.padded_text])
def test_padded_text_tokens_get_no_attention(built, name, attention_probe):
    transformer, inputs, _ = built(name)
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        sparse = _forward(transformer, inputs)
        # In the model: new embeddings at the prompts' padded positions change no output.
        changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
        padded = ~inputs[FAMILIES[name].text_mask]
        text = changed["encoder_hidden_states"]
        text[padded] = 5 * torch.randn(int(padded.sum()), text.shape[-1])
        torch.testing.assert_close(_forward(transformer, changed), sparse, atol=1e-6, rtol=0)
    finally:
        dit_sparse.unsparsify(transformer)
    # In each attention call: other keys and values at the padded text positions change no output row.
    for q, k, v, mask, layout, text_padding_mask, out in attention_probe:
        if text_padding_mask is None:  # Mochi drops its padding before the call
            continue
        assert not text_padding_mask.all()
        padded = torch.zeros(q.shape[:2], dtype=torch.bool)
        padded[:, layout.text_slice] = ~text_padding_mask
        k2, v2 = k.clone(), v.clone()
        k2[padded], v2[padded] = torch.randn_like(k2[padded]), torch.randn_like(v2[padded])
        again = dit_sparse.sparse_attention(q, k2, v2, mask, layout, text_padding_mask=text_padding_mask)
        torch.testing.assert_close(again, out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_cfg_batch_of_two_matches_two_single_calls(built, name):
    transformer, inputs, _ = built(name)
    halves = [
        {key: value[i : i + 1] if isinstance(value, torch.Tensor) and value.shape[:1] == (2,) else value
         for key, value in inputs.items()}
        for i in range(2)
    ]
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        batched = _forward(transformer, inputs)
        singles = torch.cat([_forward(transformer, half) for half in halves])
    finally:
        dit_sparse.unsparsify(transformer)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-5)


def test_radial_uses_the_family_default_variant_unless_set_explicitly(built):
    transformer, inputs, reference = built("hunyuan_video")
    session = dit_sparse.hooks.session_of
    try:
        dit_sparse.sparsify(transformer, "radial", block_size=16)
        assert session(transformer).config == dit_sparse.RadialConfig(block_size=16, variant="hunyuan")
        radial = _forward(transformer, inputs)
        hunyuan_mask = dit_sparse.patterns.radial(FAMILIES["hunyuan_video"].video, block_size=16, variant="hunyuan")
        assert dit_sparse.sparsity_stats(transformer)["density"] == pytest.approx(hunyuan_mask.density)
        assert hunyuan_mask.density < 1 and not torch.allclose(radial, reference, atol=1e-3)

        dit_sparse.sparsify(transformer, "radial", block_size=16, variant="wan")
        assert session(transformer).config.variant == "wan"
        dit_sparse.sparsify(transformer, dit_sparse.RadialConfig(block_size=16))  # a config object is taken as given
        assert session(transformer).config.variant == "wan"
    finally:
        dit_sparse.unsparsify(transformer)
    cogvideox, _, _ = built("cogvideox")
    try:
        dit_sparse.sparsify(cogvideox, "radial", block_size=16)
        assert session(cogvideox).config.variant == "wan"  # the paper's default elsewhere
    finally:
        dit_sparse.unsparsify(cogvideox)


def test_transformers_of_two_families_get_their_own_config_and_shared_statistics(built):
    hunyuan, hunyuan_inputs, _ = built("hunyuan_video")
    cogvideox, cogvideox_inputs, _ = built("cogvideox")
    dit_sparse.sparsify([hunyuan, cogvideox], "radial", block_size=16)
    try:
        assert dit_sparse.hooks.session_of(hunyuan).config.variant == "hunyuan"
        assert dit_sparse.hooks.session_of(cogvideox).config.variant == "wan"
        _forward(hunyuan, hunyuan_inputs)
        _forward(cogvideox, cogvideox_inputs)
        assert dit_sparse.sparsity_stats([hunyuan, cogvideox])["attention_calls"] == 2 + 2
    finally:
        dit_sparse.unsparsify([hunyuan, cogvideox])


@pytest.mark.parametrize("name", ["flux", "flux2", "qwen_image"])
def test_radial_on_flux_is_refused_before_anything_changes(built, name):
    transformer, _, _ = built(name)
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        with pytest.raises(ValueError, match=f"'radial' does not apply to {type(transformer).__name__}: .* one frame"):
            dit_sparse.sparsify(transformer, "radial")
        assert dit_sparse.sparsity_stats(transformer)["method"] == "random"
    finally:
        dit_sparse.unsparsify(transformer)


def test_flux_kontext_reference_image_of_the_output_size_is_a_second_frame(built, attention_probe):
    transformer, inputs, _ = built("flux")
    kontext = dict(inputs, hidden_states=torch.randn(2, 2 * 12 * 10, 8), img_ids=_flux_ids(2, 12, 10))
    # Ids with no frame-0 image grid first (here the reference's tokens first): no grid to tell, a clear error.
    reference_first = dict(
        inputs, hidden_states=torch.randn(2, 12 * 10 + 6 * 5, 8),
        img_ids=torch.cat([_flux_ids(2, 6, 5)[6 * 5 :], _flux_ids(1, 12, 10)]),
    )
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        _forward(transformer, kontext)
        assert attention_probe[0][4] == VideoLayout(2, 12, 10, 6, "prefix")
        with pytest.raises(ValueError, match=r"img_ids \(150, 3\) are not the image's tokens on one height x width "
                                             "grid at frame 0"):
            _forward(transformer, reference_first)
        with pytest.raises(ValueError, match=r"FLUX hidden_states have 241 tokens, but img_ids \(240, 3\) make 240"):
            _forward(transformer, dict(kontext, hidden_states=torch.randn(2, 2 * 12 * 10 + 1, 8)))
    finally:
        dit_sparse.unsparsify(transformer)


def test_flux2_layered_ids_are_refused_clearly(built, attention_probe):
    transformer, inputs, _ = built("flux2")
    layered = dict(inputs, img_ids=_flux2_ids(0, 12, 10) + torch.tensor([0, 0, 0, 1]))
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        _forward(transformer, inputs)
        assert attention_probe[0][4] == VideoLayout(1, 12, 10, 6, "prefix")
        with pytest.raises(ValueError, match=r"FLUX.2 img_ids .* or are layered \(a layer axis not 0\)"):
            _forward(transformer, layered)
    finally:
        dit_sparse.unsparsify(transformer)


def test_qwen_image_shapes_that_differ_between_samples_are_refused_clearly(built):
    transformer, inputs, _ = built("qwen_image")
    differ = dict(inputs, hidden_states=torch.randn(2, 12 * 10 + 6 * 5, 8),
                  img_shapes=[[(1, 12, 10), (1, 6, 5)], [(1, 12, 10), (1, 5, 6)]])
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        with pytest.raises(ValueError, match=r"img_shapes .* differ between samples"):
            _forward(transformer, differ)
        # QwenImageControlNetPipeline passes one shape per sample, not a list of them.
        torch.testing.assert_close(_forward(transformer, dict(inputs, img_shapes=[(1, 12, 10)] * 2)),
                                   _forward(transformer, inputs), atol=0, rtol=0)
        with pytest.raises(ValueError, match=r"hidden_states have 120 tokens, but img_shapes .* make 100"):
            _forward(transformer, dict(inputs, img_shapes=[[(1, 10, 10)]] * 2))
    finally:
        dit_sparse.unsparsify(transformer)


@pytest.mark.parametrize("name, message", [
    # LTX-Video reads its grid from the coordinates (tests/test_joint_tokens.py); ones of no grid are refused.
    ("ltx_video", r"LTX-Video video_coords \(2, 3, 192\): the tokens after the conditioning tokens \(the last 192\) "
                  "do not form a frames x height x width grid"),
    ("ltx2_video", r"LTX-2 transformer called without int num_frames, height and width .*\(LTX2ConditionPipeline"),
])
def test_ltx_video_coords_without_a_grid_are_a_clear_error(built, name, message):
    transformer, inputs, _ = built(name)
    inputs = {key: value for key, value in inputs.items() if key not in ("num_frames", "height", "width")}
    coords = (2, 3, 192) if name == "ltx_video" else (2, 3, 192, 2)
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        with pytest.raises(ValueError, match=message):
            _forward(transformer, dict(inputs, video_coords=torch.zeros(coords)))
    finally:
        dit_sparse.unsparsify(transformer)


def test_ltx2_spatio_temporal_guidance_blocks_pass_values_through_without_attending(built, attention_probe):
    # STG's call perturbs block 1 for the whole batch: that block's video self-attention returns its values without
    # an attention call (not an error), every other block attends sparsely; a batch perturbed only in part attends.
    transformer, inputs, _ = built("ltx2_video")
    stg = dict(inputs, spatio_temporal_guidance_blocks=[1])
    expected = _forward(transformer, stg)
    dit_sparse.sparsify(transformer, "dense", block_size=16)
    try:
        dense = _forward(transformer, stg)
        dense_stats = dit_sparse.sparsity_stats(transformer)
    finally:
        dit_sparse.unsparsify(transformer)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, built("ltx2_video")[2], atol=1e-3)  # the perturbation changed the output
    assert len(attention_probe) == 1  # the dense method's full-mask call of block 0
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        sparse = _forward(transformer, stg)
        assert len(attention_probe) == 2  # block 0 only
        _forward(transformer, dict(stg, perturbation_mask=torch.tensor([0.0, 1.0])))
        assert len(attention_probe) == 4  # both blocks: the second sample is not perturbed
    finally:
        dit_sparse.unsparsify(transformer)
    assert dense_stats["attention_calls"] == 2  # the transformer hook counts the hooked sites it ran
    assert not torch.allclose(sparse, expected, atol=1e-3)


def test_ltx2_video_self_attention_mask_is_refused_clearly(built):
    # IC-LoRA's multiplicative self-attention mask becomes an additive bias the sparse path does not combine with its
    # own mask: a clear error naming the module, not a video attending where the mask forbids.
    transformer, inputs, _ = built("ltx2_video")
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        with pytest.raises(NotImplementedError, match=r"transformer_blocks\.0\.attn1: got an attention mask"):
            _forward(transformer, dict(inputs, video_self_attention_mask=torch.ones(2, 192, 192)))
    finally:
        dit_sparse.unsparsify(transformer)


def test_ltx2_image_to_video_timesteps_per_token_follow_the_steps(built):
    # LTX2ImageToVideoPipeline passes a timestep per video token (its conditioned first frame at 0): the step counter
    # reads the largest, so the dense steps end on time.
    transformer, inputs, _ = built("ltx2_video")
    first_frame = torch.arange(3 * 8 * 8) < 8 * 8
    dit_sparse.sparsify(transformer, "random", dense_steps=1, **SPARSE)
    try:
        densities = []
        for value in (900.0, 900.0, 700.0):  # step 0 (cond and uncond calls), step 1
            timestep = torch.where(first_frame, 0.0, value).expand(2, -1)
            _forward(transformer, dict(inputs, timestep=timestep, audio_timestep=torch.full((2,), value)))
            densities.append(dit_sparse.sparsity_stats(transformer, reset=True)["density"])
    finally:
        dit_sparse.unsparsify(transformer)
    assert densities[:2] == [1.0, 1.0] and densities[2] < 1.0


def test_patterns_that_read_q_and_k_build_their_mask_in_each_call(built, monkeypatch):
    transformer, inputs, _ = built("hunyuan_video")
    built_for = []
    build_mask = dit_sparse.session.build_mask

    def recording_build_mask(layout, config, q=None, k=None, **kwargs):
        built_for.append((layout, q is not None and k is not None))
        return build_mask(layout, config, q=q, k=k, **kwargs)

    monkeypatch.setattr(dit_sparse.session, "is_static", lambda config: False)
    monkeypatch.setattr(dit_sparse.session, "build_mask", recording_build_mask)
    dit_sparse.sparsify(transformer, "random", dense_layers=1, **SPARSE)
    try:
        _forward(transformer, inputs)
        stats = dit_sparse.sparsity_stats(transformer)
    finally:
        dit_sparse.unsparsify(transformer)
    assert built_for == [(VideoLayout(3, 8, 8, 7, "suffix"), True)]  # layer 1 only: layer 0 is dense
    assert stats["attention_calls"] == 2 and 0.5 < stats["density"] < 1


def test_vdit_builds_one_mask_per_layer_whatever_the_text_length(built):
    # Mochi attends one sample at a time, each with its own text length: both share the layer's video mask.
    transformer, inputs, _ = built("mochi")
    dit_sparse.sparsify(transformer, "vdit", block_size=16)
    try:
        _forward(transformer, inputs)
        stats = dit_sparse.sparsity_stats(transformer)
    finally:
        dit_sparse.unsparsify(transformer)
    assert stats["attention_calls"] == 4 and stats["mask_builds"] == 2


@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "mochi"])  # Mochi's blocks graph-break
def test_regional_compilation_runs_every_block_through_the_op(built, name):
    # The benchmark's regional mode: compile_repeated_blocks(fullgraph=True), or each block compiled where diffusers
    # names no repeated blocks (CogVideoX): every block traces without a graph break, its self-attention the custom
    # op, and matches eager mode.
    from test_compile import _GraphRecorder
    from test_transformer_step import transformer_step

    transformer, inputs, _ = built(name)
    recorder = _GraphRecorder()
    torch._dynamo.reset()
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        eager = _forward(transformer, inputs)
        with transformer_step.compiled(transformer, "regional", backend=recorder) as runner:
            compiled = _forward(runner, inputs)
        assert all(module._compiled_call_impl is None for module in transformer.modules())  # undone on exit
    finally:
        dit_sparse.unsparsify(transformer)
        torch._dynamo.reset()
    ops = sum(targets.count("dit_sparse.attention") for targets in map(recorder.targets, recorder.graphs))
    assert recorder.graphs and ops >= 1
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


def test_wan_vace_numbers_its_vace_blocks_first_as_they_run(built, attention_probe):
    # The VACE blocks run before the main blocks: `dense_layers=2` keeps them dense and sparsifies the main blocks.
    transformer, inputs, _ = built("wan_vace")
    sites = dit_sparse.pipelines.find_adapter(transformer).attention_sites(transformer)
    assert [(site.name, site.layer) for site in sites] == [
        ("vace_blocks.0.attn1", 0), ("vace_blocks.1.attn1", 1), ("blocks.0.attn1", 2), ("blocks.1.attn1", 3)
    ]
    calls = []
    handles = [
        module.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
        for name, module in transformer.named_modules() if name.endswith("attn1")
    ]
    dit_sparse.sparsify(transformer, "random", dense_layers=2, **SPARSE)
    try:
        _forward(transformer, inputs)
    finally:
        dit_sparse.unsparsify(transformer)
        for handle in handles:
            handle.remove()
    assert calls == [site.name for site in sites]  # the execution order the numbering follows
    assert len(attention_probe) == 2  # only the two main blocks ran the sparse path


def test_skyreels_v2_asynchronous_diffusion_forcing_is_refused_clearly(built):
    # Diffusion forcing with frame blocks of 2 (`causal_block_size`) passes a block-causal attention mask, which the
    # sparse path does not combine with its own: a clear error, not a silently non-causal video.
    transformer, inputs, _ = built("skyreels_v2")
    inputs = dict(inputs, hidden_states=torch.randn(2, 16, 4, 16, 16), enable_diffusion_forcing=True,
                  timestep=torch.tensor([[700, 700, 500, 500]] * 2))
    transformer._set_ar_attention(2)
    dit_sparse.sparsify(transformer, "random", **SPARSE)
    try:
        with pytest.raises(NotImplementedError, match=r"blocks\.0\.attn1: got an attention mask \(1, 1, 256, 256\)"):
            _forward(transformer, inputs)
    finally:
        dit_sparse.unsparsify(transformer)
        transformer.register_to_config(num_frame_per_block=1)


def test_no_adapter_error_lists_every_supported_class():
    with pytest.raises(ValueError, match="no dit-sparse adapter for transformer class 'Linear'") as error:
        dit_sparse.sparsify(torch.nn.Linear(4, 4), "random")
    for name in (
        "CogVideoXTransformer3DModel", "FluxTransformer2DModel", "Flux2Transformer2DModel",
        "QwenImageTransformer2DModel", "HunyuanVideo15Transformer3DModel",
        "HunyuanVideoTransformer3DModel", "LTXVideoTransformer3DModel", "LTX2VideoTransformer3DModel",
        "MochiTransformer3DModel",
        "WanTransformer3DModel", "ChronoEditTransformer3DModel", "SkyReelsV2Transformer3DModel",
        "WanVACETransformer3DModel", "WanAnimateTransformer3DModel",
    ):
        assert name in str(error.value)
