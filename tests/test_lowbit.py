"""precision="fp8" / "int8" on CPU: the reference's emulation against fp32 attention, the Triton pre-pass and kernel
under TRITON_INTERPRET=1 against the emulation, the dispatch rules and errors, and a sparsified tiny pipeline."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dit_sparse
from dit_sparse import kernels
from dit_sparse.attention import sparse_attention
from dit_sparse.blockmask import BlockMask
from dit_sparse.config import MethodConfig
from dit_sparse.kernels import reference, triton_backend
from dit_sparse.layout import VideoLayout

ROOT = Path(__file__).resolve().parents[1]
#: the accuracy bounds of issue 30 against unquantized attention with the same mask.
MIN_COSINE, MAX_REL_L2 = 0.999, 0.03


def _realistic_qkv(batch, seq, heads, dim, generator, scores_std=1.5):
    """q, k, v (B, S, H, D) fp32 as a DiT's look: K with a large per-channel offset (what smoothing removes), V with
    a per-channel offset, scores of std `scores_std` (attention neither uniform nor one-hot)."""
    q = torch.randn(batch, seq, heads, dim, generator=generator) * scores_std ** 0.5
    k = torch.randn(batch, seq, heads, dim, generator=generator) * scores_std ** 0.5
    k = k + 4.0 * torch.randn(1, 1, heads, dim, generator=generator)
    v = torch.randn(batch, seq, heads, dim, generator=generator) + torch.randn(1, 1, heads, dim, generator=generator)
    return q, k, v


def _cosine_rel_l2(out, expected):
    a, b = out.double().flatten(), expected.double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0)), float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision, pv", [("int8", "fp8"), ("fp8", "fp8"), ("fp8", "bf16")])
def test_emulation_stays_within_the_accuracy_bounds(precision, pv, monkeypatch):
    monkeypatch.setenv("DIT_SPARSE_FP8_PV", pv)
    g = torch.Generator().manual_seed(0)
    for dim, (qb, kb), permute in ((64, (64, 64), True), (128, (128, 64), False)):
        q, k, v = _realistic_qkv(1, 700, 2, dim, g)
        blocks = torch.rand(2, math.ceil(700 / qb), math.ceil(700 / kb), generator=g) < 0.5
        blocks[:, :, 0] = True
        mask = BlockMask.from_block_dense(blocks, 700, qb, kb,
                                          permutation=torch.randperm(700, generator=g) if permute else None)
        extra_k = torch.randn(1, 40, 2, dim, generator=g) + k.mean(1, keepdim=True)
        extra_v = torch.randn(1, 40, 2, dim, generator=g)
        valid = torch.rand(1, 40, generator=g) < 0.7
        args = (q, k, v, mask, dim ** -0.5, extra_k, extra_v, valid, None)
        expected, expected_lse = reference._attention(*args)
        out, lse = reference._attention(*args, precision=precision)
        cosine, rel_l2 = _cosine_rel_l2(out, expected)
        assert cosine >= MIN_COSINE and rel_l2 <= MAX_REL_L2, (precision, pv, dim, cosine, rel_l2)
        # the log-sum-exp of the unsmoothed scores (K's mean added back), as bf16 gives it
        assert float((lse - expected_lse).abs().max()) <= 0.05
        assert not torch.equal(out, expected)  # it did quantize


def test_emulation_quantizes_per_block_after_smoothing_k():
    """Against a direct computation: K minus its token mean, one int8 scale per key block of the blocked order."""
    g = torch.Generator().manual_seed(1)
    q, k, v = _realistic_qkv(1, 96, 1, 64, g)
    perm = torch.randperm(96, generator=g)
    mask = BlockMask.from_block_dense(torch.ones(3, 3, dtype=torch.bool), 96, 32, permutation=perm)
    _, k_deq, _, _, _, _, _, _ = reference.quantize_emulated(q, k, v, mask, "int8", "fp8", "int8")
    smoothed = (k - k.mean(1, keepdim=True))[0, :, 0]  # (S, D)
    for block in range(3):
        tokens = perm[block * 32:(block + 1) * 32]
        step = smoothed[tokens].abs().max() / 127
        levels = smoothed[tokens] / step
        expected = torch.sign(levels) * torch.floor(levels.abs() + 0.5) * step
        torch.testing.assert_close(k_deq[0, tokens, 0], expected, rtol=0, atol=1e-6)


def test_smoothing_k_leaves_unquantized_attention_unchanged():
    """Why smoothing is free: shifting every key by one vector shifts each row's scores by a constant."""
    g = torch.Generator().manual_seed(2)
    q, k, v = _realistic_qkv(1, 128, 2, 64, g)
    mask = BlockMask.full(128, 32)
    out, _ = reference.block_sparse_attention(q, k, v, mask, 0.125)
    shifted, _ = reference.block_sparse_attention(q, k - k.mean(1, keepdim=True), v, mask, 0.125)
    torch.testing.assert_close(shifted, out, rtol=1e-5, atol=1e-5)


