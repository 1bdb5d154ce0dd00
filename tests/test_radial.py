"""Radial Attention mask: equal to the official block rule at the published settings and to a token-level derivation."""

import math
import random

import pytest
import torch

from dit_sparse import VideoLayout
from dit_sparse.patterns import radial


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the official block rule ---------------------------------------------------------------------------------------
# Transcribed from mit-han-lab/radial-attention, radial_attn/attn_mask.py at commit
# a5c638bbfff1517a667af2e20041e8e85b149486 (get_window_width, get_diagonal_split_mask, shrinkMaskStrict,
# gen_log_mask_shrinked). Changes, none of which alters a value: no `query`/`sparse_type` arguments (device only;
# "radial" is the only type); get_diagonal_split_mask returns the bool its all-ones / all-zeros mask is made of;
# shrinkMaskStrict sums in int16 (counts <= block_size) instead of int64; and the loop memoises the local mask on
# (sink, window width, split) and the shrunk block mask on that and the two frames' offsets in their first blocks,
# everything each depends on. That takes the Hunyuan 720p mask from about nine minutes to a few seconds.


def _official_window_width(i, j, token_per_frame, num_frame, decay_factor=1, block_size=128, model_type=None):
    dist = abs(i - j)
    if model_type == "wan":
        if dist < 1:
            return token_per_frame
        if dist == 1:
            return token_per_frame // 2
    elif model_type == "hunyuan":
        if dist <= 1:
            return token_per_frame
    else:
        raise ValueError(f"Unknown model type: {model_type}")
    group = dist.bit_length()
    decay_length = 2**token_per_frame.bit_length() / 2**group * decay_factor
    threshold = block_size
    if decay_length >= threshold:
        return decay_length
    else:
        return threshold


def _official_diagonal_split(i, j, token_per_frame):
    dist = abs(i - j)
    group = dist.bit_length()
    threshold = 128  # hardcoded threshold for now, which is equal to block-size
    decay_length = 2**token_per_frame.bit_length() / 2**group
    if decay_length >= threshold:
        return True
    split_factor = int(threshold / decay_length)
    modular = dist % split_factor
    return modular == 0


def _official_shrink_mask_strict(mask, block_size=128):
    seqlen = mask.shape[0]
    block_num = seqlen // block_size
    mask = mask[: block_num * block_size, : block_num * block_size].view(block_num, block_size, block_num, block_size)
    col_densities = mask.sum(dim=1, dtype=torch.int16) / block_size
    # we want the minimum non-zero column density in the block
    non_zero_densities = col_densities > 0
    high_density_cols = col_densities > 1 / 3
    frac_high_density_cols = high_density_cols.sum(dim=-1) / (non_zero_densities.sum(dim=-1) + 1e-9)
    block_mask = frac_high_density_cols > 0.6
    block_mask[0:0] = True
    block_mask[-1:-1] = True
    return block_mask


