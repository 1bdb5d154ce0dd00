"""`dit-sparse app`: served in a subprocess on a free port, called with gradio_client and driven in headless Chromium.

The app runs the default model (the tiny trained one when it is there, else the tiny random Wan pipeline) on the CPU,
at toy sizes through the client (9 frames at 64 x 64 px: 3 latent frames of 4 x 4 tokens, 3 blocks of 16; 2 steps) and
CPU-sized ones typed into the page in the browser (its defaults are the demo's, 81 frames at 160 px and 25 steps).
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from dit_sparse.pipelines import tiny

gradio_client = pytest.importorskip("gradio_client", reason="the app tests need the app extra (gradio, gradio_client)")
pytest.importorskip("gradio", reason="the app tests need the app extra (gradio, gradio_client)")

from gradio_client.exceptions import AppError  # noqa: E402

from dit_sparse import cli  # noqa: E402
from dit_sparse.eval import render, runner  # noqa: E402
from dit_sparse.patterns import CONFIGS  # noqa: E402
from dit_sparse.video import read_video  # noqa: E402

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")
SMALL = dict(frames=9, height=64, width=64, steps=2, option_block_size=16)
PROMPT = "a red circle moves right on a blue background"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app served by `python -m dit_sparse app` in a subprocess: its URL and cache folder."""
    folder = tmp_path_factory.mktemp("app")
    port = _free_port()
    cache_dir = folder / "cache"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(folder / "gradio"),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    log = open(folder / "app.log", "w")
    command = [sys.executable, "-m", "dit_sparse", "app", "--port", str(port), "--device", "cpu", "--threads", "1",
               "--cache-dir", str(cache_dir)]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited ({process.returncode}): {(folder / 'app.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the app did not answer: {(folder / 'app.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"url": url, "cache_dir": cache_dir}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app["url"], verbose=False)


def _generate(client, **settings):
    names = ("dense_video", "sparse_video", "dense_seconds", "sparse_seconds", "speedup", "density", "psnr", "ssim",
             "summary", "mask_plot", "mask_note")  # fmt: skip
    return dict(zip(names, client.predict(prompt=PROMPT, **settings, api_name="/generate")))


def _baseline_rows(cache_dir) -> list[dict]:
    with open(cache_dir / runner.MANIFEST_NAME) as file:
        rows = [json.loads(line) for line in file]
    return [row for row in rows if row["method"] == runner.BASELINE]


# ---- through gradio_client ---------------------------------------------------------------------------------------
def test_client_gets_both_videos_at_the_requested_frames_with_numeric_speedup_psnr_and_the_mask(client):
    result = _generate(client, method="random", option_density=0.25, **SMALL)
    for name in ("dense_video", "sparse_video"):
        assert read_video(result[name]).shape == (9, 64, 64, 3), name
    for name in ("dense_seconds", "sparse_seconds", "speedup", "psnr", "ssim", "density"):
        assert isinstance(result[name], float) and math.isfinite(result[name]), (name, result[name])
    assert result["speedup"] > 0 and 0 < result["density"] < 1 and 0 < result["ssim"] <= 1
    assert "speedup" in result["summary"]
    if tiny.available():  # the default model is the trained one once it ships
        assert f"model `{tiny.TINY_LABEL}`" in result["summary"] and "RANDOM" not in result["summary"]
    else:  # until then the random fallback is visible, and its attention barely shapes its output
        assert "tiny RANDOM pipeline" in result["summary"] and result["psnr"] > 20
    assert result["mask_plot"]["type"] == "matplotlib" and "layer 0, head 0" in result["mask_note"]


def test_switching_method_renders_only_the_sparse_video_the_dense_one_is_cached(client, app):
    first = _generate(client, method="random", option_density=0.5, seed=3, **SMALL)
    assert len([r for r in _baseline_rows(app["cache_dir"]) if r["seed"] == 3]) == 1
    second = _generate(client, method="radial", seed=3, **SMALL)
    assert len([r for r in _baseline_rows(app["cache_dir"]) if r["seed"] == 3]) == 1  # not rendered again
    assert second["dense_seconds"] == first["dense_seconds"] and "cached from" in second["summary"]
    assert read_video(second["sparse_video"]).shape[0] == 9


def test_every_method_renders_through_the_app_with_its_default_options(client):
    for method in CONFIGS:  # a method added to CONFIGS appears here with no app change
        result = _generate(client, method=method, seed=5, **SMALL)
        assert read_video(result["sparse_video"]).shape[0] == 9, method
        assert 0 < result["density"] <= 1 and result["speedup"] > 0, method
        assert (result["mask_plot"] is None) == ("q and k" in result["mask_note"]), method


def test_bad_inputs_are_readable_errors_and_the_app_keeps_serving(client, tmp_path):
    with pytest.raises(AppError, match=r"frames=0 cannot be taken by the Wan VAE"):
        _generate(client, method="radial", **{**SMALL, "frames": 0})
    with pytest.raises(AppError, match=r"no model folder '/no/such/model-folder'"):
        _generate(client, method="radial", model="/no/such/model-folder", **SMALL)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(AppError, match=r"cannot load model"):
        _generate(client, method="radial", model=str(broken), **SMALL)
    with pytest.raises(AppError, match=r"RadialConfig.decay_factor must be a number > 0"):
        _generate(client, method="radial", option_decay_factor=-1, **SMALL)
    with pytest.raises(AppError, match=r"NeighborhoodConfig.window must be three positive ints"):
        _generate(client, method="neighborhood", option_window="3,4", **SMALL)
    result = _generate(client, method="radial", **SMALL)
    assert read_video(result["sparse_video"]).shape[0] == 9 and isinstance(result["speedup"], float)