# ---- the Triton pre-pass and kernel under the interpreter ------------------------------------------------------

_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import json, math, os, torch
    from dit_sparse.attention import sparse_attention
    from dit_sparse.blockmask import BlockMask
    from dit_sparse.kernels import reference, triton_block_sparse as tbs, triton_quantize as tq
    from dit_sparse.layout import VideoLayout

    def qkv(b, s, h, d, g):
        q = torch.randn(b, s, h, d, generator=g)
        k = torch.randn(b, s, h, d, generator=g) + 3 * torch.randn(1, 1, h, d, generator=g)
        v = torch.randn(b, s, h, d, generator=g) + torch.randn(1, 1, h, d, generator=g)
        return q, k, v

    def stats(a, b):
        a, b = a.double().flatten(), b.double().flatten()
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0)), float((a - b).norm() / b.norm())

    results = []
    variants = [("int8", "fp8", "int8"), ("fp8", "fp8", "int8"), ("fp8", "bf16", "int8"), ("fp8", "fp8", "e4m3")]
    for precision, pv, qk in variants:
        os.environ["DIT_SPARSE_FP8_PV"], os.environ["DIT_SPARSE_FP8_QK"] = pv, qk
        name = f"{precision}/pv={pv}/qk={qk}"
        # the pre-pass alone: its dequantized q, k, v against the emulation's (one permutation, a ragged tail)
        g = torch.Generator().manual_seed(0)
        q, k, v = qkv(1, 80, 2, 64, g)
        perm = torch.randperm(80, generator=g)
        mask = BlockMask.from_block_dense(torch.ones(3, 3, dtype=torch.bool), 80, 32, permutation=perm)
        got = tq.quantize(q, k, v, perm.int(), 32, 32, precision, pv, "int8" if precision == "int8" else qk)
        eq, ek, ev, _, _, v_mean, _, _ = reference.quantize_emulated(q, k, v, mask, precision, pv,
                                                                  "int8" if precision == "int8" else qk)
        def dequant(x, scale):  # x (B, S, H, D) blocked order, scale (B, H, n): in the original order
            n = scale.shape[-1]
            pad = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, n * 32 - 80)).view(1, n, 32, 2, 64)
            return (pad * scale.transpose(1, 2)[:, :, None, :, None]).view(1, n * 32, 2, 64)[:, :80][:, torch.argsort(perm)]
        vs = got["v_scale"]  # (B, H, 2, D)
        v_deq = got["v"].float()[:, torch.argsort(perm)] * vs[:, None, :, 0]
        results.append(dict(case=name + " prepass", q=float((dequant(got["q"], got["q_scale"]) - eq).abs().max()),
                            k=float((dequant(got["k"], got["k_scale"]) - ek).abs().max()),
                            v=float((v_deq - ev).abs().max())))
        # the attention kernel against the emulation: permutation, extra keys with padding, empty rows, per-head
        cases = [(1, 150, 2, 64, 32, 32, (1, 2), True, 20), (2, 96, 2, 128, 64, 32, (2, 2), False, 0),
                 (1, 130, 1, 64, 32, 64, (1, 1), False, 140)]
        for i, (b, s, h, d, qb, kb, shape, permute, text) in enumerate(cases):
            g = torch.Generator().manual_seed(10 + i)
            q, k, v = qkv(b, s, h, d, g)
            blocks = torch.rand(*shape, math.ceil(s / qb), math.ceil(s / kb), generator=g) < 0.5
            blocks[..., 0, :] = False  # a query block with nothing kept
            mask = BlockMask.from_block_dense(blocks, s, qb, kb,
                                              permutation=torch.randperm(s, generator=g) if permute else None)
            kx = vx = valid = None
            if text:
                kx, vx = (torch.randn(b, text, h, d, generator=g) for _ in range(2))
                valid = torch.rand(b, text, generator=g) < 0.6
            out, lse = tbs.block_sparse_attention(q, k, v, mask, d ** -0.5, extra_k=kx, extra_v=vx,
                                                  extra_key_valid=valid, precision=precision)
            emu, emu_lse = reference._attention(q, k, v, mask, d ** -0.5, kx, vx, valid, None, precision=precision)
            same_inf = bool(torch.equal(torch.isinf(lse), torch.isinf(emu_lse)))
            finite = torch.isfinite(emu_lse)
            cosine, rel = stats(out, emu)
            results.append(dict(case=f"{name} kernel {i}", cosine=cosine, rel_l2=rel, same_empty=same_inf,
                                lse=float((lse - emu_lse)[finite].abs().max()),
                                empty_zero=bool((out.transpose(1, 2)[torch.isinf(lse)] == 0).all())))
        # the public API: joint text prefix / suffix with padding, triton against the reference's emulation
        for position in ("prefix", "suffix"):
            layout = VideoLayout(2, 4, 12, text_len=10, text_position=position)
            g = torch.Generator().manual_seed(3)
            q, k, v = qkv(1, layout.seq_len, 2, 64, g)
            padding = torch.rand(1, 10, generator=g) < 0.6
            padding[:, 0] = True
            mask = BlockMask.from_block_dense(torch.rand(2, 3, 3, generator=g) < 0.6, layout.video_len, 32)
            out = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend="triton",
                                   precision=precision)
            ref = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend="reference",
                                   precision=precision)
            cosine, rel = stats(out, ref)
            results.append(dict(case=f"{name} api {position}", cosine=cosine, rel_l2=rel))
    # in-block masking (token boxes with a lattice step, a permutation, the ragged tail) in int8 and fp8
    from dit_sparse.blockmask import TokenBoxes
    os.environ["DIT_SPARSE_FP8_PV"], os.environ["DIT_SPARSE_FP8_QK"] = "fp8", "int8"
    g = torch.Generator().manual_seed(40)
    s, axes = 90, 2
    lo = torch.randint(-1, 4, (s, axes), generator=g).int()
    boxes = TokenBoxes(lo, lo + torch.randint(1, 6, (s, axes), generator=g).int(),
                       torch.randint(0, 6, (s, axes), generator=g).int(), (2, 1))
    d = torch.rand(1, 2, 3, 3, generator=g) < 0.7
    d[..., 0] = True
    mask = BlockMask.from_block_dense(d, s, 32, 32, permutation=torch.randperm(s, generator=g),
                                      block_partial=torch.rand(d.shape, generator=g) < 0.5, token_boxes=boxes)
    q, k, v = qkv(1, s, 2, 64, g)
    for precision in ("int8", "fp8"):
        out, lse = tbs.block_sparse_attention(q, k, v, mask, 0.125, precision=precision)
        emu, emu_lse = reference._attention(q, k, v, mask, 0.125, None, None, None, None, precision=precision)
        cosine, rel = stats(out, emu)
        results.append(dict(case=f"{precision} boxes", cosine=cosine, rel_l2=rel))
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DIT_SPARSE_BACKEND": ""}
    done = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def test_interpreted_prepass_matches_the_emulation_exactly(interpreted):
    rows = [row for row in interpreted if row["case"].endswith("prepass")]
    assert len(rows) == 4
    for row in rows:  # the same scales and rounding: equal to fp32 rounding of the dequantization
        assert max(row["q"], row["k"], row["v"]) <= 1e-5, row


