"""sparsify / unsparsify on real diffusers Wan classes at tiny sizes (randomly initialised, built offline)."""

import copy
import logging
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import WanPipeline, WanTransformer3DModel

import dit_sparse
import dit_sparse.hooks
from dit_sparse.hooks import hooked_modules
from dit_sparse.pipelines.adapters import find_adapter
from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline
from dit_sparse.video import psnr

# 17 frames at 96 px: 5 latent frames of 6 x 6 tokens, 180 video tokens, 12 blocks of 16.
CALL = dict(prompt="a red fish swims over the sea", num_frames=17, height=96, width=96, num_inference_steps=3)


def _render(pipe, output_type="latent", **overrides):
    kwargs = {**CALL, **overrides}
    return pipe(**kwargs, output_type=output_type, generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_wan_pipeline(seed=0)


@pytest.fixture(scope="module")
def dense_latents(pipe):
    return _render(pipe)




def test_dense_method_matches_the_unwrapped_pipeline(pipe, dense_latents):
    dit_sparse.sparsify(pipe, "dense", block_size=16)
    try:
        latents = _render(pipe)
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)
    # 3 steps x 2 CFG calls x 2 layers, every one through the sparse path with a full mask.
    assert stats == {"method": "dense", "density": 1.0, "attention_calls": 12, "sparse_calls": 12}
    torch.testing.assert_close(latents, dense_latents, atol=1e-4, rtol=1e-4)


def test_unsparsify_is_bit_identical_to_a_pipeline_never_wrapped(pipe):
    never_wrapped = _render(build_tiny_wan_pipeline(seed=0))
    dit_sparse.sparsify(pipe, "radial", block_size=16)
    assert hooked_modules(pipe.transformer) == ["", "blocks.0.attn1", "blocks.1.attn1"]
    sparse = _render(pipe)
    dit_sparse.unsparsify(pipe)
    assert hooked_modules(pipe.transformer) == []
    for module in pipe.transformer.modules():
        assert "forward" not in module.__dict__
    assert not torch.equal(sparse, never_wrapped)
    assert torch.equal(_render(pipe), never_wrapped)


def test_a_sparsified_model_refuses_deepcopy_and_pickle_and_copies_once_unsparsified(pipe, dense_latents):
    # diffusers' hooks keep the original forward in a closure that deepcopy does not copy: a copy would silently run
    # the original's hooks and weights, so a copy is refused with a clear error instead.
    dit_sparse.sparsify(pipe, "radial", block_size=16, dense_steps=0)
    try:
        sparse = _render(pipe)
        for target in (pipe, pipe.transformer, pipe.transformer.blocks[0].attn1):
            with pytest.raises(TypeError, match="unsparsify"):
                copy.deepcopy(target)
            with pytest.raises(TypeError, match="unsparsify"):
                pickle.dumps(target)
        assert dit_sparse.sparsity_stats(pipe)["method"] == "radial"  # the failed copies changed nothing
    finally:
        dit_sparse.unsparsify(pipe)
    twin = copy.deepcopy(pipe.transformer)  # what the error advises: copy unsparsified, then sparsify the copy
    pipe.transformer, original = twin, pipe.transformer
    try:
        dit_sparse.sparsify(pipe, "radial", block_size=16, dense_steps=0)
        assert hooked_modules(original) == []
        assert torch.equal(_render(pipe), sparse)
        dit_sparse.unsparsify(pipe)
        torch.testing.assert_close(_render(pipe), dense_latents, atol=1e-4, rtol=1e-4)
    finally:
        pipe.transformer = original


def test_radial_changes_the_video_and_its_psnr_to_dense_is_reported(pipe, record_property):
    dense = _render(pipe, output_type="np")[0]
    dit_sparse.sparsify(pipe, "radial", block_size=16)
    try:
        radial = _render(pipe, output_type="np")[0]
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)
    assert radial.shape == dense.shape == (17, 96, 96, 3)
    assert 0 < stats["density"] < 1
    assert not np.array_equal(radial, dense)
    value = psnr(radial, dense)
    record_property("radial_psnr_db", value)
    print(f"radial vs dense on the tiny random Wan pipeline: PSNR {value:.2f} dB at density {stats['density']:.3f}")
    assert np.isfinite(value) and value > 10


