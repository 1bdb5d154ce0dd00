"""precision="fp8" / "int8" on the GPU (`pytest -m gpu tests/test_lowbit_gpu.py` on a CUDA machine).

For each low precision the GPU takes, >= 200 random cases through the public `sparse_attention` (shapes, head_dim
64/128, densities, ragged tails, query blocks with nothing kept, joint text prefix/suffix with padding, masks per
head and per batch, token permutations, per-head token orders): the Triton kernel against the reference's emulation
of the same quantization (close: P is rounded at the kernel's running max, the emulation's at the final one), and
against unquantized attention with the same mask within issue 30's bounds (cosine >= 0.999, relative L2 <= 3%).
The inputs look like a DiT's (K and V with per-channel offsets, scores neither uniform nor one-hot).
"""

import math
import time

import pytest
import torch

from dit_sparse import kernels
from dit_sparse.attention import sparse_attention
from dit_sparse.blockmask import BlockMask
from dit_sparse.layout import VideoLayout

pytestmark = pytest.mark.gpu

CASES = 200
MIN_COSINE, MAX_REL_L2 = 0.999, 0.03
#: the kernel against its emulation (same scales and rounding of q, k, v; P rounded at another max).
EMULATION_COSINE, EMULATION_REL_L2 = 0.9999, 0.01
#: (precision, DIT_SPARSE_FP8_PV, DIT_SPARSE_FP8_QK, cases): the defaults of each precision at full count, fp8's
#: e4m3-PV alternative at fewer (its own kernel variants compile too).
VARIANTS = [("int8", "fp8", "int8", CASES), ("fp8", "bf16", "int8", CASES), ("fp8", "fp8", "int8", 50)]


def _skip_unless(precision):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = kernels.unavailable_reason("triton", "cuda")
    reason = reason or kernels.REGISTRY["triton"].precision_reason(precision, torch.device("cuda"), 128)
    if reason:
        pytest.skip(reason)


def _stats(out, expected):
    a, b = out.double().flatten(), expected.double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0)), float((a - b).norm() / b.norm())


def _random_case(rng: torch.Generator, index: int):
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    head_dim = pick((64, 128))
    q_block = kv_block = 128  # one block size: each kernel variant compiles once (the bf16 tests vary it)
    batch, heads = pick((1, 1, 2)), pick((1, 2, 3))
    frames, height = pick((1, 2, 3)), pick((4, 8, 16))
    width = int(torch.randint(3, 40, (1,), generator=rng))
    text = pick((None, "prefix", "suffix"))
    text_len = int(torch.randint(1, 300, (1,), generator=rng)) if text else 0
    layout = VideoLayout(frames, height, width, text_len, text)
    seq_len = layout.video_len
    mask_batch, mask_heads = pick(((1, 1), (1, heads), (batch, heads)))
    density = float(torch.rand(1, generator=rng)) * 0.9 + 0.1
    n_q, n_k = math.ceil(seq_len / q_block), math.ceil(seq_len / kv_block)
    block_dense = torch.rand(mask_batch, mask_heads, n_q, n_k, generator=rng) < density
    block_dense[..., 0] = True  # every other row sees a key (a row with none is its own case below)
    if index % 5 == 0:
        block_dense[..., int(torch.randint(n_q, (1,), generator=rng)), :] = False  # a query block keeps nothing
    permutation = None
    if index % 6 == 0:
        permutation = layout.tile_permutation((1, 4, 8))
    elif index % 6 == 3:  # per-head token orders (PAROAttention's reorder): the gather path
        permutation = torch.stack([torch.randperm(seq_len, generator=rng) for _ in range(mask_heads)])[None]
        permutation = permutation.expand(mask_batch, -1, -1).contiguous()
    mask = BlockMask.from_block_dense(block_dense, seq_len, q_block, kv_block, permutation=permutation).to("cuda")
    padding = None
    if text and index % 2 == 0:
        padding = torch.rand(batch, text_len, generator=rng) < 0.6
        padding[:, 0] = True
        padding = padding.cuda()
    shape = (batch, layout.seq_len, heads, head_dim)
    q = torch.randn(shape, generator=rng) * 1.2
    k = torch.randn(shape, generator=rng) * 1.2 + 4.0 * torch.randn(1, 1, heads, head_dim, generator=rng)
    v = torch.randn(shape, generator=rng) + torch.randn(1, 1, heads, head_dim, generator=rng)
    q, k, v = (x.to("cuda", torch.bfloat16) for x in (q, k, v))
    description = (f"B{batch} H{heads} D{head_dim} S{seq_len} blocks({q_block},{kv_block}) mask({mask_batch},"
                   f"{mask_heads}) density {density:.2f} text {text}:{text_len} padding {padding is not None} "
                   f"order {None if permutation is None else tuple(permutation.shape)}")
    return q, k, v, mask, layout, padding, description


