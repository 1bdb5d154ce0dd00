"""Compensated block-sparse attention (`compensate=True`, SVG-EAR; DraftAttention) and the recall guard
(`min_recall`), on CPU: the reference against an explicit dense computation built here, the interpreted Triton pooled
pass against the reference, the guard's rules, and the end-to-end path on the tiny random pipeline."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dit_sparse import kernels
from dit_sparse.blockmask import BlockMask
from dit_sparse.kernels import reference

ROOT = Path(__file__).resolve().parents[1]


def _qkv(batch, seq_len, heads, head_dim, generator):
    return [torch.randn(batch, seq_len, heads, head_dim, generator=generator, dtype=torch.float64) for _ in range(3)]


def _random_mask(seq_len, block, shape, generator, density=0.4, permute=None, kv_permute=False, batch=1, heads=1):
    n = math.ceil(seq_len / block)
    block_dense = torch.rand(*shape, n, n, generator=generator) < density
    perm = kv_perm = None
    if permute == "shared":
        perm = torch.randperm(seq_len, generator=generator)
    elif permute == "per_head":
        perm = torch.stack([torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(heads)])
                            for _ in range(batch)])  # (B, H, S)
        if kv_permute:
            kv_perm = torch.stack([torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(heads)])
                                   for _ in range(batch)])
    mask = BlockMask.from_block_dense(block_dense, seq_len, block, permutation=perm)
    if kv_perm is not None:
        mask = BlockMask(mask.kv_block_indices, mask.kv_block_counts, seq_len, block, block, perm,
                         kv_permutation=kv_perm)
    return mask, block_dense


def _orders(mask, batch, heads):
    """(query order, key order) (B, H, S): token at each blocked position, built from the mask's fields here."""
    natural = torch.arange(mask.seq_len)
    def full(perm):
        if perm is None:
            perm = natural
        return (perm.view(1, 1, -1) if perm.dim() == 1 else perm).expand(batch, heads, -1)
    q_order = full(mask.permutation)
    return q_order, full(mask.kv_permutation) if mask.kv_permutation is not None else q_order


def dense_compensated(q, k, v, mask, block_dense, scale, extra_k=None, extra_v=None, extra_valid=None):
    """Independent oracle in fp64: an explicit (S + T + n_kv) score matrix per (batch, head, query): the S video keys
    the mask's token map allows, the valid extra keys, and one pooled key per key block the query's block drops
    (mean key of the block's tokens in the key order, score + log(its count), mean value)."""
    batch, seq_len, heads, _ = q.shape
    block = mask.q_block_size
    n = math.ceil(seq_len / block)
    q_order, k_order = _orders(mask, batch, heads)
    allowed = mask.to_dense().expand(batch, heads, -1, -1)  # (B, H, S, S) natural order
    blocks = block_dense.reshape((1,) * (4 - block_dense.dim()) + tuple(block_dense.shape)).expand(batch, heads, n, n)
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            pooled_k = torch.stack([k[b, k_order[b, h, j * block:(j + 1) * block], h].mean(0) for j in range(n)])
            pooled_v = torch.stack([v[b, k_order[b, h, j * block:(j + 1) * block], h].mean(0) for j in range(n)])
            counts = torch.tensor([len(range(seq_len)[j * block:(j + 1) * block]) for j in range(n)], dtype=q.dtype)
            q_block_of = torch.empty(seq_len, dtype=torch.long)
            q_block_of[q_order[b, h]] = torch.arange(seq_len) // block
            keys = [k[b, :, h]]
            values = [v[b, :, h]]
            ok = [allowed[b, h]]
            if extra_k is not None:
                keys.append(extra_k[b, :, h])
                values.append(extra_v[b, :, h])
                valid = torch.ones(extra_k.shape[1], dtype=torch.bool) if extra_valid is None else extra_valid[b]
                ok.append(valid.expand(seq_len, -1))
            keys.append(pooled_k)
            values.append(pooled_v)
            ok.append(~blocks[b, h][q_block_of])  # (S, n): the query's block drops key block j
            bias = torch.cat([torch.zeros(sum(x.shape[0] for x in keys[:-1]), dtype=q.dtype), counts.log()])
            scores = q[b, :, h] @ torch.cat(keys).T * scale + bias
            scores = scores.masked_fill(~torch.cat(ok, dim=1), float("-inf"))
            weights = torch.softmax(scores, -1).nan_to_num(0.0)
            out[b, :, h] = weights @ torch.cat(values)
    return out