def test_dense_steps_and_dense_layers_follow_cfg_calls(pipe):
    # 4 steps with CFG: 8 transformer calls, 2 layers each. The first 2 steps (4 calls) are dense.
    dit_sparse.sparsify(pipe, "random", density=0.25, block_size=16, dense_steps=2)
    try:
        _render(pipe, num_inference_steps=4)
        mask_density = dit_sparse.patterns.random_blocks(
            dit_sparse.VideoLayout(5, 6, 6), density=0.25, block_size=16
        ).density
        stats = dit_sparse.sparsity_stats(pipe, reset=True)
        assert stats["attention_calls"] == 16
        assert stats["density"] == pytest.approx((8 * 1.0 + 8 * mask_density) / 16)

        # Called directly, without the pipeline's cache context: steps are counted from the timestep.
        dit_sparse.sparsify(pipe, "random", density=0.25, block_size=16, dense_steps=1, dense_layers=1)
        latents = torch.randn(1, 16, 5, 12, 12)
        text = torch.randn(1, 8, 32)
        for t in (900.0, 900.0, 500.0, 500.0):  # two steps of CFG pairs
            pipe.transformer(latents, torch.tensor([t]), text, return_dict=False)
        stats = dit_sparse.sparsity_stats(pipe)
        # step 0: 4 dense calls; step 1: layer 0 dense, layer 1 sparse.
        assert stats["density"] == pytest.approx((6 * 1.0 + 2 * mask_density) / 8)
    finally:
        dit_sparse.unsparsify(pipe)


def test_observe_runs_dense_and_hands_the_observer_each_self_attention_calls_q_k_v(pipe, dense_latents):
    # 3 steps x 2 CFG calls x 2 layers. The observer's q, k, v are the call's own: attention over them, projected by
    # the module's to_out, gives the module's output.
    observed, outputs = [], []

    def observer(layer, step, layout, q, k, v):
        attn = pipe.transformer.blocks[layer].attn1
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, S, H * D)
        observed.append((layer, step, layout, attn.to_out[0](out).detach()))

    attn0 = pipe.transformer.blocks[0].attn1
    handle = attn0.register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    adapter = find_adapter(pipe.transformer)
    try:
        with dit_sparse.hooks.observe(pipe.transformer, adapter, observer) as session:
            assert hooked_modules(pipe.transformer) == ["", "blocks.0.attn1", "blocks.1.attn1"]
            latents = _render(pipe)
    finally:
        handle.remove()
    assert hooked_modules(pipe.transformer) == []
    assert torch.equal(latents, dense_latents)  # the original dense call in every step and layer
    expected = [(layer, step) for step in range(3) for _branch in ("cond", "uncond") for layer in (0, 1)]
    assert [(layer, step) for layer, step, _, _ in observed] == expected
    assert {layout for _, _, layout, _ in observed} == {dit_sparse.VideoLayout(5, 6, 6)}
    layer0 = [out for layer, _, _, out in observed if layer == 0]
    assert len(layer0) == len(outputs) == 6
    for mine, theirs in zip(layer0, outputs):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert session.attention_calls == 12 and float(session.kept_fraction_sum) == 12.0  # all dense


def test_observe_removes_its_hooks_when_the_block_raises_and_refuses_a_sparsified_model(pipe):
    adapter = find_adapter(pipe.transformer)
    with pytest.raises(RuntimeError, match="inside the block"):
        with dit_sparse.hooks.observe(pipe.transformer, adapter, lambda **call: None):
            raise RuntimeError("inside the block")
    assert hooked_modules(pipe.transformer) == []
    with pytest.raises(TypeError, match="observer must be callable, got int"):
        with dit_sparse.hooks.observe(pipe.transformer, adapter, 3):
            pass
    assert hooked_modules(pipe.transformer) == []
    dit_sparse.sparsify(pipe, "radial", block_size=16)
    try:
        with pytest.raises(ValueError, match="is sparsified: call dit_sparse.unsparsify"):
            with dit_sparse.hooks.observe(pipe.transformer, adapter, lambda **call: None):
                pass
        assert dit_sparse.sparsity_stats(pipe)["method"] == "radial"  # the sparsified setting is untouched
    finally:
        dit_sparse.unsparsify(pipe)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dit_sparse" and r.levelname == "WARNING"]


