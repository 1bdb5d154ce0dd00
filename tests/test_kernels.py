"""Kernel backends on CPU: the reference against dense SDPA, our Triton kernel under TRITON_INTERPRET=1 against the
reference, the BlockMask -> FA4 conversion against a dense expansion, and the dispatch's fallbacks and errors."""

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dit_sparse import kernels
from dit_sparse.blockmask import BlockMask, TokenBoxes
from dit_sparse.kernels import fa4, reference

ROOT = Path(__file__).resolve().parents[1]


def _qkv(batch, seq_len, heads, head_dim, generator, dtype=torch.float32):
    return [torch.randn(batch, seq_len, heads, head_dim, generator=generator).to(dtype) for _ in range(3)]


def _mask(seq_len, q_block, kv_block, shape, generator, density=0.4, empty_rows=False, permute=False):
    n_q, n_k = math.ceil(seq_len / q_block), math.ceil(seq_len / kv_block)
    block_dense = torch.rand(*shape, n_q, n_k, generator=generator) < density
    if empty_rows:
        block_dense[..., 0, :] = False
    perm = torch.randperm(seq_len, generator=generator) if permute else None
    return BlockMask.from_block_dense(block_dense, seq_len, q_block, kv_block, permutation=perm)


def _sdpa_with_lse(q, k, v, allowed, scale):
    """fp64 dense attention with a bool mask (Bm, Hm, S, S): (out (B, S, H, D), lse (B, H, S)), empty rows 0/-inf."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.double()), lse


# ---- the reference against dense attention ----------------------------------------------------------------------


@pytest.fixture(params=["fused", "explicit"])
def reference_path(request, monkeypatch):
    """Each reference test runs both ways a chunk's softmax is computed on a CPU: torch's fused CPU kernel (fp32's
    default) and the explicit scores (every other device and dtype); the first one counts its calls."""
    if request.param == "explicit":
        monkeypatch.setattr(reference, "CPU_FLASH", None)
        return None
    if reference.CPU_FLASH is None:
        pytest.skip("this torch has no fused CPU attention with an attn_mask")
    calls = []
    fused = reference.CPU_FLASH
    monkeypatch.setattr(reference, "CPU_FLASH", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    return calls


@pytest.mark.parametrize(
    "batch, seq_len, heads, head_dim, q_block, kv_block, mask_shape, permute",
    [
        (1, 100, 2, 16, 16, 16, (1, 1), False),  # ragged tail
        (2, 96, 3, 32, 32, 16, (2, 3), False),  # per-batch, per-head masks, different block sizes
        (1, 130, 2, 8, 64, 32, (1, 2), True),  # permutation, odd head_dim
        (2, 50, 1, 16, 16, 64, (1, 1), True),
    ],
)
def test_reference_kernel_matches_dense_attention_and_its_lse(
    batch, seq_len, heads, head_dim, q_block, kv_block, mask_shape, permute, reference_path
):
    g = torch.Generator().manual_seed(seq_len)
    q, k, v = _qkv(batch, seq_len, heads, head_dim, g)
    mask = _mask(seq_len, q_block, kv_block, mask_shape, g, empty_rows=True, permute=permute)
    out, lse = reference.block_sparse_attention(q, k, v, mask, 0.37)
    expected_out, expected_lse = _sdpa_with_lse(q, k, v, mask.to_dense(), 0.37)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    torch.testing.assert_close(lse.double().nan_to_num(0, 0, 0), expected_lse.nan_to_num(0, 0, 0), atol=1e-5, rtol=0)
    assert reference_path is None or reference_path  # fp32 on a CPU: the fused kernel ran


@pytest.mark.parametrize(
    "seq_len, q_block, kv_block, axes, mask_shape, permute",
    [(100, 16, 16, 3, (1, 1), False), (90, 32, 16, 2, (2, 2), True), (130, 16, 32, 1, (1, 2), True)],
)
def test_reference_honours_token_boxes_inside_partial_blocks(seq_len, q_block, kv_block, axes, mask_shape, permute,
                                                             reference_path):
    g = torch.Generator().manual_seed(seq_len)
    lo = torch.randint(-1, 4, (seq_len, axes), generator=g).int()
    boxes = TokenBoxes(lo, lo + torch.randint(0, 5, (seq_len, axes), generator=g).int(),
                       torch.randint(0, 6, (seq_len, axes), generator=g).int(), (2,) + (1,) * (axes - 1))
    block_dense = torch.rand(*mask_shape, math.ceil(seq_len / q_block), math.ceil(seq_len / kv_block),
                             generator=g) < 0.6
    partial = torch.rand(block_dense.shape, generator=g) < 0.5
    perm = torch.randperm(seq_len, generator=g) if permute else None
    mask = BlockMask.from_block_dense(block_dense, seq_len, q_block, kv_block, permutation=perm,
                                      block_partial=partial, token_boxes=boxes)
    # to_dense: a whole kept block keeps every pair, a partial one the pairs its boxes allow (blocked order)
    blocked = mask.to_dense()
    if permute:
        blocked = blocked[..., perm, :][..., perm]
    rows, cols = torch.arange(seq_len) // q_block, torch.arange(seq_len) // kv_block
    expected = block_dense[..., rows, :][..., cols] & (~partial[..., rows, :][..., cols] | boxes.allows())
    assert torch.equal(blocked, expected)
    q, k, v = _qkv(mask_shape[0], seq_len, 2, 16, g)
    out, lse = reference.block_sparse_attention(q, k, v, mask, 0.37)
    expected_out, expected_lse = _sdpa_with_lse(q, k, v, mask.to_dense(), 0.37)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    # the work (density) counts partial blocks whole; the allowed pairs are fewer
    assert float(mask.to_dense().double().mean()) < mask.density


def test_reference_text_passes_are_chunked_and_exact(monkeypatch, reference_path):
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv(2, 70, 2, 16, g)
    key_valid = torch.rand(2, 70, generator=g) < 0.7
    expected_out, expected_lse = _sdpa_with_lse(q, k, v, key_valid[:, None, None, :], 0.25)
    monkeypatch.setattr(reference, "_chunk_rows", lambda q, keys, budget=0: 9)  # 8 chunks, a short last one
    out, lse = reference.dense_attention(q, k, v, key_valid, 0.25)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=0)
    # extend_attention: first keys 0..39, then keys 40..69, equals attention over all of them
    first_out, first_lse = reference.dense_attention(q, k[:, :40], v[:, :40], key_valid[:, :40], 0.25)
    out, lse = reference.extend_attention(first_out, first_lse, q, k[:, 40:], v[:, 40:], key_valid[:, 40:], 0.25)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=0)
    assert reference_path is None or reference_path


# ---- our Triton kernel under the interpreter ---------------------------------------------------------------------

_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import json, math, sys, torch
    sys.path.insert(0, {benchmarks!r})
    from attention import ensure_importable
    ensure_importable()
    from dit_sparse.blockmask import BlockMask
    from dit_sparse.kernels import reference, triton_block_sparse as tbs
    from dit_sparse.attention import sparse_attention
    from dit_sparse.layout import VideoLayout

    def mask_of(seq_len, qb, kb, shape, g, empty, permute):
        d = torch.rand(*shape, math.ceil(seq_len / qb), math.ceil(seq_len / kb), generator=g) < 0.4
        if empty:
            d[..., 0, :] = False
        perm = torch.randperm(seq_len, generator=g) if permute else None
        return BlockMask.from_block_dense(d, seq_len, qb, kb, permutation=perm)

    def err(a, b):
        return float((a.float() - b.float()).abs().max())

    def lse_err(a, b):
        same_inf = bool(torch.equal(torch.isinf(a), torch.isinf(b)))
        return float((a - b).nan_to_num(0, 0, 0).abs().max()) if same_inf else float("inf")

    results = []
    cases = [
        # batch, seq, heads, D, q_block, kv_block, mask shape, dtype, empty rows, permute, text
        (1, 100, 2, 16, 16, 16, (1, 1), torch.float32, True, False, 0),
        (2, 90, 2, 32, 32, 16, (2, 2), torch.float32, False, True, 12),
        (1, 130, 2, 16, 32, 32, (1, 2), torch.float16, True, False, 20),
        (2, 64, 1, 16, 16, 32, (1, 1), torch.float32, False, False, 0),
        (1, 300, 1, 16, 64, 64, (1, 1), torch.float32, True, True, 7),
    ]
    for i, (b, s, h, d, qb, kb, shape, dtype, empty, permute, text) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(b, s, h, d, generator=g).to(dtype) for _ in range(3))
        mask = mask_of(s, qb, kb, shape, g, empty, permute)
        out, lse = tbs.block_sparse_attention(q, k, v, mask, 0.3)
        ref_out, ref_lse = reference.block_sparse_attention(q, k, v, mask, 0.3)
        row = dict(case=i, dtype=str(dtype), out=err(out, ref_out), lse=lse_err(lse, ref_lse))
        if text:
            kx, vx = (torch.randn(b, text, h, d, generator=g).to(dtype) for _ in range(2))
            valid = torch.rand(b, text, generator=g) < 0.6
            out, lse = tbs.block_sparse_attention(q, k, v, mask, 0.3, extra_k=kx, extra_v=vx, extra_key_valid=valid)
            ref_out, ref_lse = reference.extend_attention(ref_out, ref_lse, q, kx, vx, valid, 0.3)
            row.update(extra_out=err(out, ref_out), extra_lse=lse_err(lse, ref_lse))
            # FA4's path: continue a pass given in the blocked order, inverse permutation fused
            first_out, first_lse = reference.block_sparse_attention(q, k, v, mask, 0.3)
            if permute:
                first_out, first_lse = first_out[:, mask.permutation], first_lse[:, :, mask.permutation]
            perm = mask.permutation.int() if permute else None
            out, lse = tbs.extend_attention(first_out, first_lse, q, kx, vx, valid, 0.3, permutation=perm)
            row.update(extend_out=err(out, ref_out), extend_lse=lse_err(lse, ref_lse))
        results.append(row)

    # text queries over all keys, split-K (3 splits) against the reference
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 600, 2, 16, generator=g) for _ in range(3))
    valid = torch.rand(2, 600, generator=g) < 0.8
    out, lse = tbs.dense_attention(q[:, :20], k, v, valid, 0.3, splits=3)
    ref_out, ref_lse = reference.dense_attention(q[:, :20], k, v, valid, 0.3)
    results.append(dict(case="dense split", out=err(out, ref_out), lse=lse_err(lse, ref_lse)))

    # the public API with joint text and padding, triton against reference
    for position in ("prefix", "suffix"):
        layout = VideoLayout(2, 4, 12, text_len=10, text_position=position)
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, layout.seq_len, 2, 16, generator=g) for _ in range(3))
        padding = torch.rand(2, 10, generator=g) < 0.6
        mask = mask_of(layout.video_len, 16, 16, (1, 2), g, True, False)
        out = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend="triton")
        ref = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend="reference")
        results.append(dict(case="api " + position, out=err(out, ref)))

    # in-block masking: random token boxes (lattice steps, a permutation, the ragged tail) against the reference
    from dit_sparse.blockmask import TokenBoxes
    for i, (s, qb, kb, axes, permute) in enumerate([(100, 16, 16, 3, False), (90, 32, 16, 2, True)]):
        g = torch.Generator().manual_seed(20 + i)
        lo = torch.randint(-1, 4, (s, axes), generator=g).int()
        boxes = TokenBoxes(lo, lo + torch.randint(0, 5, (s, axes), generator=g).int(),
                           torch.randint(0, 6, (s, axes), generator=g).int(), (2,) + (1,) * (axes - 1))
        d = torch.rand(1, 2, math.ceil(s / qb), math.ceil(s / kb), generator=g) < 0.6
        partial = torch.rand(d.shape, generator=g) < 0.5
        perm = torch.randperm(s, generator=g) if permute else None
        mask = BlockMask.from_block_dense(d, s, qb, kb, permutation=perm, block_partial=partial, token_boxes=boxes)
        q, k, v = (torch.randn(1, s, 2, 16, generator=g) for _ in range(3))
        out, lse = tbs.block_sparse_attention(q, k, v, mask, 0.3)
        ref_out, ref_lse = reference.block_sparse_attention(q, k, v, mask, 0.3)
        results.append(dict(case="boxes " + str(i), dtype="torch.float32", out=err(out, ref_out),
                            lse=lse_err(lse, ref_lse)))

    # neighborhood windows through the public API against dense SDPA with their token mask
    from dit_sparse.patterns.neighborhood import neighborhood
    windows = [
        (VideoLayout(3, 7, 10), dict(window=(3, 5, 3), stride=(1, 2, 1), dilation=(1, 1, 2), exact=True), "float32"),
        (VideoLayout(1, 12, 11, 6, "prefix"), dict(window=(1, 5, 7), dilation=(1, 2, 1), exact=True), "float16"),
        (VideoLayout(3, 7, 10, 5, "suffix"), dict(window=(3, 5, 9), exact=False), "float32"),
    ]
    for i, (layout, options, dtype) in enumerate(windows):
        mask = neighborhood(layout, tile=(1, 4, 4), **options)
        g = torch.Generator().manual_seed(30 + i)
        q, k, v = (torch.randn(1, layout.seq_len, 1, 16, generator=g).to(getattr(torch, dtype)) for _ in range(3))
        allowed = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
        allowed[layout.video_slice, layout.video_slice] = mask.to_dense()[0, 0]
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.25
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        expected = torch.einsum("bhqk,bkhd->bqhd", weights, v.double())
        out = sparse_attention(q, k, v, mask, layout, backend="triton")
        results.append(dict(case="neighborhood " + str(i), dtype="torch." + dtype, boxes=mask.has_token_boxes,
                            sdpa_out=err(out, expected)))
    print("RESULTS" + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DIT_SPARSE_BACKEND": ""}
    script = _INTERPRET_SCRIPT.format(benchmarks=str(ROOT / "benchmarks"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def test_triton_kernel_matches_reference_under_interpreter(interpreted_results):
    for row in interpreted_results:
        tolerance = 2e-3 if "float16" in row.get("dtype", "") else 1e-5
        for key, value in row.items():
            if key in ("case", "dtype", "boxes"):
                continue
            assert value <= (1e-5 if key.endswith("lse") else tolerance), (row, key)


def test_triton_masks_inside_blocks_under_interpreter(interpreted_results):
    # Token boxes against the reference, and exact neighborhood windows (NATTEN, with stride, dilation, the ragged
    # tail, joint text) plus a tile-aligned one against dense SDPA with their token masks.
    cases = {str(row["case"]): row for row in interpreted_results}
    assert {"boxes 0", "boxes 1"} <= set(cases)
    assert [cases[f"neighborhood {i}"]["boxes"] for i in range(3)] == [True, True, False]
    for name, row in cases.items():
        if name.startswith("neighborhood"):
            assert row["sdpa_out"] <= (2e-3 if "float16" in row["dtype"] else 1e-5), row


# ---- BlockMask -> FA4 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, seq_len, empty", [((1, 1), 1000, False), ((2, 3), 515, True), ((1, 4), 128, True)])
def test_fa4_conversion_expands_to_the_same_blocks_and_tokens(shape, seq_len, empty):
    g = torch.Generator().manual_seed(seq_len)
    mask = _mask(seq_len, 128, 128, shape, g, density=0.3, empty_rows=empty)
    tensors = fa4.to_fa4_block_sparse(mask)
    for t in (tensors.mask_block_cnt, tensors.mask_block_idx, tensors.full_block_cnt, tensors.full_block_idx):
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert int(tensors.mask_block_cnt.abs().sum()) == 0  # no partial blocks: no mask_mod needed
    assert tensors.block_size == (128, 128)
    assert tensors.has_empty_rows == bool((mask.kv_block_counts == 0).any()) and (tensors.has_empty_rows or not empty)
    block_dense = fa4.fa4_block_dense(tensors, mask.n_kv_blocks)
    assert torch.equal(block_dense, mask.to_block_dense())
    # token level: FA4 visits whole blocks and cuts keys at seq_len, which is mask.to_dense()
    token_of = torch.arange(seq_len) // 128
    assert torch.equal(block_dense[..., token_of, :][..., token_of], mask.to_dense())
    assert "flash_attn" not in sys.modules


def test_fa4_conversion_is_cached_with_the_mask():
    mask = BlockMask.full(300, 128)
    assert fa4.cached_fa4_block_sparse(mask) is fa4.cached_fa4_block_sparse(mask)
    assert fa4.cached_fa4_block_sparse(BlockMask.full(300, 128)) is not fa4.cached_fa4_block_sparse(mask)


def test_fa4_block_constraints_name_the_block_size():
    assert fa4.block_constraints_error(BlockMask.full(512, 128), 128, (9, 0)) is None
    assert fa4.block_constraints_error(BlockMask.full(512, 64), 64, (9, 0)) is None
    assert "kv_block_size" in fa4.block_constraints_error(BlockMask.full(512, 128, 256), 128, (9, 0))
    assert "q_block_size" in fa4.block_constraints_error(BlockMask.full(512, 32), 128, (9, 0))
    assert "256" in fa4.block_constraints_error(BlockMask.full(512, 128), 128, (10, 0))
    assert "head_dim" in fa4.block_constraints_error(BlockMask.full(512, 128), 80, (9, 0))
    assert "capability" in fa4.block_constraints_error(BlockMask.full(512, 128), 128, (8, 0))


# ---- dispatch -----------------------------------------------------------------------------------------------------


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_dispatch_falls_back_to_reference_without_cuda(no_override, caplog):
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(1, 64, 2, 16, g)
    mask = _mask(64, 16, 16, (1, 1), g)
    assert kernels.available_backends("cpu") == ["reference"]
    kernels._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="dit_sparse"):
        out, lse = kernels.block_sparse_attention(q, k, v, mask)
        kernels.block_sparse_attention(q, k, v, mask)
    assert [r.getMessage() for r in caplog.records if "backend" in r.getMessage()].__len__() == 1
    assert "reference" in caplog.records[0].getMessage()
    expected = reference.block_sparse_attention(q, k, v, mask, 16**-0.5)
    torch.testing.assert_close(out, expected[0])
    assert "flash_attn" not in sys.modules


def test_asking_for_an_unavailable_backend_names_what_is_missing(no_override, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(1, 64, 2, 16, g)
    mask = _mask(64, 16, 16, (1, 1), g)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.block_sparse_attention(q, k, v, mask, backend="fa4")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.block_sparse_attention(q, k, v, mask, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.block_sparse_attention(q, k, v, mask, backend="cuda")
    monkeypatch.setenv(kernels.ENV_VAR, "fa4")
    with pytest.raises(ValueError, match="fa4.*CUDA"):
        kernels.block_sparse_attention(q, k, v, mask)
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="DIT_SPARSE_BACKEND='fast'"):
        kernels.block_sparse_attention(q, k, v, mask)
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    kernels.block_sparse_attention(q, k, v, mask)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "head_dim" in kernels.unavailable_reason("triton", "cpu", torch.float32, 80)
    assert "dtype" in kernels.unavailable_reason("triton", "cpu", torch.float64, 64)
    assert "flash_attn" not in sys.modules


def test_bad_inputs_raise_before_launch_with_both_values(no_override):
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(1, 64, 2, 16, g)
    with pytest.raises(ValueError, match="seq_len 80.*S=64"):
        kernels.block_sparse_attention(q, k, v, BlockMask.full(80, 16))
    with pytest.raises(ValueError, match="3 heads.*2"):
        kernels.block_sparse_attention(q, k, v, _mask(64, 16, 16, (1, 3), g))
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.block_sparse_attention(q, k.half(), v, BlockMask.full(64, 16))
    with pytest.raises(ValueError, match="one shape"):
        kernels.block_sparse_attention(q, k[:, :32], v, BlockMask.full(64, 16))
    with pytest.raises(ValueError, match="extra_key_valid"):
        kernels.block_sparse_attention(q, k, v, BlockMask.full(64, 16), extra_k=k[:, :5], extra_v=v[:, :5],
                                       extra_key_valid=torch.ones(1, 4, dtype=torch.bool))


def test_config_backends_are_auto_plus_the_registry():
    from dit_sparse.config import BACKENDS, MethodConfig

    assert kernels.BACKENDS == tuple(kernels.REGISTRY) == ("fa4", "triton", "reference")
    assert BACKENDS == ("auto",) + kernels.BACKENDS
    for name in kernels.BACKENDS:
        assert MethodConfig(backend=name).backend == name
        assert f"`{name}`" in kernels.describe_backends()
    with pytest.raises(ValueError, match="fa4.*triton.*reference"):
        MethodConfig(backend="cuda")


def test_dispatch_and_auto_read_the_registry(no_override, monkeypatch):
    """A record added to the table is a backend: named, taken by auto in its place, refused by its own rules."""
    calls = []

    def attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out):
        calls.append(scale)
        return reference.BACKEND.attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out)

    record = kernels.Backend(name="reference", where="here", summary="a counted reference",
                             device_reason=lambda device: None, dtypes=(torch.float32,), head_dims=(16,),
                             token_boxes=False, attention=attention)
    monkeypatch.setitem(kernels.REGISTRY, "reference", record)
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(1, 64, 2, 16, g)
    mask = _mask(64, 16, 16, (1, 1), g)
    out, lse = kernels.block_sparse_attention(q, k, v, mask, scale=0.5)
    assert calls == [0.5]
    torch.testing.assert_close(out, reference.block_sparse_attention(q, k, v, mask, 0.5)[0])
    with pytest.raises(ValueError, match="backend 'reference' cannot run here: .*head_dim \\(16,\\), got 32"):
        kernels.resolve_backend("reference", _qkv(1, 64, 2, 32, g)[0], mask)
    assert "float32" in kernels.unavailable_reason("reference", "cpu", torch.float16)


def test_masks_keep_what_backends_derive_in_their_one_cache(no_override):
    """The dispatch keeps the moved, reordered and converted masks with the mask, through `BlockMask.cached`, and
    sets no attribute on it: a second call builds nothing new."""
    import dataclasses

    g = torch.Generator().manual_seed(4)
    q, k, v = _qkv(2, 64, 2, 16, g)
    orders = torch.stack([torch.randperm(64, generator=g) for _ in range(2)])[None]  # (1, H, S)
    per_head = BlockMask.from_block_dense(torch.rand(1, 2, 4, 4, generator=g) < 0.6, 64, 16, permutation=orders)
    fields = {field.name for field in dataclasses.fields(BlockMask)}
    first = kernels.block_sparse_attention(q, k, v, per_head)
    kept = dict(per_head._cache)
    assert "in_blocked_order" in kept
    second = kernels.block_sparse_attention(q, k, v, per_head)
    assert set(vars(per_head)) == fields and per_head._cache.keys() == kept.keys()
    assert all(per_head._cache[key] is value for key, value in kept.items())
    torch.testing.assert_close(first, second)
    expected = _sdpa_with_lse(q, k, v, per_head.to_dense(), 16**-0.5)
    torch.testing.assert_close(first[0], expected[0].float(), atol=1e-5, rtol=1e-5)
    assert fa4.cached_fa4_block_sparse(per_head) is per_head._cache["fa4_block_sparse"]


def test_dense_attention_of_text_rows_matches_sdpa(no_override):
    g = torch.Generator().manual_seed(2)
    q, k, v = _qkv(2, 40, 2, 16, g)
    key_valid = torch.rand(2, 40, generator=g) < 0.5
    out, _ = kernels.dense_attention(q[:, :7], k, v, key_valid=key_valid)
    expected = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q[:, :7], k, v)), attn_mask=key_valid[:, None, None, :]
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_check_backend_names_the_backend_the_device_and_what_is_missing(no_override):
    for name in ("auto", "reference"):
        kernels.check_backend(name, "cpu")
    with pytest.raises(ValueError, match=r"backend 'fa4' cannot run on cpu here: the fa4 backend needs a CUDA GPU"):
        kernels.check_backend("fa4", "cpu")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on cpu here: .*TRITON_INTERPRET=1"):
        kernels.check_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"one of \('auto', 'fa4', 'triton', 'reference'\), got 'cuda'"):
        kernels.check_backend("cuda", "cpu")
