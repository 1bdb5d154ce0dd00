"""The `dit-sparse` command line, run in-process on the tiny random Wan pipeline at toy sizes.

The shipped trained model is hidden from every test (`tiny.MODEL_DIR` points at an empty folder) unless the test puts
a stand-in there: a saved tiny random pipeline (`trained_model`)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dit_sparse import cli
from dit_sparse.eval import render
from dit_sparse.pipelines import models, tiny
from dit_sparse.pipelines.tiny.random_tiny import TINY_RANDOM_LABEL, build_tiny_wan_pipeline
from dit_sparse.video import read_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 9 frames at 64 x 64 px: 3 latent frames of 4 x 4 tokens; 2 steps. Seconds per video on a CPU.
SMALL = ["--frames", "9", "--height", "64", "--width", "64", "--steps", "2", "--block-size", "16", "--device", "cpu"]


def _render(tmp_path, *extra, out="out"):
    return cli.main(["render", *SMALL, "--output-dir", str(tmp_path / out), *extra])


def _rows(folder):
    with open(folder / render.MANIFEST_NAME, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def _files(folder):
    return sorted(os.listdir(folder))


@pytest.fixture(autouse=True)
def trained_model_absent(monkeypatch, tmp_path_factory):
    """The default model is the random fallback, whether or not the trained model's folder is in the checkout."""
    monkeypatch.setattr(tiny, "MODEL_DIR", str(tmp_path_factory.mktemp("no-tiny-model")))


@pytest.fixture(scope="module")
def trained_model_folder(tmp_path_factory):
    """A stand-in for the trained model's folder: a tiny random pipeline (seed 1) saved with `save_pretrained`."""
    folder = tmp_path_factory.mktemp("tiny_model")
    build_tiny_wan_pipeline(seed=1).save_pretrained(folder)
    return folder


