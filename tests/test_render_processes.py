"""`render` on several processes: manifest shards, their merge, the split, the launch; and real 2-process CPU runs
(gloo, the tiny random Wan pipeline at toy sizes) against one process, including a killed run resumed."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dit_sparse import cli
from dit_sparse.eval import render
from dit_sparse.video import read_video

SMALL = ["--frames", "9", "--height", "64", "--width", "64", "--steps", "2", "--block-size", "16", "--device", "cpu"]
PROMPTS = ["a red fox runs", "a blue boat", "a cat sleeps", "a dog jumps"]


def _row(prompt: str, **extra) -> dict:
    job = render.make_job(prompt, {"seed": 0, "method": "radial", "options": {"block_size": 16}, "frames": 9,
                                "height": 64, "width": 64, "steps": 2, "guidance": 5.0}, "m")
    return {**job.key(), "file": job.file_name(), **extra}


def _write_rows(path, rows, tail=""):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail, encoding="utf-8")


def _rows(folder):
    return [json.loads(line) for line in (folder / render.MANIFEST_NAME).read_text(encoding="utf-8").splitlines()]


# ---- the pieces, in process --------------------------------------------------------------------------------------
def test_shards_merge_into_the_manifest_in_rank_order_without_duplicates_and_are_removed(tmp_path, capsys):
    a, b, c, d = (_row(p) for p in PROMPTS)
    _write_rows(tmp_path / render.MANIFEST_NAME, [a])
    _write_rows(tmp_path / render.shard_name(1), [d])
    _write_rows(tmp_path / render.shard_name(0), [a, b, c], tail='{"prompt": "torn')  # a: merged before a crash
    assert render.merge_manifest_shards(str(tmp_path)) == 3
    assert [row["prompt"] for row in _rows(tmp_path)] == PROMPTS
    assert sorted(os.listdir(tmp_path)) == [render.MANIFEST_NAME]
    assert "skipping a line" in capsys.readouterr().err
    assert render.merge_manifest_shards(str(tmp_path)) == 0  # nothing left to merge
    assert [row["prompt"] for row in _rows(tmp_path)] == PROMPTS


def test_pending_jobs_skip_finished_and_repeated_keys_in_prompt_order():
    jobs = [render.make_job(p, {"seed": 0, "method": "dense", "options": {}, "frames": 9, "height": 64, "width": 64,
                             "steps": 2, "guidance": 5.0}, "m") for p in [*PROMPTS, PROMPTS[0]]]
    finished = {jobs[1].key_hash(): {}}
    assert [job.prompt for job in render.pending_jobs(jobs, finished)] == [PROMPTS[0], *PROMPTS[2:]]


def test_num_processes_relaunches_render_under_accelerate_without_the_flag():
    command = render.launch_command(2, ["render", "--prompt", "a cat", "--num-processes", "2", "--steps", "3",
                                     "--num-processes=2"])
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("-m", 3):] == ["-m", "dit_sparse.cli", "render", "--prompt", "a cat", "--steps", "3"]


def test_num_processes_must_be_positive(tmp_path, capsys):
    assert cli.main(["render", "--prompt", "x", "--num-processes", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert "num_processes must be >= 1, got 0" in capsys.readouterr().err


# ---- real processes (CPU, gloo) ----------------------------------------------------------------------------------
def _command(out, processes: int) -> list[str]:
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    return [sys.executable, "-m", "dit_sparse.cli", "render", *SMALL, *prompts, "--output-dir", str(out),
            "--num-processes", str(processes)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one thread: same sums


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), children first."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as file:
                    parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _frames(folder) -> dict[str, np.ndarray]:
    return {row["prompt"]: read_video(folder / row["file"]) for row in _rows(folder)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    subprocess.run(_command(out, 1), check=True, env=_env(), capture_output=True, timeout=600)
    return out


@pytest.mark.slow
def test_two_processes_render_the_same_videos_as_one_and_a_complete_manifest(tmp_path, one_process):
    out = tmp_path / "out"
    done = subprocess.run(_command(out, 2), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(out)
    assert sorted(row["prompt"] for row in rows) == sorted(PROMPTS) and len(rows) == 4
    assert sorted(os.listdir(out)) == sorted([render.MANIFEST_NAME, *(row["file"] for row in rows)])  # shards merged
    reference, frames = _frames(one_process), _frames(out)
    for prompt in PROMPTS:
        assert np.array_equal(frames[prompt], reference[prompt]), prompt
    by_prompt = {row["prompt"]: row["file"] for row in _rows(one_process)}
    for row in rows:  # the same key, the same file name, the same bytes
        assert (out / row["file"]).read_bytes() == (one_process / by_prompt[row["prompt"]]).read_bytes()


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_with_only_the_missing_videos(tmp_path, one_process):
    out = tmp_path / "out"
    run = subprocess.Popen(_command(out, 2), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # until one process has recorded a video in its shard
            shards = [out / render.shard_name(r) for r in (0, 1)]
            if any(s.exists() and s.read_text(encoding="utf-8").strip() for s in shards):
                break
            assert run.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no video was rendered in time")
    finally:  # the launcher and both workers (torchrun starts them in sessions of their own): a run that dies
        for pid in [run.pid, *_descendants(run.pid)]:  # before its merge
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run.wait()
    kept = {}  # videos the killed run recorded: file -> (inode, mtime)
    for r in (0, 1):
        shard = out / render.shard_name(r)
        if shard.exists():
            for row in render.read_manifest(str(shard)):
                stat = (out / row["file"]).stat()
                kept[row["file"]] = (stat.st_ino, stat.st_mtime_ns)
    assert 1 <= len(kept) < 4

    done = subprocess.run(_command(out, 2), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipping {len(kept)} video(s)" in done.stdout, done.stdout
    rows = _rows(out)
    assert sorted(row["prompt"] for row in rows) == sorted(PROMPTS) and len(rows) == 4
    for name, stat in kept.items():  # not rendered again
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stat
    assert not any(name.startswith("manifest.rank") for name in os.listdir(out))
    reference = _frames(one_process)
    for prompt, frames in _frames(out).items():
        assert np.array_equal(frames, reference[prompt]), prompt
