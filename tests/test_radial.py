"""Radial Attention mask: equal to the official code's masks at two of its commits and to a token-level derivation."""

import math
import os
import random

import numpy

import pytest
import torch

from dit_sparse import VideoLayout
from dit_sparse.patterns import radial


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the official masks --------------------------------------------------------------------------------------------
# tests/data/radial_official/ holds masks made by mit-han-lab/radial-attention's own gen_log_mask_shrinked at two
# commits (its README gives the command): d945317, the last with the earlier Wan rule, and 72788d4, the current one.

OFFICIAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "radial_official")
EARLIER, CURRENT = "d945317", "72788d4"
# the dit-sparse variant that follows each official (commit, model_type)
VARIANT = {(EARLIER, "wan"): "wan-2025-06", (CURRENT, "wan"): "wan", (EARLIER, "hunyuan"): "hunyuan",
           (CURRENT, "hunyuan"): "hunyuan"}
CASES = ["wan_480p_81f", "wan_768x1280_69f", "wan_16x15x26", "wan_tiny_21x10x10", "wan_4x15x17", "hunyuan_720p_129f",
         "hunyuan_4x15x17"]


def _official(case: str, commit: str):
    """The stored official mask (bool (s // 128, s // 128)), its layout and model type."""
    with numpy.load(os.path.join(OFFICIAL, f"{case}_{commit}.npz")) as data:
        assert str(data["commit"]).startswith(commit)
        assert (int(data["block_size"]), float(data["decay_factor"])) == (128, 1.0)
        shape = tuple(int(n) for n in data["shape"])
        bits = numpy.unpackbits(data["bits"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
        return torch.from_numpy(bits), VideoLayout(*(int(n) for n in data["layout"])), str(data["model_type"])


def _ours(layout, **kwargs) -> torch.Tensor:
    return radial(layout, **kwargs).to_block_dense()[0, 0]


@pytest.mark.parametrize("commit", [EARLIER, CURRENT])
@pytest.mark.parametrize("case", CASES)
def test_radial_mask_matches_the_official_mask_of_its_commit(case, commit):
    official, layout, model_type = _official(case, commit)
    ours = _ours(layout, block_size=128, decay_factor=1.0, variant=VARIANT[commit, model_type])
    n_blocks = math.ceil(layout.video_len / 128)
    # The official mask covers s // 128 blocks: the video's, then (Hunyuan) the text's. From block video_len // 128
    # on every block is kept, as ours keeps the short tail block; ours also keeps the diagonal (radial's docstring).
    assert official.shape[0] >= n_blocks == ours.shape[0]
    assert official[layout.video_len // 128 :].all()
    assert torch.equal(ours, official[:n_blocks, :n_blocks] | torch.eye(n_blocks, dtype=torch.bool))


def test_radial_wan_variants_have_the_official_densities_at_wan21_480p():
    earlier, layout, _ = _official("wan_480p_81f", EARLIER)
    current, _, _ = _official("wan_480p_81f", CURRENT)
    # Wan2.1 480p, 81 frames: 21 latent frames of 30 x 52 tokens = 32,760 tokens, 255 full blocks and a 120-token tail.
    assert earlier.shape == current.shape == (256, 256)
    assert (int(earlier.sum()), int(current.sum()), int((earlier ^ current).sum())) == (28369, 29442, 1073)
    assert (round(earlier.float().mean().item(), 3), round(current.float().mean().item(), 3)) == (0.433, 0.449)
    new, old = _ours(layout, variant="wan"), _ours(layout, variant="wan-2025-06")
    assert torch.equal(new, current) and torch.equal(old, earlier)  # every diagonal block is already kept here
    assert not (old & ~new).any()  # the current rule only adds blocks


def test_radial_hunyuan_is_the_same_at_both_official_commits():
    for case in ("hunyuan_720p_129f", "hunyuan_4x15x17"):
        assert torch.equal(_official(case, EARLIER)[0], _official(case, CURRENT)[0])


def test_radial_keeps_the_diagonal_where_the_official_rule_leaves_a_query_block_empty():
    # Frames of 255 tokens at block 128: frame 2 starts at token 510, 2 tokens before the end of block 3, so block 3
    # holds 126 spilled rows of frame 1 (which the official rule leaves out) and 2 rows of frame 2: no key block of
    # the full blocks wins the vote; block 5 likewise (frame 3 starts 3 tokens before its end). On the tiny model's
    # layout (21 frames of 100 tokens) the vote leaves query blocks 4 and 11 empty.
    for case, empty in (("wan_4x15x17", [3, 5]), ("hunyuan_4x15x17", [3, 5]), ("wan_tiny_21x10x10", [4, 11])):
        official, layout, model_type = _official(case, CURRENT)
        n_full = layout.video_len // 128  # the official mask keeps every block of the tail and the text
        assert (~official[:n_full, :n_full].any(1)).nonzero().flatten().tolist() == empty
        ours = _ours(layout, variant=VARIANT[CURRENT, model_type])
        assert ours[empty, empty].all()


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
    width = torch.where(distance == 1, float(s // 2 if variant == "wan-2025-06" else s), width)
    # Frame pairs whose window would be under a block are kept only every (block_size / decay_length)-th frame.
    step = torch.clamp(block_size / decay_length, min=1).long()
    keep = (offset <= width) & (distance % step == 0)
    if variant in ("wan", "wan-2025-06"):
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


@pytest.mark.parametrize("variant", ["wan", "hunyuan", "wan-2025-06"])
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


@pytest.mark.parametrize("variant", ["wan", "hunyuan", "wan-2025-06"])
def test_radial_keeps_every_diagonal_block(variant):
    for layout in _small_layouts() + [VideoLayout(21, 30, 52)]:
        for block_size in (16, 128):
            assert _ours(layout, block_size=block_size, variant=variant).diagonal().all()


@pytest.mark.parametrize("variant", ["wan", "hunyuan", "wan-2025-06"])
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
        ({"variant": "cogvideox"}, r"variant must be one of \('wan', 'hunyuan', 'wan-2025-06'\), got 'cogvideox'"),
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
