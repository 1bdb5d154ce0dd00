"""The fused k-means kernels (`dit_sparse.kernels.kmeans`) against independent references: the assignment against
fp64 scores (and the torch engine where the best centroid is clear), the update against a per-cluster loop, the sort
against a sort of (label, index) keys, and `kmeans` / `reorder_cluster` through both engines on planted clusters.

On CPU the kernels run under TRITON_INTERPRET=1, which Triton reads when a kernel is defined: each check runs in a
subprocess with it set (as tests/test_kernels.py does). The same checks run on CUDA at larger sizes (`pytest -m gpu`).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_sparse import VideoLayout
from dit_sparse.patterns import reorder_cluster
from dit_sparse.patterns.reorder import KMEANS_ENV_VAR, forced_kmeans_engine, kmeans, kmeans_engine

TESTS = Path(__file__).resolve().parent

# (leading dims, S, K, D, dtype): S and K ragged against the tiles (the interpreter's are 64 points x 32 centroids)
ASSIGN_CASES_CPU = [((1, 2), 100, 37, 32, torch.float32), ((2, 1), 75, 19, 16, torch.bfloat16),
                    ((3,), 130, 70, 64, torch.float16)]
ASSIGN_CASES_GPU = [((2, 4), 5000, 300, 128, torch.bfloat16), ((3,), 3001, 129, 64, torch.float16),
                    ((2,), 4097, 77, 32, torch.float32), ((1, 2), 999, 929, 128, torch.bfloat16)]
# (leading dims, S, K, D, x dtype): S over several sort chunks (512), empty clusters, one cluster of half the points
UPDATE_CASES_CPU = [((1, 2), 1100, 13, 32, torch.float32), ((2,), 300, 9, 16, torch.bfloat16)]
UPDATE_CASES_GPU = [((2, 4), 20000, 300, 128, torch.float32), ((3,), 3001, 50, 64, torch.bfloat16)]
# (layout, heads, D, block size, dtype) of the planted-cluster runs
PLANTED_CPU = (VideoLayout(2, 8, 16), 2, 32, 32, torch.float32)
PLANTED_GPU = (VideoLayout(4, 16, 32), 4, 128, 64, torch.bfloat16)


def _exact_scores(x, centroids):
    """(..., S, K) fp64 x.c - |c|^2 / 2, c cast to x's dtype for the dot as both engines do, and (..., S) the
    largest |x.c| + |c|^2 / 2 of each point (what the torch engine's roundings in x's dtype scale with)."""
    dot = x.double() @ centroids.to(x.dtype).double().transpose(-1, -2)
    half_norms = 0.5 * centroids.double().square().sum(-1)[..., None, :]
    return dot - half_norms, (dot.abs() + half_norms).amax(-1)


def check_assign(device, cases):
    from dit_sparse.kernels import kmeans as fused
    from dit_sparse.patterns.reorder import _assign

    for i, (lead, seq_len, clusters, dim, dtype) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(*lead, seq_len, dim, generator=g).to(dtype).to(device)
        centroids = torch.randn(*lead, clusters, dim, generator=g)
        centroids[..., 5, :] = centroids[..., 2, :]  # exact ties, in one tile and across tiles: the lower index wins
        centroids[..., clusters - 1, :] = centroids[..., 1, :]
        centroids = centroids.to(device)
        labels, best = fused.assign(x, centroids)
        assert labels.dtype == torch.int64 and best.dtype == torch.float32 and labels.shape == x.shape[:-1]
        scores, magnitude = _exact_scores(x, centroids)
        top2 = scores.topk(2, dim=-1).values  # (..., S, 2)
        tolerance = 2e-5 * magnitude + 1e-4  # (..., S): fp32 accumulation of the dot and of |c|^2
        assert ((best.double() - top2[..., 0]).abs() <= tolerance).all(), (i, "best score")
        chosen = scores.gather(-1, labels[..., None])[..., 0]
        assert (chosen >= top2[..., 0] - tolerance).all(), (i, "chosen centroid not within tolerance of the max")
        clear = top2[..., 0] - top2[..., 1] > 2 * tolerance
        assert torch.equal(labels[clear], scores.argmax(-1)[clear]), i
        assert not ((labels == 5) | (labels == clusters - 1)).any(), (i, "a tie went to the higher index")
        # the torch engine (dot, |c|^2 / 2 and their difference rounded to x's dtype) where that cannot flip the choice
        torch_labels, torch_best = _assign(x, centroids, "torch")
        rounding = 1.5 * torch.finfo(dtype).eps * magnitude + tolerance
        assert ((best.double() - torch_best.double()).abs() <= 2 * rounding).all(), i
        far_apart = top2[..., 0] - top2[..., 1] > 4 * rounding
        assert far_apart.any() and torch.equal(labels[far_apart], torch_labels[far_apart]), i


def check_update(device, cases):
    from dit_sparse.kernels import kmeans as fused

    for i, (lead, seq_len, clusters, dim, dtype) in enumerate(cases):
        g = torch.Generator().manual_seed(10 + i)
        x = torch.randn(*lead, seq_len, dim, generator=g).to(dtype)
        labels = torch.randint(0, clusters - 2, (*lead, seq_len), generator=g)  # the last two clusters empty
        labels[labels == 3] = 4  # and one in the middle
        labels[..., : seq_len // 2][torch.rand(*lead, seq_len // 2, generator=g) < 0.8] = 0  # one big cluster
        old = torch.randn(*lead, clusters, dim, generator=g)
        centroids, sizes, order = fused.update(x.to(device), labels.to(device), old.to(device))

        flat_x, flat_labels, flat_old = x.reshape(-1, seq_len, dim), labels.reshape(-1, seq_len), old.reshape(
            -1, clusters, dim)
        expected = torch.empty(flat_old.shape, dtype=torch.float64)
        expected_sizes = torch.empty(flat_old.shape[:2])
        for p in range(flat_x.shape[0]):
            for k in range(clusters):
                members = flat_x[p][flat_labels[p] == k].double()
                expected[p, k] = members.mean(0) if len(members) else flat_old[p, k].double()
                expected_sizes[p, k] = len(members)
        torch.testing.assert_close(centroids.cpu().reshape(expected.shape).double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(sizes.cpu().reshape(expected_sizes.shape), expected_sizes), i
        assert (expected_sizes[:, -2:] == 0).all() and (expected_sizes[:, 3] == 0).all()
        # the order: tokens by label, ascending index within a label (sort of unique keys label * S + index)
        keys = flat_labels * seq_len + torch.arange(seq_len)
        expected_order = keys.sort(-1).values % seq_len
        assert torch.equal(order.cpu().reshape(expected_order.shape), expected_order), i
        _, ends = fused.sort_by_label(labels.to(device), clusters)
        assert torch.equal(ends.cpu().reshape(expected_sizes.shape).long(), expected_sizes.long().cumsum(-1)), i


def _planted(layout, heads, dim, block_size, dtype, device, seed):
    """q, k (1, H, S, D): each a cluster of `block_size` points around each of S / block_size centres, hidden by a
    random permutation; one point of each cluster (H, K, D) as initial centroids for k-means."""
    g = torch.Generator().manual_seed(seed)
    seq_len = layout.video_len
    groups = math.ceil(seq_len / block_size)
    group_of = torch.randperm(seq_len, generator=g) % groups
    q, k = (10 * torch.nn.functional.normalize(torch.randn(heads, groups, dim, generator=g), dim=-1)[:, group_of]
            + 0.3 * torch.randn(heads, seq_len, dim, generator=g) for _ in range(2))
    first_of_group = torch.stack([(group_of == j).nonzero()[0, 0] for j in range(groups)])
    init = q[:, first_of_group]
    return q[None].to(dtype).to(device), k[None].to(dtype).to(device), init[None].to(device)


def check_engines_agree(device, planted):
    layout, heads, dim, block_size, dtype = planted
    q, k, init = _planted(layout, heads, dim, block_size, dtype, device, seed=3)
    runs = {}
    for engine in ("torch", "triton"):
        with forced_kmeans_engine(engine):
            assert kmeans_engine(q) == engine
            labels, centroids, sizes = kmeans(q, init, 3)
            cold, state = reorder_cluster(layout, q, k, density=0.25, block_size=block_size)
        runs[engine] = (labels, centroids, sizes, cold, state)
    (labels, centroids, sizes, cold, state), (t_labels, t_centroids, t_sizes, t_cold, t_state) = runs.values()
    assert torch.equal(t_labels, labels) and torch.equal(t_sizes, sizes)
    torch.testing.assert_close(t_centroids, centroids, atol=1e-4, rtol=1e-4)
    if dtype == torch.float32:  # fp32 scores in both engines: the cold start takes the same steps
        assert torch.equal(t_cold.permutation, cold.permutation)
        assert torch.equal(t_cold.kv_permutation, cold.kv_permutation)
        assert _blocks_differing(t_cold, cold) <= 0.01
    # a warm start from one state: the same orders and blocks (bar near-ties of the centroid-level attention, whose
    # centroids are sums in another order)
    warm = {}
    for engine in ("torch", "triton"):
        with forced_kmeans_engine(engine):
            warm[engine] = reorder_cluster(layout, q, k, density=0.25, block_size=block_size, state=state)
    (mask, new_state), (t_mask, t_new_state) = warm.values()
    assert torch.equal(t_mask.permutation, mask.permutation) and torch.equal(t_mask.kv_permutation,
                                                                             mask.kv_permutation)
    assert _blocks_differing(t_mask, mask) <= 0.01
    torch.testing.assert_close(t_new_state["q"], new_state["q"], atol=1e-4, rtol=1e-4)


def _blocks_differing(mask, other) -> float:
    """Share of (query, key) pairs one mask keeps and the other does not."""
    return float((mask.to_dense() != other.to_dense()).float().mean())


def _interpreted(check: str, *arguments: str):
    """Run `check(*arguments)` of this module in a subprocess under TRITON_INTERPRET=1 on one CPU thread."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", KMEANS_ENV_VAR: ""}
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import torch; torch.set_num_threads(1); "
            f"import test_kmeans_kernels as t; t.{check}('cpu', {', '.join(arguments)})")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def test_assign_picks_the_nearest_centroid_lowest_index_on_ties_under_interpreter():
    _interpreted("check_assign", "t.ASSIGN_CASES_CPU")