def test_interpreted_kernel_matches_the_emulation(interpreted):
    rows = [row for row in interpreted if " kernel " in row["case"] or " api " in row["case"]
            or row["case"].endswith("boxes")]
    assert len(rows) == 22
    for row in rows:
        # P is rounded at the running max in the kernel and at the final max in the emulation: close, not equal
        assert row["cosine"] >= 0.9999 and row["rel_l2"] <= 1e-2, row
        if "lse" in row:
            assert row["same_empty"] and row["empty_zero"] and row["lse"] <= 1e-4, row


# ---- dispatch --------------------------------------------------------------------------------------------------


def test_unknown_precision_is_refused_everywhere():
    q = torch.zeros(1, 64, 1, 64)
    mask = BlockMask.full(64, 32)
    for call in (lambda: kernels.block_sparse_attention(q, q, q, mask, precision="fp4"),
                 lambda: kernels.dense_attention(q, q, q, precision="fp4"),
                 lambda: sparse_attention(q, q, q, mask, precision="fp4")):
        with pytest.raises(ValueError, match=r"precision must be one of \('bf16', 'fp8', 'int8'\), got 'fp4'"):
            call()
    with pytest.raises(ValueError, match=r"MethodConfig.precision must be one of .*'fp4'"):
        MethodConfig(precision="fp4")
    assert MethodConfig().precision == "bf16"
    assert dict(MethodConfig.__dataclass_fields__["precision"].metadata)["choices"] == ("bf16", "fp8", "int8")


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_low_precision_on_cpu_needs_the_emulation_asked_for(precision, monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 64, 1, 64)
    mask = BlockMask.full(64, 32)
    with pytest.raises(ValueError, match=rf"precision '{precision}' cannot run on cpu with backend='auto' "
                                         r"\(it takes precision \('bf16',\) there\).*backend='reference'"):
        kernels.block_sparse_attention(q, q, q, mask, precision=precision)
    with pytest.raises(ValueError, match="backend='reference'"):
        sparse_attention(q, q, q, mask, precision=precision)
    out, _ = kernels.block_sparse_attention(q, q, q, mask, backend="reference", precision=precision)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert kernels.resolve_backend("auto", q, mask) == "reference"  # bf16: auto as before
    with pytest.raises(ValueError, match="backend 'fa4' cannot run here"):
        kernels.block_sparse_attention(q, q, q, mask, backend="fa4", precision=precision)