CASES = [  # batch, seq_len, heads, block, mask shape, permute, kv_permute, text
    (1, 72, 2, 16, (1, 1), None, False, 0),  # ragged tail, shared mask
    (2, 64, 3, 16, (2, 3), None, False, 5),  # per-batch, per-head masks, text with padding
    (1, 90, 2, 16, (1, 2), "shared", False, 3),  # one token order (tiles), ragged
    (2, 80, 2, 16, (2, 2), "per_head", False, 0),  # per-head orders (clusters)
    (1, 70, 2, 16, (1, 2), "per_head", True, 4),  # keys ordered apart from queries, ragged, text
]


@pytest.mark.parametrize("batch, seq_len, heads, block, shape, permute, kv_permute, text", CASES)
def test_reference_compensation_matches_explicit_dense_computation(batch, seq_len, heads, block, shape, permute,
                                                                   kv_permute, text):
    g = torch.Generator().manual_seed(seq_len + heads)
    q, k, v = _qkv(batch, seq_len, heads, 16, g)
    mask, block_dense = _random_mask(seq_len, block, shape, g, permute=permute, kv_permute=kv_permute,
                                     batch=batch, heads=heads)
    extra = {}
    if text:
        ek, ev = (torch.randn(batch, text, heads, 16, generator=g, dtype=torch.float64) for _ in range(2))
        valid = torch.ones(batch, text, dtype=torch.bool)
        valid[-1, -2:] = False  # padding
        extra = dict(extra_k=ek, extra_v=ev, extra_key_valid=valid)
    out, lse = kernels.block_sparse_attention(q, k, v, mask, backend="reference", compensate=True, **extra)
    expected = dense_compensated(q, k, v, mask, block_dense, 16 ** -0.5, *extra.values())
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)  # the pass accumulates in fp32
    plain, _ = kernels.block_sparse_attention(q, k, v, mask, backend="reference", **extra)
    assert (out - plain).abs().max() > 1e-3  # the dropped blocks do contribute


def test_compensation_on_token_boxes_covers_dropped_blocks_only():
    # A kept block masked inside keeps its masked-out tokens out; only the blocks the mask drops are pooled.
    from dit_sparse.layout import VideoLayout
    from dit_sparse.patterns.neighborhood import neighborhood

    mask = neighborhood(VideoLayout(2, 8, 8), window=(1, 3, 3), tile=(1, 4, 4), exact=True)
    assert mask.has_token_boxes
    g = torch.Generator().manual_seed(5)
    q, k, v = _qkv(1, 128, 2, 16, g)
    out, _ = kernels.block_sparse_attention(q, k, v, mask, backend="reference", compensate=True)
    expected = dense_compensated(q, k, v, mask, mask.to_block_dense(), 16 ** -0.5)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_compensation_with_every_block_kept_changes_nothing():
    g = torch.Generator().manual_seed(0)
    q, k, v = (x.float() for x in _qkv(2, 50, 2, 16, g))
    mask = BlockMask.full(50, 16)
    plain, plain_lse = kernels.block_sparse_attention(q, k, v, mask, backend="reference")
    out, lse = kernels.block_sparse_attention(q, k, v, mask, backend="reference", compensate=True)
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)


@pytest.mark.parametrize("text", [0, 3])
def test_compensation_with_every_block_dropped_is_attention_over_pooled_keys(text):
    g = torch.Generator().manual_seed(1)
    batch, seq_len, heads, block = 1, 40, 2, 16  # blocks of 16, 16, 8 tokens
    q, k, v = _qkv(batch, seq_len, heads, 8, g)
    empty = torch.zeros(3, 3, dtype=torch.bool)
    mask = BlockMask.from_block_dense(empty, seq_len, block)
    extra = {}
    if text:
        ek, ev = (torch.randn(batch, text, heads, 8, generator=g, dtype=torch.float64) for _ in range(2))
        extra = dict(extra_k=ek, extra_v=ev)
    out, _ = kernels.block_sparse_attention(q, k, v, mask, backend="reference", compensate=True, **extra)
    spans = [(0, 16), (16, 32), (32, 40)]
    pooled_k = torch.stack([k[:, a:b].mean(1) for a, b in spans], 1)  # (B, 3, H, D)
    pooled_v = torch.stack([v[:, a:b].mean(1) for a, b in spans], 1)
    log_count = torch.tensor([16.0, 16.0, 8.0], dtype=torch.float64).log()
    keys, values = pooled_k, pooled_v
    bias = log_count
    if text:
        keys, values = torch.cat([pooled_k, ek], 1), torch.cat([pooled_v, ev], 1)
        bias = torch.cat([log_count, torch.zeros(text, dtype=torch.float64)])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) * 8 ** -0.5 + bias
    expected = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), values)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_compensate_must_be_a_bool():
    from dit_sparse.attention import sparse_attention

    q = torch.zeros(1, 16, 1, 16)
    with pytest.raises(ValueError, match="compensate must be a bool.*'yes'"):
        kernels.block_sparse_attention(q, q, q, BlockMask.full(16, 16), compensate="yes")
    with pytest.raises(ValueError, match="compensate must be a bool.*got 1"):
        sparse_attention(q, q, q, BlockMask.full(16, 16), compensate=1)


