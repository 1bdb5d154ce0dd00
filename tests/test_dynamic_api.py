"""Dynamic methods through `sparsify` on the tiny random Wan pipeline: dense-equal at density 1, sparse otherwise,
restored exactly; the `refresh` schedule counted; calibration profiles through JSON and back, and refused for
another model. `vdit` (fixed per-layer, per-head patterns from a profile): its masks are `vdit_mask` of the profile's
patterns, built once per layout and layer."""

import json

import pytest
import torch
from test_api import CALL, _render

import dit_sparse
from dit_sparse.hooks import session_of
from dit_sparse.layout import VideoLayout
from dit_sparse.patterns.vdit import DEFAULT_PATTERN, HeadPattern, vdit_mask
from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 180 video tokens: 12 blocks of 16 (tiles of 1 x 4 x 4 for draft).
METHODS = {
    "draft": dict(tile=(1, 4, 4)),
    "reorder-axes": dict(strategy="axes", axes="hwf", block_size=16),
    "reorder-cluster": dict(strategy="cluster", block_size=16),
}


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_wan_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dense_latents(pipe):
    return _render(pipe)


def _calibrated(pipe, tmp_path_factory, method: str, **settings):
    """A profile calibrated on two prompts at step 1 of 2, and its path."""
    path = tmp_path_factory.mktemp("profiles") / f"{method}.json"
    kwargs = dict(num_frames=CALL["num_frames"], height=CALL["height"], width=CALL["width"], num_inference_steps=2)
    profile = dit_sparse.calibrate(pipe, ["a red fish", "a dog runs"], method, steps=[1], path=path,
                                   pipe_kwargs=kwargs, progress=False, **settings)
    return profile, path


@pytest.fixture(scope="module")
def draft_profile(pipe, tmp_path_factory):
    return _calibrated(pipe, tmp_path_factory, "draft", target_recall=0.8, tile=(1, 4, 4))


@pytest.fixture(scope="module")
def vdit_profile(pipe, tmp_path_factory):
    return _calibrated(pipe, tmp_path_factory, "vdit", max_error=0.3, block_size=16)  # tile (1, 4, 4)


def _method(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_dynamic_method_is_dense_at_density_one_sparse_below_and_unsparsify_restores(pipe, dense_latents, name):
    dit_sparse.sparsify(pipe, _method(name), density=1.0, **METHODS[name])
    try:
        full = _render(pipe)
        assert dit_sparse.sparsity_stats(pipe)["density"] == 1.0
        dit_sparse.sparsify(pipe, _method(name), density=0.3, **METHODS[name])
        sparse = _render(pipe)
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)
    torch.testing.assert_close(full, dense_latents, atol=1e-4, rtol=1e-4)  # every token order inverted exactly
    # round(0.3 * 12) = 4 of 12 key blocks per query block; the short tail block (4 tokens) moves the token share.
    assert stats["method"] == _method(name) and 0.3 < stats["density"] < 0.37
    assert not torch.allclose(sparse, dense_latents, atol=1e-3)
    assert torch.equal(_render(pipe), dense_latents)  # unwrapped: bit-identical again


@pytest.mark.parametrize("refresh, steps, expected", [(1, 5, 5), (2, 5, 3), (3, 5, 2), ((0, 3), 5, 2), ((1, 4), 5, 3)])
def test_refresh_recomputes_exactly_on_schedule(pipe, refresh, steps, expected):
    # Estimates per step x 2 layers x 2 CFG branches; (1, 4) also estimates at step 0 (nothing to reuse yet).
    dit_sparse.sparsify(pipe, "draft", density=0.5, refresh=refresh, **METHODS["draft"])
    try:
        _render(pipe, num_inference_steps=steps)
        stats = dit_sparse.sparsity_stats(pipe)
        assert stats["mask_builds"] == expected * 4 and stats["attention_calls"] == steps * 4
        built_at = sorted({entry[2] for entry in session_of(pipe.transformer).dynamic_masks.values()})
        assert built_at[-1] == {1: 4, 2: 4, 3: 3, (0, 3): 3, (1, 4): 4}[refresh]
    finally:
        dit_sparse.unsparsify(pipe)


@pytest.mark.parametrize("refresh", [(0,), 3])
def test_a_new_generation_estimates_afresh_even_when_its_step_is_not_due(pipe, refresh):
    # Estimated at step 0 only (refresh (0,), or a period longer than the generation): the next generation, another
    # prompt, must not reuse the previous one's masks. Its output equals a fresh sparsify's on the same prompt.
    options = dict(density=0.3, refresh=refresh, **METHODS["draft"])
    dit_sparse.sparsify(pipe, "draft", **options)
    try:
        _render(pipe, num_inference_steps=2)
        second = _render(pipe, num_inference_steps=2, prompt="a dog runs")
        assert session_of(pipe.transformer).mask_builds == 2 * 2 * 2  # per generation: step 0, 2 layers, 2 branches
        dit_sparse.sparsify(pipe, "draft", **options)
        fresh = _render(pipe, num_inference_steps=2, prompt="a dog runs")
    finally:
        dit_sparse.unsparsify(pipe)
    assert torch.equal(second, fresh)