def test_triton_low_precision_head_dims_are_checked_at_the_edge(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 64, 1, 32)
    mask = BlockMask.full(64, 32)
    with pytest.raises(ValueError, match=r"precision 'fp8' takes head_dim \(64, 128\), got head_dim=32"):
        kernels.block_sparse_attention(q, q, q, mask, backend="triton", precision="fp8")
    with pytest.raises(ValueError, match="head_dim=32"):
        sparse_attention(q, q, q, mask, backend="triton", precision="int8")


def test_fp8_needs_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    cuda = torch.device("cuda", 0)
    reason = triton_backend.BACKEND.precision_reason("fp8", cuda, 128)
    assert reason == ("precision 'fp8' needs FP8 tensor cores (compute capability >= 8.9); cuda:0 (NVIDIA A100) is "
                      "8.0")
    assert triton_backend.BACKEND.precision_reason("int8", cuda, 128) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "INT8 tensor cores (compute capability >= 8.0)" in triton_backend.BACKEND.precision_reason("int8", cuda, 64)


def test_describe_backends_lists_the_precisions():
    table = kernels.describe_backends()
    assert "| precisions |" in table.splitlines()[0]
    assert "bf16; fp8/int8 (emulated, when named)" in table  # reference
    assert "| bf16; fp8/int8 |" in table  # triton
    assert kernels.REGISTRY["fa4"].precisions == ("bf16",)


# ---- through a pipeline ----------------------------------------------------------------------------------------


def test_sparsify_refuses_a_low_precision_auto_cannot_run_before_changing_anything(monkeypatch):
    from dit_sparse.hooks import hooked_modules
    from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pipe = build_tiny_wan_pipeline(seed=0)
    with pytest.raises(ValueError, match=r"precision 'fp8' cannot run on cpu with backend='auto' \(it takes precision "
                                         r"\('bf16',\) there; the emulation is asked for by name: "
                                         r"backend='reference'\)"):
        dit_sparse.sparsify(pipe, "radial", block_size=16, precision="fp8")
    assert hooked_modules(pipe.transformer) == []
    kernels.check_precision("int8", "reference", "cpu")  # the emulation, named: fine
    with pytest.raises(ValueError, match="backend 'fa4' cannot run precision 'int8' on cpu"):
        kernels.check_precision("int8", "fa4", "cpu")



def test_sparsify_runs_a_tiny_pipeline_in_fp8_with_the_emulation():
    from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(seed=0)
    call = dict(prompt="a red fish", num_frames=9, height=64, width=64, num_inference_steps=2, output_type="latent")
    results = {}
    for precision in ("bf16", "fp8"):
        dit_sparse.sparsify(pipe, "radial", block_size=16, precision=precision, backend="reference")
        try:
            results[precision] = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
        finally:
            dit_sparse.unsparsify(pipe)
    assert torch.isfinite(results["fp8"]).all()
    assert not torch.equal(results["fp8"], results["bf16"])
    cosine, _ = _cosine_rel_l2(results["fp8"], results["bf16"])
    assert cosine >= 0.99
