"""Stacking: diffusers' step caches and cache-dit with `sparsify` in either order, `optimize` / `restore`, torchao FP8
and torch.compile, on the tiny random Wan pipeline (real diffusers classes, built offline)."""

import importlib.util

import numpy as np
import pytest
import torch
from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig, apply_first_block_cache)

import dit_sparse
from dit_sparse import stack
from dit_sparse.hooks import hooked_modules
from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 17 frames at 96 px: 5 latent frames of 6 x 6 tokens, 180 video tokens; 6 steps with CFG, 2 blocks.
CALL = dict(prompt="a red fish swims over the sea", num_frames=17, height=96, width=96, num_inference_steps=6)
SPARSE = dict(block_size=16, dense_steps=1)
HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


def _render(pipe):
    return pipe(**CALL, output_type="latent", generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_wan_pipeline(seed=0)


@pytest.fixture(scope="module")
def dense(pipe):
    return _render(build_tiny_wan_pipeline(seed=0))  # a pipeline never touched


def _cache_configs(pipe):
    return {
        "first_block": lambda: FirstBlockCacheConfig(threshold=0.2),
        "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                    **stack.FAMILY_CACHE_DEFAULTS["wan"]["taylorseer"]),
        "pab": lambda: PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                       current_timestep_callback=lambda: pipe.current_timestep),
    }


def _untouched(pipe) -> bool:
    """No hook, cache config, stack record or stray instance forward left on the transformer's modules (diffusers'
    own `cache_context` leaves an empty registry on the transformer itself, as on a pipeline never touched)."""
    transformer = pipe.transformer
    return (transformer._cache_config is None and hooked_modules(transformer) == []
            and stack.record_of(transformer) is None
            and not any("forward" in m.__dict__ or m.__dict__.get("_diffusers_hook") is not None
                        for m in list(transformer.modules())[1:]))


@pytest.mark.parametrize("cache", ["first_block", "taylorseer", "pab"])
def test_a_diffusers_cache_and_sparsify_compose_in_either_order(pipe, dense, cache):
    make = _cache_configs(pipe)[cache]
    pipe.transformer.enable_cache(make())
    cache_alone = _render(pipe)
    outputs = []
    for order in ("cache first", "sparsify first"):
        pipe.transformer.disable_cache()
        if order == "sparsify first":
            dit_sparse.sparsify(pipe, "radial", **SPARSE)
        pipe.transformer.enable_cache(make())
        if order == "cache first":
            dit_sparse.sparsify(pipe, "radial", **SPARSE)
        outputs.append(_render(pipe))
        dit_sparse.unsparsify(pipe)  # removes only dit-sparse's part: the cache stays
        assert torch.equal(_render(pipe), cache_alone)
    pipe.transformer.disable_cache()
    stack.drop_empty_registries(pipe.transformer)
    assert torch.equal(_render(pipe), dense)
    assert torch.isfinite(outputs[0]).all()
    assert torch.equal(outputs[0], outputs[1])  # the order does not matter
    assert not torch.allclose(outputs[0], cache_alone, atol=1e-4)  # the sparse part changed it
    assert not torch.allclose(cache_alone, dense, atol=1e-4)  # and the cache did


@pytest.mark.parametrize("cache", ["first_block:threshold=0.2",
                                   "taylorseer:cache_interval=2:disable_cache_before_step=1",
                                   "pab", pytest.param("cache-dit:max_warmup_steps=2:residual_diff_threshold=0.2",
                                                       marks=pytest.mark.skipif(not HAS_CACHE_DIT,
                                                                                reason="cache-dit is not installed"))])
def test_optimize_stacks_cache_and_attention_and_restore_is_bit_identical(pipe, dense, cache):
    dit_sparse.optimize(pipe, "radial", cache=cache, **SPARSE)
    try:
        stacked = _render(pipe)
        stats = dit_sparse.sparsity_stats(pipe, reset=True)
    finally:
        dit_sparse.restore(pipe)
    assert _untouched(pipe)
    assert torch.equal(_render(pipe), dense)
    assert torch.isfinite(stacked).all() and not torch.allclose(stacked, dense, atol=1e-4)
    assert stats["method"] == "radial" and stats["cache"] == cache.split(":")[0]
    # 6 steps x 2 CFG calls x 2 blocks: the cache served a share of the blocks' computations.
    assert 0 < stats["cache_skipped_blocks"] < 24 and stats["cache_skip_share"] == stats["cache_skipped_blocks"] / 24


