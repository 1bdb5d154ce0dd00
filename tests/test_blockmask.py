"""BlockMask and VideoLayout: conversions agree with each other and with masks built by hand."""

import math

import pytest
import torch

from dit_sparse import BlockMask, VideoLayout


def test_block_dense_round_trip_and_sorted_indices():
    g = torch.Generator().manual_seed(0)
    block_dense = torch.rand(2, 3, 7, 7, generator=g) < 0.4
    mask = BlockMask.from_block_dense(block_dense, seq_len=100, q_block_size=16)
    assert torch.equal(mask.to_block_dense(), block_dense)
    assert torch.equal(mask.kv_block_counts, block_dense.sum(-1).int())
    for b, h, i in [(0, 0, 0), (1, 2, 6), (1, 1, 3)]:
        kept = mask.kv_block_indices[b, h, i, : mask.kv_block_counts[b, h, i]].tolist()
        assert kept == torch.nonzero(block_dense[b, h, i]).flatten().tolist()


def test_to_dense_expands_blocks_and_undoes_the_permutation():
    g = torch.Generator().manual_seed(1)
    seq_len, block = 50, 16
    block_dense = torch.rand(4, 4, generator=g) < 0.5
    perm = torch.randperm(seq_len, generator=g)
    mask = BlockMask.from_block_dense(block_dense, seq_len, block, permutation=perm)
    dense = mask.to_dense()[0, 0]
    # Token i sits at position p in the blocked order, where perm[p] == i.
    position = torch.argsort(perm)
    for i, j in [(0, 0), (3, 49), (17, 31), (49, 2)]:
        assert dense[i, j] == block_dense[position[i] // block, position[j] // block]


def test_density_counts_the_short_tail_block():
    # 40 tokens in blocks of 32: block sizes 32 and 8. Keep only (0, 0): 32 * 32 of 40 * 40 pairs.
    block_dense = torch.tensor([[True, False], [False, False]])
    mask = BlockMask.from_block_dense(block_dense, 40, 32)
    assert math.isclose(mask.density, 32 * 32 / 40**2)
    assert math.isclose(BlockMask.full(40, 32).density, 1.0)
    assert math.isclose(float(mask.to_dense().double().mean()), mask.density)


def test_rows_all_kept_is_what_the_counts_say_and_survives_derived_masks():
    from dit_sparse.parallel import mask_for_heads

    g = torch.Generator().manual_seed(2)
    block_dense = torch.rand(1, 4, 5, 5, generator=g) < 0.5
    block_dense[..., 0] = True  # every row keeps a block
    full_rows = BlockMask.from_block_dense(block_dense, 80, 16, permutation=torch.randperm(80, generator=g))
    block_dense[0, 2, 3] = False  # one empty row
    empty_row = BlockMask.from_block_dense(block_dense, 80, 16)
    assert full_rows.rows_all_kept and bool((full_rows.kv_block_counts > 0).all())
    assert not empty_row.rows_all_kept and not BlockMask(empty_row.kv_block_indices, empty_row.kv_block_counts,
                                                         80, 16, 16).rows_all_kept  # no promise by default
    for mask in (full_rows, empty_row):
        for derived in (mask.in_blocked_order(), mask.to("meta"), mask_for_heads(mask, 2, 2, 4)):
            assert derived.rows_all_kept == mask.rows_all_kept


def test_cached_builds_once_per_key_and_each_mask_keeps_its_own():
    mask = BlockMask.full(64, 16)
    builds = []

    def build(value):
        return lambda: builds.append(value) or value

    assert mask.cached("a", build(1)) == 1 and mask.cached("a", build(2)) == 1  # built once, then kept
    assert mask.cached(("a", 2), build(3)) == 3 and builds == [1, 3]
    other = BlockMask.full(64, 16)
    assert other.cached("a", build(4)) == 4  # another mask: its own cache
    moved = mask.to("meta")
    assert moved.cached("a", build(5)) == 5  # a derived mask starts empty
    assert mask.in_blocked_order() is mask.in_blocked_order()
    assert "_cache" not in repr(mask)


def test_blockmask_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="power of two"):
        BlockMask.full(64, 48)
    with pytest.raises(ValueError, match="needs 4"):
        BlockMask(torch.zeros(1, 1, 3, 1, dtype=torch.int32), torch.zeros(1, 1, 3, dtype=torch.int32), 64, 16, 16)
    with pytest.raises(ValueError, match="int32"):
        BlockMask(torch.zeros(1, 1, 4, 1, dtype=torch.int64), torch.zeros(1, 1, 4, dtype=torch.int32), 64, 16, 16)
    with pytest.raises(ValueError, match=r"needs \(4, 4\)"):
        BlockMask.from_block_dense(torch.ones(3, 4, dtype=torch.bool), 64, 16)


def test_layout_sizes_and_slices():
    layout = VideoLayout(21, 30, 52)
    assert layout.video_len == 32760 and layout.tokens_per_frame == 1560 and layout.seq_len == 32760
    suffix = VideoLayout(2, 3, 4, text_len=5, text_position="suffix")
    assert suffix.video_slice == slice(0, 24) and suffix.text_slice == slice(24, 29)
    prefix = VideoLayout(2, 3, 4, text_len=5, text_position="prefix")
    assert prefix.video_slice == slice(5, 29) and prefix.text_slice == slice(0, 5)
    with pytest.raises(ValueError, match="frames"):
        VideoLayout(0, 3, 4)
    with pytest.raises(ValueError, match="text_position"):
        VideoLayout(1, 3, 4, text_len=5)
    with pytest.raises(ValueError, match="text_position"):
        VideoLayout(1, 3, 4, text_position="middle")


def test_tile_permutation_groups_compact_cubes():
    layout = VideoLayout(5, 6, 7)
    perm = layout.tile_permutation((2, 4, 4))
    assert torch.equal(torch.sort(perm).values, torch.arange(layout.video_len))
    f, rem = perm // 42, perm % 42
    h, w = rem // 7, rem % 7
    # The first tile is the full cube frames 0-1, rows 0-3, columns 0-3, in (t, h, w) order.
    first = perm[:32]
    assert set(zip(f[:32].tolist(), h[:32].tolist(), w[:32].tolist())) == {
        (t, r, c) for t in range(2) for r in range(4) for c in range(4)
    }
    assert first.tolist() == sorted(first.tolist())
    # Every token of a tile shares its tile coordinates.
    tile_id = (f // 2) * 100 + (h // 4) * 10 + (w // 4)
    changes = (tile_id[1:] != tile_id[:-1]).sum()
    assert int(changes) == 3 * 2 * 2 - 1
