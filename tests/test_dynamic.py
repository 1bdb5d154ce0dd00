"""Dynamic patterns (draft, reorder axes / cluster) on synthetic q, k with a planted block structure, per-head token
orders inverted exactly, the estimation helpers, and the configs' bad input."""

import math

import pytest
import torch
from test_attention import _sdpa

from dit_sparse import BlockMask, VideoLayout, make_config, sparse_attention
from dit_sparse.kernels import fa4
from dit_sparse.patterns import draft, reorder_axes, reorder_cluster
from dit_sparse.patterns.draft import tile_order
from dit_sparse.patterns.estimate import density_for_recall, select_blocks
from dit_sparse.patterns.reorder import axes_calibration, axis_order, kmeans

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT = VideoLayout(4, 8, 16)  # 512 video tokens
GROUP = 32  # tokens per planted group = one kernel block
TARGETS = 3  # key groups each query group attends to: planted density 3 / 16


def _planted(group_of: torch.Tensor, heads: int = 2, dim: int = 32, seed: int = 0):
    """q, k (1, H, S, D) where each query group attends (almost only) to TARGETS key groups, and the token-level
    bool (H, S, S) of those planted pairs. Group g's targets are g + offsets (mod n), distinct per group."""
    g = torch.Generator().manual_seed(seed)
    n = int(group_of.max()) + 1
    centers = torch.nn.functional.normalize(torch.randn(heads, n, dim, generator=g), dim=-1)  # (H, n, D)
    offsets = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(n - 1, generator=g)[:2]])
                           for _ in range(heads)])  # (H, TARGETS)
    targets = (torch.arange(n)[None, :, None] + offsets[:, None, :]) % n  # (H, n, TARGETS)
    query_centers = centers.gather(1, targets.view(heads, -1, 1).expand(-1, -1, dim)).view(heads, n, TARGETS, dim)
    q = 10.0 * query_centers.sum(2)[:, group_of] + 0.3 * torch.randn(heads, group_of.numel(), dim, generator=g)
    k = math.sqrt(dim) * centers[:, group_of] + 0.3 * torch.randn(heads, group_of.numel(), dim, generator=g)
    planted_groups = torch.zeros(heads, n, n, dtype=torch.bool).scatter_(2, targets, True)
    return q[None], k[None], planted_groups[:, group_of][:, :, group_of]


def _recovered(q, k, planted, mask: BlockMask) -> float:
    """Share of the planted attention mass (exact softmax weights on planted pairs) that the mask keeps."""
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)[0]  # (H, S, S)
    kept = mask.to_dense()[0].expand_as(weights)
    return float((weights * planted * kept).sum() / (weights * planted).sum())


def test_draft_recovers_planted_tiles_hidden_by_the_raster_order():
    # Planted groups are the 3D tiles (1, 4, 8): in the raster (natural) token order each is scattered.
    tile = (1, 4, 8)
    group_of = torch.empty(LAYOUT.video_len, dtype=torch.long)
    group_of[tile_order(LAYOUT, tile)] = torch.arange(LAYOUT.video_len) // GROUP
    q, k, planted = _planted(group_of)
    mask = draft(LAYOUT, q, k, density=TARGETS / 16, tile=tile)
    assert mask.density == pytest.approx(TARGETS / 16)
    assert _recovered(q, k, planted, mask) >= 0.95


def test_reorder_cluster_recovers_planted_groups_hidden_by_a_random_permutation():
    group_of = torch.randperm(LAYOUT.video_len, generator=torch.Generator().manual_seed(1)) // GROUP
    q, k, planted = _planted(group_of, seed=1)
    mask, state = reorder_cluster(LAYOUT, q, k, density=TARGETS / 16, block_size=GROUP)
    assert mask.per_head_order and mask.kv_permutation is not None
    assert mask.density == pytest.approx(TARGETS / 16)
    assert _recovered(q, k, planted, mask) >= 0.95
    # A refresh warm-starts from the centroids (SVG2): the same clusters come back.
    again, _ = reorder_cluster(LAYOUT, q, k, density=TARGETS / 16, block_size=GROUP, state=state, kmeans_iters=1)
    assert torch.equal(again.to_dense(), mask.to_dense())
    # The draft's fixed tiles cannot see groups scattered at random: what the reordering is for.
    assert _recovered(q, k, planted, draft(LAYOUT, q, k, density=TARGETS / 16, tile=(1, 4, 8))) < 0.5


