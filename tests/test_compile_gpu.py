"""Regional compilation of a sparsified transformer on a CUDA GPU, through the GPU kernels (`pytest -m gpu`; skipped
elsewhere): the blocks trace to one graph on the device's torch (the site token a graph input, not a per-block
constant), and inductor's compiled blocks give eager mode's output with FA4 (where installed) and our Triton kernel.
"""

import pytest
import torch
from diffusers import WanTransformer3DModel

from test_compile import _GraphRecorder, _uncompile
from test_kernels_gpu import _skip_unless_available

import dit_sparse

pytestmark = pytest.mark.gpu

# 5 latent frames of 16 x 16 tokens: 1,280 video tokens, 10 blocks of 128; head_dim 128 (FA4 takes 64 and 128).
LATENTS, TEXT = (1, 16, 5, 32, 32), (1, 8, 64)


def _wan():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=32, ffn_dim=256, num_layers=4, rope_max_seq_len=64,
    )
    with torch.no_grad():  # sharper attention and a larger share of the residual: sparse differs from dense by
        for block in model.blocks:  # ~16% of the output, far above bf16's ~1%
            block.attn1.to_q.weight.mul_(4)
            block.attn1.to_k.weight.mul_(4)
            block.attn1.to_out[0].weight.mul_(20)
    inputs = (torch.randn(LATENTS), torch.tensor([600.0]), torch.randn(TEXT))
    return model.eval().to("cuda", torch.bfloat16), tuple(x.to("cuda", torch.bfloat16) for x in inputs)


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


@pytest.mark.parametrize("backend", ["fa4", "triton"])
def test_regional_compilation_on_gpu_is_one_block_graph_and_matches_eager(backend):
    _skip_unless_available(backend)
    torch._dynamo.reset()
    model, inputs = _wan()
    recorder = _GraphRecorder()
    dit_sparse.sparsify(model, "random", density=0.25, dense_steps=0, backend=backend)
    try:
        eager = _run(model, inputs)
        model.compile_repeated_blocks(backend=recorder, fullgraph=True)
        _run(model, inputs)
        assert len(recorder.graphs) == 1  # 4 blocks, one graph
        _uncompile(model)
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True)  # inductor
        compiled = _run(model, inputs)
    finally:
        dit_sparse.unsparsify(model)
        _uncompile(model)
        torch._dynamo.reset()
    scale = float(eager.float().abs().max())
    assert float((compiled.float() - eager.float()).abs().max()) <= 2e-2 * scale
    assert not torch.allclose(eager, _run(model, inputs), atol=1e-2 * scale)  # it was sparse