def _official_gen_log_mask_shrinked(
    s, video_token_num, num_frame, block_size=128, decay_factor=0.5, model_type=None, memo=None
):
    final_log_mask = torch.zeros((s // block_size, s // block_size), dtype=torch.bool)
    token_per_frame = video_token_num // num_frame
    video_text_border = video_token_num // block_size

    col_indices = torch.arange(0, token_per_frame).view(1, -1)
    row_indices = torch.arange(0, token_per_frame).view(-1, 1)
    offsets = torch.abs(col_indices - row_indices).int()  # hoisted out of the loop
    final_log_mask[video_text_border:] = True
    final_log_mask[:, video_text_border:] = True
    # memo: optional dict shared by calls with the same frames, block size, decay factor and model type.
    memo = {} if memo is None else memo
    local_masks, shrunk = memo.setdefault("local_masks", {}), memo.setdefault("shrunk", {})
    for i in range(num_frame):
        for j in range(num_frame):
            sink = j == 0 and model_type == "wan"  # this is attention sink
            if sink:
                rule = (True, None, None)
            else:
                window_width = _official_window_width(
                    i, j, token_per_frame, num_frame, decay_factor, block_size=block_size, model_type=model_type
                )
                rule = (False, window_width, _official_diagonal_split(i, j, token_per_frame))
            if rule not in local_masks:
                if sink:
                    local_mask = torch.ones((token_per_frame, token_per_frame), dtype=torch.bool)
                else:
                    local_mask = offsets <= rule[1]
                    local_mask = torch.logical_and(local_mask, torch.tensor(rule[2]))
                local_masks[rule] = local_mask
            local_mask = local_masks[rule]
            remainder_row = (i * token_per_frame) % block_size
            remainder_col = (j * token_per_frame) % block_size
            key = (rule, remainder_row, remainder_col)
            if key not in shrunk:
                # get the padded size
                all_length_row = remainder_row + ((token_per_frame - 1) // block_size + 1) * block_size
                all_length_col = remainder_col + ((token_per_frame - 1) // block_size + 1) * block_size
                padded_local_mask = torch.zeros((all_length_row, all_length_col), dtype=torch.bool)
                padded_local_mask[
                    remainder_row : remainder_row + token_per_frame, remainder_col : remainder_col + token_per_frame
                ] = local_mask
                # shrink the mask
                shrunk[key] = _official_shrink_mask_strict(padded_local_mask, block_size=block_size)
            block_mask = shrunk[key]
            # set the block mask to the final log mask
            block_row_start = (i * token_per_frame) // block_size
            block_col_start = (j * token_per_frame) // block_size
            block_row_end = block_row_start + block_mask.shape[0]
            block_col_end = block_col_start + block_mask.shape[1]
            final_log_mask[block_row_start:block_row_end, block_col_start:block_col_end] = torch.logical_or(
                final_log_mask[block_row_start:block_row_end, block_col_start:block_col_end], block_mask
            )
    return final_log_mask


def _official_video_blocks(layout: VideoLayout, variant: str, s: int, block_size=128, decay_factor=1.0, memo=None):
    """The official mask over `s` tokens (video first), cut to the full video blocks it defines."""
    mask = _official_gen_log_mask_shrinked(
        s, layout.video_len, layout.frames, block_size, decay_factor, model_type=variant, memo=memo
    )
    n_full = layout.video_len // block_size
    return mask[:n_full, :n_full]


def _ours(layout, **kwargs) -> torch.Tensor:
    return radial(layout, **kwargs).to_block_dense()[0, 0]


def test_radial_mask_matches_official_rule_wan_480p():
    # Wan2.1 480p, 81 frames: 21 latent frames of 30 x 52 tokens = 32,760 tokens, 255 full blocks and a 120-token
    # tail. The official call (s = video tokens, Wan has no joint text) raises a shape error at this size: the last
    # frame's blocks reach block 255, past its 255 x 255 mask. We pad s to whole blocks, as its Hunyuan path does
    # with the text tokens; the padded block is the tail block, True in the official mask and whole in ours.
    layout, memo = VideoLayout(21, 30, 52), {}
    with pytest.raises(RuntimeError, match="must match"):
        _official_video_blocks(layout, "wan", s=layout.video_len, memo=memo)
    official = _official_video_blocks(layout, "wan", s=math.ceil(layout.video_len / 128) * 128, memo=memo)
    ours = _ours(layout, block_size=128, decay_factor=1.0, variant="wan")
    assert official.shape == (255, 255) and ours.shape == (256, 256)
    assert torch.equal(ours[:255, :255], official)
    assert int(official.sum()) == 27858  # density 0.4284 over the full blocks
    assert ours[255].all() and ours[:, 255].all()


def test_radial_mask_matches_official_rule_hunyuan_720p():
    # HunyuanVideo 720p, 129 frames: 33 latent frames of 45 x 80 tokens = 118,800 video tokens (928 full blocks and
    # a 16-token tail), followed by the 256 joint text tokens the official call also gets (s = 119,056).
    layout = VideoLayout(33, 45, 80)
    official = _official_video_blocks(layout, "hunyuan", s=layout.video_len + 256)
    ours = _ours(layout, block_size=128, decay_factor=1.0, variant="hunyuan")
    assert official.shape == (928, 928) and ours.shape == (929, 929)
    assert torch.equal(ours[:928, :928], official)
    assert int(official.sum()) == 236245  # density 0.2743 over the full blocks
    assert ours[928].all() and ours[:, 928].all()


@pytest.mark.parametrize(
    ("variant", "layout", "text_len"),
    [
        # The official scripts' defaults, 768 x 1280: Wan 69 frames (18 x 3,840 tokens), Hunyuan 117 (30 x 3,840).
        # Frames of 30 whole blocks: no block is shared by two frames, and the official Wan call needs no padding.
        ("wan", VideoLayout(18, 48, 80), 0),
        ("hunyuan", VideoLayout(30, 48, 80), 256),
    ],
)
def test_radial_mask_matches_official_rule_at_the_official_scripts_defaults(variant, layout, text_len):
    official = _official_video_blocks(layout, variant, s=layout.video_len + text_len)
    assert torch.equal(_ours(layout, variant=variant), official)


def test_radial_keeps_the_diagonal_where_the_official_rule_leaves_a_query_block_empty():
    # Frames of 255 tokens at block 128: frame 2 starts at token 510, 2 tokens before the end of block 3, so block 3
    # holds 126 spilled rows of frame 1 (which the official rule leaves out) and 2 rows of frame 2: no key block
    # wins the vote. Ours differs from the official mask exactly by keeping those diagonal blocks.
    layout = VideoLayout(4, 15, 17)
    for variant in ("wan", "hunyuan"):
        official = _official_video_blocks(layout, variant, s=math.ceil(layout.video_len / 128) * 128)
        ours = _ours(layout, variant=variant)[: official.shape[0], : official.shape[0]]
        assert not official[3].any()
        assert torch.equal(ours, official | torch.eye(official.shape[0], dtype=torch.bool))


def test_radial_on_the_tiny_models_layout_is_the_official_rule_plus_the_diagonal():
    # The shipped tiny model: 21 latent frames of 10 x 10 tokens, blocks of 128, so every block spans two frames.
    # The official vote leaves query blocks 4 and 11 with no key block; ours keeps their diagonal blocks, and the
    # short tail block (52 tokens) whole. Density over the full blocks: 27 / 256 official, 29 / 256 ours.
    layout = VideoLayout(21, 10, 10)
    official = _official_video_blocks(layout, "wan", s=math.ceil(layout.video_len / 128) * 128)
    ours = _ours(layout, variant="wan")
    assert official.shape == (16, 16) and ours.shape == (17, 17)
    assert (~official.any(1)).nonzero().flatten().tolist() == [4, 11]
    assert torch.equal(ours[:16, :16], official | torch.eye(16, dtype=torch.bool))
    assert ours[16].all() and ours[:, 16].all()
    assert (int(official.sum()), int(ours[:16, :16].sum())) == (27, 29)


# ---- a token-level derivation ---------------------------------------------------------------------------------------


def _token_mask(layout: VideoLayout, block_size: int, decay_factor: float, variant: str) -> torch.Tensor:
    """Bool (video_len, video_len): the paper's rule per pair of tokens, with the official constants."""
    s = layout.tokens_per_frame
    token = torch.arange(layout.video_len)
    frame, position = token // s, token % s
    distance = (frame[:, None] - frame[None, :]).abs()
    offset = (position[:, None] - position[None, :]).abs()
    # 2 ** bit_length(x) is the power of two just above x: 2 ** (floor(log2 x) + 1), and 1 for x = 0.
    octave = torch.where(distance > 0, torch.floor(torch.log2(distance.clamp(min=1).double())) + 1, 0.0)
    decay_length = 2.0 ** (math.floor(math.log2(s)) + 1) / 2.0**octave
    width = torch.clamp(decay_length * decay_factor, min=block_size)
    width = torch.where(distance == 0, float(s), width)
    width = torch.where(distance == 1, float(s if variant == "hunyuan" else s // 2), width)
    # Frame pairs whose window would be under a block are kept only every (block_size / decay_length)-th frame.
    step = torch.clamp(block_size / decay_length, min=1).long()
    keep = (offset <= width) & (distance % step == 0)
    if variant == "wan":
        keep |= (frame == 0)[None, :]
    return keep


def _blocks_by_official_vote(keep: torch.Tensor, layout: VideoLayout, block_size: int) -> torch.Tensor:
    """Bool (n_blocks, n_blocks): the token mask reduced to blocks the way shrinkMaskStrict reduces it."""
    s, n = layout.tokens_per_frame, layout.video_len
    n_blocks, n_full = math.ceil(n / block_size), n // block_size
    token = torch.arange(n)
    frame, block = token // s, token // block_size
    # Each frame owns the ceil(s / block_size) blocks from the one it starts in; the rest of it is left out.
    owned = block < (frame * s) // block_size + math.ceil(s / block_size)
    voter = owned & (block < n_full)
    # One group per (block, frame) piece of voting tokens; a query piece votes on each key piece.
    groups, group_of = torch.unique(block[voter] * layout.frames + frame[voter], return_inverse=True)
    n_groups = len(groups)
    rows_kept = torch.zeros(n_groups, n).index_add_(0, group_of, keep[voter].float())  # (G, n): rows c keeps
    nonzero = torch.zeros(n_groups, n_groups).index_add_(1, group_of, (rows_kept[:, voter] > 0).float())
    dense = torch.zeros(n_groups, n_groups).index_add_(1, group_of, (rows_kept[:, voter] / block_size > 1 / 3).float())
    vote = dense / (nonzero + 1e-9) > 0.6  # (G, G)
    group_block = groups // layout.frames
    blocks = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    q_group, k_group = torch.nonzero(vote, as_tuple=True)
    blocks[group_block[q_group], group_block[k_group]] = True
    # The tail block is kept whole, and so is the diagonal (see radial's docstring).
    blocks[n_full:] = True
    blocks[:, n_full:] = True
    return blocks | torch.eye(n_blocks, dtype=torch.bool)


def _small_layouts():
    rng = random.Random(0)
    # Frames that spill past their own blocks (63 tokens), many frames per block (10, 7), frame skipping (33 frames),
    # frames aligned to every block size (64), then random ones.
    layouts = [VideoLayout(6, 7, 9), VideoLayout(20, 2, 5), VideoLayout(33, 1, 7), VideoLayout(6, 8, 8)]
    layouts += [VideoLayout(rng.randint(2, 10), rng.randint(1, 10), rng.randint(1, 10)) for _ in range(6)]
    return layouts


@pytest.mark.parametrize("variant", ["wan", "hunyuan"])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("decay_factor", [1.0, 0.3])
def test_radial_mask_matches_token_level_derivation(variant, block_size, decay_factor):
    sparse_somewhere = False
    for layout in _small_layouts():
        expected = _blocks_by_official_vote(
            _token_mask(layout, block_size, decay_factor, variant), layout, block_size
        )
        ours = _ours(layout, block_size=block_size, decay_factor=decay_factor, variant=variant)
        assert torch.equal(ours, expected), layout
        sparse_somewhere |= not bool(ours.all())
    assert sparse_somewhere


# ---- properties ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["wan", "hunyuan"])
def test_radial_keeps_every_diagonal_block(variant):
    for layout in _small_layouts() + [VideoLayout(21, 30, 52)]:
        for block_size in (16, 128):
            assert _ours(layout, block_size=block_size, variant=variant).diagonal().all()


@pytest.mark.parametrize("variant", ["wan", "hunyuan"])
def test_radial_density_falls_as_frames_grow(variant):
    # O(n log n): the kept fraction falls with length, and kept blocks grow far slower than n ** 2.
    masks = [radial(VideoLayout(frames, 8, 16), block_size=32, variant=variant) for frames in (8, 16, 32, 64, 128)]
    densities = [m.density for m in masks]
    assert all(a > b for a, b in zip(densities, densities[1:])), densities
    kept = [int(m.kv_block_counts.sum()) for m in masks]
    assert kept[-1] / kept[-2] < 2.7  # doubling n: n log n gives ~2.2, n ** 2 gives 4


def test_radial_smaller_decay_factor_keeps_fewer_blocks():
    layout = VideoLayout(33, 45, 80)
    wide, narrow = (radial(layout, decay_factor=f, variant="hunyuan").density for f in (1.0, 0.5))
    assert narrow < wide


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "cogvideox"}, r"variant must be one of \('wan', 'hunyuan'\), got 'cogvideox'"),
        ({"block_size": 100}, r"block_size must be a power of two >= 16, got 100"),
        ({"block_size": 8}, r"block_size must be a power of two >= 16, got 8"),
        ({"block_size": 128.0}, r"block_size must be a power of two >= 16, got 128.0"),
        ({"decay_factor": 0}, r"decay_factor must be a number > 0, got 0"),
        ({"decay_factor": -1.5}, r"decay_factor must be a number > 0, got -1.5"),
        ({"decay_factor": float("nan")}, r"decay_factor must be a number > 0, got nan"),
        ({"decay_factor": "1"}, r"decay_factor must be a number > 0, got '1'"),
    ],
)
def test_radial_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        radial(VideoLayout(4, 8, 8), **kwargs)
