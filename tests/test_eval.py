"""`dit-sparse eval`: suites, input checks, and a tiny end-to-end eval (tiny random Wan pipeline, 5 frames 32 x 32,
2 steps) that writes every output, resumes from its cache, and renders in headless Chromium."""

import csv
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from headless_chromium import screenshot

from dit_sparse import cli
from dit_sparse.eval import render, runner, suites
from dit_sparse.eval import report as report_module
from dit_sparse.patterns import CONFIGS
from dit_sparse.pipelines.tiny.shapes import build_tokenizer, parse_caption
from dit_sparse.video import read_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: where the test run leaves its screenshot of the report (git-ignored)
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")
SMALL = ["--model", "tiny-random", "--frames", "5", "--height", "32", "--width", "32", "--steps", "2",
         "--block-size", "16", "--device", "cpu"]  # fmt: skip
PROMPTS = ["a red circle moves right on a blue background", "a green square moves up on a white background"]


# ---- suites ------------------------------------------------------------------------------------------------------
def test_tiny_suite_is_20_plus_captions_in_the_tiny_models_vocabulary_covering_its_words():
    suite = suites.load_suite("tiny")
    assert len(suite.prompts) >= 20 and len({p.prompt for p in suite.prompts}) == len(suite.prompts)
    tokenizer = build_tokenizer()
    parsed = [parse_caption(p.prompt) for p in suite.prompts]
    for prompt in suite.prompts:
        assert tokenizer.unk_token_id not in tokenizer(prompt.prompt)["input_ids"]
    from dit_sparse.pipelines.tiny.shapes import DIRECTIONS, SHAPE_COLOURS, SHAPES

    assert {p["shape"] for p in parsed} == set(SHAPES) and {p["colour"] for p in parsed} == set(SHAPE_COLOURS)
    assert {p["direction"] for p in parsed} == set(DIRECTIONS)
    assert set(suite.categories()) == {"plain background", "vertical gradient", "horizontal gradient"}


def test_standard_suite_has_50_plus_prompts_over_the_vbench_categories():
    suite = suites.load_suite("standard")
    assert len(suite.prompts) >= 50 and len({p.prompt for p in suite.prompts}) == len(suite.prompts)
    categories = ["subject", "multiple objects", "motion", "camera motion", "scene", "style"]
    assert suite.categories() == categories
    assert all(sum(p.category == c for p in suite.prompts) >= 8 for c in categories)


def test_suite_files_txt_and_json(tmp_path):
    (tmp_path / "mine.txt").write_text("# comment\na cat\n\n a dog \n", encoding="utf-8")
    assert [p.prompt for p in suites.load_suite(str(tmp_path / "mine.txt")).prompts] == ["a cat", "a dog"]
    (tmp_path / "list.json").write_text(json.dumps(["a cat", {"prompt": "a dog", "category": "motion"}]))
    suite = suites.load_suite(str(tmp_path / "list.json"))
    assert [(p.prompt, p.category) for p in suite.prompts] == [("a cat", ""), ("a dog", "motion")]
    (tmp_path / "bad.json").write_text(json.dumps({"prompts": [{"category": "x"}]}))
    with pytest.raises(ValueError, match="entry 0"):
        suites.load_suite(str(tmp_path / "bad.json"))


def test_vbench_suites_come_from_the_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "vbench"
    package.mkdir()
    (package / "__init__.py").write_text("")
    info = [{"prompt_en": "a cat", "dimension": ["subject_consistency"]},
            {"prompt_en": "a dog running", "dimension": ["dynamic_degree", "subject_consistency"]}]  # fmt: skip
    (package / "VBench_full_info.json").write_text(json.dumps(info))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "vbench" in suites.available_suites()
    assert [p.prompt for p in suites.load_suite("vbench").prompts] == ["a cat", "a dog running"]
    assert [p.prompt for p in suites.load_suite("vbench:dynamic_degree").prompts] == ["a dog running"]
    with pytest.raises(ValueError, match="'color'.*dynamic_degree"):
        suites.load_suite("vbench:color")