def test_update_equals_per_cluster_means_keeps_empty_clusters_and_sorts_stably_under_interpreter():
    _interpreted("check_update", "t.UPDATE_CASES_CPU")


def test_triton_and_torch_engines_find_the_same_planted_clusters_under_interpreter():
    _interpreted("check_engines_agree", "t.PLANTED_CPU")


def test_unknown_kmeans_engine_raises_naming_it_and_the_allowed_ones(monkeypatch):
    layout, heads, dim, block_size, dtype = PLANTED_CPU
    q, k, init = _planted(layout, heads, dim, block_size, dtype, "cpu", seed=0)
    monkeypatch.setenv(KMEANS_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"DIT_SPARSE_KMEANS='cuda'.*\('auto', 'torch', 'triton'\)"):
        reorder_cluster(layout, q, k, block_size=block_size)
    with pytest.raises(ValueError, match="DIT_SPARSE_KMEANS='cuda'"):
        kmeans(q, init, 1)


def test_kmeans_engine_is_torch_off_cuda_and_triton_says_what_is_missing(monkeypatch):
    x = torch.zeros(1, 2, 8, 32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for value in (None, "", "auto", "torch"):
        if value is None:
            monkeypatch.delenv(KMEANS_ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(KMEANS_ENV_VAR, value)
        assert kmeans_engine(x) == "torch"
    monkeypatch.setenv(KMEANS_ENV_VAR, "triton")
    with pytest.raises(ValueError, match="DIT_SPARSE_KMEANS=triton cannot run here.*TRITON_INTERPRET"):
        kmeans_engine(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kmeans_engine(x) == "triton"
    with pytest.raises(ValueError, match="head_dim"):
        kmeans_engine(torch.zeros(1, 2, 8, 80))
    monkeypatch.setenv(KMEANS_ENV_VAR, "auto")
    assert kmeans_engine(x) == "torch"  # the interpreter runs only when asked for


@pytest.mark.gpu
def test_kmeans_kernels_match_their_references_on_cuda_without_host_syncs():
    check_assign("cuda", ASSIGN_CASES_GPU)
    check_update("cuda", UPDATE_CASES_GPU)
    check_engines_agree("cuda", PLANTED_GPU)
    layout, heads, dim, block_size, dtype = PLANTED_GPU
    q, _, init = _planted(layout, heads, dim, block_size, dtype, "cuda", seed=4)
    with forced_kmeans_engine("auto"):
        assert kmeans_engine(q) == "triton"
        expected = kmeans(q, init, 2)  # compiles and tunes the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync raises
        try:
            found = kmeans(q, init, 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(found, expected))  # deterministic: no atomics in the sums