def _has_empty_rows(mask: BlockMask) -> bool:
    return bool((mask.kv_block_counts == 0).any())


@pytest.mark.parametrize("precision, pv, qk, cases", VARIANTS)
def test_lowbit_kernel_matches_emulation_and_bf16_on_random_cases(precision, pv, qk, cases, monkeypatch):
    _skip_unless(precision)
    monkeypatch.setenv("DIT_SPARSE_TRITON_AUTOTUNE", "0")  # one config per variant: compile time, not speed
    monkeypatch.setenv("DIT_SPARSE_FP8_PV", pv)
    monkeypatch.setenv("DIT_SPARSE_FP8_QK", qk)
    rng = torch.Generator().manual_seed(30)
    failures, worst, start = [], (1.0, 0.0, ""), time.time()
    for index in range(cases):
        q, k, v, mask, layout, padding, description = _random_case(rng, index)
        call = dict(text_padding_mask=padding)
        out = sparse_attention(q, k, v, mask, layout, backend="triton", precision=precision, **call)
        emulated = sparse_attention(q, k, v, mask, layout, backend="reference", precision=precision, **call)
        exact = sparse_attention(q, k, v, mask, layout, backend="reference", **call)
        if not torch.isfinite(out).all():
            failures.append(f"{description}: non-finite output")
            continue
        cosine, rel = _stats(out, emulated)
        if not (cosine >= EMULATION_COSINE and rel <= EMULATION_REL_L2):
            failures.append(f"{description}: against the emulation cosine {cosine:.6f} rel L2 {rel:.4f}")
        cosine, rel = _stats(out, exact)
        if rel > worst[1]:
            worst = (cosine, rel, description)
        if not (cosine >= MIN_COSINE and rel <= MAX_REL_L2):
            failures.append(f"{description}: against bf16 cosine {cosine:.6f} rel L2 {rel:.4f}")
        if _has_empty_rows(mask) and layout.text_len == 0 and mask.permutation is None:
            # rows of a query block with nothing kept and no text: zeros, as in bf16
            empty = (mask.kv_block_counts == 0).expand(q.shape[0], q.shape[2], -1)  # (B, H, n_q)
            rows = empty.repeat_interleave(mask.q_block_size, dim=-1)[..., :layout.video_len]  # (B, H, S)
            if not bool((out.transpose(1, 2)[rows] == 0).all()):
                failures.append(f"{description}: a row with no kept key is not zero")
    print(f"{precision} pv={pv} qk={qk}: {cases} cases in {time.time() - start:.1f} s, worst against bf16: "
          f"cosine {worst[0]:.6f} rel L2 {worst[1]:.4f} ({worst[2]})")
    assert not failures, "\n".join(failures[:20])


def test_auto_takes_triton_for_a_low_precision_and_never_picks_one_itself():
    _skip_unless("int8")
    q = torch.zeros(1, 1024, 2, 128, device="cuda", dtype=torch.bfloat16)
    mask = BlockMask.full(1024, 128, device="cuda")
    assert kernels.resolve_backend("auto", q, mask, "int8") == "triton"
    assert kernels.resolve_backend("auto", q, mask) in ("fa4", "triton")  # bf16 by default
    with pytest.raises(ValueError, match=r"takes head_dim \(64, 128\), got head_dim=32"):
        kernels.block_sparse_attention(q[..., :32], q[..., :32], q[..., :32], mask, precision="int8")


def test_fp8_is_refused_below_compute_capability_8_9():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q = torch.zeros(1, 256, 1, 64, device="cuda", dtype=torch.bfloat16)
    mask = BlockMask.full(256, 128, device="cuda")
    if torch.cuda.get_device_capability() >= (8, 9):
        out, _ = kernels.block_sparse_attention(q, q, q, mask, precision="fp8")
        assert torch.equal(out, torch.zeros_like(out))
    else:
        with pytest.raises(ValueError, match=r"FP8 tensor cores \(compute capability >= 8.9\)"):
            kernels.block_sparse_attention(q, q, q, mask, precision="fp8")
