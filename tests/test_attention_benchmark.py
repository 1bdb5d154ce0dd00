"""benchmarks/attention.py's --precision machinery on CPU: its smoke run writes the speed and accuracy tables, and
the tiny model's captured q, k, v are the ones its self-attention sees (issue 30's accuracy on captured inputs)."""

import json

import pytest
import torch

from benchmarks import attention as bench
from dit_sparse.attention import sparse_attention
from dit_sparse.pipelines import tiny

needs_tiny = pytest.mark.skipif(not tiny.available(), reason="the tiny trained model is not in this checkout")


@needs_tiny
def test_tiny_captures_are_the_self_attention_inputs_of_the_asked_calls():
    calls = ((0, 0), (5, 1))
    captures, why = bench.tiny_captures(torch.device("cpu"), calls=calls, steps=2, size=(9, 64, 64))
    assert why is None
    assert [name for name, _, _ in captures] == ["tiny layer 0 step 0", "tiny layer 5 step 1"]
    for _, layout, (q, k, v) in captures:
        # 9 frames -> 3 latent frames of 4 x 4 tokens; the tiny model's 3 heads of 64
        assert (layout.frames, layout.height, layout.width) == (3, 4, 4)
        assert q.shape == k.shape == v.shape == (1, layout.seq_len, 3, 64)
        assert q.dtype == torch.bfloat16
    (_, _, first), (_, _, last) = captures
    assert not torch.equal(first[0], last[0])  # another layer at another step


@needs_tiny
def test_captured_accuracy_rows_compare_the_emulation_with_the_reference(monkeypatch):
    captures, _ = bench.tiny_captures(torch.device("cpu"), calls=((2, 1),), steps=2, size=(9, 64, 64))
    monkeypatch.setattr(bench, "tiny_captures", lambda device: (captures, None))
    rows, notes = [], []
    variants = [("reference bf16", "bf16", None, None, "reference"), ("reference fp8", "fp8", "fp8", "int8", "reference")]
    bench.run_captured_accuracy(variants, rows, notes)
    assert notes == []
    assert [(r["mask"], r["variant"]) for r in rows] == [("random 0.25", "reference fp8"), ("radial", "reference fp8")]
    _, layout, (q, k, v) = captures[0]
    monkeypatch.setenv("DIT_SPARSE_FP8_PV", "fp8")  # the variant's operands, for the independent recomputation
    monkeypatch.setenv("DIT_SPARSE_FP8_QK", "int8")
    for row in rows:
        mask = (bench.load_pattern("random_blocks")(layout, density=0.25, block_size=64) if row["mask"] != "radial"
                else bench.load_pattern("radial")(layout, block_size=64, decay_factor=1.0))
        plain = sparse_attention(q, k, v, mask, layout, backend="reference").float()
        low = sparse_attention(q, k, v, mask, layout, backend="reference", precision="fp8").float()
        cosine = torch.nn.functional.cosine_similarity(plain.flatten(), low.flatten(), dim=0).item()
        assert row["cosine"] == pytest.approx(cosine, abs=1e-6)
        assert row["rel_l2"] == pytest.approx(((plain - low).norm() / plain.norm()).item(), rel=1e-4)
        assert row["within_bounds"] == (row["cosine"] >= 0.999 and row["rel_l2"] <= 0.03)


def test_precision_smoke_run_writes_both_tables(tmp_path):
    assert bench.main(["--precision", "--smoke", "--out", str(tmp_path)]) == 0
    speed = json.loads(next(tmp_path.glob("attention-precision-cpu-*.json")).read_text())
    accuracy = json.loads(next(tmp_path.glob("lowbit-accuracy-cpu-*.json")).read_text())
    assert {r["variant"] for r in speed["rows"]} == {"reference bf16", "reference fp8"}
    assert accuracy["accuracy"] and all(0.99 < r["cosine"] <= 1.0 + 1e-6 for r in accuracy["accuracy"])
    assert next(tmp_path.glob("lowbit-accuracy-cpu-*.md")).read_text().startswith("# Low-precision accuracy")


def test_tiny_shape_is_refused_outside_precision_mode(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--shapes", "tiny"])
    assert "--shapes tiny" in capsys.readouterr().err