_INTERPRET_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from dit_sparse import kernels
    from dit_sparse.blockmask import BlockMask
    from test_compensation import _random_mask
    rows = []
    for case, (batch, seq_len, heads, block, shape, permute, kv_permute, text, dtype) in enumerate([
            (1, 72, 2, 16, (1, 1), None, False, 0, torch.float32),
            (2, 64, 2, 32, (2, 2), None, False, 5, torch.float32),
            (1, 90, 2, 16, (1, 2), "shared", False, 3, torch.float32),
            (2, 80, 2, 16, (2, 2), "per_head", False, 0, torch.float32),
            (1, 70, 2, 16, (1, 2), "per_head", True, 4, torch.float16)]):
        g = torch.Generator().manual_seed(case)
        q, k, v = (torch.randn(batch, seq_len, heads, 16, generator=g).to(dtype) for _ in range(3))
        mask, _ = _random_mask(seq_len, block, shape, g, permute=permute, kv_permute=kv_permute, batch=batch,
                               heads=heads)
        extra = {{}}
        if text:
            ek, ev = (torch.randn(batch, text, heads, 16, generator=g).to(dtype) for _ in range(2))
            valid = torch.ones(batch, text, dtype=torch.bool)
            valid[-1, -2:] = False
            extra = dict(extra_k=ek, extra_v=ev, extra_key_valid=valid)
        ref, ref_lse = kernels.block_sparse_attention(q, k, v, mask, backend="reference", compensate=True, **extra)
        out, lse = kernels.block_sparse_attention(q, k, v, mask, backend="triton", compensate=True, **extra)
        plain, _ = kernels.block_sparse_attention(q, k, v, mask, backend="triton", **extra)
        full = BlockMask.full(seq_len, block)
        f0, l0 = kernels.block_sparse_attention(q, k, v, full, backend="triton")
        f1, l1 = kernels.block_sparse_attention(q, k, v, full, backend="triton", compensate=True)
        rows.append(dict(case=case, dtype=str(dtype), out=float((out.float() - ref.float()).abs().max()),
                         lse=float((lse - ref_lse).abs().max()),
                         changed=float((out.float() - plain.float()).abs().max()),
                         full_identical=bool(torch.equal(f0, f1) and torch.equal(l0, l1))))
    print("RESULTS" + json.dumps(rows))
    """
)


def test_interpreted_triton_pooled_pass_matches_reference():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DIT_SPARSE_BACKEND": ""}
    script = _INTERPRET_SCRIPT.format(tests=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULTS"))[len("RESULTS"):])
    for row in rows:
        half = "float16" in row["dtype"]
        assert row["out"] <= (2e-3 if half else 1e-5), row
        assert row["lse"] <= (2e-4 if half else 1e-5), row
        assert row["changed"] > 1e-2, row  # the pooled pass ran and merged
        assert row["full_identical"], row  # every block kept: bit-identical


# ---- the recall guard ------------------------------------------------------------------------------------------


def test_guard_never_lowers_density_and_keeps_orders_and_boxes():
    from dit_sparse.layout import VideoLayout
    from dit_sparse.patterns import build_mask, make_config
    from dit_sparse.patterns.recall import guard_recall

    g = torch.Generator().manual_seed(3)
    empty_row = torch.rand(5, 5, generator=g) < 0.3
    empty_row[0] = False  # a query block that keeps nothing
    masks = [BlockMask.from_block_dense(empty_row, 72, 16), _random_mask(80, 16, (2, 2), g, permute="per_head", batch=2,
                                                                  heads=2)[0]]
    layout = VideoLayout(2, 8, 8)  # an exact window masks tokens inside kept blocks
    masks.append(build_mask(layout, make_config("neighborhood", window=(1, 3, 3), tile=(1, 4, 4), exact=True)))
    for mask in masks:
        q, k = (torch.randn(2, 2, mask.seq_len, 16, generator=g) * 3 for _ in range(2))  # (B, H, S, D)
        for target in (0.5, 0.9, 1.0):
            new, added, touched = guard_recall(mask, q, k, target)
            before, after = mask.to_block_dense().expand(2, 2, -1, -1), new.to_block_dense()
            assert bool((after | ~before).all())  # nothing removed
            assert float(added) == pytest.approx(new.density - mask.density) and float(added) >= 0
            assert float(touched) == float(bool((after & ~before).any()))
            assert new.rows_all_kept and bool((new.kv_block_counts > 0).all())
            assert new.per_head_order == mask.per_head_order and new.has_token_boxes == mask.has_token_boxes
            if mask.has_token_boxes:  # the blocks the mask kept stay masked inside as they were
                kept_partial = mask.to_block_partial().expand(2, 2, -1, -1)
                assert torch.equal(new.to_block_partial() & before, kept_partial & before)
                torch.testing.assert_close(new.to_dense() | ~mask.to_dense(), torch.ones_like(new.to_dense()))


@pytest.mark.parametrize("seq_len, target", [(96, 0.9), (88, 0.75), (88, 1.0)])
def test_guard_reaches_its_recall_where_the_pooled_map_is_exact(seq_len, target):
    # Tiles of identical tokens: within a block every q (and every k) is the same, so the pooled map is the exact
    # attention mass per block (the ragged tail included, through its log-count bias).
    from dit_sparse.patterns.estimate import block_attention_mass
    from dit_sparse.patterns.recall import guard_recall

    g = torch.Generator().manual_seed(seq_len)
    block, n = 16, math.ceil(seq_len / 16)
    tile = torch.arange(seq_len) // block
    q, k = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64)[:, :, tile] * 2 for _ in range(2))
    mask, _ = _random_mask(seq_len, block, (1, 2), g, density=0.2)
    new, _, _ = guard_recall(mask, q, k, target)
    sizes = torch.full((n,), float(block), dtype=torch.float64)
    sizes[-1] = seq_len - (n - 1) * block
    mass = block_attention_mass(q, k, block, block).double() / sizes[:, None]  # (1, 2, n, n), rows sum to 1
    exact_recall = (mass * new.to_block_dense()).sum(-1)
    assert bool((exact_recall >= target - 1e-5).all()), exact_recall.min()
    # The fewest blocks: dropping the weakest block the guard added leaves the row short of the target.
    added = new.to_block_dense() & ~mask.to_block_dense()
    weakest = torch.where(added, mass, float("inf")).min(-1).values
    short_rows = added.any(-1)
    assert bool((exact_recall - weakest < target + 1e-5)[short_rows].all())


@pytest.mark.parametrize("options, message", [
    (dict(compensate=1), "compensate must be a bool.*got 1"),
    (dict(min_recall=0.0), r"min_recall must be in \(0, 1\], got 0.0"),
    (dict(min_recall=1.5), r"min_recall must be in \(0, 1\], got 1.5"),
    (dict(min_recall=True), r"min_recall must be in \(0, 1\], got True"),
])
def test_bad_compensate_and_min_recall_raise_naming_the_value(options, message):
    from dit_sparse.patterns import make_config

    for method in ("radial", "draft"):
        with pytest.raises(ValueError, match=message):
            make_config(method, **options)


# ---- end to end on the tiny random pipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe():
    from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

    return build_tiny_wan_pipeline(seed=0)


def _latents(pipe, method, **options):
    import dit_sparse

    dit_sparse.sparsify(pipe, method, dense_steps=0, dense_layers=0, **options)
    try:
        latents = pipe(prompt="a red fish swims over the sea", num_frames=17, height=96, width=96,
                       num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
        return latents, dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)


@pytest.mark.parametrize("method", ["radial", "draft"])
def test_compensation_and_guard_run_end_to_end_and_change_the_output(tiny_pipe, method):
    options = dict(density=0.25, tile=(1, 4, 4)) if method == "draft" else dict(block_size=16)
    plain, plain_stats = _latents(tiny_pipe, method, compensate=False, **options)
    compensated, stats = _latents(tiny_pipe, method, compensate=True, **options)
    assert not torch.equal(compensated, plain) and torch.isfinite(compensated).all()
    assert stats["density"] == pytest.approx(plain_stats["density"])  # compensation adds no kept block
    guarded, guard_stats = _latents(tiny_pipe, method, compensate=False, min_recall=0.9, **options)
    assert not torch.equal(guarded, plain) and torch.isfinite(guarded).all()
    assert guard_stats["guard_calls"] > 0 and guard_stats["guard_added_density"] > 0
    assert guard_stats["density"] == pytest.approx(plain_stats["density"] + guard_stats["guard_added_density"])


def test_compensation_is_on_by_default_for_reorder_alone():
    """The defaults issue 31's sweep set (ReorderConfig's docstring): reorder compensates, every other method does not
    unless asked."""
    import dit_sparse

    defaults = {name: config().compensate for name, config in dit_sparse.CONFIGS.items()}
    assert defaults.pop("reorder") is True
    assert defaults and not any(defaults.values())
    assert dit_sparse.make_config("reorder", compensate=False).compensate is False