def test_refresh_without_a_cache_context_keeps_cfg_branches_apart(pipe):
    # Called directly: steps from the falling timestep, branches from the repeated one.
    dit_sparse.sparsify(pipe.transformer, "reorder", strategy="cluster", block_size=16, density=0.5, refresh=2)
    try:
        latents, text = torch.randn(1, 16, 5, 12, 12), torch.randn(1, 8, 32)
        for t in (900.0, 900.0, 700.0, 700.0, 500.0, 500.0):  # three steps of CFG pairs
            pipe.transformer(latents, torch.tensor([t]), text, return_dict=False)
        session = session_of(pipe.transformer)
        assert session.mask_builds == 2 * 2 * 2  # steps 0 and 2, two layers, two branches
        assert {key[1] for key in session.dynamic_masks} == {0, 1}
        assert {key[1] for key in session.pattern_state} == {0, 1}  # centroids kept per branch
    finally:
        dit_sparse.unsparsify(pipe)


def test_profile_round_trips_through_json_and_drives_sparsify(pipe, draft_profile):
    profile, path = draft_profile
    assert (profile.method, profile.transformer, profile.layers, profile.heads) == ("draft", "WanTransformer3DModel",
                                                                                    2, 2)
    assert profile.layout == (5, 6, 6) and profile.meta["samples_per_head"] == 4  # 2 prompts x 2 CFG branches
    loaded = dit_sparse.Profile.load(path)
    assert loaded == profile and loaded.config() == profile.config()
    config = loaded.config(refresh=2)
    assert config.tile == (1, 4, 4) and config.refresh == 2
    assert config.layer_density == tuple(tuple(e["density"] for e in row) for row in profile.entries)
    assert all(0 < d <= 1 for row in config.layer_density for d in row)
    dit_sparse.sparsify(pipe, profile=path, refresh=2)
    try:
        _render(pipe)
        assert session_of(pipe.transformer).config == config
    finally:
        dit_sparse.unsparsify(pipe)