def test_optimize_with_a_cache_only_counts_skips_and_takes_a_diffusers_config(pipe, dense):
    dit_sparse.optimize(pipe, None, cache=FirstBlockCacheConfig(threshold=0.2))
    try:
        by_config = _render(pipe)
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.restore(pipe)
    dit_sparse.optimize(pipe, None, cache="first_block:threshold=0.2")
    try:
        assert torch.equal(_render(pipe), by_config)  # the string and the config are one setting
    finally:
        dit_sparse.restore(pipe)
    assert stats["method"] is None and stats["cache_skipped_blocks"] > 0
    assert _untouched(pipe) and torch.equal(_render(pipe), dense)


def test_a_cache_applied_directly_after_a_run_misses_the_cache_context_and_enable_cache_does_not(pipe, dense):
    # The "No cache context is set": the transformer's registry cached its child registries in the first
    # run's cache_context; a direct apply_* adds block hooks that list does not hold (enable_cache refreshes it).
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.2))
    try:
        with pytest.raises(ValueError, match="No cache context is set"):
            _render(pipe)
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()
        assert torch.isfinite(_render(pipe)).all()  # the documented fix for a direct apply
    finally:
        pipe.transformer._cache_config = FirstBlockCacheConfig()
        pipe.transformer.disable_cache()
        stack.drop_empty_registries(pipe.transformer)
    assert torch.equal(_render(pipe), dense)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache="nope"), r"unknown cache 'nope'.*allowed: \['first_block'"),
    (dict(cache="first_block:thresh=0.1"), r"no option 'thresh'; FirstBlockCacheConfig takes \['threshold'\]"),
    (dict(cache="first_block:threshold"), r"'threshold' in 'first_block:threshold' is not KEY=VALUE"),
    (dict(cache="faster"), r"'faster' cannot work with WanPipeline"),
    (dict(cache="mag"), r"'mag' needs mag_ratios"),
    (dict(cache=3), r"cache=3 is neither a cache name"),
    (dict(fp8=True), r"fp8=True needs a CUDA GPU with FP8.*WanTransformer3DModel is on cpu"),
    (dict(compile="everything"), r"compile='everything'; allowed: None, 'regional', 'full'"),
    (dict(density=2.0), r"density"),
])
def test_bad_input_is_refused_before_anything_changes(pipe, kwargs, message):
    if kwargs.get("fp8") and torch.cuda.is_available():
        pytest.skip("a CUDA machine: the CPU refusal is what this pins")
    with pytest.raises(ValueError, match=message):
        dit_sparse.optimize(pipe, "radial", **{"block_size": 16, **kwargs})
    assert _untouched(pipe)


def test_a_second_cache_is_refused_naming_both(pipe):
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with pytest.raises(ValueError, match=r"already has a diffusers cache \(FirstBlockCacheConfig\); "
                                             r"cache='pab' would be a second one"):
            dit_sparse.optimize(pipe, "radial", cache="pab")
        assert hooked_modules(pipe.transformer) == []
    finally:
        pipe.transformer.disable_cache()
        stack.drop_empty_registries(pipe.transformer)


def test_optimize_again_replaces_the_stack(pipe, dense):
    dit_sparse.optimize(pipe, "radial", cache="pab", **SPARSE)
    dit_sparse.optimize(pipe, "radial", cache="first_block:threshold=0.2", **SPARSE)
    try:
        assert dit_sparse.sparsity_stats(pipe)["cache"] == "first_block" if _render(pipe) is not None else False
        assert isinstance(pipe.transformer._cache_config, FirstBlockCacheConfig)
    finally:
        dit_sparse.restore(pipe)
    assert _untouched(pipe)