def test_the_page_starts_at_the_demos_settings(app):
    config = json.load(urllib.request.urlopen(app["url"] + "config", timeout=10))
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in config["components"]}
    assert [values[name] for name in ("prompt", "frames", "height", "width", "steps", "model")] == [
        render.DEMO_PROMPT, render.DEFAULT_FRAMES, render.DEFAULT_HEIGHT, render.DEFAULT_WIDTH, render.DEFAULT_STEPS,
        "tiny",
    ]  # fmt: skip


# ---- in the browser ----------------------------------------------------------------------------------------------
def test_a_generation_in_headless_chromium_shows_both_videos_and_is_screenshot(app):
    from headless_chromium import generate_in_app

    png = os.path.join(ARTIFACTS, "app.png")
    if os.path.exists(png):
        os.remove(png)
    # The page's defaults are the demo's (81 frames at 160 px, 25 steps); typed in: a CPU-sized video.
    settings = {"frames": 33, "height": 128, "width": 128, "steps": 8}
    summary = generate_in_app(app["url"], png, timeout=300, settings=settings)
    assert "speedup" in summary and "radial" in summary
    assert "33 frames at 128x128 px" in summary and "8 steps" in summary  # the typed settings, not the defaults
    assert os.path.getsize(png) > 50_000


# ---- the page's parts --------------------------------------------------------------------------------------------
def test_method_options_are_built_from_every_config_field():
    import dataclasses

    from dit_sparse.app import ui

    fields = {option.name: option for option in ui.option_fields()}
    for method, config_cls in CONFIGS.items():
        for field in dataclasses.fields(config_cls):
            assert method in fields[field.name].methods
    assert fields["backend"].kind == "choice" and fields["backend"].choices == ("auto", "fa4", "triton", "reference")
    assert fields["precision"].kind == "choice" and fields["precision"].choices == ("bf16", "fp8", "int8")
    assert (fields["variant"].kind, fields["exact"].kind, fields["density"].kind) == ("choice", "bool", "float")
    assert (fields["block_size"].kind, fields["window"].kind, fields["top_p"].kind) == ("int", "text", "text")
    assert ui.default_value("neighborhood", fields["window"]) == "7,24,48"
    assert ui.default_value("radial", fields["block_size"]) == ui.BLOCK_SIZE
    given = {"window": "3, 4, 4", "tile": "", "exact": True, "block_size": 32, "density": 0.5}
    assert ui.option_values("neighborhood", given) == {"window": (3, 4, 4), "exact": True}
    assert ui.option_values("random", given) == {"block_size": 32, "density": 0.5}
    assert "smaller is sparser" in ui.option_help(CONFIGS["radial"], "decay_factor")


def test_the_mask_view_draws_static_masks_and_explains_dynamic_ones():
    from dit_sparse.app import ui

    radial = {"method": "radial", "config": {"block_size": 16, "dense_layers": 1}, "layout": [3, 4, 4]}
    figure, note = ui.mask_view(radial, 0, 0)
    assert figure is not None and "runs dense" in note
    figure, note = ui.mask_view({**radial, "method": "draft", "config": {"tile": [1, 4, 4]}}, 1, 0)
    assert figure is None and "q and k" in note
    figure, note = ui.mask_view(radial, -1, 0)
    assert figure is None and "must be >= 0" in note


def test_the_mask_view_refuses_a_layer_or_head_the_model_does_not_have():
    from dit_sparse.app import ui
    from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline()
    layers, heads = ui.attention_shape(pipe)
    assert (layers, heads) == (pipe.transformer.config.num_layers, pipe.transformer.config.num_attention_heads)
    state = {"method": "radial", "config": {"block_size": 16}, "layout": [3, 4, 4], "layers": layers, "heads": heads}
    assert ui.mask_view(state, layers - 1, heads - 1)[0] is not None
    assert ui.mask_view(state, 99, 0) == (
        None, f"No mask: layer must be in 0..{layers - 1} (the model has {layers} self-attention layers), got 99")
    assert ui.mask_view(state, 0, 99) == (
        None, f"No mask: head must be in 0..{heads - 1} (the model has {heads} self-attention heads), got 99")


def test_the_page_refuses_a_mask_layer_beyond_the_served_model(client):
    result = _generate(client, method="radial", layer=99, head=99, **SMALL)
    assert result["mask_plot"] is None
    assert result["mask_note"].startswith("No mask: layer must be in 0..") and result["mask_note"].endswith("got 99")


def test_app_command_checks_its_inputs_before_serving(capsys):
    assert cli.main(["app", "--model", "/no/such/model-folder", "--device", "cpu"]) == 2
    assert "no model folder" in capsys.readouterr().err
    assert cli.main(["app", "--warmup-steps", "-1", "--device", "cpu"]) == 2


def test_app_refuses_a_cache_dir_it_cannot_write_before_serving(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert cli.main(["app", "--cache-dir", str(tmp_path / "file"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"dit-sparse: error: --cache-dir {str(tmp_path / 'file')!r} is a file, not a folder"
    assert cli.main(["app", "--device", "tpu"]) == 2
    assert "device 'tpu' is not available here; available: cpu" in capsys.readouterr().err


def test_the_step_cache_control_stacks_a_cache_on_the_method_and_refuses_an_unknown_one(client):
    plain = _generate(client, method="radial", seed=7, **{**SMALL, "steps": 4})
    cached = _generate(client, method="radial", seed=7, cache="first_block:threshold=1e9", **{**SMALL, "steps": 4})
    assert cached["psnr"] != plain["psnr"]  # every step after the first served by the cache: another video
    assert cached["sparse_seconds"] > 0
    with pytest.raises(AppError, match="unknown cache 'nope'"):
        _generate(client, method="radial", cache="nope", **SMALL)
