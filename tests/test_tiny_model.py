"""The shipped tiny trained model (issue 4's bar), in a module of its own: it renders at the model's full size, so it
runs on every core (the training tests' module pins torch to one thread for its toy sizes)."""

import pytest
from dit_sparse.pipelines import tiny
from dit_sparse.pipelines import train_tiny as tt


@pytest.mark.slow
@pytest.mark.skipif(
    not tiny.available(), reason="the tiny model is not trained and exported yet (pipelines/tiny_model/)"
)
def test_the_shipped_tiny_model_follows_at_least_8_of_10_captions():
    """The issue's bar: 10 evaluation prompts at fixed seeds, the demo's size and settings (`tiny.DEFAULT_STEPS`
    steps), checked with OpenCV. Minutes on a CPU (10 renders of 81 frames at 160 x 160 px)."""
    from dit_sparse.pipelines.caption_score import caption_following

    config, _ = tt.PRESETS["default"]
    pipe = tiny.load()
    pipe.set_progress_bar_config(disable=True)
    result = caption_following(
        pipe, n=10, frames=config.frames, height=config.height, width=config.width, steps=tiny.DEFAULT_STEPS
    )
    assert result["n_ok"] >= 8, [(p, d["reason"]) for p, d in zip(result["prompts"], result["details"]) if not d["ok"]]