def test_model_cpu_offload_keeps_working_under_the_stack(dense):
    offloaded = build_tiny_wan_pipeline(seed=0)
    offloaded.enable_model_cpu_offload(device="cpu")
    reference = build_tiny_wan_pipeline(seed=0)
    dit_sparse.optimize(reference, "radial", cache="first_block:threshold=0.2", **SPARSE)
    expected = _render(reference)
    dit_sparse.optimize(offloaded, "radial", cache="first_block:threshold=0.2", **SPARSE)
    torch.testing.assert_close(_render(offloaded), expected, atol=1e-5, rtol=1e-5)
    dit_sparse.restore(offloaded)
    assert torch.equal(_render(offloaded), dense)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_fp8_linears_stack_with_sparse_attention_and_restore_puts_the_original_weights_back():
    # torchao's dynamic FP8 refuses any device but an FP8 GPU (compute capability >= 8.9), as optimize does first.
    if torch.cuda.get_device_capability() < stack.FP8_MIN_CAPABILITY:
        pytest.skip("needs a GPU with FP8 (compute capability >= 8.9)")
    pipe = build_tiny_wan_pipeline(seed=0, dtype=torch.bfloat16).to("cuda")
    dense = _render(pipe)
    weights = {name: m.weight for name, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    dit_sparse.optimize(pipe, "radial", cache="first_block:threshold=0.2", fp8=True, **SPARSE)
    try:
        swapped = [n for n, m in pipe.transformer.named_modules()
                   if isinstance(m, torch.nn.Linear) and m.weight is not weights[n]]
        stacked = _render(pipe)
    finally:
        dit_sparse.restore(pipe)
    assert swapped and torch.isfinite(stacked).all() and not torch.equal(stacked, dense)
    assert all(m.weight is weights[n] for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear))
    assert torch.equal(_render(pipe), dense)


def test_a_sparse_stack_under_regional_compilation_compiles_one_graph_per_block_class(pipe, dense, monkeypatch):
    from test_compile import _GraphRecorder

    recorder = _GraphRecorder()
    compile_transformer = stack.compile_transformer
    monkeypatch.setattr(stack, "compile_transformer", lambda t, mode: compile_transformer(t, mode, backend=recorder))
    dit_sparse.optimize(pipe, "radial", **SPARSE)
    eager = _render(pipe)
    torch._dynamo.reset()
    dit_sparse.optimize(pipe, "radial", compile="regional", **SPARSE)
    try:
        compiled = _render(pipe)
    finally:
        dit_sparse.restore(pipe)
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # One WanTransformerBlock graph per phase (the dense first step, the sparse steps).
    assert [recorder.targets(g).count("dit_sparse.attention") for g in recorder.graphs] == [0, 1]
    assert _untouched(pipe) and torch.equal(_render(pipe), dense)


def test_a_cached_sparse_stack_compiles_whole_and_matches_eager(pipe, dense, monkeypatch):
    # The cache's decisions graph-break a whole-model compile (not a fullgraph block one: refused, below).
    # (first_block and cache-dit compile too, slower: each block recompiles until dynamo's limit.)
    from test_compile import _GraphRecorder

    cache = "taylorseer:cache_interval=2:disable_cache_before_step=1"

    recorder = _GraphRecorder()
    compile_transformer = stack.compile_transformer
    monkeypatch.setattr(stack, "compile_transformer", lambda t, mode: compile_transformer(t, mode, backend=recorder))
    dit_sparse.optimize(pipe, "radial", cache=cache, **SPARSE)
    eager = _render(pipe)
    torch._dynamo.reset()
    dit_sparse.optimize(pipe, "radial", cache=cache, compile="full", **SPARSE)
    try:
        compiled = _render(pipe)
    finally:
        dit_sparse.restore(pipe)
        torch._dynamo.reset()
    assert recorder.graphs
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert _untouched(pipe) and torch.equal(_render(pipe), dense)


