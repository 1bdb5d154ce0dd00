"""benchmarks/quality.py's method subset and refresh rows, on the tiny random pipeline (quick on CPU): each refresh
period is its own row with its option, and a longer period estimates fewer masks."""

import json

from benchmarks import quality


def test_refresh_rows_estimate_fewer_masks_with_a_longer_period(tmp_path):
    argv = ["--random", "--methods", "draft", "--densities", "0.25", "--refresh", "1", "2", "--steps", "2",
            "--out", str(tmp_path)]
    assert quality.main(argv) == 0
    (path,) = tmp_path.glob("quality-random-subset-cpu-*.json")
    result = json.loads(path.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert sorted(rows) == ["draft refresh 1", "draft refresh 2"]
    assert rows["draft refresh 2"]["options"]["refresh"] == 2
    # 2 prompts x 2 steps x 2 CFG branches x 2 layers: refresh 1 estimates at every step, refresh 2 at the first only
    # (each prompt's generation afresh).
    assert rows["draft refresh 1"]["mask_builds"] == 2 * 2 * 2 * 2
    assert rows["draft refresh 2"]["mask_builds"] == 2 * 1 * 2 * 2
    assert all(0.2 < row["density"] < 0.3 for row in rows.values())
    assert result["methods"] == ["draft"] and result["refresh"] == [1, 2]


def test_sweep_runs_every_block_size_and_variant_over_prompts_and_seeds_within_its_video_budget(tmp_path, capsys):
    argv = ["--random", "--size", "9,64,64", "--methods", "draft", "--densities", "0.5", "--steps", "1", "--prompts",
            "1", "--seeds", "2", "--block-sizes", "16,32", "--variants", "plain,compensate", "--max-videos", "6",
            "--out", str(tmp_path)]
    assert quality.main(argv) == 0
    (path,) = tmp_path.glob("quality-random-subset-cpu-*.json")
    result = json.loads(path.read_text())
    # 1 prompt x 2 seeds: 2 dense videos, rendered once; each row renders 2 sparse videos, so a budget of 6 runs 3 of
    # the 4 rows (2 block sizes x 2 variants) and stops before the last.
    assert result["videos"] == {"dense": 2, "sparse": 6} and "--max-videos 6" in result["stopped"]
    rows = [(r["block_size"], r["variant"]) for r in result["rows"]]
    assert rows == [(16, "compensate"), (16, "plain"), (32, "plain")]
    assert [r["options"].get("compensate", False) for r in result["rows"]] == [True, False, False]
    assert [tuple(r["options"]["tile"]) for r in result["rows"]] == [(1, 4, 4), (1, 4, 4), (1, 4, 8)]
    assert result["prompts"] == quality.tiny_suite_prompts(1) and result["seeds"] == [0, 1]
    assert all(r["lpips"] is None for r in result["rows"]) == (result["lpips_note"] is not None)
    printed = capsys.readouterr().out
    assert printed.count("dense, prompt 1/1") == 2 and "seed 1:" in printed


def test_warmup_sweeps_dense_steps_and_layers_and_marks_the_official_setting(tmp_path):
    argv = ["--random", "--size", "9,64,64", "--methods", "draft", "--densities", "0.25", "--steps", "4", "--prompts",
            "1", "--warmup",
            "--out", str(tmp_path)]
    assert quality.main(argv) == 0
    (path,) = tmp_path.glob("quality-random-warmup-subset-cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    # 0/10/20/30% of 4 steps rounds to 0, 0, 1, 1 dense steps; x 0/1/2 dense layers: 6 settings. draft has no
    # official setting; radial's 12 of 50 steps and 1 layer is 1 step and 1 layer of 4 steps, 6 of 25 off the grid.
    grid = {(r["dense_steps"], r["dense_layers"]): r for r in rows}
    assert sorted(grid) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert not any(r["official"] for r in rows)
    radial = quality.warmup_grid(4, quality.OFFICIAL_WARMUP["radial"])
    assert [(s, l) for s, l, official in radial if official] == [(1, 1)] and len(radial) == 6
    radial = quality.warmup_grid(25, quality.OFFICIAL_WARMUP["radial"])
    assert radial[-1] == (6, 1, True) and len(radial) == 13
    # the work counts dense calls as 1: more dense steps or layers, more work; both layers dense is all dense
    assert grid[(0, 0)]["density"] < grid[(1, 0)]["density"] < 1
    assert grid[(0, 0)]["density"] < grid[(0, 1)]["density"] < grid[(0, 2)]["density"] == 1.0
    assert all(r["psnr_per_work"] == round(r["psnr_db"] / r["density"], 3) for r in rows if r["psnr_db"] != float("inf"))


def test_low_precision_variant_runs_the_reference_emulation_on_cpu(tmp_path):
    argv = ["--random", "--size", "9,64,64", "--methods", "radial", "--densities", "0.5", "--steps", "1", "--prompts",
            "1", "--variants", "plain,fp8", "--out", str(tmp_path)]
    assert quality.main(argv) == 0
    (path,) = tmp_path.glob("quality-random-subset-cpu-*.json")
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["fp8"]["options"]["precision"] == "fp8" and rows["fp8"]["options"]["backend"] == "reference"
    assert "precision" not in rows["plain"]["options"]
    assert rows["fp8"]["density"] == rows["plain"]["density"]  # the same mask, in other arithmetic
    assert rows["fp8"]["psnr_db"] != rows["plain"]["psnr_db"]
