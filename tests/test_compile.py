"""torch.compile on a sparsified transformer: one graph through attention (the sparse call is the custom op
`dit_sparse::sparse_attention`), the eager result, guards that follow sparsify / unsparsify."""

import pytest
import torch
from diffusers import WanTransformer3DModel

import dit_sparse
import dit_sparse.hooks

# 4 latent frames of 4 x 4 tokens: 64 video tokens, 4 blocks of 16.
LATENTS, TEXT = (1, 16, 4, 8, 8), (1, 8, 32)
TIMESTEPS = (900.0, 900.0, 600.0, 600.0)  # two steps of CFG pairs: the first step dense (dense_steps=1)
SPARSE = dict(density=0.5, block_size=16)


@pytest.fixture(scope="module")
def transformer():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
        )
        inputs = [(torch.randn(LATENTS), torch.tensor([t]), torch.randn(TEXT)) for t in TIMESTEPS]
    return model.eval(), inputs


def _run(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(*args, return_dict=False)[0] for args in inputs]


class _GraphRecorder:
    """A torch.compile backend that keeps each FX graph dynamo hands over and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward

    def targets(self, graph_module) -> list[str]:
        return [str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_graph_runs_through_sparse_attention_without_a_break(transformer, fresh_dynamo):
    model, inputs = transformer
    recorder = _GraphRecorder()
    dit_sparse.sparsify(model, "random", dense_steps=1, **SPARSE)
    try:
        eager = _run(model, inputs)
        eager_stats = dit_sparse.sparsity_stats(model, reset=True)
        compiled = _run(torch.compile(model, backend=recorder), inputs)
        compiled_stats = dit_sparse.sparsity_stats(model)
    finally:
        dit_sparse.unsparsify(model)
    # One graph per phase (the dense step, then the sparse ones), each the whole transformer: its two
    # self-attentions are the op (or SDPA in the dense step) next to the cross-attentions' SDPA.
    assert len(recorder.graphs) == 2
    dense_step, sparse_step = (recorder.targets(graph) for graph in recorder.graphs)
    assert dense_step.count("dit_sparse.sparse_attention") == 0
    assert sparse_step.count("dit_sparse.sparse_attention") == 2
    assert "<built-in function scaled_dot_product_attention>" in sparse_step  # cross-attention, untouched
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert compiled_stats == eager_stats  # the plan, steps and statistics still run on the host, every call


def test_inductor_output_matches_eager(transformer, fresh_dynamo):
    model, inputs = transformer
    dit_sparse.sparsify(model, "random", **SPARSE)
    try:
        eager = _run(model, inputs[2:])
        compiled = _run(torch.compile(model), inputs[2:])
    finally:
        dit_sparse.unsparsify(model)
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(eager[0], _run(model, inputs[2:3])[0], atol=1e-3)  # it was sparse


def test_guards_follow_unsparsify_and_sparsify_of_the_compiled_module(transformer, fresh_dynamo):
    model, inputs = transformer
    never_wrapped = _run(model, inputs[2:3])
    compiled = torch.compile(model, backend=_GraphRecorder())
    dit_sparse.sparsify(compiled, "random", **SPARSE)  # the compiled wrapper stands for the module it wraps
    sparse = _run(compiled, inputs[2:3])
    dit_sparse.unsparsify(compiled)
    assert all("forward" not in module.__dict__ for module in model.modules())
    assert torch.equal(_run(compiled, inputs[2:3])[0], never_wrapped[0])
    dit_sparse.sparsify(model, "random", **SPARSE)
    try:
        assert torch.equal(_run(compiled, inputs[2:3])[0], sparse[0])
    finally:
        dit_sparse.unsparsify(model)
    assert not torch.equal(sparse[0], never_wrapped[0])


def test_the_custom_op_passes_torch_library_checks():
    layout = dit_sparse.VideoLayout(2, 4, 4, text_len=5, text_position="prefix")
    mask = dit_sparse.patterns.random_blocks(layout, density=0.5, block_size=16)
    q, k, v = (torch.randn(2, layout.seq_len, 2, 16) for _ in range(3))
    text_padding_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    args = (
        q, k, v, mask.kv_block_indices, mask.kv_block_counts, None, None, None, None, None, None, text_padding_mask,
        mask.seq_len, mask.q_block_size, mask.kv_block_size, 2, 4, 4, 5, "prefix", None, "reference",
    )
    torch.library.opcheck(torch.ops.dit_sparse.sparse_attention.default, args)
    expected = dit_sparse.sparse_attention(q, k, v, mask, layout, text_padding_mask=text_padding_mask)
    torch.testing.assert_close(torch.ops.dit_sparse.sparse_attention(*args), expected)


def test_the_custom_op_keeps_in_block_masking_when_it_rebuilds_the_mask():
    # Copies of the index tensors carry no link to the session's BlockMask, so the op rebuilds it from its tensors:
    # the token-level window (partial blocks) must survive that, not widen to whole blocks.
    layout = dit_sparse.VideoLayout(3, 8, 8)
    mask = dit_sparse.patterns.neighborhood(layout, window=(3, 3, 5), tile=(1, 4, 4), exact=True)
    assert mask.has_token_boxes
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16) for _ in range(3))
    boxes = mask.token_boxes
    out = torch.ops.dit_sparse.sparse_attention(
        q, k, v, mask.kv_block_indices.clone(), mask.kv_block_counts.clone(), mask.permutation,
        mask.kv_block_partial, boxes.query_lo, boxes.query_hi, boxes.key_coords, list(boxes.step), None,
        mask.seq_len, mask.q_block_size, mask.kv_block_size, 3, 8, 8, 0, None, None, "reference",
    )
    expected = dit_sparse.sparse_attention(q, k, v, mask, layout, backend="reference")
    torch.testing.assert_close(out, expected)
    whole_blocks = dit_sparse.BlockMask(
        mask.kv_block_indices, mask.kv_block_counts, mask.seq_len, mask.q_block_size, mask.kv_block_size,
        mask.permutation,
    )
    assert not torch.allclose(out, dit_sparse.sparse_attention(q, k, v, whole_blocks, layout, backend="reference"))


# vdit: per layer and head a diagonal band of +-1 frame, a first-frame stripe, dense, a single tile (1 tile a frame)
VDIT_LAYERS = [[{"kind": "diagonal", "radius": [1, 0, 0]}, {"kind": "stripe", "key_frames": [0]}],
               [{"kind": "dense"}, {"kind": "diagonal", "radius": [0, 0, 0]}]]


@pytest.mark.parametrize("method, options", [
    ("reorder", dict(strategy="cluster", density=0.5, block_size=16, refresh=2)),
    ("vdit", dict(block_size=16, layer_pattern=VDIT_LAYERS)),
])
def test_masks_taken_in_the_call_compile_with_the_build_run_eagerly(transformer, fresh_dynamo, method, options):
    # A dynamic estimate (k-means, per-head orders) or a per-layer mask (vdit, built once per layer) is taken in a
    # function dynamo skips; the attention is still the op.
    model, inputs = transformer
    recorder = _GraphRecorder()
    dit_sparse.sparsify(model, method, **options)
    try:
        eager = _run(model, inputs)
        eager_stats = dit_sparse.sparsity_stats(model, reset=True)
        session = dit_sparse.hooks.session_of(model)
        session.dynamic_masks.clear()  # the compiled run builds afresh, as eager did
        session.masks.clear()
        compiled = _run(torch.compile(model, backend=recorder), inputs)
        compiled_stats = dit_sparse.sparsity_stats(model)
    finally:
        dit_sparse.unsparsify(model)
    assert any("dit_sparse.sparse_attention" in recorder.targets(g) for g in recorder.graphs)
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert compiled_stats == eager_stats
    assert method != "vdit" or eager_stats["mask_builds"] == 2  # one per layer over all four calls