def _edited(path, tmp_path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    return edited


@pytest.mark.parametrize("profile_fixture", ["draft_profile", "vdit_profile"])
def test_a_profile_for_another_model_is_refused(pipe, profile_fixture, request, tmp_path):
    profile, path = request.getfixturevalue(profile_fixture)
    method, entries = profile.method, profile.entries
    cases = [
        (dict(transformer="HunyuanVideoTransformer3DModel"), "calibrated on HunyuanVideoTransformer3DModel, not Wan"),
        (dict(layers=3, entries=entries + entries[:1]), "profile has 3 layers; WanTransformer3DModel has 2"),
        (dict(heads=1, entries=[row[:1] for row in entries]), r"profile has 1 heads per layer; .* has \[2\]"),
        (dict(layers=3), "entries must hold 3 layers of 2 dicts"),
        (dict(entries=[[{"window": 3}] * 2] * 2), rf"\['layer_window'\], which method '{method}' does not take"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            dit_sparse.sparsify(pipe, profile=_edited(path, tmp_path, **changes))
    with pytest.raises(ValueError, match=f"the profile is for method '{method}'; sparsify was asked for 'radial'"):
        dit_sparse.sparsify(pipe, "radial", profile=path)
    with pytest.raises(ValueError, match=r"dense_steps must be an int >= 0"):
        dit_sparse.sparsify(pipe, profile=path, dense_steps=-1)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        dit_sparse.Profile.load(tmp_path / "broken.json")
    assert session_of(pipe.transformer) is None  # nothing was installed


def test_calibrate_reorder_axes_records_an_order_per_head(pipe, tmp_path):
    kwargs = dict(num_frames=CALL["num_frames"], height=CALL["height"], width=CALL["width"], num_inference_steps=1)
    profile = dit_sparse.calibrate(pipe, ["a cat"], "reorder", strategy="axes", block_size=16, pipe_kwargs=kwargs,
                                   progress=False, path=tmp_path / "axes.json")
    config = dit_sparse.Profile.load(tmp_path / "axes.json").config()
    assert config.strategy == "axes" and len(config.layer_axes) == 2
    assert all(order in dit_sparse.patterns.reorder.AXIS_ORDERS for row in config.layer_axes for order in row)
    assert [[e["axes"] for e in row] for row in profile.entries] == [list(row) for row in config.layer_axes]
    with pytest.raises(ValueError, match="calibrate supports methods"):
        dit_sparse.calibrate(pipe, ["a cat"], "radial")
    with pytest.raises(ValueError, match=r"target_recall must be in \(0, 1\], got 1.5"):
        dit_sparse.calibrate(pipe, ["a cat"], "draft", target_recall=1.5)


# ---- vdit: a fixed pattern per layer and head -------------------------------------------------------------------------
# The tiny pipeline's 5 x 6 x 6 latent tokens at block 16: tile (1, 4, 4), ragged tiles at the borders.
TINY_LAYOUT, VDIT_BLOCK, VDIT_TILE = VideoLayout(5, 6, 6), 16, (1, 4, 4)


def test_vdit_out_of_the_box_changes_the_output_and_unsparsify_restores(pipe, dense_latents):
    dit_sparse.sparsify(pipe, "vdit", block_size=VDIT_BLOCK)
    try:
        sparse = _render(pipe)
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)
    expected = vdit_mask(TINY_LAYOUT, [DEFAULT_PATTERN], VDIT_BLOCK, VDIT_TILE).density  # one pattern, every head
    assert stats == {"method": "vdit", "density": pytest.approx(expected), "attention_calls": 12, "sparse_calls": 12,
                     "mask_builds": 2}
    assert 0 < expected < 1 and not torch.allclose(sparse, dense_latents, atol=1e-3)
    assert torch.equal(_render(pipe), dense_latents)  # unwrapped: bit-identical again


def test_vdit_with_dense_patterns_gives_the_dense_output(pipe, dense_latents):
    dit_sparse.sparsify(pipe, "vdit", block_size=VDIT_BLOCK, layer_pattern=[[HeadPattern.dense()] * 2] * 2)
    try:
        latents = _render(pipe)
        assert dit_sparse.sparsity_stats(pipe)["density"] == 1.0
    finally:
        dit_sparse.unsparsify(pipe)
    torch.testing.assert_close(latents, dense_latents, atol=1e-5, rtol=1e-5)


def test_vdit_profile_round_trips_and_its_masks_are_built_once_per_layout_and_layer(pipe, vdit_profile):
    profile, path = vdit_profile
    assert (profile.method, profile.layers, profile.heads) == ("vdit", 2, 2)
    assert profile.options["block_size"] == VDIT_BLOCK and profile.options["tile"] == list(VDIT_TILE)
    assert profile.meta["max_error"] == 0.3 and profile.meta["cost_weight"] == 0.1
    patterns = [[HeadPattern.from_dict(entry["pattern"]) for entry in row] for row in profile.entries]
    assert len({p for row in patterns for p in row}) > 1  # the search told the heads apart
    loaded = dit_sparse.Profile.load(path)
    assert loaded == profile and loaded.config().layer_pattern == tuple(map(tuple, patterns))
    dit_sparse.sparsify(pipe, profile=path)
    try:
        _render(pipe, num_inference_steps=3)
        _render(pipe, num_inference_steps=2, num_frames=9)  # 3 latent frames: a second layout
        stats = dit_sparse.sparsity_stats(pipe)
        masks = session_of(pipe.transformer).masks
    finally:
        dit_sparse.unsparsify(pipe)
    small = VideoLayout(3, 6, 6)
    assert stats["mask_builds"] == 4 and stats["attention_calls"] == (3 + 2) * 2 * 2  # steps x CFG x layers
    assert sorted(masks, key=repr) == sorted(((layout, "cpu", layer) for layout in (TINY_LAYOUT, small)
                                              for layer in (0, 1)), key=repr)
    for (layout, _, layer), (mask, density) in masks.items():
        expected = vdit_mask(layout, patterns[layer], VDIT_BLOCK, VDIT_TILE)
        assert torch.equal(mask.to_block_dense(), expected.to_block_dense())
        assert torch.equal(mask.permutation, expected.permutation) and density == expected.density
    calls = {TINY_LAYOUT: 3 * 2, small: 2 * 2}  # per layer
    mean_density = sum(calls[layout] * density for (layout, _, _), (_, density) in masks.items()) / (10 * 2)
    assert stats["density"] == pytest.approx(mean_density)


@pytest.mark.parametrize(
    "settings, chosen",
    [
        (dict(max_error=1e9), HeadPattern.diagonal((0, 0, 0))),  # any error allowed: the cheapest candidate
        (dict(max_error=0.0), HeadPattern.dense()),  # no error allowed: dense
        (dict(max_error=None, cost_weight=0.0), HeadPattern.dense()),  # only the error counts: dense
    ],
)
def test_calibrate_vdit_chooses_by_max_error_and_cost_weight(pipe, tmp_path_factory, settings, chosen):
    profile, _ = _calibrated(pipe, tmp_path_factory, "vdit", block_size=VDIT_BLOCK, **settings)
    assert profile.config().layer_pattern == ((chosen,) * 2,) * 2


def test_calibrate_vdit_checks_its_settings_before_running(pipe):
    with pytest.raises(ValueError, match="max_error must be a number >= 0 or None, got -1"):
        dit_sparse.calibrate(pipe, ["a cat"], "vdit", max_error=-1)
    with pytest.raises(ValueError, match="cost_weight must be a number >= 0, got 'high'"):
        dit_sparse.calibrate(pipe, ["a cat"], "vdit", cost_weight="high")