def test_regional_compilation_under_a_cache_is_refused_naming_both(pipe):
    with pytest.raises(ValueError, match=r"compile='regional' cannot work with cache 'first_block'.*compile='full'"):
        dit_sparse.optimize(pipe, "radial", cache="first_block", compile="regional")
    assert _untouched(pipe)


def test_render_takes_the_stack_flags_and_keeps_unstacked_file_names(tmp_path, monkeypatch):
    import json

    from dit_sparse import cli
    from dit_sparse.eval import render
    from dit_sparse.pipelines import tiny

    monkeypatch.setattr(tiny, "MODEL_DIR", str(tmp_path / "no-model"))  # the random pipeline, as test_cli does
    small = ["render", "--frames", "9", "--height", "64", "--width", "64", "--steps", "3", "--block-size", "16",
             "--device", "cpu", "--prompt", "a red fox runs", "--output-dir", str(tmp_path / "out")]
    assert cli.main(small) == 0
    assert cli.main([*small, "--cache", "first_block:threshold=0.2"]) == 0
    with open(tmp_path / "out" / render.MANIFEST_NAME, encoding="utf-8") as file:
        plain, stacked = [json.loads(line) for line in file]
    assert "stack" not in plain and stacked["stack"] == {"cache": "first_block:threshold=0.2"}
    assert plain["file"] != stacked["file"]
    job = render.make_job("a red fox runs", {**{k: plain[k] for k in render.OVERRIDE_FIELDS if k in plain}},
                          plain["model"])
    assert job.key_hash() == render.key_hash(plain)  # a manifest row from before stacks keeps its hash


@pytest.mark.parametrize("flags, named", [
    (["--cache", "nope"], "unknown cache 'nope'"),
    (["--cache", "first_block:threshold"], "is not KEY=VALUE"),
    (["--compile", "everything"], "--compile"),
])
def test_bad_stack_flags_exit_2_naming_the_value(tmp_path, capsys, flags, named):
    from dit_sparse import cli

    args = ["render", "--prompt", "x", "--device", "cpu", "--output-dir", str(tmp_path / "out"), *flags]
    assert cli.main(args) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not __import__("dit_sparse.pipelines.tiny", fromlist=["available"]).available(),
                    reason="the trained tiny model is not in this checkout")
def test_the_stack_on_the_trained_tiny_model_changes_the_video_a_little_and_restores_it_exactly():
    from dit_sparse.pipelines import tiny
    from dit_sparse.video import psnr

    trained = tiny.load()
    trained.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle moves right on a blue background", num_frames=9, height=96, width=96,
                num_inference_steps=8, output_type="np")

    def render():
        return trained(**call, generator=torch.Generator().manual_seed(0)).frames[0]

    dense = render()
    dit_sparse.optimize(trained, "radial", cache="taylorseer:cache_interval=2:disable_cache_before_step=4",
                        block_size=16, dense_steps=2)
    try:
        stacked = render()
        stats = dit_sparse.sparsity_stats(trained)
    finally:
        dit_sparse.restore(trained)
    assert np.isfinite(stacked).all() and stats["cache_skip_share"] > 0
    assert 20 < psnr(dense, stacked) < float("inf")  # changed, and still the same video
    assert np.array_equal(render(), dense)


def test_eval_takes_the_stack_and_its_report_says_it(tmp_path, monkeypatch):
    import json

    from dit_sparse import cli
    from dit_sparse.eval import runner
    from dit_sparse.eval.report import reproduce_command

    prompts = tmp_path / "one.txt"
    prompts.write_text("a red circle moves right on a blue background\n")
    out = tmp_path / "report"
    argv = ["eval", "--model", "tiny-random", "--frames", "9", "--height", "64", "--width", "64", "--steps", "4",
            "--block-size", "16", "--device", "cpu", "--suite", str(prompts), "--output-dir", str(out),
            "--methods", "radial", "--cache", "first_block:threshold=0.2"]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in open(out / "videos" / runner.MANIFEST_NAME)]
    assert {r["method"]: r.get("stack") for r in rows} == {"baseline": None,
                                                           "radial": {"cache": "first_block:threshold=0.2"}}
    assert "first_block:threshold=0.2" in (out / "report.md").read_text()
    plan = runner.make_plan(suite=str(prompts), methods="radial", stack={"cache": "first_block:threshold=0.2"})
    assert "--cache first_block:threshold=0.2" in reproduce_command(plan)
    with pytest.raises(ValueError, match="unknown cache 'nope'"):
        runner.make_plan(suite=str(prompts), methods="radial", stack={"cache": "nope"})