def test_reorder_axes_recovers_a_head_whose_pattern_runs_across_frames_and_calibration_picks_its_order():
    # Groups are runs of 32 tokens of the "hwf" order (8 positions x 4 frames): scattered in the natural order.
    group_of = torch.empty(LAYOUT.video_len, dtype=torch.long)
    group_of[axis_order(LAYOUT, "hwf")] = torch.arange(LAYOUT.video_len) // GROUP
    q, k, planted = _planted(group_of, seed=2)
    mask = reorder_axes(LAYOUT, q, k, axes=["hwf", "hwf"], density=TARGETS / 16, block_size=GROUP)
    assert _recovered(q, k, planted, mask) >= 0.95
    natural = reorder_axes(LAYOUT, q, k, axes="fhw", density=TARGETS / 16, block_size=GROUP)
    assert _recovered(q, k, planted, natural) < 0.8
    entries = axes_calibration(LAYOUT, q, k, block_size=GROUP, density=TARGETS / 16, target_recall=0.95)
    for entry in entries:
        assert max(entry["concentration"], key=entry["concentration"].get) == "hwf"
        assert entry["density"]["hwf"] == pytest.approx(TARGETS / 16)
    # Heads with different orders: one (1, H, S) per-head permutation.
    mixed = reorder_axes(LAYOUT, q, k, axes=["hwf", "fhw"], density=0.25, block_size=GROUP)
    assert mixed.permutation.shape == (1, 2, LAYOUT.video_len)