def test_dense_steps_covering_the_run_warns_once_and_counts_no_sparse_call(pipe, caplog):
    # 3 steps x 2 CFG calls x 2 layers = 12 calls a run; dense_steps=2 leaves step 2's 4 calls sparse.
    caplog.set_level(logging.WARNING, logger="dit_sparse")
    dit_sparse.sparsify(pipe, "radial", block_size=16, dense_steps=2)
    try:
        _render(pipe)
        assert dit_sparse.sparsity_stats(pipe)["sparse_calls"] == 4 and _warnings(caplog) == []
        dit_sparse.sparsify(pipe, "radial", block_size=16, dense_steps=100)
        _render(pipe)
        _render(pipe)
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)
    assert stats["attention_calls"] == 24 and stats["sparse_calls"] == 0 and stats["density"] == 1.0
    (message,) = _warnings(caplog)  # once, not once per run or call
    assert "dense_steps=100 covers all 3 steps" in message and "'radial' method never runs" in message


def test_dense_layers_covering_every_block_warns_at_sparsify(pipe, caplog):
    caplog.set_level(logging.WARNING, logger="dit_sparse")
    dit_sparse.sparsify(pipe, "radial", block_size=16, dense_layers=1)  # the tiny Wan has 2 blocks
    assert _warnings(caplog) == []
    dit_sparse.sparsify(pipe, "radial", block_size=16, dense_layers=2)
    try:
        (message,) = _warnings(caplog)
        assert "dense_layers=2 covers all 2 blocks of WanTransformer3DModel" in message
        _render(pipe)
        assert dit_sparse.sparsity_stats(pipe)["sparse_calls"] == 0
    finally:
        dit_sparse.unsparsify(pipe)


def test_a_block_holding_the_whole_video_warns_once_that_the_mask_is_dense(pipe, caplog):
    caplog.set_level(logging.WARNING, logger="dit_sparse")
    dit_sparse.sparsify(pipe, "radial", block_size=16)
    try:
        _render(pipe)
        assert _warnings(caplog) == []
        dit_sparse.sparsify(pipe, "radial", block_size=131072)  # accepted: a power of two
        _render(pipe)
        _render(pipe)
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)
    assert stats["density"] == 1.0 and stats["sparse_calls"] == stats["attention_calls"] == 24
    (message,) = _warnings(caplog)
    assert "block_size=131072 >= the 180 video tokens" in message and "mask is dense" in message


def test_sparsify_refuses_an_empty_list(pipe):
    with pytest.raises(ValueError, match=r"got an empty list \[\]: pass a pipeline, a transformer"):
        dit_sparse.sparsify([], "radial")
    with pytest.raises(ValueError, match=r"got an empty tuple \(\)"):
        dit_sparse.sparsify((), "radial")
    assert dit_sparse.unsparsify([]) == []  # removing from nothing stays a no-op


def test_both_wan22_transformers_are_wrapped(pipe):
    components = dict(pipe.components)
    components["transformer_2"] = build_tiny_wan_pipeline(seed=1).transformer
    wan22 = WanPipeline(**components, boundary_ratio=0.5)
    dit_sparse.sparsify(wan22, "radial", block_size=16)
    try:
        assert hooked_modules(wan22.transformer) == ["", "blocks.0.attn1", "blocks.1.attn1"]
        assert hooked_modules(wan22.transformer_2) == ["", "blocks.0.attn1", "blocks.1.attn1"]
        _render(wan22, num_inference_steps=4)
        # Each of the 4 steps runs one of the two experts, twice (CFG), over 2 layers: all 16 calls intercepted.
        assert dit_sparse.sparsity_stats(wan22)["attention_calls"] == 16
    finally:
        dit_sparse.unsparsify(wan22)
    assert hooked_modules(wan22.transformer_2) == []


def test_sparsify_twice_replaces_the_first_setting(pipe):
    dit_sparse.sparsify(pipe, "random", density=0.5, block_size=16)
    dit_sparse.sparsify(pipe, "dense", block_size=16)
    try:
        assert hooked_modules(pipe.transformer) == ["", "blocks.0.attn1", "blocks.1.attn1"]
        _render(pipe, num_inference_steps=1)
        assert dit_sparse.sparsity_stats(pipe) == {"method": "dense", "density": 1.0, "attention_calls": 4,
                                                   "sparse_calls": 4}
    finally:
        dit_sparse.unsparsify(pipe)


def test_works_with_model_cpu_offload(dense_latents):
    offloaded = build_tiny_wan_pipeline(seed=0)
    offloaded.enable_model_cpu_offload(device="cpu")
    dit_sparse.sparsify(offloaded, "dense", block_size=16)
    latents = _render(offloaded)
    assert dit_sparse.sparsity_stats(offloaded)["attention_calls"] == 12
    torch.testing.assert_close(latents, dense_latents, atol=1e-4, rtol=1e-4)
    dit_sparse.unsparsify(offloaded)
    assert torch.equal(_render(offloaded), dense_latents)