def test_unknown_suite_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown suite 'tinyy'.*'tiny', 'standard'"):
        suites.load_suite("tinyy")


# ---- input checks ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(runner, "load_eval_model", refuse)


BAD_INPUTS = [
    (["--methods", "dense,sparse"], ["'sparse'", "radial"]),
    (["--methods", "radial,radial"], ["radial", "twice"]),
    (["--methods", "baseline"], ["baseline", "always"]),
    (["--suite", "tinyy"], ["tinyy", "standard"]),
    (["--suite", "missing.txt"], ["missing.txt"]),
    (["--frames", "10"], ["frames=10", "9 or 13"]),
    (["--height", "40"], ["height=40", "32 or 48"]),
    (["--steps", "0"], ["steps", "0"]),
    (["--seeds", "0,-1"], ["seeds", "-1"]),
    (["--seeds", "a"], ["--seeds", "'a'"]),
    (["--option", "random.density=2"], ["random", "density", "2"]),
    (["--methods", "dense", "--option", "radial.decay_factor=0.5"], ["radial", "not in --methods"]),
    (["--option", "radial=3"], ["METHOD.KEY=VALUE"]),
    (["--block-size", "24"], ["block_size", "24"]),
    (["--model", "./no-such-model"], ["no-such-model"]),
    (["--warmup-steps", "-1"], ["warmup_steps", "-1"]),
    (["--score-workers", "0"], ["score workers", "0"]),
    (["--seeds", f"0,{2**70}"], ["seed must be in 0..", str(2**70)]),
    (["--device", "tpu"], ["device 'tpu'", "available: cpu"]),
    (["--threads", "0"], ["threads", "0"]),
    (["--stacks", "cache=nosuch"], ["'cache=nosuch'", "unknown cache 'nosuch'", "'first_block'"]),
    (["--stacks", "fp8+fp8"], ["'fp8+fp8'", "fp8 twice", "compile=regional|full"]),
    (["--stacks", "compile=fast"], ["'compile=fast'", "'regional', 'full'"]),
    (["--stacks", "none+fp8"], ["'none+fp8'", "'none' is not a stack item", "none (the method alone)"]),
    (["--stacks", "cache=first_block+compile=regional"], ["'cache=first_block+compile=regional'", "compile='full'"]),
    (["--stacks", "none", "cache=pab", "none"], ["--stacks 'none' is the same stack as 'none'"]),
    (["--stacks", "fp8+cache=pab", "cache=pab+fp8"], ["'cache=pab+fp8' is the same stack as 'fp8+cache=pab'"]),
    (["--stacks", "none", "cache=pab", "--cache", "pab"], ["--stacks none cache=pab", "--cache", "(given: cache=pab)"]),
    (["--fp8", "--stacks", "none"], ["--stacks none", "--fp8", "(given: fp8)"]),
]