def test_the_benchmark_scripts_run_their_logic_on_a_cpu(tmp_path):
    import json

    from benchmarks import compose, compose_quality

    assert compose.main(["--smoke", "--out", str(tmp_path), "--rows", "default", "first_block",
                         "radial+taylorseer", "--repeats", "1"]) == 0
    result = json.loads(next(tmp_path.glob("compose-cpu-*.json")).read_text())
    rows = {row["stack"]: row for row in result["rows"]}
    assert set(rows) == {"default", "first_block", "radial+taylorseer"}
    assert rows["default"]["speedup_vs_default"] == 1.0 and rows["first_block"]["ms_cached_step"] > 0
    taylorseer = rows["radial+taylorseer"]["schedule"]["fixed"]
    assert (taylorseer["full_steps"], taylorseer["cached_steps"]) == (30, 20)  # interval 2 after 10 full steps
    assert compose_quality.main(["--random", "--frames", "5", "--steps", "3", "--prompts", "1", "--caches",
                                 "first_block", "--attention", "none", "--out", str(tmp_path)]) == 0
    quality = json.loads(next(tmp_path.glob("compose-quality-random-cpu-*.json")).read_text())
    assert [row["cache"] for row in quality["rows"]] == compose_quality.SWEEP["first_block"]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed (pip install "
                    "'dit-sparse[fp8]')")
def test_fp8_quantizes_only_the_bf16_linears_fp8_gemms_take(monkeypatch):
    import torchao.quantization

    chosen = []
    monkeypatch.setattr(torchao.quantization, "quantize_",
                        lambda model, config, filter_fn: chosen.extend(
                            name for name, m in model.named_modules() if filter_fn(m, name)))
    model = torch.nn.ModuleDict(dict(
        bf16=torch.nn.Linear(32, 64).to(torch.bfloat16),
        kept_fp32=torch.nn.Linear(32, 64),  # a module the model keeps in fp32 (Wan's time embedder)
        odd=torch.nn.Linear(24, 64).to(torch.bfloat16),  # 24 input features: no FP8 GEMM
        norm=torch.nn.LayerNorm(32).to(torch.bfloat16)))
    stack.quantize_fp8(model)
    assert chosen == ["bf16"]
    assert [m for m, _ in stack.record_of(model).fp8_weights] == [model["bf16"]]


def test_compose_full_step_computes_every_block_on_its_alternating_inputs():
    """The benchmark's "always computes" FirstBlockCache setting (threshold 0) runs the last block at every call
    once the inputs alternate; on one repeated input the cache sees no change and skips (what an H100 run hit)."""
    from benchmarks import compose
    from benchmarks.transformer_step import SMOKE_MODELS, build

    spec = SMOKE_MODELS["smoke-wan"]
    model = build(spec, torch.device("cpu"), torch.float32)
    calls = spec.calls(torch.device("cpu"), torch.float32)
    last_block_calls = []
    # the last block's feed-forward: a skipped block's forward is the cache's, which runs none of its parts
    model.blocks[-1].ffn.register_forward_hook(lambda *_: last_block_calls.append(1))
    for inputs, expected in ((compose.alternating_inputs(calls), 3 * 2), ([calls, calls], None)):
        last_block_calls.clear()
        with compose.stacked(model, spec, "first_block", compose.CACHE_SETTINGS["first_block"][0], []):
            for step in range(3):
                compose._calls_in_context(model, inputs[step % 2], step)
        if expected is not None:
            assert len(last_block_calls) == expected  # 3 steps x (cond, uncond), every block computed
        else:
            assert len(last_block_calls) < 3 * 2  # the same input again: reused