def test_image_to_video_transformer_keeps_cross_attention_dense():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=24, added_kv_proj_dim=32,
        qk_norm="rms_norm_across_heads", cross_attn_norm=True,
    ).eval()
    latents = torch.randn(1, 36, 3, 8, 8)
    args = (latents, torch.tensor([700.0]), torch.randn(1, 512, 32))
    kwargs = dict(encoder_hidden_states_image=torch.randn(1, 257, 24), return_dict=False)
    with torch.no_grad():
        reference = transformer(*args, **kwargs)[0]
        dit_sparse.sparsify(transformer, "dense", block_size=16)
        assert hooked_modules(transformer) == ["", "blocks.0.attn1", "blocks.1.attn1"]
        torch.testing.assert_close(transformer(*args, **kwargs)[0], reference, atol=1e-5, rtol=1e-5)
        dit_sparse.sparsify(transformer, "random", density=0.3, block_size=16)
        assert not torch.allclose(transformer(*args, **kwargs)[0], reference, atol=1e-3)
        dit_sparse.unsparsify(transformer)
        assert torch.equal(transformer(*args, **kwargs)[0], reference)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("sparse-magic", {}, "unknown method 'sparse-magic'"),
        ("random", {"density": 1.2}, r"density must be in \(0, 1\], got 1.2"),
        ("radial", {"dense_steps": -3}, "dense_steps must be an int >= 0, got -3"),
    ],
)
def test_bad_input_raises_before_anything_changes(pipe, method, options, message):
    dit_sparse.sparsify(pipe, "random", density=0.5, block_size=16)
    try:
        with pytest.raises(ValueError, match=message):
            dit_sparse.sparsify(pipe, method, **options)
        assert dit_sparse.sparsity_stats(pipe)["method"] == "random"  # the earlier setting is still in place
    finally:
        dit_sparse.unsparsify(pipe)


def test_no_adapter_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match=r"no dit-sparse adapter for transformer class 'Linear'.*WanTransformer3DModel"):
        dit_sparse.sparsify(torch.nn.Linear(4, 4), "radial")
    components = {k: v for k, v in pipe.components.items() if not k.startswith("transformer")}
    with pytest.raises(ValueError, match="no dit-sparse adapter for pipeline 'Wan"):

        class _Pipe:
            pass

        bare = _Pipe()
        bare.components = components
        bare.__class__.__name__ = "WanLikePipeline"
        dit_sparse.sparsify(bare, "radial")
    with pytest.raises(TypeError, match="got str"):
        dit_sparse.sparsify("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "radial")
    with pytest.raises(ValueError, match="not sparsified"):
        dit_sparse.sparsity_stats(pipe)


def test_non_native_attention_backend_is_rejected(pipe):
    processor = pipe.transformer.blocks[0].attn1.processor
    processor._attention_backend = "flash"
    try:
        with pytest.raises(ValueError, match="attention backend 'flash'"):
            dit_sparse.sparsify(pipe, "radial")
    finally:
        processor._attention_backend = None
    assert hooked_modules(pipe.transformer) == []


def test_a_backend_that_cannot_run_on_the_pipelines_device_is_refused_by_sparsify(pipe, monkeypatch):
    """fa4 (or triton without TRITON_INTERPRET) on a CPU pipeline: refused by sparsify, nothing changed; under model
    CPU offload the device is not known from the weights, so the first attention call refuses it instead."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dit_sparse.sparsify(pipe, "random", density=0.5, block_size=16)
    try:
        with pytest.raises(ValueError, match="backend 'fa4' cannot run on cpu here: .*CUDA GPU"):
            dit_sparse.sparsify(pipe, "radial", backend="fa4")
        with pytest.raises(ValueError, match="backend 'triton' cannot run on cpu here: .*TRITON_INTERPRET=1"):
            dit_sparse.sparsify(pipe, "dense", block_size=16, backend="triton")
        assert dit_sparse.sparsity_stats(pipe)["method"] == "random"  # the earlier setting is still in place
    finally:
        dit_sparse.unsparsify(pipe)
    offloaded = build_tiny_wan_pipeline(seed=0)
    offloaded.enable_model_cpu_offload(device="cpu")
    dit_sparse.sparsify(offloaded, "dense", block_size=16, backend="fa4")
    try:
        with pytest.raises(ValueError, match="backend 'fa4' cannot run here: .*CUDA GPU"):
            _render(offloaded, num_inference_steps=1)
    finally:
        dit_sparse.unsparsify(offloaded)
