"""Compensation (`compensate=True`) and the recall guard on the GPU backends, against the reference
(`pytest -m gpu` on a CUDA machine; skipped elsewhere).

The random cases of `test_kernels_gpu` (shapes, head dims, dtypes, densities, masks shared / per head / per batch,
ragged tails, query blocks keeping nothing, token permutations, joint text as prefix or suffix with padding) run
through `sparse_attention(..., compensate=True)` on each GPU backend (main pass + our Triton pooled pass) and on the
reference (its PyTorch pooled pass), plus per-head token orders (keys ordered apart from queries too). Same error
measure and bounds as `test_kernels_gpu`. The guard and the pooled pass make no host sync.
"""

import math

import pytest
import torch

from dit_sparse import kernels
from dit_sparse.attention import sparse_attention
from dit_sparse.blockmask import BlockMask
from dit_sparse.patterns.recall import guard_recall

from test_kernels_gpu import TOLERANCE, _random_case, _skip_unless_available

pytestmark = pytest.mark.gpu

CASES = 100


def _relative_error(out, expected):
    scale = expected.float().abs().max().clamp_min(1e-6)
    return float(((out.float() - expected.float()).abs().max() / scale).nan_to_num(float("inf")))


@pytest.mark.parametrize("backend", ["fa4", "triton"])
def test_compensated_gpu_backend_matches_reference_on_random_cases(backend, monkeypatch):
    _skip_unless_available(backend)
    monkeypatch.setenv("DIT_SPARSE_TRITON_AUTOTUNE", "0")
    rng = torch.Generator().manual_seed(31 if backend == "fa4" else 32)
    failures = []
    for index in range(CASES):
        q, k, v, mask, layout, padding, dtype, description = _random_case(rng, backend, index)
        out = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=backend, compensate=True)
        expected = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend="reference",
                                    compensate=True)
        error = _relative_error(out, expected)
        if not error <= TOLERANCE[dtype]:
            failures.append(f"{description}: relative max error {error:.2e}")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("backend", ["fa4", "triton"])
@pytest.mark.parametrize("kv_apart", [False, True])
def test_compensated_per_head_orders_match_reference(backend, kv_apart, monkeypatch):
    _skip_unless_available(backend)
    monkeypatch.setenv("DIT_SPARSE_TRITON_AUTOTUNE", "0")
    g = torch.Generator().manual_seed(7)
    batch, heads, seq_len, block = 2, 3, 1000, 128  # ragged tail of 104 tokens
    n = math.ceil(seq_len / block)
    block_dense = torch.rand(batch, heads, n, n, generator=g) < 0.3
    orders = [torch.stack([torch.stack([torch.randperm(seq_len, generator=g) for _ in range(heads)])
                           for _ in range(batch)]).cuda() for _ in range(2)]  # (B, H, S)
    base = BlockMask.from_block_dense(block_dense.cuda(), seq_len, block)
    mask = BlockMask(base.kv_block_indices, base.kv_block_counts, seq_len, block, block, orders[0],
                     kv_permutation=orders[1] if kv_apart else None)
    q, k, v = (torch.randn(batch, seq_len, heads, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    text_k, text_v = (torch.randn(batch, 77, heads, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    valid = (torch.arange(77) < 60).expand(batch, -1).contiguous().cuda()
    extra = dict(extra_k=text_k, extra_v=text_v, extra_key_valid=valid)
    out, lse = kernels.block_sparse_attention(q, k, v, mask, backend=backend, compensate=True, **extra)
    ref, ref_lse = kernels.block_sparse_attention(q, k, v, mask, backend="reference", compensate=True, **extra)
    assert _relative_error(out, ref) <= TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)


def test_compensation_with_every_block_kept_is_bit_identical_on_triton():
    _skip_unless_available("triton")
    q, k, v = (torch.randn(1, 1500, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = BlockMask.full(1500, 128, device="cuda")
    plain = kernels.block_sparse_attention(q, k, v, mask, backend="triton")
    compensated = kernels.block_sparse_attention(q, k, v, mask, backend="triton", compensate=True)
    assert torch.equal(plain[0], compensated[0]) and torch.equal(plain[1], compensated[1])


def test_guard_and_pooled_pass_make_no_host_sync():
    _skip_unless_available("triton")
    g = torch.Generator().manual_seed(2)
    seq_len, block = 4096, 128
    block_dense = torch.rand(1, 2, 32, 32, generator=g) < 0.25
    block_dense[..., torch.arange(32), torch.arange(32)] = True
    mask = BlockMask.from_block_dense(block_dense.cuda(), seq_len, block)
    q, k, v = (torch.randn(1, seq_len, 2, 64, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    kernels.block_sparse_attention(q, k, v, mask, backend="triton", compensate=True)  # compile, cache the mask's
    guard_recall(mask, q.transpose(1, 2), k.transpose(1, 2), 0.9)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        guarded, added, touched = guard_recall(mask, q.transpose(1, 2), k.transpose(1, 2), 0.9)
        kernels.block_sparse_attention(q, k, v, mask, backend="triton", compensate=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(added) >= 0 and guarded.density >= mask.density
