"""Sparse attention under diffusers' Ulysses context parallelism: the head and token bookkeeping as pure functions,
and two real gloo processes on the CPU (tiny Wan and HunyuanVideo) against one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_sparse.blockmask import BlockMask
from dit_sparse.patterns import DraftConfig, RadialConfig
from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import config_for_heads, gathered_order, mask_for_heads

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WORKER = Path(__file__).with_name("context_parallel_worker.py")


def _gathered(natural: torch.Tensor, layout: VideoLayout, world: int) -> torch.Tensor:
    """What Ulysses hands a rank: each rank's equal share of the video and of the text, ranks one after another."""
    video, text = natural[layout.video_slice], natural[layout.text_slice]
    shares = []
    for v, t in zip(video.chunk(world), text.chunk(world)):
        shares += [t, v] if layout.text_position == "prefix" else [v, t]
    return torch.cat(shares)


@pytest.mark.parametrize("position", ["suffix", "prefix"])
@pytest.mark.parametrize("world", [2, 4])
def test_gathered_order_puts_the_ulysses_sequence_back_in_natural_order(position, world):
    layout = VideoLayout(2, 4, 4, text_len=8, text_position=position)
    natural = torch.arange(layout.seq_len)
    order = gathered_order(layout, world)
    assert torch.equal(_gathered(natural, layout, world)[order], natural)


def test_gathered_order_is_none_without_text_or_ranks_and_refuses_uneven_shares():
    assert gathered_order(VideoLayout(2, 4, 4), 2) is None
    assert gathered_order(VideoLayout(2, 4, 4, text_len=8, text_position="suffix"), 1) is None
    with pytest.raises(ValueError, match=r"text \(7\)"):
        gathered_order(VideoLayout(2, 4, 4, text_len=7, text_position="suffix"), 2)


def test_mask_for_heads_takes_this_ranks_rows_of_a_per_head_mask_and_leaves_shared_ones():
    blocks = torch.rand(1, 4, 3, 3) < 0.5  # (B, H, n_q, n_k), 4 heads
    blocks[..., 0] = True
    mask = BlockMask.from_block_dense(blocks, seq_len=48, q_block_size=16)
    rank1 = mask_for_heads(mask, offset=2, count=2, total=4)
    assert torch.equal(rank1.to_block_dense(), blocks[:, 2:4])
    assert mask_for_heads(mask, offset=2, count=2, total=4) is rank1  # kept with the mask: kernel caches survive
    shared = BlockMask.full(48, 16)
    assert mask_for_heads(shared, offset=2, count=2, total=4) is shared
    local = BlockMask.from_block_dense(blocks[:, :2], seq_len=48, q_block_size=16)  # estimated from local q, k
    assert mask_for_heads(local, offset=2, count=2, total=4) is local


def test_config_for_heads_cuts_per_head_profile_entries_to_this_ranks_heads():
    config = DraftConfig(layer_density=[(0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8)])
    assert config_for_heads(config, 2, 2).layer_density == ((0.3, 0.4), (0.7, 0.8))
    radial = RadialConfig()
    assert config_for_heads(radial, 2, 2) is radial


def test_a_session_cuts_its_config_to_a_ranks_heads_once(monkeypatch):
    import dit_sparse.session

    calls = []
    monkeypatch.setattr(dit_sparse.session, "config_for_heads", lambda config, *heads: calls.append(heads) or
                        config_for_heads(config, *heads))
    config = DraftConfig(layer_density=[(0.1, 0.2, 0.3, 0.4)], tile=(1, 4, 4))
    session = dit_sparse.session.SparseSession(config)
    layout = VideoLayout(2, 8, 8)
    q, k = torch.randn(2, 1, 2, layout.video_len, 8).unbind(0)  # this rank's 2 of 4 heads
    for step in range(3):  # draft's default refresh: a new estimate every step
        session.step = step
        mask, _ = session.mask_for(layout, "cpu", q=q, k=k, layer=0, site="attn", heads=(2, 2))
        assert mask.kv_block_counts.shape[1] == 2
    assert session.mask_builds == 3 and calls == [(2, 2)]
    assert session.config_for_heads((2, 2)).layer_density == ((0.3, 0.4),)


@pytest.mark.slow
def test_two_gloo_ranks_ulysses_match_one_process_for_wan_and_hunyuan_video(tmp_path):
    out = tmp_path / "cp.json"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == 2
    for results in ranks:
        assert set(results) == {"wan/dense", "wan/radial", "wan/vdit-per-head", "wan/draft-per-head",
                                "hunyuan/dense", "hunyuan/radial"}
        for case, r in results.items():
            assert r["max_abs_diff"] <= 1e-5 * r["scale"], (case, r)  # fp32: the same sums, split by heads
            if not case.endswith("dense"):  # the sparse cases really are sparse (and differ from dense)
                assert r["density"] < 1 and r["differs_from_dense"] > 1e-3, (case, r)