@pytest.mark.parametrize("text_len", [0, 7])
def test_per_head_token_orders_are_exactly_inverted(text_len):
    # Per (batch, head) query orders and separate key orders: the output equals dense attention under the
    # equivalent boolean mask in the natural order (the un-permuted reference), joint text included.
    g = torch.Generator().manual_seed(3)
    batch, heads, seq_len, block = 2, 3, 100, 16
    layout = VideoLayout(1, 10, 10, text_len, "suffix" if text_len else None)
    n = math.ceil(seq_len / block)
    block_dense = torch.rand(batch, heads, n, n, generator=g) < 0.4
    q_perm = torch.stack([torch.stack([torch.randperm(seq_len, generator=g) for _ in range(heads)])
                          for _ in range(batch)])
    k_perm = torch.stack([torch.randperm(seq_len, generator=g) for _ in range(heads)])[None]  # shared over batch
    plain = BlockMask.from_block_dense(block_dense, seq_len, block)
    mask = BlockMask(plain.kv_block_indices, plain.kv_block_counts, seq_len, block, block, q_perm,
                     kv_permutation=k_perm)
    q, k, v = (torch.randn(batch, layout.seq_len, heads, 16, generator=g) for _ in range(3))
    out = sparse_attention(q, k, v, mask, layout, backend="reference")
    allowed = torch.ones(batch, heads, layout.seq_len, layout.seq_len, dtype=torch.bool)
    allowed[:, :, :seq_len, :seq_len] = mask.to_dense()
    torch.testing.assert_close(out, _sdpa(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    # to_dense, checked one (batch, head) at a time: kept block of (position of i, position of j).
    for b, h in [(0, 0), (1, 2)]:
        q_pos, k_pos = torch.argsort(q_perm[b, h]), torch.argsort(k_perm[0, h])
        expected = block_dense[b, h][q_pos[:, None] // block, k_pos[None, :] // block]
        assert torch.equal(mask.to_dense()[b, h], expected)


def test_shared_and_per_head_orders_agree():
    g = torch.Generator().manual_seed(4)
    perm = torch.randperm(64, generator=g)
    shared = BlockMask.from_block_dense(torch.rand(4, 4, generator=g) < 0.5, 64, 16, permutation=perm)
    per_head = BlockMask(shared.kv_block_indices, shared.kv_block_counts, 64, 16, 16, perm.expand(1, 2, -1))
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(sparse_attention(q, k, v, per_head, backend="reference"),
                               sparse_attention(q, k, v, shared, backend="reference"), atol=1e-6, rtol=1e-6)


def test_per_head_orders_are_checked():
    with pytest.raises(ValueError, match="kv_permutation needs"):
        BlockMask.full(32, 16).__class__(torch.zeros(1, 1, 2, 1, dtype=torch.int32),
                                         torch.ones(1, 1, 2, dtype=torch.int32), 32, 16, 16, None,
                                         kv_permutation=torch.arange(32))
    mask = BlockMask(torch.zeros(1, 1, 2, 1, dtype=torch.int32), torch.ones(1, 1, 2, dtype=torch.int32), 32, 16, 16,
                     torch.arange(32).expand(1, 3, -1))
    with pytest.raises(ValueError, match="permutation is \\(1, 3, 32\\); q has batch 1, 2 heads"):
        mask.check_fits(1, 2, 32)


def test_selection_keeps_top_k_and_stops_at_top_p():
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]).view(1, 1, 2, 4)
    kept = select_blocks(scores, [3])
    assert kept.tolist() == [[[[True, True, True, False], [False, True, True, True]]]]
    kept = select_blocks(scores, [3], top_p=0.7)  # 0.5 + 0.3 reaches 0.7: two blocks
    assert kept.tolist() == [[[[True, True, False, False], [False, False, True, True]]]]
    # Mass 0.5, 0.3, 0.15, 0.05 in the score order: recall 0.8 needs 2 of 4 blocks, 0.95 needs 3.
    assert density_for_recall(scores, scores, 0.8).tolist() == [0.5]
    assert density_for_recall(scores, scores, 0.95).tolist() == [0.75]


def test_draft_keeps_every_block_at_density_one_and_a_short_tail_block():
    layout = VideoLayout(3, 5, 7)  # 105 tokens: border tiles are short
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, layout.video_len, 16, generator=g) for _ in range(2))
    full = draft(layout, q, k, density=1.0, tile=(1, 4, 4))
    assert full.density == 1.0 and full.to_dense().all()
    sparse = draft(layout, q, k, density=[0.25, 0.5], tile=(1, 4, 4))
    assert sparse.kv_block_counts.shape == (1, 2, 7)
    assert sparse.kv_block_counts[0, 0].tolist() == [2] * 7 and sparse.kv_block_counts[0, 1].tolist() == [4] * 7


def test_kmeans_separates_well_spread_points():
    g = torch.Generator().manual_seed(6)
    centers = torch.randn(4, 8, generator=g) * 10
    labels = torch.arange(40) % 4
    x = (centers[labels] + 0.1 * torch.randn(40, 8, generator=g))[None, None]
    found, _, sizes = kmeans(x, x[:, :, :4].clone(), 10)  # initial centroids: one point of each cluster
    assert sizes.tolist() == [[[10.0] * 4]]
    assert torch.equal(found[0, 0], labels)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("draft", {"density": 0}, r"DraftConfig.density must be in \(0, 1\], got 0"),
        ("draft", {"density": 1.5}, r"density must be in \(0, 1\], got 1.5"),
        ("draft", {"refresh": 0}, r"refresh must be an int >= 1 .*, got 0"),
        ("reorder", {"refresh": (2, -1)}, r"refresh must be .* step indices >= 0, got \(2, -1\)"),
        ("reorder", {"refresh": ()}, r"refresh must be"),
        ("reorder", {"strategy": "hilbert"}, r"strategy must be one of \('axes', 'cluster'\), got 'hilbert'"),
        ("reorder", {"axes": "fxy"}, r"axes must be one of \('fhw'"),
        ("reorder", {"layer_axes": (("fhw", "abc"),)}, r"layer_axes entries must be one of .*got 'abc'"),
        ("draft", {"layer_density": ((0.5, 0.0),)}, r"layer_density entry must be in \(0, 1\], got 0.0"),
        ("draft", {"top_p": 2}, r"top_p must be in \(0, 1\], got 2"),
        ("draft", {"tile": (1, 3, 3)}, r"holds 9 tokens"),
    ],
)
def test_bad_dynamic_options_raise_naming_the_value(method, options, message):
    with pytest.raises(ValueError, match=message):
        make_config(method, **options)


