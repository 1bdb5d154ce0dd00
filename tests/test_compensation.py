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
    q = torch.zeros(1, 16, 1, 16)
    with pytest.raises(ValueError, match="compensate must be a bool.*'yes'"):
        kernels.block_sparse_attention(q, q, q, BlockMask.full(16, 16), compensate="yes")


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
