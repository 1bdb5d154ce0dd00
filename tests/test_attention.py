"""The reference sparse attention against dense SDPA with the equivalent boolean mask, built a second way."""

import math

import pytest
import torch
import torch.nn.functional as F

from dit_sparse import BlockMask, VideoLayout, sparse_attention


def _random_qkv(batch, seq_len, heads, head_dim, generator, dtype=torch.float32):
    return [torch.randn(batch, seq_len, heads, head_dim, generator=generator, dtype=dtype) for _ in range(3)]


def _sdpa(q, k, v, allowed=None, scale=None):
    """Dense SDPA on (B, S, H, D) with a bool mask (B|1, H|1, Sq, Sk); rows with nothing allowed give zeros."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if allowed is None:
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale).transpose(1, 2)
    allowed = allowed.expand(q.shape[0], q.shape[2], -1, -1)
    empty = ~allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed | empty, scale=scale)
    return out.masked_fill(empty, 0.0).transpose(1, 2)


def _random_block_mask(seq_len, block, heads, generator, density, empty_rows=False, permute=False):
    n = math.ceil(seq_len / block)
    block_dense = torch.rand(heads, n, n, generator=generator) < density
    if empty_rows:
        block_dense[:, 0] = False
    perm = torch.randperm(seq_len, generator=generator) if permute else None
    return BlockMask.from_block_dense(block_dense, seq_len, block, permutation=perm)


def test_reference_with_full_mask_equals_dense_sdpa():
    from dit_sparse.kernels import reference

    g = torch.Generator().manual_seed(0)
    for batch, seq_len, heads, head_dim, block in [(1, 256, 2, 32, 64), (2, 200, 3, 16, 32), (1, 77, 1, 64, 16)]:
        q, k, v = _random_qkv(batch, seq_len, heads, head_dim, g)
        out, _ = reference.block_sparse_attention(q, k, v, BlockMask.full(seq_len, block), head_dim**-0.5)
        torch.testing.assert_close(out, _sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_a_full_mask_on_the_cpu_reference_path_runs_as_fused_dense_attention(monkeypatch):
    """Every block kept, in token order: sparse_attention hands the call to torch's SDPA instead of the block loop
    (the same result as the reference kernel); a mask missing one block, or a permuted full mask, still goes through
    the block-sparse kernel."""
    from dit_sparse import kernels
    from dit_sparse.kernels import reference

    g = torch.Generator().manual_seed(1)
    q, k, v = _random_qkv(2, 200, 3, 16, g)
    full = BlockMask.full(200, 32)
    expected, _ = reference.block_sparse_attention(q, k, v, full, 0.3)
    calls = []
    real = kernels.block_sparse_attention
    monkeypatch.setattr(kernels, "block_sparse_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for backend in ("auto", "reference"):
        torch.testing.assert_close(sparse_attention(q, k, v, full, scale=0.3, backend=backend), expected,
                                   atol=1e-5, rtol=1e-5)
    assert calls == []
    block_dense = torch.ones(7, 7, dtype=torch.bool)
    block_dense[3, 5] = False
    sparse_attention(q, k, v, BlockMask.from_block_dense(block_dense, 200, 32), backend="reference")
    sparse_attention(q, k, v, BlockMask.from_block_dense(torch.ones(7, 7, dtype=torch.bool), 200, 32,
                                                         permutation=torch.randperm(200, generator=g)))
    assert calls == [1, 1]


@pytest.mark.parametrize("case", range(12))
def test_reference_equals_sdpa_with_equivalent_bool_mask(case):
    g = torch.Generator().manual_seed(100 + case)
    batch = 1 + case % 2
    heads = 1 + case % 3
    head_dim = (16, 32, 64)[case % 3]
    block = (16, 32, 64)[(case // 3) % 3]
    seq_len = int(torch.randint(block, 5 * block, (1,), generator=g))  # often not a multiple of the block
    q, k, v = _random_qkv(batch, seq_len, heads, head_dim, g)
    mask = _random_block_mask(
        seq_len, block, heads, g, density=0.2 + 0.1 * (case % 5), empty_rows=case % 4 == 0, permute=case % 3 == 0
    )
    scale = None if case % 2 else 0.3
    out = sparse_attention(q, k, v, mask, scale=scale, backend="reference")
    allowed = mask.to_dense()  # (1, H, S, S) bool in the natural token order
    torch.testing.assert_close(out, _sdpa(q, k, v, allowed, scale), atol=1e-5, rtol=1e-5)


def test_query_blocks_with_nothing_kept_output_zeros():
    g = torch.Generator().manual_seed(1)
    q, k, v = _random_qkv(1, 96, 2, 16, g)
    block_dense = torch.ones(3, 3, dtype=torch.bool)
    block_dense[1] = False
    out = sparse_attention(q, k, v, BlockMask.from_block_dense(block_dense, 96, 32), backend="reference")
    assert torch.count_nonzero(out[:, 32:64]) == 0
    assert torch.count_nonzero(out[:, :32]) > 0


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_joint_text_is_dense_and_padding_gets_zero_weight(position):
    g = torch.Generator().manual_seed(2)
    layout = VideoLayout(3, 4, 6, text_len=10, text_position=position)  # 72 video tokens + 10 text
    batch, heads = 2, 2
    q, k, v = _random_qkv(batch, layout.seq_len, heads, 32, g)
    mask = _random_block_mask(layout.video_len, 16, heads, g, density=0.4, empty_rows=True)
    text_valid = torch.ones(batch, layout.text_len, dtype=torch.bool)
    text_valid[1, 6:] = False  # the second prompt is padded

    # The token-level rule, built directly: video rows keep their blocks plus valid text; text rows see all valid.
    allowed = torch.zeros(batch, heads, layout.seq_len, layout.seq_len, dtype=torch.bool)
    video, text = layout.video_slice, layout.text_slice
    allowed[:, :, video, video] = mask.to_dense().expand(batch, heads, -1, -1)
    allowed[:, :, video, text] = text_valid[:, None, None, :]
    allowed[:, :, text, :] = True
    allowed[:, :, :, text] &= text_valid[:, None, None, :]

    out = sparse_attention(q, k, v, mask, layout, text_padding_mask=text_valid, backend="reference")
    torch.testing.assert_close(out, _sdpa(q, k, v, allowed), atol=1e-5, rtol=1e-5)

    # Padding is exact: changing the padded keys' values changes nothing.
    k2, v2 = k.clone(), v.clone()
    pad = [i for i in range(layout.seq_len)][text][6:]
    k2[1, pad], v2[1, pad] = 100.0, -100.0
    out2 = sparse_attention(q, k2, v2, mask, layout, text_padding_mask=text_valid, backend="reference")
    torch.testing.assert_close(out2[1], out[1], atol=1e-5, rtol=1e-5)


def test_reference_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    q, k, v = _random_qkv(1, 128, 2, 32, g)
    mask = _random_block_mask(128, 32, 2, g, density=0.5)
    out32 = sparse_attention(q, k, v, mask, backend="reference")
    out16 = sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, backend="reference")
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=2e-2, rtol=2e-2)


def test_bad_inputs_raise_with_the_values():
    q = torch.randn(1, 64, 2, 16)
    mask = BlockMask.full(64, 16)
    with pytest.raises(ValueError, match=r"\(B, S, H\)"):
        sparse_attention(q, torch.randn(1, 60, 2, 16), q, mask)
    with pytest.raises(ValueError, match="dtype"):
        sparse_attention(q, q.double(), q, mask)
    with pytest.raises(ValueError, match="seq_len 32 video tokens, but this call has S=64"):
        sparse_attention(q, q, q, BlockMask.full(32, 16))
    with pytest.raises(ValueError, match="3 heads"):
        sparse_attention(q, q, q, BlockMask.from_block_dense(torch.ones(3, 4, 4, dtype=torch.bool), 64, 16))
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, q, q, mask, backend="cuda-magic")
    with pytest.raises(ValueError, match="covers 70 tokens"):
        sparse_attention(q, q, q, mask, VideoLayout(2, 5, 7))


@pytest.mark.parametrize("full", [False, True], ids=["sparse mask", "full mask"])
def test_integer_tensors_an_empty_batch_and_a_bad_scale_are_refused_by_name(full):
    """Refused at the edge with the argument and what is allowed, on every path (a sparse mask used to return a
    truncated int64 result, batch 0 a torch max() error, scale="abc" a float() error)."""
    from dit_sparse import kernels

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 64, 2, 16, generator=g)
    mask = BlockMask.full(64, 16) if full else _random_block_mask(64, 16, 2, g, density=0.5)
    ints = torch.randint(-3, 3, (1, 64, 2, 16), generator=g)
    calls = [lambda *t, **kw: sparse_attention(*t, mask, **kw),
             lambda *t, **kw: kernels.block_sparse_attention(*t, mask, **kw),
             lambda *t, **kw: kernels.dense_attention(*t, **kw)]
    for call in calls:
        with pytest.raises(ValueError, match=r"q, k, v must have a floating dtype .*got torch.int64"):
            call(ints, ints, ints)
        with pytest.raises(ValueError, match=r"q, k, v must have every size >= 1 \(B, S, H, D\), got \(0, 64, 2, 16\)"):
            call(q[:0], q[:0], q[:0])
        with pytest.raises(TypeError, match=r"scale must be a real number or None \(1/sqrt\(D\)\), got 'abc'"):
            call(q, q, q, scale="abc")
        with pytest.raises(ValueError, match="scale must be finite, got nan"):
            call(q, q, q, scale=float("nan"))
    import numpy as np

    torch.testing.assert_close(sparse_attention(q, q, q, mask, scale=np.float32(0.25)),
                               sparse_attention(q, q, q, mask, scale=0.25))