def test_refresh_schedule_rule():
    every_two = make_config("draft", refresh=2)
    assert [every_two.refreshes_at(step, 0) for step in range(5)] == [False, False, True, True, True]
    assert every_two.refreshes_at(0, None) and every_two.refreshes_at(1, 4)  # nothing cached; a new generation
    at_steps = make_config("draft", refresh=(3, 0))
    assert at_steps.refresh == (0, 3)
    assert [at_steps.refreshes_at(step, 0) for step in range(5)] == [False, False, False, True, False]
    with pytest.raises(ValueError, match="layer_density covers 1 layers; layer 3 has none"):
        make_config("draft", layer_density=((0.5,),)).densities(3, 1)


def _refuse(name):
    def call(*args, **kwargs):
        raise AssertionError(f"host sync on the estimate path: {name}")
    return call


def _no_bool_index(original):
    def call(self, index, *rest):
        for part in index if isinstance(index, tuple) else (index,):
            if isinstance(part, torch.Tensor) and part.dtype in (torch.bool, torch.uint8):
                raise AssertionError("host sync on the estimate path: boolean-mask indexing")
        return original(self, index, *rest)
    return call


def test_estimates_make_no_host_sync_on_the_hot_path():
    # Every call that makes the host wait for the device (a value read back, a shape that depends on data) raises
    # while the estimates run: no .item() / .tolist() / bool(t) / int(t) / float(t), nonzero, unique,
    # masked_select, boolean-mask indexing. Constants (orders, sizes) are built on a first call, then memoised.
    group_of = torch.randperm(LAYOUT.video_len, generator=torch.Generator().manual_seed(1)) // GROUP
    q, k, _ = _planted(group_of, heads=3, seed=1)
    mixed_axes = ["hwf", "fhw", "whf"]

    def estimate(state):
        masks = [draft(LAYOUT, q, k, density=[0.25, 0.5, 0.125], tile=(1, 4, 8)),
                 draft(LAYOUT, q, k, density=0.25, tile=(1, 4, 8), top_p=0.9),
                 reorder_axes(LAYOUT, q, k, axes=mixed_axes, density=0.25, block_size=GROUP)]
        cold, fitted = reorder_cluster(LAYOUT, q, k, density=0.25, block_size=GROUP)
        warm, _ = reorder_cluster(LAYOUT, q, k, density=[0.25, 0.5, 0.25], block_size=GROUP, state=state, top_p=0.9)
        return masks + [cold, warm], fitted

    expected, state = estimate(None)  # memoises the constants
    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
                     "masked_select"):
            patch.setattr(torch.Tensor, name, _refuse(f"Tensor.{name}"))
        for name in ("nonzero", "unique", "masked_select", "argwhere"):
            patch.setattr(torch, name, _refuse(f"torch.{name}"))
        patch.setattr(torch.Tensor, "__getitem__", _no_bool_index(torch.Tensor.__getitem__))
        patch.setattr(torch.Tensor, "__setitem__", _no_bool_index(torch.Tensor.__setitem__))
        masks, _ = estimate(state)
        fractions = [mask.kept_fraction for mask in masks]  # the hooks' per-call statistic
        # FA4 takes each new mask's block lists (the per-head orders' masks in their blocked order), vouched free
        # of empty rows by the selection: no check of the counts.
        converted = [fa4.to_fa4_block_sparse(mask.in_blocked_order()) for mask in masks]
    for mask, again, fraction, tensors in zip(expected, masks, fractions, converted):
        assert torch.equal(mask.to_dense(), again.to_dense())
        assert float(fraction) == pytest.approx(again.density)
        assert not tensors.has_empty_rows and bool((again.kv_block_counts > 0).all())
