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
