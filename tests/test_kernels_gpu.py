"""GPU backends against the reference (`pytest -m gpu` on a CUDA machine; skipped elsewhere).

For each available GPU backend, >= 200 random cases through the public `sparse_attention`: shape, head_dim, dtype,
density, mask shared or per head or per batch, ragged tail, query blocks with nothing kept, token permutation, joint
text as prefix or suffix with and without padding. Error: max |out - reference| over the reference's max |out|, at
most 2e-2 in bf16 and 5e-3 in fp16 (the reference accumulates in fp32 on the same device).
"""

import math
import os
import time

import pytest
import torch

from dit_sparse import kernels
from dit_sparse.attention import sparse_attention
from dit_sparse.blockmask import BlockMask
from dit_sparse.layout import VideoLayout

pytestmark = pytest.mark.gpu

CASES = 200
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _skip_unless_available(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = kernels.unavailable_reason(backend, "cuda")
    if reason:
        pytest.skip(reason)


def _random_case(rng: torch.Generator, backend: str, index: int):
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    if backend == "fa4":
        head_dim = pick((64, 128))
        q_block = kv_block = 128
    else:
        head_dim = pick((32, 64, 64, 128, 128))
        q_block, kv_block = pick(((128, 128), (64, 64), (128, 64)))
    dtype = torch.float16 if index % 4 == 3 else torch.bfloat16
    batch, heads = pick((1, 1, 2)), pick((1, 2, 3, 4))
    frames, height = pick((1, 2, 3)), pick((4, 8, 16))
    width = int(torch.randint(3, 40, (1,), generator=rng))
    text = pick((None, None, "prefix", "suffix"))
    text_len = int(torch.randint(1, 300, (1,), generator=rng)) if text else 0
    # Extra tokens off the grid (a reference image, conditioning tokens) on the video's other side from the text.
    extra = pick((None, None, "suffix" if text == "prefix" else "prefix"))
    extra_len = int(torch.randint(1, 200, (1,), generator=rng)) if extra else 0
    layout = VideoLayout(frames, height, width, text_len, text, extra_len, extra)
    seq_len = layout.video_len
    mask_batch, mask_heads = pick(((1, 1), (1, heads), (batch, heads)))
    density = float(torch.rand(1, generator=rng)) * 0.9 + 0.05
    n_q, n_k = math.ceil(seq_len / q_block), math.ceil(seq_len / kv_block)
    block_dense = torch.rand(mask_batch, mask_heads, n_q, n_k, generator=rng) < density
    if index % 5 == 0:
        block_dense[..., int(torch.randint(n_q, (1,), generator=rng)), :] = False  # a query block keeps nothing
    permutation = layout.tile_permutation((1, 4, 8)) if index % 6 == 0 else None
    mask = BlockMask.from_block_dense(block_dense, seq_len, q_block, kv_block, permutation=permutation).to("cuda")
    padding = None
    if text and index % 2 == 0:
        padding = torch.rand(batch, text_len, generator=rng) < 0.6
        padding[:, 0] = True
        padding = padding.cuda()
    q, k, v = (torch.randn(batch, layout.seq_len, heads, head_dim, generator=rng).to("cuda", dtype) for _ in range(3))
    description = (f"B{batch} H{heads} D{head_dim} {dtype} S{seq_len} blocks({q_block},{kv_block}) "
                   f"mask({mask_batch},{mask_heads}) density {density:.2f} text {text}:{text_len} "
                   f"extra {extra}:{extra_len} padding {padding is not None} permuted {permutation is not None}")
    return q, k, v, mask, layout, padding, dtype, description


@pytest.mark.parametrize("backend", ["fa4", "triton"])
def test_gpu_backend_matches_reference_on_random_cases(backend, monkeypatch):
    _skip_unless_available(backend)
    monkeypatch.setenv("DIT_SPARSE_TRITON_AUTOTUNE", "0")  # one config per variant: compile time, not speed
    rng = torch.Generator().manual_seed(12 if backend == "fa4" else 13)
    worst, failures, start = (0.0, ""), [], time.time()
    for index in range(CASES):
        q, k, v, mask, layout, padding, dtype, description = _random_case(rng, backend, index)
        out = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=backend)
        expected = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend="reference")
        scale = expected.float().abs().max().clamp_min(1e-6)
        error = float(((out.float() - expected.float()).abs().max() / scale).nan_to_num(float("inf")))
        if error > worst[0]:
            worst = (error, description)
        if not error <= TOLERANCE[dtype]:
            failures.append(f"{description}: relative max error {error:.2e}")
    print(f"{backend}: {CASES} cases in {time.time() - start:.1f} s, worst {worst[0]:.2e} ({worst[1]})")
    assert not failures, "\n".join(failures[:20])