@pytest.mark.parametrize("args, named", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_value_and_creates_nothing(tmp_path, capsys, no_model, args, named):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    argv = ["eval", *SMALL, "--suite", str(prompts), "--output-dir", str(tmp_path / "out"), *args]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dit-sparse: error:") and "\n" not in error
    for text in named:
        assert text in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--output-dir", "--cache-dir"])
def test_an_output_or_cache_dir_that_is_a_file_exits_2_before_a_model_loads(tmp_path, capsys, no_model, flag):
    (tmp_path / "file").write_text("not a folder")
    file = str(tmp_path / "file")
    folders = {"--output-dir": str(tmp_path / "out"), "--cache-dir": str(tmp_path / "cache"), flag: file}
    argv = ["eval", *SMALL, "--suite", "tiny", *(item for pair in folders.items() for item in pair)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"dit-sparse: error: {flag} {file!r} is a file, not a folder"


def test_a_damaged_cached_video_is_reported_by_path_and_rendered_again(tmp_path, capsys):
    frames = np.arange(2 * 16 * 16 * 3, dtype=np.uint8).reshape(2, 16, 16, 3)
    rows = []
    for name, shape in [("whole", [2, 16, 16, 3]), ("cut", [2, 16, 16, 3]), ("other", [3, 16, 16, 3]),
                        ("old", None)]:  # fmt: skip
        runner.save_frames(frames, str(tmp_path / f"{name}.npy"))
        rows.append({"hash": name, "file": f"{name}.npy", **({} if shape is None else {"shape": shape})})
    with open(tmp_path / "cut.npy", "r+b") as file:  # a write cut short by a full disk or a kill
        file.truncate(os.path.getsize(tmp_path / "cut.npy") - 100)
    (tmp_path / "junk.npy").write_bytes(b"\x00" * 10)
    rows.append({"hash": "junk", "file": "junk.npy"})
    for row in rows:
        render.append_row(str(tmp_path / runner.MANIFEST_NAME), row)
    assert sorted(runner.cached_rows(str(tmp_path))) == ["old", "whole"]  # a row without a shape: its size checked
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings[:2] == [
        f"dit-sparse: warning: {tmp_path / 'cut.npy'}: cut short ({os.path.getsize(tmp_path / 'cut.npy')} of "
        f"{os.path.getsize(tmp_path / 'whole.npy')} bytes); rendering it again",
        f"dit-sparse: warning: {tmp_path / 'other.npy'}: its frames are [2, 16, 16, 3], its manifest row says "
        "[3, 16, 16, 3]; rendering it again",
    ]
    assert warnings[2].startswith(f"dit-sparse: warning: {tmp_path / 'junk.npy'}: not a readable .npy file (")
    assert warnings[2].endswith("); rendering it again") and len(warnings) == 3


def test_a_folder_that_is_not_a_diffusers_pipeline_is_refused(tmp_path, capsys, no_model):
    (tmp_path / "weights").mkdir()
    argv = ["eval", *SMALL[2:], "--model", str(tmp_path / "weights"), "--output-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_methods_default_to_every_config_and_options_fill_in_defaults():
    plan = runner.make_plan(suite="tiny", block_size=32, options=["radial.decay_factor=0.5"])
    assert [m.name for m in plan.methods] == list(CONFIGS)
    radial = next(m for m in plan.methods if m.name == "radial")
    assert radial.options["decay_factor"] == 0.5 and radial.options["block_size"] == 32
    assert all(m.options.get("block_size", 32) == 32 for m in plan.methods)
    plan = runner.make_plan(suite="tiny", methods="neighborhood", options=["neighborhood.window=3,4,4"])
    assert plan.methods[0].options["window"] == (3, 4, 4)
    from dit_sparse.eval.report import reproduce_command

    assert "--option=neighborhood.window=3,4,4" in reproduce_command(plan)


def test_eval_sizes_default_to_the_trained_tiny_models_own_and_to_small_ones_for_other_models(tmp_path, monkeypatch):
    """At 8 steps the trained model's shapes vanish, so eval runs it at its training size and steps; the random
    pipeline (or any other model) keeps the fast small defaults; flags given always win."""
    from dit_sparse.pipelines import tiny

    def sizes(plan):
        return plan.frames, plan.height, plan.width, plan.steps

    monkeypatch.setattr(tiny, "MODEL_DIR", str(tmp_path / "absent"))
    assert sizes(runner.make_plan(suite="tiny")) == (17, 128, 128, 8)  # the random fallback
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    monkeypatch.setattr(tiny, "MODEL_DIR", str(tmp_path / "model"))
    trained = runner.make_plan(suite="tiny")
    assert trained.model_label == tiny.TINY_LABEL
    assert sizes(trained) == (
        render.DEFAULT_FRAMES, render.DEFAULT_HEIGHT, render.DEFAULT_WIDTH, tiny.DEFAULT_STEPS) == (81, 160, 160, 25)
    assert sizes(runner.make_plan(suite="tiny", model="tiny-random")) == (17, 128, 128, 8)
    assert sizes(runner.make_plan(suite="tiny", frames=9, steps=3)) == (9, 160, 160, 3)


# ---- end to end --------------------------------------------------------------------------------------------------
@pytest.fixture
def render_calls(monkeypatch):
    """Counts timed renders by (method, steps); `fail_on` makes the render of that method raise."""
    real = runner.render_timed
    calls, fail_on = [], set()

    def counting(pipe, job, device):
        calls.append((job.method, job.steps))
        if job.method in fail_on and job.steps > 1:
            raise RuntimeError(f"render of {job.method} failed (simulated)")
        return real(pipe, job, device)

    monkeypatch.setattr(runner, "render_timed", counting)
    counting.calls, counting.fail_on = calls, fail_on
    return counting


def test_small_eval_writes_every_output_resumes_from_its_cache_and_renders_in_chromium(tmp_path, render_calls, capsys):
    prompts = tmp_path / "two.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "report"
    argv = ["eval", *SMALL, "--suite", str(prompts), "--output-dir", str(out)]

    # 1. radial alone, its render of the second prompt failing: the finished videos stay, nothing half-written
    render_calls.fail_on.add("radial")
    with pytest.raises(RuntimeError, match="simulated"):
        cli.main([*argv, "--methods", "radial"])
    rows = [json.loads(line) for line in open(out / "videos" / runner.MANIFEST_NAME)]
    assert [r["method"] for r in rows] == ["baseline"]
    assert sorted(os.listdir(out / "videos")) == sorted([runner.MANIFEST_NAME, rows[0]["file"]])

    # 2. resumed with dense added: the cached baseline is not rendered again
    render_calls.fail_on.clear()
    render_calls.calls.clear()
    assert cli.main([*argv, "--methods", "dense,radial"]) == 0
    timed = [method for method, steps in render_calls.calls if steps == 2]
    assert sorted(timed) == ["baseline", "dense", "dense", "radial", "radial"]

    # 3. everything there: nothing is rendered
    render_calls.calls.clear()
    assert cli.main([*argv, "--methods", "dense,radial"]) == 0
    assert render_calls.calls == []

    for name in ("results.json", "results.csv", "report.md", "report.html", "pareto.png", "masks/radial.png",
                 "masks/dense.png"):  # fmt: skip
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["model"].startswith("tiny-random") and "UNTRAINED" in results["run"]["model_note"]
    assert results["run"]["settings"]["frames"] == 5 and results["run"]["device"].startswith("cpu")
    videos = results["videos"]
    expected = [(p, m) for p in PROMPTS for m in ("baseline", "dense", "radial")]
    assert [(v["prompt"], v["method"]) for v in videos] == expected
    for video in videos:
        assert video["seconds"] > 0 and video["seconds_per_step"] > 0 and video["peak_memory_mb"] > 0
        assert 0 <= video["temporal_flickering"] <= 1 and isinstance(video["dynamic"], bool)
        if video["method"] == "baseline":
            assert video["psnr"] is None and video["density"] == 1.0
        else:
            assert video["psnr"] == "inf" or video["psnr"] > 30
            assert 0.9 < video["ssim"] <= 1.0 and 0 < video["density"] <= 1
    assert [m["method"] for m in results["means"]] == ["baseline", "dense", "radial"]
    with open(out / "results.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert len(table) == 6 + 3 and [r["prompt"] for r in table[6:]] == ["MEAN"] * 3

    side_by_side = sorted(name for name in os.listdir(out / "side_by_side") if name.endswith(".mp4"))
    assert len(side_by_side) == 2
    grid = read_video(out / "side_by_side" / side_by_side[0])
    assert grid.shape == (5, 2 * (32 + 14) + 4, 3 * 32, 3)  # 2 method rows with labels, padded to 16; 3 columns
    report = (out / "report.html").read_text()
    for link in ("pareto.png", "masks/radial.png", f"side_by_side/{side_by_side[0]}"):
        assert f"'{link}'" in report
    assert str(tmp_path) not in report.replace(str(prompts), "")  # links are relative
    assert "pareto.png" in (out / "report.md").read_text()

    # the CLI scored in one spawned process per core (2 on CI's machine): one process gives the same rows
    plan = runner.make_plan(suite=str(prompts), methods="dense,radial", model="tiny-random", frames=5, height=32,
                            width=32, steps=2, block_size=16, output_dir=str(out))  # fmt: skip
    finished = runner.cached_rows(plan.cache_dir)
    alone = runner.score_videos(plan, finished, workers=1)
    assert json.loads(json.dumps(report_module._json_safe(alone))) == videos
    # learnt metrics (stand-ins here) run in this process, each on its own row's frames
    optional = {"lpips": lambda reference, video: float(abs(reference.astype(int) - video).mean()),
                "clip_score": lambda video, prompt: float(video.mean()) + len(prompt)}  # fmt: skip
    learnt = runner.score_videos(plan, finished, optional)
    by_file = {row["file"]: runner.load_frames(plan, row) for row in finished.values()}
    for row in learnt:
        frames = by_file[row["file"]]
        base = by_file[next(r["file"] for r in learnt if r["prompt"] == row["prompt"] and r["method"] == "baseline")]
        assert row["clip_score"] == float(frames.mean()) + len(row["prompt"])
        expected = None if row["method"] == "baseline" else float(abs(base.astype(int) - frames).mean())
        assert row["lpips"] == expected

    # a cached video cut short (a full disk, a kill): reported by path and rendered again, never trusted
    damaged = next(row for row in finished.values() if row["method"] == "radial")
    path = os.path.join(plan.cache_dir, damaged["file"])
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    render_calls.calls.clear()
    again = runner.render_all(plan, log=lambda line: None)
    assert render_calls.calls == [("radial", 1), ("radial", 2)]  # its warm-up, then the video
    assert f"{path}: cut short" in capsys.readouterr().err
    assert runner.damaged_frames(path, damaged["shape"]) is None and set(again) == set(finished)

    screenshot(str(out / "report.html"), os.path.join(ARTIFACTS, "eval-report.png"))


def test_eval_runs_a_random_wan_folder_built_by_the_script_and_no_videos_keeps_stills_only(tmp_path):
    from dit_sparse.pipelines.tiny import random_wan

    folder = tmp_path / "wan-smoke"
    assert random_wan.main(["--config", "smoke", "--out", str(folder), "--dtype", "float32"]) == 0
    with pytest.raises(ValueError, match="already holds a pipeline"):
        random_wan.save_random_wan(str(folder), "smoke")
    prompts = tmp_path / "one.txt"
    prompts.write_text("a cat\n")
    argv = ["eval", *SMALL[2:], "--model", str(folder), "--methods", "radial", "--suite", str(prompts),
            "--warmup-steps", "0", "--output-dir", str(tmp_path / "out"), "--no-videos"]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["run"]["model"] == str(folder)
    note = results["run"]["model_note"]  # the folder says it holds random weights: the report says so up front
    assert note.startswith("random weights (UNTRAINED)") and note.endswith("(drawn for smoke, seed 0)")
    assert note in (tmp_path / "out" / "report.md").read_text()
    assert f"--model {folder}" in results["run"]["command"] and " --no-videos" in results["run"]["command"]
    assert os.listdir(tmp_path / "out" / "side_by_side") == ["00-a-cat.jpg"]  # the still, no mp4
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<img src='side_by_side/00-a-cat.jpg'" in html and "<video" not in html
    assert "(middle frame; no video)" in (tmp_path / "out" / "report.md").read_text()
    psnr = results["means"][1]["psnr"]
    assert psnr == "inf" or psnr > 30


def test_random_weights_origin_reads_the_marker_of_a_folder_only(tmp_path):
    from dit_sparse.pipelines.models import RANDOM_WEIGHTS_MARKER, random_weights_origin

    assert random_weights_origin(str(tmp_path)) is None  # a folder without the marker: a model like any other
    assert random_weights_origin("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") is None and random_weights_origin(None) is None
    (tmp_path / RANDOM_WEIGHTS_MARKER).write_text('{"config": "wan2.1-14b", "seed": 3}')
    assert random_weights_origin(str(tmp_path)) == "wan2.1-14b, seed 3"
    (tmp_path / RANDOM_WEIGHTS_MARKER).write_text("{not json")
    assert "unreadable" in random_weights_origin(str(tmp_path))


def test_python_m_dit_sparse_eval_scores_in_spawned_worker_processes(tmp_path):
    # README's way in: the frame metrics run in spawned processes, which re-import what the command's process holds
    prompts = tmp_path / "one.txt"
    prompts.write_text("a cat\n")
    argv = [sys.executable, "-m", "dit_sparse", "eval", *SMALL, "--methods", "dense", "--suite", str(prompts),
            "--warmup-steps", "0", "--score-workers", "2", "--no-videos", "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scoring (2 processes)" in done.stderr
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["videos"]
    assert [r["method"] for r in rows] == ["baseline", "dense"] and rows[1]["ssim"] > 0.99


def test_the_random_wan_13b_config_has_the_real_models_size():
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from dit_sparse.pipelines.tiny.random_wan import CONFIGS

    with torch.device("meta"):  # no memory, no time: only the shapes
        transformer = WanTransformer3DModel(**CONFIGS["wan2.1-1.3b"]["transformer"])
        vae = AutoencoderKLWan(**CONFIGS["wan2.1-1.3b"]["vae"])
    assert 1.40e9 < sum(p.numel() for p in transformer.parameters()) < 1.43e9  # Wan2.1-T2V-1.3B: 1.42 B
    assert 120e6 < sum(p.numel() for p in vae.parameters()) < 130e6  # Wan 2.1 VAE: 127 M


def test_score_workers_default_to_the_cores_this_process_may_use_and_never_exceed_the_videos():
    cores = len(os.sched_getaffinity(0))
    assert runner.score_workers(1000) == cores and runner.score_workers(1) == 1
    assert runner.score_workers(5, 8) == 5 and runner.score_workers(5, 3) == 3
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="score workers"):
            runner.score_workers(5, bad)


# ---- several stacks in one eval ----------------------------------------------------------------------------------
def test_stack_specs_read_as_documented_and_name_their_rows():
    assert render.parse_stack_spec("none") == {}
    assert render.parse_stack_spec("cache=first_block:threshold=0.1") == {"cache": "first_block:threshold=0.1"}
    assert render.parse_stack_spec("fp8+cache=taylorseer") == {"cache": "taylorseer", "fp8": True}
    assert render.parse_stack_spec("compile=full+cache=pab+fp8") == {"cache": "pab", "fp8": True, "compile": "full"}
    assert render.stack_spec({}) == "none" and render.stack_spec({"compile": "full", "cache": "pab"}) == (
        "cache=pab+compile=full")
    assert render.stack_label("radial", {}) == "radial"
    assert render.stack_label("radial", {"cache": "taylorseer", "fp8": True}) == "radial + taylorseer + fp8"
    # the example line: every method once per stack, method-major
    args = cli.build_parser("eval").parse_args(
        ["eval", "--methods", "radial,dense", "--stacks", "none", "cache=first_block:threshold=0.1",
         "cache=taylorseer+fp8"])  # fmt: skip
    plan = runner.make_plan(suite="tiny", methods=args.methods, model="tiny-random", stacks=args.stacks)
    assert [(row.label, row.method) for row in plan.rows()] == [
        ("radial", "radial"), ("radial + first_block:threshold=0.1", "radial"), ("radial + taylorseer + fp8", "radial"),
        ("dense", "dense"), ("dense + first_block:threshold=0.1", "dense"), ("dense + taylorseer + fp8", "dense")]
    assert len(plan.jobs()) == len(plan.suite.prompts) * 7 and len({job.key_hash() for job in plan.jobs()}) == len(
        plan.jobs())  # every stack's video has its own key


def test_eval_with_stacks_reports_a_row_and_a_pareto_point_per_method_and_stack(tmp_path, render_calls):
    prompts = tmp_path / "one.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    out = tmp_path / "report"
    cache = "first_block:threshold=0.2"  # skips blocks on the tiny random pipeline even at 2 steps
    stacked = f"radial + {cache}"
    common = ["eval", *SMALL, "--suite", str(prompts), "--methods", "radial", "--score-workers", "1", "--no-videos",
              "--output-dir", str(out)]  # fmt: skip
    assert cli.main([*common, "--stacks", "none", f"cache={cache}"]) == 0
    # the baseline once, then radial once per stack, each stack after its own warm-up call
    assert render_calls.calls == [("baseline", 1), ("baseline", 2), ("radial", 1), ("radial", 2), ("radial", 1),
                                  ("radial", 2)]  # fmt: skip

    manifest = [json.loads(line) for line in open(out / "videos" / runner.MANIFEST_NAME)]
    assert [(row["method"], row.get("stack")) for row in manifest] == [
        ("baseline", None), ("radial", None), ("radial", {"cache": cache})]
    base, plain, cached = manifest
    assert len({row["hash"] for row in manifest}) == 3 and len({row["file"] for row in manifest}) == 3
    # 2 steps x 2 CFG calls x 2 transformer blocks = 8 self-attention computations; the cache served some
    assert 0 < cached["cache_skipped_blocks"] < 8 and cached["cache_skip_share"] == cached["cache_skipped_blocks"] / 8
    assert "cache_skipped_blocks" not in plain
    frames = {row["hash"]: np.load(out / "videos" / row["file"]) for row in manifest}
    assert not np.array_equal(frames[plain["hash"]], frames[cached["hash"]])

    def psnr(row):  # against the baseline's lossless frames, on the 0..255 scale
        error = np.mean((frames[row["hash"]].astype(np.float64) - frames[base["hash"]]) ** 2)
        return "inf" if error == 0 else 10 * math.log10(255.0**2 / error)

    results = json.loads((out / "results.json").read_text())
    assert results["run"]["stacks"] == [{}, {"cache": cache}]
    videos = {video["label"]: video for video in results["videos"]}
    means = {mean["label"]: mean for mean in results["means"]}
    assert list(videos) == list(means) == ["baseline", "radial", stacked]
    for label, row in [("radial", plain), (stacked, cached)]:
        for entry in (videos[label], means[label]):
            assert entry["method"] == "radial" and entry["stack"] == row.get("stack", {})
            expected = psnr(row)
            assert entry["psnr"] == expected if expected == "inf" else entry["psnr"] == pytest.approx(expected)
            assert entry["step_speedup"] == pytest.approx(base["seconds_per_step"] / row["seconds_per_step"])
    assert psnr(cached) != "inf" and psnr(cached) != psnr(plain)  # the cache changed the video
    assert means[stacked]["cache_skip_share"] == cached["cache_skip_share"]
    assert "cache_skip_share" not in means["radial"]
    # one Pareto point per row, each at its own speed and PSNR
    points = report_module.pareto_points([{**m, "psnr": None if m["psnr"] is None else float(m["psnr"])}
                                          for m in results["means"]])  # fmt: skip
    assert [(p["method"], p["speedup"]) for p in points] == [(label, means[label]["step_speedup"])
                                                            for label in ("radial", stacked)]  # fmt: skip
    assert points[1]["psnr"] == pytest.approx(psnr(cached))

    with open(out / "results.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert [(r["prompt"], r["label"], r["method"]) for r in table] == [
        (PROMPTS[0], "baseline", "baseline"), (PROMPTS[0], "radial", "radial"), (PROMPTS[0], stacked, "radial"),
        ("MEAN", "baseline", "baseline"), ("MEAN", "radial", "radial"), ("MEAN", stacked, "radial")]
    assert json.loads(table[2]["stack"]) == {"cache": cache} and json.loads(table[1]["stack"]) == {}
    markdown = (out / "report.md").read_text()
    summary = [line.split(" | ")[0] for line in markdown.split("## Methods")[0].splitlines() if line.startswith("| ")]
    assert summary == ["| method", "| baseline", "| radial", f"| {stacked}"]
    assert "\n### radial\n" in markdown and f"\n### {stacked}\n" in markdown and "cache skipped" in markdown
    assert markdown.count("](masks/radial.png)") == 2 and os.listdir(out / "masks") == ["radial.png"]
    html = (out / "report.html").read_text()
    assert "<h3>radial</h3>" in html and f"<h3>{stacked}</h3>" in html
    import cv2

    still = cv2.imread(str(out / "side_by_side" / os.listdir(out / "side_by_side")[0]))
    assert still.shape == (2 * (32 + 14) + 4, 3 * 32, 3)  # a row per report row, each labelled; padded to 16

    # the reproduce command names both stacks and parses back to the same plan
    command = results["run"]["command"]
    assert f" --stacks none cache={cache}" in command and command in markdown
    args = cli.build_parser("eval").parse_args(shlex.split(command)[1:])
    assert runner.parse_stacks(args.stacks) == ({}, {"cache": cache}) and args.cache is None

    # the method alone is the video a run without --stacks renders: that run reuses it, and its report is as before
    render_calls.calls.clear()
    assert cli.main(common) == 0
    assert render_calls.calls == []
    legacy = json.loads((out / "results.json").read_text())
    assert [(m["method"], "label" in m, "stack" in m) for m in legacy["means"]] == [("baseline", False, False),
                                                                                   ("radial", False, False)]
    assert "stacks" not in legacy["run"] and "--stacks" not in legacy["run"]["command"]
    assert "cache skipped" not in (out / "report.md").read_text()


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [{"method": m, "speedup": x, "psnr": y} for m, x, y in
              [("a", 1.0, 30.0), ("b", 2.0, 20.0), ("c", 1.5, 10.0), ("d", 0.9, 30.0), ("e", 2.0, 20.0)]]
    # c is beaten by b, d by a; b and e tie (neither beats the other)
    assert [p["method"] for p in report_module.pareto_front(points)] == ["a", "b", "e"]


def test_side_by_side_shows_the_difference_amplified_by_a_labelled_power_of_two():
    import numpy as np

    from dit_sparse.eval import report

    reference = np.full((3, 16, 16, 3), 100, np.uint8)
    method = reference.copy()
    method[:, 4:8, 4:8] += 3  # |diff| 3 on 1/16 of the pixels: the 99.9th percentile is 3, so the gain is 64
    assert report.difference_gain(reference, {"m": method}) == 64
    assert report.difference_gain(reference, {"m": reference}) == 1
    grid = report.side_by_side(reference, {"m": method})
    assert grid.shape == (3, 32, 48, 3)  # a 14-pixel label strip, padded to 16; three 16-pixel columns
    difference = grid[:, report.LABEL_HEIGHT : report.LABEL_HEIGHT + 16, 32:48]
    assert difference.max() == 3 * 64 and (difference[:, 4:8, 4:8] == 192).all()
    assert (grid[:, report.LABEL_HEIGHT : report.LABEL_HEIGHT + 16, 16:32] == method).all()
