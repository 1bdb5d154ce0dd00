"""torch.compile on a sparsified transformer: one graph through attention (the sparse call is the custom op
`dit_sparse::attention`), the eager result, guards that follow sparsify / unsparsify, regional compilation that
compiles one block for all."""

import contextlib

import pytest
import torch
from diffusers import WanTransformer3DModel

import dit_sparse
import dit_sparse.hooks

# 4 latent frames of 4 x 4 tokens: 64 video tokens, 4 blocks of 16.
LATENTS, TEXT = (1, 16, 4, 8, 8), (1, 8, 32)
TIMESTEPS = (900.0, 900.0, 600.0, 600.0)  # two steps of CFG pairs: the first step dense (dense_steps=1)
SPARSE = dict(density=0.5, block_size=16)


def _wan(num_layers: int, seed: int, timesteps=TIMESTEPS):
    """A tiny random WanTransformer3DModel and its inputs, one per timestep (latents, timestep, text)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers, rope_max_seq_len=32,
        )
        inputs = [(torch.randn(LATENTS), torch.tensor([t]), torch.randn(TEXT)) for t in timesteps]
    return model.eval(), inputs


@pytest.fixture(scope="module")
def transformer():
    return _wan(num_layers=2, seed=0)


def _uncompile(model) -> None:
    """Undo `compile_repeated_blocks` / `Module.compile` on every module of `model`."""
    for module in model.modules():
        module._compiled_call_impl = None


@contextlib.contextmanager
def _sparsified(model, method, **options):
    """`model` sparsified; on exit unsparsified, with any regional compilation of its blocks undone."""
    dit_sparse.sparsify(model, method, **options)
    try:
        yield model
    finally:
        dit_sparse.unsparsify(model)
        _uncompile(model)


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
    assert dense_step.count("dit_sparse.attention") == 0
    assert sparse_step.count("dit_sparse.attention") == 2
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


def _sites(model) -> list:
    return [module._dit_sparse_site for module in model.modules() if "_dit_sparse_site" in module.__dict__]


def test_the_custom_op_passes_torch_library_checks(transformer):
    # The op's body runs the site's call against the published plan: publish a sparse step's plan, then check the
    # op (schema, fake, strides) on q, k, v of that layout; a tensor that is no live site's token is an error.
    model, inputs = transformer
    dit_sparse.sparsify(model, "random", **SPARSE)
    try:
        session = dit_sparse.hooks.session_of(model)
        site = _sites(model)[1]
        layout = dit_sparse.VideoLayout(4, 4, 4)
        session.active = session.plan_for(layout, torch.device("cpu"), 1, model._diffusers_hook.get_hook(
            dit_sparse.hooks.TRANSFORMER_HOOK).adapter)
        q, k, v = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(3))
        args = (q, k, v, site.token, None, None)
        torch.library.opcheck(torch.ops.dit_sparse.attention.default, args)
        out = torch.ops.dit_sparse.attention(*args)
        expected = dit_sparse.sparse_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), session.active.mask, layout
        ).transpose(1, 2)
        torch.testing.assert_close(out, expected)
        assert out.transpose(1, 2).is_contiguous()  # the layout the fake promises
        for not_a_site in (torch.empty(0), torch.tensor([-1])):
            with pytest.raises(RuntimeError, match="no hooked attention module's site token"):
                torch.ops.dit_sparse.attention(q, k, v, not_a_site, None, None)
    finally:
        session.active = None
        dit_sparse.unsparsify(model)


def test_regional_compilation_compiles_one_block_for_all(fresh_dynamo):
    # compile_repeated_blocks compiles each block's forward on its own: the blocks of a sparsified model must trace
    # to one graph (no layer index or per-module object in traced code), sparse and dense layers alike (dense_layers
    # is decided in the op's body), and match eager mode.
    model, inputs = _wan(num_layers=4, seed=1)
    recorder = _GraphRecorder()
    with _sparsified(model, "random", dense_steps=1, dense_layers=1, **SPARSE):
        eager = _run(model, inputs)
        eager_stats = dit_sparse.sparsity_stats(model, reset=True)
        model.compile_repeated_blocks(backend=recorder, fullgraph=True)
        compiled = _run(model, inputs)
        compiled_stats = dit_sparse.sparsity_stats(model)
    assert len(recorder.graphs) == 2  # one block graph per phase (the dense first step, the sparse steps)
    assert [recorder.targets(g).count("dit_sparse.attention") for g in recorder.graphs] == [0, 1]
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert compiled_stats == eager_stats
    assert not torch.allclose(eager[2], _run(model, inputs[2:3])[0], atol=1e-3)  # the sparse steps were sparse


def test_switching_methods_reuses_the_compiled_blocks(fresh_dynamo):
    # Sparsify with another method, or again after unsparsify (as the app and the CLI do per video): the mask is taken
    # in the op's body, so the one compiled block graph serves every method, each with its own mask.
    model, inputs = _wan(num_layers=3, seed=3)
    runs = [("random", SPARSE), ("radial", dict(block_size=16)), ("random", SPARSE)]
    eager = []
    for method, options in runs:
        with _sparsified(model, method, dense_steps=0, **options):
            eager.append(_run(model, inputs[2:3])[0])
    assert not torch.allclose(eager[0], eager[1], atol=1e-3)  # the two methods' masks differ
    recorder = _GraphRecorder()
    model.compile_repeated_blocks(backend=recorder, fullgraph=True)
    try:
        for (method, options), expected in zip(runs, eager):
            dit_sparse.sparsify(model, method, dense_steps=0, **options)
            try:
                torch.testing.assert_close(_run(model, inputs[2:3])[0], expected, atol=1e-6, rtol=1e-6)
            finally:
                dit_sparse.unsparsify(model)
    finally:
        _uncompile(model)
    assert len(recorder.graphs) == 1


def test_regional_compilation_with_inductor_finds_each_layer(fresh_dynamo):
    # Inductor's compiled block hands the op each block's own token, so a per-layer pattern (vdit: each layer its own
    # mask, built once in eager mode and looked up by layer) gets the right mask under one compiled block; a token
    # mixed up between blocks would give the other layer's mask and another output.
    model, inputs = _wan(num_layers=2, seed=2, timesteps=(600.0, 600.0))
    with _sparsified(model, "vdit", block_size=16, layer_pattern=VDIT_LAYERS, dense_steps=0):
        eager = _run(model, inputs)
        model.compile_repeated_blocks(fullgraph=True)
        compiled = _run(model, inputs)
        assert dit_sparse.hooks.session_of(model).mask_builds == 2  # one per layer, none built again
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_module_with_its_own_forward_hook_is_intercepted_through_the_hook_chain(transformer):
    # A self-attention module that already carries a HookRegistry hook keeps it: dit-sparse joins the chain (a class
    # swap would be bypassed by the instance-level forward), and unsparsify leaves the other hook as it was.
    from diffusers.hooks import HookRegistry, ModelHook

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    model, inputs = transformer
    dit_sparse.sparsify(model, "random", **SPARSE)
    expected = _run(model, inputs[2:3])[0]
    dit_sparse.unsparsify(model)
    dense = _run(model, inputs[2:3])[0]
    attn = model.blocks[0].attn1
    HookRegistry.check_if_exists_or_initialize(attn).register_hook(Counting(), "counting")
    try:
        dit_sparse.sparsify(model, "random", **SPARSE)
        assert type(attn) is type(model.blocks[1].attn1).__base__  # not swapped; its sibling is
        torch.testing.assert_close(_run(model, inputs[2:3])[0], expected, atol=0, rtol=0)
        assert Counting.calls == 1
        dit_sparse.unsparsify(model)
        assert list(attn._diffusers_hook.hooks) == ["counting"]
        assert torch.equal(_run(model, inputs[2:3])[0], dense)
    finally:
        dit_sparse.unsparsify(model)
        attn._diffusers_hook.remove_hook("counting")


# vdit: per layer and head a diagonal band of +-1 frame, a first-frame stripe, dense, a single tile (1 tile a frame)
VDIT_LAYERS = [[{"kind": "diagonal", "radius": [1, 0, 0]}, {"kind": "stripe", "key_frames": [0]}],
               [{"kind": "dense"}, {"kind": "diagonal", "radius": [0, 0, 0]}]]


@pytest.mark.parametrize("method, options", [
    ("reorder", dict(strategy="cluster", density=0.5, block_size=16, refresh=2)),
    ("vdit", dict(block_size=16, layer_pattern=VDIT_LAYERS)),
])
def test_masks_taken_in_the_call_compile_with_the_build_run_eagerly(transformer, fresh_dynamo, method, options):
    # A dynamic estimate (k-means, per-head orders) or a per-layer mask (vdit, built once per layer) is taken in the
    # op's body, eagerly; the graph runs through it.
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
    # The mask is taken in the op's body (estimated or built per layer on the host): no graph break at attention.
    assert len(recorder.graphs) == 1 and recorder.targets(recorder.graphs[0]).count("dit_sparse.attention") == 2
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert compiled_stats == eager_stats
    assert method != "vdit" or eager_stats["mask_builds"] == 2  # one per layer over all four calls


class _NoSDPAProcessor:
    """A processor that never calls scaled_dot_product_attention (as a non-torch attention backend would not)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **_):
        return attn.to_out[0](hidden_states)


class _CausalProcessor:
    """A processor whose attention call is causal: not the self-attention sparse attention serves."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **_):
        q = hidden_states.unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B, H, S, D)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return attn.to_out[0](out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("processor, error, message", [
    (_NoSDPAProcessor(), RuntimeError, r"blocks\.1\.attn1: no scaled_dot_product_attention call was seen"),
    (_CausalProcessor(), NotImplementedError, r"blocks\.1\.attn1: sparse attention supports self-attention only.*"
                                              r"is_causal=True"),
])
def test_an_attention_call_sparse_attention_cannot_serve_is_a_clear_error_naming_the_module(
    transformer, processor, error, message
):
    model, inputs = transformer
    attention = model.blocks[1].attn1
    original = attention.processor
    dit_sparse.sparsify(model, "random", dense_steps=0, **SPARSE)
    attention.set_processor(processor)  # after sparsify, as a backend switched later would be
    try:
        with pytest.raises(error, match=message):
            _run(model, inputs[2:3])
    finally:
        attention.set_processor(original)
        dit_sparse.unsparsify(model)
