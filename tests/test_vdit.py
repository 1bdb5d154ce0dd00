"""Sparse-vDiT (`dit_sparse.patterns.vdit`): each pattern's block mask against a brute-force definition, the search on
planted heads, the attention it runs against masked dense SDPA, `VditConfig`, and the input checks (`sparsify`,
profiles and `calibrate` with vdit: tests/test_dynamic_api.py)."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dit_sparse.kernels import reference
from dit_sparse.layout import VideoLayout
from dit_sparse.patterns import make_config
from dit_sparse.patterns.vdit import (
    DEFAULT_CANDIDATES,
    DEFAULT_PATTERN,
    HeadPattern,
    VditConfig,
    candidate_errors,
    choose_head_patterns,
    combine_errors,
    default_tile,
    pattern_costs,
    search_head_patterns,
    vdit_mask,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (layout, block_size, tile): whole tiles only, ragged borders on every axis, one frame, tiles two frames deep.
LAYOUTS = [
    (VideoLayout(2, 4, 8), 16, (1, 4, 4)),
    (VideoLayout(3, 5, 9), 16, (1, 4, 4)),
    (VideoLayout(1, 6, 7), 16, (1, 4, 4)),
    (VideoLayout(5, 3, 6), 16, (2, 2, 4)),
    (VideoLayout(4, 4, 4), 16, (2, 2, 4)),
]

PATTERNS = [
    HeadPattern.dense(),
    HeadPattern.diagonal((0, 0, 0)),
    HeadPattern.diagonal((0, 1, 1)),
    HeadPattern.diagonal((1, 0, 2)),
    HeadPattern.multi_diagonal((0, 0), frame_stride=1),
    HeadPattern.multi_diagonal((1, 0), frame_stride=2),
    HeadPattern.stripe((0,)),
]


# ---- brute-force definitions: loops over query and key token coordinates ---------------------------------------------


def _keeps(pattern: HeadPattern, layout: VideoLayout, tile, query, key) -> bool:
    """The pattern's rule for one (query, key) token pair, each (frame, row, column), from the definitions."""
    query_tile = [c // t for c, t in zip(query, tile)]
    key_tile = [c // t for c, t in zip(key, tile)]
    if pattern.kind == "dense":
        return True
    if pattern.kind == "diagonal":
        return all(abs(a - b) <= r for a, b, r in zip(query_tile, key_tile, pattern.radius))
    if pattern.kind == "multi_diagonal":
        spatial = all(abs(a - b) <= r for a, b, r in zip(query_tile[1:], key_tile[1:], pattern.spatial_radius))
        return spatial and abs(query_tile[0] - key_tile[0]) % pattern.frame_stride == 0
    # stripe: the key's tile spans frames [tile frame x tile depth, next tile's first frame) holding a key frame
    first = key_tile[0] * tile[0]
    return any(first <= frame < min(first + tile[0], layout.frames) for frame in pattern.key_frames)


def _token_rule(pattern, layout, tile) -> torch.Tensor:
    """Bool (S, S) in the natural order."""
    coords = list(itertools.product(range(layout.frames), range(layout.height), range(layout.width)))
    return torch.tensor([[_keeps(pattern, layout, tile, q, k) for k in coords] for q in coords])


def _block_expanded(rule: torch.Tensor, permutation, block: int) -> torch.Tensor:
    """A token rule with each block pair (blocks cut in the permuted order) kept whole when any pair in it is kept,
    back in the natural order."""
    seq_len = rule.shape[0]
    perm = torch.arange(seq_len) if permutation is None else permutation
    blocked = rule[perm][:, perm]
    out = torch.zeros_like(blocked)
    for qb in range(math.ceil(seq_len / block)):
        for kb in range(math.ceil(seq_len / block)):
            rows, cols = slice(qb * block, (qb + 1) * block), slice(kb * block, (kb + 1) * block)
            out[rows, cols] = bool(blocked[rows, cols].any())
    inverse = torch.argsort(perm)
    return out[inverse][:, inverse]


def _stripe_for(layout):
    return HeadPattern.stripe((0, layout.frames - 1)) if layout.frames > 2 else HeadPattern.stripe((0,))


@pytest.mark.parametrize("layout, block, tile", LAYOUTS)
def test_vdit_mask_matches_brute_force_definitions(layout, block, tile):
    patterns = PATTERNS + [_stripe_for(layout)]
    mask = vdit_mask(layout, patterns, block, tile)
    dense = mask.to_dense()  # (1, Hm, S, S)
    assert dense.shape == (1, len(patterns), layout.video_len, layout.video_len)
    whole_tiles = all(n % t == 0 for n, t in zip((layout.frames, layout.height, layout.width), tile))
    for head, pattern in enumerate(patterns):
        rule = _token_rule(pattern, layout, tile)
        assert torch.equal(dense[0, head], _block_expanded(rule, mask.permutation, block)), (head, pattern)
        if whole_tiles:  # a block is one tile: the block mask is the token rule itself
            assert torch.equal(dense[0, head], rule), (head, pattern)


def test_heads_sharing_a_pattern_share_one_mask_row():
    layout, block, tile = LAYOUTS[1]
    a, b = HeadPattern.diagonal((0, 1, 1)), HeadPattern.stripe((0,))
    mask = vdit_mask(layout, [a, b, a, b, a], block, tile)
    single = vdit_mask(layout, [a, b], block, tile).to_block_dense()[0]
    assert torch.equal(mask.to_block_dense()[0], single[[0, 1, 0, 1, 0]])


def test_default_tile_is_one_frame_of_rows_and_columns():
    assert default_tile(128) == (1, 8, 16) and default_tile(64) == (1, 8, 8) and default_tile(16) == (1, 4, 4)
    layout = VideoLayout(2, 8, 16)
    assert torch.equal(
        vdit_mask(layout, PATTERNS, 128).to_block_dense(), vdit_mask(layout, PATTERNS, 128, (1, 8, 16)).to_block_dense()
    )


def test_pattern_costs_are_the_measured_fa4_time_per_density():
    layout, block, tile = LAYOUTS[1]
    costs = pattern_costs(layout, PATTERNS, block, tile)
    mask = vdit_mask(layout, PATTERNS, block, tile)
    for head, pattern in enumerate(PATTERNS):
        density = mask.to_dense()[0, head].double().mean().item()  # whole blocks: visited = allowed pairs
        expected = 1.0 if pattern.kind == "dense" else 1.05 * density
        assert costs[head].item() == pytest.approx(expected)


# ---- the attention it runs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, block, tile", LAYOUTS[1:4])
def test_reference_attention_with_vdit_mask_equals_masked_sdpa(layout, block, tile):
    patterns = PATTERNS + [_stripe_for(layout)]
    mask = vdit_mask(layout, patterns, block, tile)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.video_len, len(patterns), 8, generator=generator) for _ in range(3))
    out, _ = reference.block_sparse_attention(q, k, v, mask, scale=8**-0.5)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.to_dense()[0]
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_candidate_errors_are_the_relative_error_of_the_kernel_output():
    layout, block, tile = LAYOUTS[1]
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, layout.video_len, 3, 8, generator=generator) for _ in range(3))
    errors = candidate_errors(q, k, v, layout, PATTERNS, block, tile, query_rows=None)  # (C, H)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    for c, pattern in enumerate(PATTERNS):
        out, _ = reference.block_sparse_attention(q, k, v, vdit_mask(layout, [pattern], block, tile), 8**-0.5)
        per_sample = (out - dense).norm(dim=(1, 3)) / dense.norm(dim=(1, 3))  # (B, H)
        torch.testing.assert_close(errors[c], per_sample.mean(0), atol=1e-5, rtol=1e-4)
    sampled = candidate_errors(q, k, v, layout, PATTERNS, block, tile, query_rows=40, seed=3)
    assert sampled.shape == errors.shape and bool((sampled[0] < 1e-5).all())  # dense: no error


