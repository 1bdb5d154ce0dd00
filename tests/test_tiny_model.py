"""The shipped tiny trained model (issue 4's bar), in a module of its own: it renders at the model's full size, so it
runs on every core (the training tests' module pins torch to one thread for its toy sizes)."""

import pytest
from dit_sparse.pipelines import tiny
from dit_sparse.pipelines.tiny import train as tt


@pytest.mark.slow
@pytest.mark.skipif(
    not tiny.available(), reason="the tiny model is not trained and exported yet (pipelines/tiny_model/)"
)
def test_the_shipped_tiny_model_follows_at_least_8_of_10_captions():
    """The issue's bar: 10 evaluation prompts at fixed seeds, the demo's size and settings (`tiny.DEFAULT_STEPS`
    steps), checked with OpenCV. Minutes on a CPU (10 renders of 81 frames at 160 x 160 px)."""
    from dit_sparse.pipelines.tiny.caption_score import caption_following

    config, _ = tt.PRESETS["default"]
    pipe = tiny.load()
    pipe.set_progress_bar_config(disable=True)
    result = caption_following(
        pipe, n=10, frames=config.frames, height=config.height, width=config.width, steps=tiny.DEFAULT_STEPS
    )
    assert result["n_ok"] >= 8, [(p, d["reason"]) for p, d in zip(result["prompts"], result["details"]) if not d["ok"]]


def test_channels_last_convolutions_keep_the_weights_and_the_decode():
    """The CPU speed-up `tiny.load` applies: every Conv3d weight channels-last, same values, same decode (the
    oracle: the same VAE with contiguous weights)."""
    import torch
    from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

    vae = build_tiny_wan_pipeline(seed=0).vae
    before = {name: value.clone() for name, value in vae.state_dict().items()}
    latents = torch.randn(1, vae.config.z_dim, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(latents).sample
        assert tiny.channels_last_convolutions(vae) is vae
        decoded = vae.decode(latents).sample
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)
    assert not all(m.weight.is_contiguous() for m in convs)  # really another layout (not 1x1x1 kernels only)
    assert all(torch.equal(before[name], value) for name, value in vae.state_dict().items())
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not tiny.available(), reason="the tiny model is not trained and exported yet")
def test_load_on_the_cpu_gives_channels_last_vae_convolutions_and_contiguous_elsewhere():
    import torch

    pipe = tiny.load()
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d)
               for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv3d))
    assert all(p.is_contiguous() for p in pipe.transformer.parameters())
