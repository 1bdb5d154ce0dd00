"""benchmarks/transformer_step.py's bookkeeping on CPU (its --smoke models): a row is saved as soon as it is timed,
so a run cut off by a time limit keeps what it measured, and --resume keeps those rows and takes its baselines from
them instead of running them again. Timings here are meaningless; only which rows exist and how they relate is
checked."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("transformer_step", ROOT / "benchmarks" / "transformer_step.py")
transformer_step = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(transformer_step)

SMOKE = ["--smoke", "--models", "smoke-wan", "--modes", "eager", "--warmup", "0", "--repeats", "1"]


def _rows(out: Path) -> dict:
    (path,) = out.glob("transformer_step-*.json")
    return {row["method"]: row for row in json.loads(path.read_text())["rows"]}


def test_a_run_cut_off_keeps_its_rows_and_resume_reuses_them(tmp_path, monkeypatch):
    timed = transformer_step.time_steps
    calls = []

    def time_then_stop(fn, repeats):
        if len(calls) == 2:  # the third row (our dense path) is cut off, as a device call's time limit would
            raise KeyboardInterrupt
        calls.append(1)
        return timed(fn, repeats)

    monkeypatch.setattr(transformer_step, "time_steps", time_then_stop)
    with pytest.raises(KeyboardInterrupt):
        transformer_step.main(SMOKE + ["--methods", "random", "--out", str(tmp_path)])
    first = _rows(tmp_path)
    assert sorted(first) == ["diffusers", "skip-attention"]

    monkeypatch.setattr(transformer_step, "time_steps", timed)
    assert transformer_step.main(SMOKE + ["--methods", "random", "--resume", "--out", str(tmp_path)]) == 0
    second = _rows(tmp_path)
    assert sorted(second) == ["dense", "diffusers", "random", "skip-attention"]
    for method in ("diffusers", "skip-attention"):  # kept, not run again
        assert second[method]["ms_sparse"] == first[method]["ms_sparse"]
    baseline, skipped = first["diffusers"]["ms_sparse"], first["skip-attention"]["ms_sparse"]
    for method in ("dense", "random"):  # the new rows relate to the kept baselines
        row = second[method]
        assert row["ms_dense"] == baseline
        assert row["speedup"] == pytest.approx(baseline / row["ms_sparse"])
        assert row["attention_share"] == pytest.approx(max(0.0, 1 - skipped / baseline))
    assert 0 < second["random"]["density"] < 1

    # Without --resume every row is run again.
    assert transformer_step.main(SMOKE + ["--methods", "random", "--out", str(tmp_path)]) == 0
    third = _rows(tmp_path)
    assert sorted(third) == sorted(second)
    assert third["random"]["ms_dense"] == third["diffusers"]["ms_sparse"]


def test_resume_runs_a_row_again_when_its_options_changed(tmp_path):
    assert transformer_step.main(SMOKE + ["--methods", "random", "--out", str(tmp_path)]) == 0
    before = _rows(tmp_path)["random"]
    options = json.dumps({"random": {"density": 0.9, "block_size": 16}})
    assert transformer_step.main(SMOKE + ["--methods", "random", "--resume", "--method-options", options,
                                          "--out", str(tmp_path)]) == 0
    after = _rows(tmp_path)["random"]
    assert after["options"] == {"density": 0.9, "block_size": 16}
    assert after["density"] != before["density"]


def test_regional_mode_compiles_the_repeated_blocks_of_every_row(tmp_path, monkeypatch):
    compiled_blocks = []
    from diffusers import WanTransformer3DModel

    original = WanTransformer3DModel.compile_repeated_blocks

    def counting(self, *args, **kwargs):
        compiled_blocks.append(kwargs)
        return original(self, *args, backend="eager", **kwargs)  # the traced graph run as is: quick on CPU

    monkeypatch.setattr(WanTransformer3DModel, "compile_repeated_blocks", counting)
    smoke = [a if a != "eager" else "regional" for a in SMOKE]
    assert transformer_step.main(smoke + ["--methods", "random", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("transformer_step-*.json")
    result = json.loads(path.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert sorted(rows) == ["dense", "diffusers", "random", "skip-attention"]
    assert {row["mode"] for row in rows.values()} == {"regional"}
    assert compiled_blocks == [{"fullgraph": True}] * 4  # once per row, whole blocks without a graph break
    assert 0 < rows["random"]["density"] < 1 and rows["random"]["ms_dense"] == rows["diffusers"]["ms_sparse"]
    assert not result["notes"]


def test_regional_mode_compiles_each_block_where_the_class_names_no_repeated_blocks():
    # CogVideoX's class sets no `_repeated_blocks` (compile_repeated_blocks would raise): its blocks are compiled one
    # by one instead, and every compiled block is undone when the row ends.
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=8,
    )
    assert not model._repeated_blocks
    with transformer_step.compiled(model, "regional") as runner:
        assert runner is model
        compiled = [name for name, module in model.named_modules() if module._compiled_call_impl is not None]
    assert compiled == ["transformer_blocks.0", "transformer_blocks.1"]
    assert all(module._compiled_call_impl is None for module in model.modules())


def _row(mode, method, ms, model_key="wan14"):
    return dict(model="Wan2.1-14B 720p 81f", model_key=model_key, mode=mode, method=method, ms_sparse=ms,
                density=0.1 if method == "neighborhood" else 1.0)


def test_findings_judge_a_target_only_against_the_eager_diffusers_step_of_the_same_file():
    regional = [_row("regional", "diffusers", 20000.0), _row("regional", "neighborhood", 9000.0)]
    transformer_step.relate_to_eager_diffusers(regional)
    (wan14,) = [line for line in transformer_step.findings(regional) if line.startswith("Wan2.1-14B 720p >= 2x")]
    # No eager diffusers row: not judged (a regional speedup against compiled diffusers is another ratio), not MISSED.
    assert "not measured in this file" in wan14 and "regional rows" in wan14 and "MISSED" not in wan14

    rows = [_row("eager", "diffusers", 24000.0), _row("eager", "neighborhood", 13000.0)] + regional
    transformer_step.relate_to_eager_diffusers(rows)
    (wan14,) = [line for line in transformer_step.findings(rows) if line.startswith("Wan2.1-14B 720p >= 2x")]
    assert wan14.startswith("Wan2.1-14B 720p >= 2x: met, best 2.67x (neighborhood, regional")  # 24000 / 9000

    slow = [_row("eager", "diffusers", 24000.0), _row("eager", "neighborhood", 13000.0)]
    transformer_step.relate_to_eager_diffusers(slow)
    (wan14,) = [line for line in transformer_step.findings(slow) if line.startswith("Wan2.1-14B 720p >= 2x")]
    assert wan14.startswith("Wan2.1-14B 720p >= 2x: MISSED, best 1.85x (neighborhood, eager")


# The token grid each real-size model's step runs at, from its pipeline's rule at the labelled size: latent frames
# (F - 1) // 4 + 1, latent pixels px // 8 (HunyuanVideo-1.5: // 16), then the transformer's patch (2 x 2 but for
# HunyuanVideo-1.5; CogVideoX 1.5 pads 21 latent frames to 22 and pairs them; FLUX.2 and Qwen-Image pack 2 x 2).
REAL_GRIDS = {
    "wan13": (21, 480 // 16, 832 // 16),
    "wan14": (21, 720 // 16, 1280 // 16),
    "hunyuan": (33, 720 // 16, 1280 // 16),
    "cogvideox15": (22 // 2, 768 // 16, 1360 // 16),
    "cogvideox5b": (13, 480 // 16, 720 // 16),
    "flux": (1, 2048 // 16, 2048 // 16),
    "hunyuan15": (31, 480 // 16, 848 // 16),
    "qwen_image": (1, 1328 // 16, 1328 // 16),
    "flux2": (1, 2048 // 16, 2048 // 16),
    "mochi": ((163 - 1) // 6 + 1, 480 // 16, 848 // 16),  # Mochi's VAE: 6x in time
}


@pytest.mark.parametrize("name", sorted(transformer_step.MODELS))
def test_each_real_size_spec_builds_and_its_calls_make_the_labelled_token_grid(name):
    import torch

    from dit_sparse.pipelines.adapters import find_adapter

    spec = transformer_step.MODELS[name]
    model = transformer_step.build(spec, torch.device("meta"), torch.bfloat16)  # the real config, no memory
    adapter = find_adapter(model)
    calls = spec.calls(torch.device("cpu"), torch.bfloat16)
    assert adapter is not None and calls
    for kwargs in calls:
        layout = adapter.layout(model, (), kwargs)
        assert (layout.frames, layout.height, layout.width) == REAL_GRIDS[name]


def test_the_smoke_models_of_the_newer_families_run_every_row(tmp_path):
    # HunyuanVideo-1.5 (its byT5 tokens all padding, as a prompt without glyph text gives), Qwen-Image (no mask, two
    # text lengths), FLUX.2 ((B, N, 4) ids), Mochi (the negative prompt's text all padding): each row of each method
    # the family takes is timed, none fails.
    models = ["smoke-hunyuan15", "smoke-qwen-image", "smoke-flux2", "smoke-mochi"]
    argv = ["--smoke", "--models", *models, "--modes", "eager", "--warmup", "0", "--repeats", "1",
            "--methods", "radial", "random", "draft", "--out", str(tmp_path)]
    assert transformer_step.main(argv) == 0
    (path,) = tmp_path.glob("transformer_step-*.json")
    result = json.loads(path.read_text())
    rows = {(row["model"], row["method"]) for row in result["rows"]}
    labels = [transformer_step.SMOKE_MODELS[m].label for m in models]
    expected = {(label, method) for label in labels for method in ("diffusers", "skip-attention", "dense", "random",
                                                                    "draft")}
    assert rows == expected | {("smoke HunyuanVideo-1.5", "radial"), ("smoke Mochi", "radial")}  # not on images
    assert sorted(note.split(":")[0] for note in result["notes"]) == ["smoke FLUX.2", "smoke Qwen-Image"]
    assert all("radial skipped" in note for note in result["notes"])