# ---- the search ------------------------------------------------------------------------------------------------------


def _planted_heads(batch: int = 1, seed: int = 0):
    """Layout (4, 8, 8), block 16 = tile (1, 4, 4): head 0 attends within its own tile (diagonal), head 1 to the
    first frame from everywhere (stripe), head 2 uniformly to every key (diffuse)."""
    layout = VideoLayout(4, 8, 8)
    f, h, w = torch.meshgrid(torch.arange(4), torch.arange(8), torch.arange(8), indexing="ij")
    tile_id = (f * 4 + (h // 4) * 2 + w // 4).flatten()  # (S,) 16 tiles
    dim, strength = 32, 30.0 * math.sqrt(32)  # scores of 30 after the 1/sqrt(D) scale
    q = torch.zeros(batch, layout.video_len, 3, dim)
    k = torch.zeros_like(q)
    q[:, :, 0] = strength * F.one_hot(tile_id, dim).float()
    k[:, :, 0] = F.one_hot(tile_id, dim).float()
    q[:, :, 1, 20] = strength
    k[:, :, 1, 20] = (f.flatten() == 0).float()
    v = torch.randn(batch, layout.video_len, 3, dim, generator=torch.Generator().manual_seed(seed))
    return layout, q, k, v


def test_search_picks_diagonal_stripe_and_dense_on_planted_heads():
    layout, q, k, v = _planted_heads(batch=2)
    chosen = search_head_patterns(q, k, v, layout, 16, max_error=0.05)
    assert chosen == [HeadPattern.diagonal((0, 0, 0)), HeadPattern.stripe((0,)), HeadPattern.dense()]
    # over several samples: per-sample errors, their mean, then the choice
    samples = [_planted_heads(seed=s) for s in range(3)]
    errors = combine_errors([candidate_errors(q, k, v, layout, DEFAULT_CANDIDATES, 16) for layout, q, k, v in samples])
    costs = pattern_costs(layout, DEFAULT_CANDIDATES, 16)
    assert choose_head_patterns(errors, DEFAULT_CANDIDATES, costs) == chosen
    # the trade-off without a bound: the same at a small cost weight; the cheapest candidate everywhere at a large one
    assert search_head_patterns(q, k, v, layout, 16, max_error=None, cost_weight=0.1) == chosen
    traded = search_head_patterns(q, k, v, layout, 16, max_error=None, cost_weight=100.0)
    assert traded == [HeadPattern.diagonal((0, 0, 0))] * 3


def test_choose_takes_the_cheapest_within_the_bound_then_the_smaller_error():
    a, b, c = HeadPattern.diagonal((0, 0, 0)), HeadPattern.diagonal((0, 1, 1)), HeadPattern.stripe((0,))
    errors = torch.tensor([[0.01, 0.20, 0.04], [0.00, 0.03, 0.02], [0.02, 0.30, 0.03]])  # (C=3, H=3)
    costs = torch.tensor([0.1, 0.3, 0.1])
    assert choose_head_patterns(errors, [a, b, c], costs, max_error=0.05) == [a, b, c]
    # nothing within the bound: dense, however cheap the candidates
    assert choose_head_patterns(errors + 1, [a, b, c], costs, max_error=0.05) == [HeadPattern.dense()] * 3
    # no bound: error + weight x cost
    assert choose_head_patterns(errors, [a, b, c], costs, max_error=None, cost_weight=0.1) == [a, b, c]
    dense = HeadPattern.dense()  # at weight 0 only the error counts: dense (0) wins unless a candidate also has 0
    assert choose_head_patterns(errors, [a, b, c], costs, max_error=None, cost_weight=0.0) == [b, dense, dense]


# ---- bad inputs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: HeadPattern("blocky"), "kind must be one of"),
        (lambda: HeadPattern("diagonal"), "needs radius"),
        (lambda: HeadPattern("dense", radius=(0, 0, 0)), "takes only ()"),
        (lambda: HeadPattern.diagonal((0, 1)), "radius must be 3 ints >= 0, got (0, 1)"),
        (lambda: HeadPattern.diagonal((0, True, 1)), "radius must be 3 ints"),
        (lambda: HeadPattern.multi_diagonal((1, 1), frame_stride=0), "frame_stride must be an int >= 1, got 0"),
        (lambda: HeadPattern.multi_diagonal((1, -1)), "spatial_radius must be 2 ints >= 0"),
        (lambda: HeadPattern.stripe(()), "key_frames must be a non-empty"),
        (lambda: HeadPattern.stripe((0, 0)), "key_frames must be distinct"),
        (lambda: HeadPattern.stripe(0), "key_frames must be a non-empty sequence of ints >= 0, got 0"),
        (lambda: HeadPattern.from_dict([("kind", "dense")]), "must be a dict"),
        (lambda: default_tile(100), "block_size must be a power of two >= 16, got 100"),
    ],
)
def test_bad_head_patterns_raise_naming_the_value(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


def test_bad_mask_inputs_raise_naming_the_value():
    layout = VideoLayout(2, 4, 8)
    with pytest.raises(ValueError, match="non-empty sequence of HeadPattern"):
        vdit_mask(layout, [], 16)
    with pytest.raises(ValueError, match="non-empty sequence of HeadPattern"):
        vdit_mask(layout, HeadPattern.dense(), 16)
    with pytest.raises(ValueError, match=r"patterns\[1\] must be a HeadPattern, got dict"):
        vdit_mask(layout, [HeadPattern.dense(), {"kind": "dense"}], 16)
    with pytest.raises(ValueError, match=r"patterns\[0\] keeps key frames \(0, 2\), but the layout has 2 frames"):
        vdit_mask(layout, [HeadPattern.stripe((0, 2))], 16)
    with pytest.raises(ValueError, match="block_size must be a power of two >= 16, got 24"):
        vdit_mask(layout, PATTERNS, 24)
    with pytest.raises(ValueError, match=r"tile \(1, 4, 8\) holds 32 tokens; it must hold block_size=16"):
        vdit_mask(layout, PATTERNS, 16, (1, 4, 8))
    with pytest.raises(ValueError, match="layout must be a VideoLayout"):
        vdit_mask((2, 4, 8), PATTERNS, 16)


def test_bad_search_inputs_raise_naming_the_value():
    layout, q, k, v = _planted_heads()
    with pytest.raises(ValueError, match="q has S=255 tokens, but the layout has 256"):
        search_head_patterns(q[:, 1:], k[:, 1:], v[:, 1:], layout, 16)
    with pytest.raises(ValueError, match=r"k must be a \(B, S, H, D\) tensor"):
        candidate_errors(q, k[0], v, layout, PATTERNS, 16)
    with pytest.raises(ValueError, match="q, k, v must share"):
        candidate_errors(q, k[:, :, :2], v, layout, PATTERNS, 16)
    with pytest.raises(ValueError, match="candidates must be a non-empty sequence of HeadPattern"):
        search_head_patterns(q, k, v, layout, 16, candidates=[])
    with pytest.raises(ValueError, match=r"candidates\[0\] must be a HeadPattern, got str"):
        search_head_patterns(q, k, v, layout, 16, candidates=["dense"])
    with pytest.raises(ValueError, match="query_rows must be an int >= 1 or None, got 0"):
        candidate_errors(q, k, v, layout, PATTERNS, 16, query_rows=0)
    errors, costs = torch.zeros(len(PATTERNS), 3), torch.ones(len(PATTERNS))
    with pytest.raises(ValueError, match="max_error must be a number >= 0 or None, got -0.1"):
        choose_head_patterns(errors, PATTERNS, costs, max_error=-0.1)
    with pytest.raises(ValueError, match="cost_weight must be a number >= 0, got 'high'"):
        choose_head_patterns(errors, PATTERNS, costs, cost_weight="high")
    with pytest.raises(ValueError, match=r"errors must be a \(C=7, H\) tensor, got torch.Size\(\[6, 3\]\)"):
        choose_head_patterns(errors[1:], PATTERNS, costs)
    with pytest.raises(ValueError, match=r"costs must be a \(7,\) tensor"):
        choose_head_patterns(errors, PATTERNS, costs[1:])
    with pytest.raises(ValueError, match="errors must be a non-empty sequence"):
        combine_errors([])
    with pytest.raises(ValueError, match="of one shape"):
        combine_errors([errors, errors[1:]])


def test_vdit_config_takes_one_pattern_or_per_layer_patterns_and_round_trips_its_options():
    default = VditConfig()
    assert default.pattern == DEFAULT_PATTERN and default.layer_pattern is None and default.block_tile == (1, 8, 16)
    assert default.head_patterns(5) == (DEFAULT_PATTERN,)  # one mask row all heads share
    config = VditConfig(block_size=16, pattern={"kind": "stripe", "key_frames": [0]},
                        layer_pattern=[[{"kind": "dense"}, HeadPattern.stripe((0,))], PATTERNS[1:3]])
    assert config.pattern == HeadPattern.stripe((0,)) and config.method == "vdit" and config.block_tile == (1, 4, 4)
    assert config.layer_pattern == ((HeadPattern.dense(), HeadPattern.stripe((0,))), tuple(PATTERNS[1:3]))
    assert config.head_patterns(1) == tuple(PATTERNS[1:3])
    options = config.options()
    assert json.loads(json.dumps(options)) == options and options["tile"] == [1, 4, 4]
    assert options["layer_pattern"][0] == [{"kind": "dense"}, {"kind": "stripe", "key_frames": [0]}]
    rebuilt = make_config("vdit", **options)
    assert (rebuilt.pattern, rebuilt.layer_pattern, rebuilt.block_tile) == (
        config.pattern, config.layer_pattern, config.block_tile)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(pattern={"kind": "blocky"}), "VditConfig.pattern: head pattern kind must be one of"),
        (dict(pattern="dense"), "VditConfig.pattern: a head pattern must be a dict"),
        (dict(layer_pattern=[[{"kind": "blocky"}]]), "VditConfig.layer_pattern: layer 0 head 0: head pattern kind"),
        (dict(layer_pattern=[[{"kind": "dense"}] * 2, [{"kind": "dense"}]]), "layer 1 has 1 heads, layer 0 has 2"),
        (dict(layer_pattern=[]), "VditConfig.layer_pattern: layers must be a non-empty list"),
        (dict(tile=(1, 8, 8)), r"VditConfig.tile \(1, 8, 8\) holds 64 tokens"),
        (dict(block_size=8), "VditConfig.block_size must be a power of two >= 16, got 8"),
    ],
)
def test_bad_vdit_config_raises_naming_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        VditConfig(**options)


def test_a_layer_the_per_layer_patterns_do_not_cover_raises():
    config = VditConfig(layer_pattern=[PATTERNS[:2]])
    with pytest.raises(ValueError, match="layer_pattern covers 1 layers; layer 1 has none"):
        config.head_patterns(1)
    with pytest.raises(ValueError, match="layer None has none"):
        config.head_patterns(None)