@pytest.fixture
def trained_model(monkeypatch, trained_model_folder):
    """The stand-in trained model in `tiny.MODEL_DIR`; returns the list of `tiny.load` calls' folders."""
    monkeypatch.setattr(tiny, "MODEL_DIR", str(trained_model_folder))
    real, loads = tiny.load, []

    def recording(*args, **kwargs):
        loads.append(tiny.MODEL_DIR if kwargs.get("folder") is None else kwargs["folder"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny, "load", recording)
    return loads


@pytest.fixture
def render_calls(monkeypatch):
    """Counts `render_video` calls by prompt; `fail_on` makes the render of that prompt raise."""
    real = render.render_video
    calls = []
    fail_on = set()

    def counting(pipe, job):
        calls.append(job.prompt)
        if job.prompt in fail_on:
            raise RuntimeError(f"render of {job.prompt!r} failed (simulated)")
        return real(pipe, job)

    monkeypatch.setattr(render, "render_video", counting)
    counting.calls, counting.fail_on = calls, fail_on
    return counting


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded (input checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_pipeline", refuse)


def test_render_writes_mp4s_at_the_requested_frames_and_size_and_a_manifest_row_each(tmp_path):
    assert _render(tmp_path, "--prompt", "a red fox runs", "--prompt", "a blue boat", "--width", "96") == 0
    out = tmp_path / "out"
    rows = _rows(out)
    assert [row["prompt"] for row in rows] == ["a red fox runs", "a blue boat"]
    assert _files(out) == sorted([render.MANIFEST_NAME, *(row["file"] for row in rows)])
    for row in rows:
        assert read_video(out / row["file"]).shape == (9, 64, 96, 3)
        assert row["file"].endswith(".mp4") and row["file"].startswith(row["prompt"].replace(" ", "-"))
        assert {k: row[k] for k in ("seed", "method", "frames", "height", "width", "steps", "guidance", "model")} == {
            "seed": 0, "method": "radial", "frames": 9, "height": 64, "width": 96, "steps": 2, "guidance": 5.0,
            "model": TINY_RANDOM_LABEL,
        }  # fmt: skip
        assert row["options"] == {
            "dense_steps": 0, "dense_layers": 0, "backend": "auto", "block_size": 16, "decay_factor": 1.0,
            "variant": "wan", "compensate": False, "min_recall": None,
        }  # fmt: skip
        assert 0 < row["density"] <= 1 and row["seconds"] > 0


def test_settings_that_differ_get_different_files(tmp_path):
    assert _render(tmp_path, "--prompt", "a cat", "--seed", "1") == 0
    assert _render(tmp_path, "--prompt", "a cat", "--seed", "1", "--option", "decay_factor=0.5") == 0
    assert _render(tmp_path, "--prompt", "a cat", "--seed", "1", "--method", "dense") == 0
    files = [row["file"] for row in _rows(tmp_path / "out")]
    assert len(set(files)) == 3 and all(f.startswith("a-cat-seed1-") for f in files)


def test_an_interrupted_batch_resumes_with_only_the_unfinished_video(tmp_path, render_calls):
    prompts = ["--prompt", "a cat sleeps", "--prompt", "a dog runs"]
    render_calls.fail_on.add("a dog runs")
    with pytest.raises(RuntimeError, match="simulated"):
        _render(tmp_path, *prompts)
    out = tmp_path / "out"
    (first,) = _rows(out)
    assert first["prompt"] == "a cat sleeps"
    assert _files(out) == sorted([render.MANIFEST_NAME, first["file"]])  # no partial mp4, no row for the failure

    render_calls.fail_on.clear()
    render_calls.calls.clear()
    assert _render(tmp_path, *prompts) == 0
    assert render_calls.calls == ["a dog runs"]
    assert [row["prompt"] for row in _rows(out)] == ["a cat sleeps", "a dog runs"]

    render_calls.calls.clear()
    assert _render(tmp_path, *prompts) == 0
    assert render_calls.calls == []
    assert len(_rows(out)) == 2


def test_a_video_whose_mp4_is_gone_is_rendered_again(tmp_path, render_calls):
    assert _render(tmp_path, "--prompt", "a cat") == 0
    (row,) = _rows(tmp_path / "out")
    os.remove(tmp_path / "out" / row["file"])
    assert _render(tmp_path, "--prompt", "a cat") == 0
    assert render_calls.calls == ["a cat", "a cat"]
    assert (tmp_path / "out" / row["file"]).exists()


def test_a_manifest_line_torn_by_a_crash_is_skipped_and_closed_off(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / render.MANIFEST_NAME).write_text('{"prompt": "a cat", "seed', encoding="utf-8")
    assert _render(tmp_path, "--prompt", "a cat") == 0
    assert "manifest.jsonl:1: skipping" in capsys.readouterr().err
    lines = (out / render.MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
    assert lines[0] == '{"prompt": "a cat", "seed' and json.loads(lines[1])["prompt"] == "a cat"


def test_jsonl_lines_override_the_command_line_settings(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "a cat", "seed": 3, "frames": 13, "width": 96},
        {"prompt": "a dog", "method": "random", "options": {"density": 0.5}, "steps": 1, "guidance": 1.0},
    ]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    assert _render(tmp_path, "--prompts", str(prompts)) == 0
    cat, dog = _rows(tmp_path / "out")
    assert (cat["seed"], cat["frames"], cat["height"], cat["width"], cat["method"]) == (3, 13, 64, 96, "radial")
    assert read_video(tmp_path / "out" / cat["file"]).shape == (13, 64, 96, 3)
    assert (dog["method"], dog["steps"], dog["guidance"], dog["seed"]) == ("random", 1, 1.0, 0)
    assert dog["options"] == {
        "dense_steps": 0, "dense_layers": 0, "backend": "auto", "density": 0.5, "block_size": 16, "seed": 0,
        "compensate": False, "min_recall": None,
    }  # fmt: skip


def test_txt_prompts_skip_blank_lines_and_comments(tmp_path, render_calls):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a list\n\na cat\n   \n# more\na dog\n", encoding="utf-8")
    assert _render(tmp_path, "--prompts", str(prompts), "--frames", "5") == 0
    assert render_calls.calls == ["a cat", "a dog"]



def test_render_takes_tuple_options_as_eval_does(tmp_path):
    # `--option window=1,4,4` is the tuple eval's `--option neighborhood.window=1,4,4` gives (one option parser):
    # each token of the 3 latent frames of 4 x 4 tokens attends to its own frame only, a third of the keys.
    small = [arg for arg in SMALL if arg not in ("--block-size", "16")]
    argv = ["render", *small, "--output-dir", str(tmp_path / "out"), "--prompt", "a cat", "--method", "neighborhood",
            "--option", "window=1,4,4", "--option", "tile=1,4,4"]  # fmt: skip
    assert cli.main(argv) == 0
    (row,) = _rows(tmp_path / "out")
    assert (row["options"]["window"], row["options"]["tile"]) == ([1, 4, 4], [1, 4, 4])
    assert row["density"] == pytest.approx(1 / 3, abs=1e-6)
    assert render.parse_option_value("3,4,4") == (3, 4, 4) == render.parse_option_value("(3, 4, 4)")

BAD_INPUTS = [
    (["--prompt", "x", "--method", "sparse"], ["'sparse'", "radial"]),
    (["--prompt", "x", "--option", "windw=3"], ["windw"]),
    (["--prompt", "x", "--option", "decay_factor=-1"], ["decay_factor", "-1"]),
    (["--prompt", "x", "--option", "decay_factor"], ["KEY=VALUE", "decay_factor"]),
    (["--prompt", "x", "--option", "block_size=32"], ["block_size", "twice"]),
    (["--prompt", "x", "--dense-steps", "-1"], ["dense_steps", "-1"]),
    (["--prompt", "x", "--backend", "cudnn"], ["backend", "cudnn"]),
    (["--prompt", "x", "--frames", "10"], ["frames=10", "9 or 13"]),
    (["--prompt", "x", "--frames", "0"], ["frames", "0"]),
    (["--prompt", "x", "--height", "100"], ["height=100", "96 or 112"]),
    (["--prompt", "x", "--width", "8"], ["width=8", "16"]),
    (["--prompt", "x", "--steps", "0"], ["steps", "0"]),
    (["--prompt", "x", "--seed", "-2"], ["seed", "-2"]),
    (["--prompt", "x", "--fps", "0"], ["fps", "0"]),
    (["--prompt", "x", "--frames", "nine"], ["--frames", "nine"]),
    (["--prompt", "x", "--no-such-flag"], ["--no-such-flag"]),
    (["--prompt", "x", "--model", "./no-such-model"], ["no model folder", "./no-such-model", "tiny-random"]),
    ([], ["no prompt"]),
]


@pytest.mark.parametrize("args, named", BAD_INPUTS, ids=[" ".join(a[2:]) or "no-prompt" for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_value_and_creates_nothing(tmp_path, capsys, no_model, args, named):
    assert _render(tmp_path, *args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dit-sparse: error:") and "\n" not in error
    for text in named:
        assert text in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, content, named",
    [
        ("missing.txt", None, ["missing.txt"]),
        ("empty.txt", "# only a comment\n\n", ["empty.txt", "no prompts"]),
        ("prompts.csv", "a cat\n", ["prompts.csv", ".jsonl"]),
        ("bad.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog",\n', ["bad.jsonl:2", "JSON"]),
        ("noprompt.jsonl", '{"seed": 1}\n', ["noprompt.jsonl:1", '"prompt"']),
        ("field.jsonl", '{"prompt": "a", "fps": 8}\n', ["field.jsonl:1", "fps"]),
        ("frames.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "frames": 8}\n', ["frames.jsonl:3", "frames=8", "5 or 9"]),
        ("option.jsonl", '{"prompt": "a", "options": {"density": 0.5}}\n', ["option.jsonl:1", "'density'", "radial"]),
        ("latin1.txt", b"caf\xe9\n", ["latin1.txt"]),
    ],
)
def test_bad_prompts_file_exits_2_naming_file_and_line(tmp_path, capsys, no_model, name, content, named):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    assert _render(tmp_path, "--prompts", str(path)) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    for text in named:
        assert text in error
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_loaded_exits_2_naming_it(tmp_path, capsys, no_model):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert _render(tmp_path, "--prompt", "a cat", "--model", str(empty)) == 2  # checked before anything is made
    error = capsys.readouterr().err
    assert str(empty) in error and "model_index.json" in error
    assert not (tmp_path / "out").exists()


def test_a_model_folder_that_fails_to_load_exits_2_naming_it(tmp_path, capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    assert _render(tmp_path, "--prompt", "a cat", "--model", str(broken)) == 2
    error = capsys.readouterr().err
    assert "cannot load model" in error and str(broken) in error
    assert not any(name.endswith(".mp4") for name in os.listdir(tmp_path / "out"))


def test_render_without_model_uses_the_trained_model_when_it_is_there(tmp_path, capsys, trained_model):
    assert _render(tmp_path, "--prompt", "a red circle moves right") == 0
    printed = capsys.readouterr().out
    assert f"model: {tiny.TINY_LABEL}\n" in printed and "note:" not in printed
    assert [row["model"] for row in _rows(tmp_path / "out")] == [tiny.TINY_LABEL]
    assert trained_model == [tiny.MODEL_DIR]
    assert _render(tmp_path, "--prompt", "a red circle moves right", "--model", "tiny") == 0  # the same video
    assert trained_model == [tiny.MODEL_DIR] and "skipping 1 video(s)" in capsys.readouterr().out


def test_render_without_model_falls_back_to_the_random_one_with_the_note(tmp_path, capsys):
    label, note = models.resolve_model_label(None)
    assert label == TINY_RANDOM_LABEL and "tiny RANDOM pipeline" in note
    assert _render(tmp_path, "--prompt", "a cat") == 0
    assert f"model: {TINY_RANDOM_LABEL}\n{note}\n" in capsys.readouterr().out  # the note eval and the app show
    assert [row["model"] for row in _rows(tmp_path / "out")] == [TINY_RANDOM_LABEL]


def test_render_model_tiny_random_is_the_random_pipeline_even_with_the_trained_one_there(
    tmp_path, capsys, trained_model
):
    assert _render(tmp_path, "--prompt", "a cat", "--model", "tiny-random") == 0
    printed = capsys.readouterr().out
    assert f"model: {TINY_RANDOM_LABEL}\n" in printed and "note:" not in printed
    assert [row["model"] for row in _rows(tmp_path / "out")] == [TINY_RANDOM_LABEL]
    assert trained_model == []


@pytest.fixture
def small_demo(monkeypatch):
    """The demo at toy sizes: 17 frames at 96 px are 5 latent frames of 6 x 6 tokens, 180 tokens in 12 blocks of 16
    (radial drops some); 2 steps."""
    for name, value in [("DEFAULT_FRAMES", 17), ("DEFAULT_HEIGHT", 96), ("DEFAULT_WIDTH", 96), ("DEFAULT_STEPS", 2),
                        ("DEMO_BLOCK_SIZE", 16)]:  # fmt: skip
        monkeypatch.setattr(render, name, value)


def test_demo_prints_the_table_and_the_psnr_of_radial_against_dense(tmp_path, capsys, small_demo):
    assert cli.main(["demo", "--output-dir", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"model: {TINY_RANDOM_LABEL}\n{models.resolve_model_label(None)[1]}\n" in printed  # the fallback's note
    assert "180 video tokens" in printed and "block size 16" in printed
    lines = {line.split()[0]: line.split() for line in printed.splitlines() if line.strip()}
    assert lines["dense"][2] == "1.000" and 0 < float(lines["radial"][2]) < 1
    psnr_line = next(line for line in printed.splitlines() if line.startswith("PSNR radial vs dense:"))
    assert psnr_line.count("dB") == 2
    assert len(_rows(tmp_path / "demo")) == 2

    assert cli.main(["demo", "--output-dir", str(tmp_path / "demo"), "--device", "cpu"]) == 0  # resumed
    printed = capsys.readouterr().out
    assert "skipping 2 video(s)" in printed and "dB between the mp4s" in printed
    assert "wrote" not in printed and printed.count("(reused: an earlier run's video and seconds)") == 2
    assert printed.count("reused " + str(tmp_path / "demo")) == 2
    assert len(_rows(tmp_path / "demo")) == 2


def test_tiny_random_pipeline_is_deterministic_in_its_seed():
    first, again, other = (build_tiny_wan_pipeline(seed=s).transformer.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_demo_uses_the_trained_model_when_it_is_there(tmp_path, capsys, small_demo, trained_model):
    assert cli.main(["demo", "--output-dir", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"model: {tiny.TINY_LABEL}\n" in printed and "note:" not in printed
    assert [row["model"] for row in _rows(tmp_path / "demo")] == [tiny.TINY_LABEL] * 2
    assert trained_model == [tiny.MODEL_DIR]


def test_the_demo_defaults_are_the_trained_models_size_steps_and_a_shapes_caption_at_a_half_dense_radial():
    from dit_sparse.layout import VideoLayout
    from dit_sparse.patterns.radial import radial
    from dit_sparse.pipelines.tiny.shapes import parse_caption

    dense, sparse = render.demo_jobs()
    assert (dense.frames, dense.height, dense.width, dense.steps) == (81, 160, 160, tiny.DEFAULT_STEPS)
    assert render.wan_video_tokens(dense.frames, dense.height, dense.width) == 2100  # 21 latent frames of 10 x 10
    assert parse_caption(dense.prompt) == {"colour": "red", "shape": "circle", "direction": "right"}
    assert (dense.method, sparse.method, sparse.options["block_size"]) == ("dense", "radial", render.DEMO_BLOCK_SIZE)
    density = float(radial(VideoLayout(21, 10, 10), block_size=render.DEMO_BLOCK_SIZE).density)
    assert 0.4 < density < 0.6  # sparse, yet not the near-empty mask of a block larger than a frame (0.16 at 128)


def test_load_pipeline_tiny_random_is_the_tiny_random_pipeline_in_the_dtype_asked():
    pipe = models.load_pipeline(models.TINY_RANDOM, "cpu", "bfloat16")
    assert type(pipe).__name__ == "WanPipeline" and pipe.transformer.dtype == torch.bfloat16


def _tiny_flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                         axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    return FluxPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, None, None, transformer)


def test_a_hub_image_pipeline_is_refused_by_name_before_anything_renders(tmp_path, monkeypatch, capsys):
    # render / eval / the app call the pipeline with num_frames; FLUX's call takes none. The refusal names the class
    # (not a TypeError from inside the first call) and leaves no video or manifest row; a video pipeline loaded the
    # same way passes the check.
    from diffusers import DiffusionPipeline

    loaded = {"org/flux": _tiny_flux_pipeline(), "org/wan": build_tiny_wan_pipeline()}
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda name, **kwargs: loaded[name])
    assert _render(tmp_path, "--prompt", "a red circle", "--model", "org/flux") == 2
    error = capsys.readouterr().err
    assert "'org/flux' is a FluxPipeline, an image pipeline" in error and "\n" not in error.strip()
    assert _files(tmp_path / "out") == []
    assert models.load_pipeline("org/wan", "cpu", "float32") is loaded["org/wan"]


def test_option_values_are_parsed_as_bool_int_float_or_string():
    values = ("true", "False", "12", "0.5", "1e-3", "wan")
    assert [render.parse_option_value(v) for v in values] == [True, False, 12, 0.5, 1e-3, "wan"]
    assert render.parse_option_value("-2.5") == -2.5



# ---- faults: each is a one-line error and exit 2 before any model is loaded, or a run that repairs what it owns ----
def test_help_parses_before_torch_diffusers_and_the_model_code_are_imported():
    code = ("import runpy, sys\nsys.argv = ['dit-sparse', '--help']\ntry:\n    runpy.run_module('dit_sparse', "
            "run_name='__main__')\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
            "print(sorted(name for name in ('torch', 'diffusers', 'dit_sparse.api') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "render" in done.stdout and "eval" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_public_names_load_on_first_use_and_calibrate_stays_the_function():
    import dit_sparse
    import dit_sparse.calibrate  # noqa: F401  (the sub-module of the same name does not replace the function)

    assert callable(dit_sparse.calibrate) and dit_sparse.calibrate.__module__ == "dit_sparse.calibrate"
    assert all(getattr(dit_sparse, name) is not None for name in dit_sparse.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        dit_sparse.no_such_name


def test_an_output_dir_that_is_a_file_exits_2_before_a_model_loads(tmp_path, capsys, no_model):
    (tmp_path / "out").write_text("not a folder")
    assert _render(tmp_path, "--prompt", "a cat") == 2
    error = capsys.readouterr().err.strip()
    assert error == f"dit-sparse: error: --output-dir {str(tmp_path / 'out')!r} is a file, not a folder"
    assert cli.main(["demo", "--output-dir", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder nobody may write, root included (`chattr +i`); skips where the file system does not allow it."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("command", ["render", "demo"])
def test_an_output_dir_that_cannot_be_written_exits_2_before_a_model_loads(
    unwritable_folder, capsys, no_model, command
):
    argv = ["--prompt", "a cat", *SMALL] if command == "render" else ["--device", "cpu"]
    assert cli.main([command, *argv, "--output-dir", str(unwritable_folder / "sub")]) == 2
    assert cli.main([command, *argv, "--output-dir", str(unwritable_folder)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [
        f"dit-sparse: error: --output-dir {str(unwritable_folder / 'sub')!r} cannot be written: Operation not permitted",
        f"dit-sparse: error: --output-dir {str(unwritable_folder)!r} cannot be written: Operation not permitted",
    ]
    assert os.listdir(unwritable_folder) == []


def test_a_device_this_machine_lacks_exits_2_naming_the_ones_it_has(tmp_path, capsys, no_model):
    assert _render(tmp_path, "--prompt", "a cat", "--device", "tpu") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dit-sparse: error: device 'tpu' is not available here; available: cpu")
    assert "\n" not in error and not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        assert _render(tmp_path, "--prompt", "a cat", "--device", "cuda") == 2
        error = capsys.readouterr().err.strip()
        assert error == (f"dit-sparse: error: device 'cuda' is not available here (this torch {torch.__version__} "
                         "sees no CUDA GPU); available: cpu")  # fmt: skip


def test_a_seed_beyond_64_bits_exits_2_before_a_model_loads(tmp_path, capsys, no_model):
    assert _render(tmp_path, "--prompt", "a cat", "--seed", str(2**70)) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"dit-sparse: error: seed must be in 0..{2**63 - 1} (2**63 - 1), got {2**70}"
    torch.Generator().manual_seed(render.check_seed(render.MAX_SEED))  # the largest seed allowed is one torch takes
    with pytest.raises(ValueError, match="Overflow"):
        torch.Generator().manual_seed(2**70)  # what the run died of, after the model had loaded


def test_render_and_demo_take_threads_as_eval_does(tmp_path, capsys, no_model, monkeypatch):
    assert _render(tmp_path, "--prompt", "a cat", "--threads", "0") == 2
    assert capsys.readouterr().err.strip() == "dit-sparse: error: threads must be >= 1, got 0"
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    with pytest.raises(AssertionError, match="a model was loaded"):  # the threads are set, then the model loads
        cli.main(["demo", "--output-dir", str(tmp_path / "demo"), "--device", "cpu", "--threads", "3"])
    assert set_to == [3]


def test_a_kills_partial_mp4_is_removed_and_a_rerendered_video_keeps_one_row(tmp_path, render_calls):
    assert _render(tmp_path, "--prompt", "a cat", "--prompt", "a dog") == 0
    out = tmp_path / "out"
    cat, dog = _rows(out)
    (out / f".{cat['file']}.k1ll3d.part.mp4").write_bytes(b"")  # a kill during the mp4 write
    (out / ".someone-elses.mp4.x.part.mp4").write_bytes(b"")  # not this run's: left alone
    os.remove(out / dog["file"])
    assert _render(tmp_path, "--prompt", "a cat", "--prompt", "a dog") == 0
    assert render_calls.calls == ["a cat", "a dog", "a dog"]
    assert [row["prompt"] for row in _rows(out)] == ["a cat", "a dog"]
    assert _files(out) == sorted([render.MANIFEST_NAME, cat["file"], dog["file"], ".someone-elses.mp4.x.part.mp4"])