def test_auto_picks_fa4_on_sm90_when_installed(monkeypatch):
    _skip_unless_available("triton")
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    q = torch.zeros(1, 1024, 2, 128, device="cuda", dtype=torch.bfloat16)
    mask = BlockMask.full(1024, 128, device="cuda")
    capability = torch.cuda.get_device_capability()
    if capability[0] == 9 and kernels.unavailable_reason("fa4", "cuda") is None:
        assert kernels.resolve_backend("auto", q, mask) == "fa4"
        # head_dim FA4 does not take, or fp32: auto moves on to triton
        assert kernels.resolve_backend("auto", q[..., :32].contiguous(), mask) == "triton"
        assert kernels.resolve_backend("auto", q.float(), mask) == "triton"
        with pytest.raises(ValueError, match="head_dim"):
            kernels.resolve_backend("fa4", q[..., :32].contiguous(), mask)
        with pytest.raises(ValueError, match="q_block_size"):
            kernels.resolve_backend("fa4", q, BlockMask.full(1024, 32, device="cuda"))
    else:
        assert kernels.resolve_backend("auto", q, mask) == "triton"
        pytest.skip(f"FA4 unavailable here ({kernels.unavailable_reason('fa4', 'cuda')}); auto picked triton")


def test_triton_honours_strides_without_copies():
    _skip_unless_available("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2, 1000, 3, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g)  # packed (B, S, 3, H, D)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    mask = BlockMask.from_block_dense(torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5, 1000,
                                      128).to("cuda")
    out, lse = kernels.block_sparse_attention(q, k, v, mask, backend="triton")
    expected, expected_lse = kernels.block_sparse_attention(q, k, v, mask, backend="reference")
    assert float((out.float() - expected.float()).abs().max()) <= 2e-2 * float(expected.float().abs().max())
    finite = torch.isfinite(expected_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert float((lse - expected_lse)[finite].abs().max()) < 2e-2


def test_environment_override_reaches_the_kernel(monkeypatch):
    _skip_unless_available("triton")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    q = torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert kernels.resolve_backend("auto", q, BlockMask.full(256, 128, device="cuda")) == "triton"
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.resolve_backend("auto", q, BlockMask.full(256, 128, device="cuda")) == "reference"
    assert os.environ[kernels.ENV_VAR] == "reference"


@pytest.mark.parametrize(
    "options",
    [
        dict(window=(3, 9, 9), stride=(1, 2, 2), dilation=(1, 1, 2), exact=True),  # partial blocks, lattice steps
        dict(window=(5, 16, 24), exact=True),
        dict(window=(5, 16, 24), exact=False),  # STA: whole tiles
    ],
)
def test_neighborhood_windows_on_gpu_backends_match_the_reference(options, monkeypatch):
    # Wan-like frames (30 x 52 tokens: border tiles on both axes), joint text suffix with padding, bf16.
    _skip_unless_available("triton")
    monkeypatch.setenv("DIT_SPARSE_TRITON_AUTOTUNE", "0")
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    from dit_sparse.patterns.neighborhood import neighborhood

    layout = VideoLayout(5, 30, 52, text_len=40, text_position="suffix")
    mask = neighborhood(layout, tile=(1, 8, 16), **options).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    padding = torch.ones(1, 40, dtype=torch.bool, device="cuda")
    padding[:, 30:] = False
    expected = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend="reference")
    backends = ["triton"] + ([] if mask.has_token_boxes or kernels.unavailable_reason("fa4", "cuda") else ["fa4"])
    for backend in backends + ["auto"]:
        out = sparse_attention(q, k, v, mask, layout, text_padding_mask=padding, backend=backend)
        error = float((out.float() - expected.float()).abs().max() / expected.float().abs().max())
        assert error <= TOLERANCE[torch.bfloat16], (backend, error)
    if mask.has_token_boxes:
        assert kernels.resolve_backend("auto", q, mask) == "triton"  # FA4 takes whole blocks only
