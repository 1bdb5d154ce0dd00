"""Neighborhood attention (NATTEN's window, exact; STA's tiles, tile-aligned) against brute-force definitions, the
attention it runs against dense SDPA with its token mask, and `sparsify(pipe, "neighborhood")` on a tiny Wan.

Our Triton kernel on these masks, under TRITON_INTERPRET=1, is tested in tests/test_kernels.py (one interpreter
subprocess for all kernel cases)."""

import itertools
import math
import random

import pytest
import torch

import dit_sparse
from dit_sparse import kernels
from dit_sparse.attention import sparse_attention
from dit_sparse.kernels import fa4
from dit_sparse.layout import VideoLayout
from dit_sparse.patterns import PATTERNS, NeighborhoodConfig, build_mask, is_static, make_config
from dit_sparse.patterns.neighborhood import effective_window, neighborhood, tiled_order

TILES = [(1, 4, 4), (2, 2, 4), (1, 2, 8), (4, 2, 2), (2, 4, 4)]


# ---- brute-force definitions: loops over query coordinates -----------------------------------------------------------


def _natten_axis_keys(x: int, n: int, k: int, s: int, d: int) -> list[int]:
    """NATTEN's window on one axis, by its definition: the k members of x's dilation group around its stride group's
    leader, shifted inside the group at the borders (after clamping as `neighborhood` documents)."""
    d = min(d, n)
    k = max(1, min(k, n // d))
    s = min(s, k)
    members = list(range(x % d, n, d))
    i = x // d
    leader = min((i // s) * s + s // 2, len(members) - 1)
    start = min(max(leader - k // 2, 0), len(members) - k)
    return members[start : start + k]


def _brute_force(layout: VideoLayout, keys_of) -> torch.Tensor:
    """Bool (S, S) in the natural order: query (t, h, w) sees the product of `keys_of(axis, coordinate)`."""
    sizes = (layout.frames, layout.height, layout.width)
    allowed = torch.zeros(layout.video_len, layout.video_len, dtype=torch.bool)
    for t, h, w in itertools.product(*(range(n) for n in sizes)):
        query = (t * layout.height + h) * layout.width + w
        for kt, kh, kw in itertools.product(keys_of(0, t), keys_of(1, h), keys_of(2, w)):
            allowed[query, (kt * layout.height + kh) * layout.width + kw] = True
    return allowed


def _natten_brute_force(layout, window, stride, dilation):
    sizes = (layout.frames, layout.height, layout.width)
    return _brute_force(layout, lambda a, x: _natten_axis_keys(x, sizes[a], window[a], stride[a], dilation[a]))


def _sta_brute_force(layout, window, tile):
    """Whole tiles: the query's tile sees the tiles of NATTEN's window over the tile grid, ceil(window / tile) wide."""
    sizes = (layout.frames, layout.height, layout.width)

    def keys_of(a, x):
        n, size = sizes[a], tile[a]
        n_tiles = math.ceil(n / size)
        tiles = _natten_axis_keys(x // size, n_tiles, math.ceil(min(window[a], n) / size), 1, 1)
        return [y for y in range(n) if y // size in tiles]

    return _brute_force(layout, keys_of)


def _natten_flex_rule(layout, window, stride, dilation):
    """NATTEN's own FlexAttention mask_mod (`backends/flex.py`, non-causal), transcribed, on NATTEN-valid arguments."""
    sizes = (layout.frames, layout.height, layout.width)
    idx = torch.arange(layout.video_len)
    crd = torch.stack([idx // (sizes[1] * sizes[2]), (idx // sizes[2]) % sizes[1], idx % sizes[2]])  # (3, S)
    q, kv = crd[:, :, None], crd[:, None, :]
    mask = torch.ones(layout.video_len, layout.video_len, dtype=torch.bool)
    for i in range(3):
        n, k, s, d = sizes[i], window[i], stride[i], dilation[i]
        q_di, kv_di, q_g, kv_g = q[i] // d, kv[i] // d, q[i] % d, kv[i] % d
        padding = 1 - ((q_g + (d - (n % d))) // d)
        corrected = n // d + padding
        left, right = k // 2, k // 2 + (k % 2 - 1)
        leader = torch.minimum((q_di // s) * s + (s // 2), corrected - 1)
        center = torch.maximum(torch.minimum(leader, corrected - 1 - right), torch.full_like(leader, left))
        w0, w1 = center - kv_di, kv_di - center
        mask &= (((0 <= w0) & (w0 <= left)) | ((0 <= w1) & (w1 <= right))) & (q_g == kv_g)
    return mask


def _random_case(rng: random.Random):
    layout = VideoLayout(rng.randint(1, 5), rng.randint(1, 11), rng.randint(1, 11))
    window = tuple(rng.randint(1, 7) for _ in range(3))
    stride = tuple(rng.randint(1, k) for k in window)
    dilation = tuple(rng.randint(1, 3) for _ in range(3))
    return layout, window, stride, dilation, rng.choice(TILES)


def _blocked(dense: torch.Tensor, mask) -> torch.Tensor:
    """A natural-order (S, S) token mask in the mask's blocked order."""
    if mask.permutation is None:
        return dense
    perm = mask.permutation
    return dense[perm][:, perm]


def _block_any_all(blocked: torch.Tensor, block: int):
    """Per block pair: whether any / all of its token pairs are True (short tail blocks at their size)."""
    n = math.ceil(blocked.shape[0] / block)
    pad = n * block - blocked.shape[0]
    padded = torch.nn.functional.pad(blocked.float(), (0, pad, 0, pad), value=float("nan"))
    tiles = padded.view(n, block, n, block).transpose(1, 2).reshape(n, n, -1)
    real = ~torch.isnan(tiles)
    return (tiles.nan_to_num(0) > 0).any(-1), ((tiles == 1) | ~real).all(-1)


# ---- the exact variant -----------------------------------------------------------------------------------------------


def test_natten_flex_rule_matches_the_brute_force_definition():
    # Pins our reading of NATTEN: its own mask_mod equals the definition on arguments NATTEN accepts.
    rng = random.Random(1)
    checked = 0
    while checked < 5:
        layout, window, stride, dilation, _ = _random_case(rng)
        sizes = (layout.frames, layout.height, layout.width)
        if any(k * d > n for k, d, n in zip(window, dilation, sizes)):
            continue
        assert torch.equal(_natten_flex_rule(layout, window, stride, dilation),
                           _natten_brute_force(layout, window, stride, dilation)), (layout, window, stride, dilation)
        checked += 1


def test_exact_neighborhood_token_mask_matches_natten_brute_force():
    rng = random.Random(0)
    partial_somewhere = False
    for _ in range(16):
        layout, window, stride, dilation, tile = _random_case(rng)
        mask = neighborhood(layout, window=window, stride=stride, dilation=dilation, tile=tile, exact=True)
        expected = _natten_brute_force(layout, window, stride, dilation)
        assert torch.equal(mask.to_dense()[0, 0], expected), (layout, window, stride, dilation, tile)
        # Every query sees exactly the product of the clamped window sizes (a full window, NATTEN's guarantee).
        assert bool((expected.sum(1) == math.prod(effective_window(layout, window, stride, dilation)[0])).all())
        # Blocks: kept exactly when any pair is in the window, partial exactly when not all are.
        any_pair, all_pairs = _block_any_all(_blocked(expected, mask), mask.q_block_size)
        assert torch.equal(mask.to_block_dense()[0, 0], any_pair)
        assert torch.equal(mask.to_block_partial()[0, 0], any_pair & ~all_pairs)
        partial_somewhere |= mask.has_token_boxes
    assert partial_somewhere


def test_images_get_a_2d_window():
    # FLUX-like: one frame; the time window is clamped to 1, the spatial window is NATTEN's 2D one.
    layout = VideoLayout(1, 9, 13)
    mask = neighborhood(layout, window=(3, 5, 5), stride=(1, 2, 1), dilation=(1, 1, 2), tile=(1, 4, 4), exact=True)
    assert effective_window(layout, (3, 5, 5))[0] == (1, 5, 5)
    assert torch.equal(mask.to_dense()[0, 0], _natten_brute_force(layout, (1, 5, 5), (1, 2, 1), (1, 1, 2)))
    assert bool((mask.to_dense()[0, 0].sum(1) == 25).all())


def test_tiled_order_puts_whole_tiles_first_one_block_each():
    layout, tile = VideoLayout(5, 10, 19), (2, 4, 4)
    perm, coords = tiled_order(layout, tile)
    assert sorted(perm.tolist()) == list(range(layout.video_len))
    frame, rest = perm // layout.tokens_per_frame, perm % layout.tokens_per_frame
    assert torch.equal(coords, torch.stack([frame, rest // layout.width, rest % layout.width], 1))
    whole = 2 * 2 * 4  # whole tiles per axis: 5 // 2, 10 // 4, 19 // 4
    for i in range(whole):
        box = coords[i * 32 : (i + 1) * 32]
        spans = box.max(0).values - box.min(0).values + 1
        assert spans.tolist() == list(tile) and bool((box.min(0).values % torch.tensor(tile) == 0).all())
    assert perm is not None and tiled_order(VideoLayout(2, 8, 16), (1, 8, 16))[0] is None  # natural order already


# ---- the tile-aligned variant (STA) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, window, tile",
    [
        (VideoLayout(6, 8, 16), (3, 8, 16), (2, 4, 4)),  # 3 x 2 x 4 tiles of a 3 x 2 x 4 grid: dense
        (VideoLayout(4, 12, 16), (3, 5, 9), (2, 4, 4)),  # 2 x 2 x 3 of 2 x 3 x 4 tiles (windows rounded up)
        (VideoLayout(3, 16, 32), (1, 8, 16), (1, 8, 16)),  # 1 x 1 x 1 of 3 x 2 x 2
        (VideoLayout(1, 32, 32), (1, 17, 17), (1, 4, 4)),  # an image: 1 x 5 x 5 of 1 x 8 x 8
    ],
)
def test_tile_aligned_density_is_the_window_arithmetic(layout, window, tile):
    mask = neighborhood(layout, window=window, tile=tile)
    grid = [n // t for n, t in zip((layout.frames, layout.height, layout.width), tile)]
    kept_tiles = [min(math.ceil(min(k, t * g) / t), g) for k, t, g in zip(window, tile, grid)]
    assert math.isclose(mask.density, math.prod(k / g for k, g in zip(kept_tiles, grid)), rel_tol=1e-12)
    assert not mask.has_token_boxes
    counts = mask.kv_block_counts.flatten()
    assert bool((counts == math.prod(kept_tiles)).all())  # every query tile keeps a full tile window
    assert torch.equal(mask.to_dense()[0, 0], _sta_brute_force(layout, window, tile))


def _sta_official_rule(layout, kernel_tiles, tile):
    """FastVideo's `generate_sta_mask` (video part), transcribed: odd kernels in tiles, canvas a multiple of tile."""
    sizes = (layout.frames, layout.height, layout.width)
    grid = [n // t for n, t in zip(sizes, tile)]
    idx = torch.arange(layout.video_len)
    crd = torch.stack([idx // (sizes[1] * sizes[2]), (idx // sizes[2]) % sizes[1], idx % sizes[2]])
    tile_crd = crd // torch.tensor(tile)[:, None]
    mask = torch.ones(layout.video_len, layout.video_len, dtype=torch.bool)
    for a in range(3):
        k = kernel_tiles[a]
        center = tile_crd[a].clamp(k // 2, grid[a] - 1 - k // 2)
        mask &= (center[:, None] - tile_crd[a][None, :]).abs() <= k // 2
    return mask


def test_tile_aligned_equals_sta_and_exact_natten_with_stride_equal_to_the_tile():
    # STA is strided NA with stride = tile for windows of an odd number of tiles (GNA): then no block is partial.
    layout, tile = VideoLayout(6, 16, 24), (2, 4, 4)
    for kernel_tiles in [(1, 3, 3), (3, 1, 5), (3, 3, 1)]:
        window = tuple(k * t for k, t in zip(kernel_tiles, tile))
        sta = neighborhood(layout, window=window, tile=tile)
        assert torch.equal(sta.to_dense()[0, 0], _sta_official_rule(layout, kernel_tiles, tile))
        exact = neighborhood(layout, window=window, stride=tile, tile=tile, exact=True)
        assert not exact.has_token_boxes
        assert torch.equal(exact.to_block_dense(), sta.to_block_dense())


def test_tile_aligned_border_blocks_keep_every_block_their_tiles_keep():
    rng = random.Random(2)
    for _ in range(8):
        layout, window, _, _, tile = _random_case(rng)
        mask = neighborhood(layout, window=window, tile=tile)
        any_pair, _ = _block_any_all(_blocked(_sta_brute_force(layout, window, tile), mask), mask.q_block_size)
        assert torch.equal(mask.to_block_dense()[0, 0], any_pair), (layout, window, tile)
        assert not mask.has_token_boxes


# ---- attention through the mask --------------------------------------------------------------------------------------


def _dense_reference(q, k, v, video_allowed, layout, scale):
    """fp64 attention with the video token mask and dense joint text."""
    allowed = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
    video = layout.video_slice
    allowed[video, video] = video_allowed
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.double())


@pytest.mark.parametrize("exact", [True, False])
def test_reference_attention_equals_dense_sdpa_with_the_window_mask(exact):
    layout = VideoLayout(3, 7, 10, text_len=5, text_position="suffix")
    options = dict(window=(3, 5, 3), stride=(1, 2, 1), dilation=(1, 1, 2)) if exact else dict(window=(3, 5, 9))
    mask = neighborhood(layout, tile=(1, 4, 4), exact=exact, **options)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, 2, 16, generator=g) for _ in range(3))
    out = sparse_attention(q, k, v, mask, layout, backend="reference")
    expected = _dense_reference(q, k, v, mask.to_dense()[0, 0], layout, 16**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_fa4_refuses_exact_masks_by_name_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    exact = neighborhood(VideoLayout(3, 7, 10), window=(3, 5, 3), tile=(1, 4, 4), exact=True)
    assert exact.has_token_boxes
    assert "token_boxes" in kernels.unavailable_reason("fa4", "cuda", torch.bfloat16, 128, exact)
    with pytest.raises(ValueError, match="whole blocks"):
        fa4.to_fa4_block_sparse(exact)
    tiled = neighborhood(VideoLayout(3, 7, 10), window=(3, 5, 3), tile=(1, 4, 4))
    assert fa4.to_fa4_block_sparse(tiled).block_size == (16, 16)
    q = torch.zeros(1, exact.seq_len, 2, 16)
    assert kernels.resolve_backend("auto", q, exact) == "reference"  # CPU here; on a GPU, triton


# ---- config, registry, pipeline --------------------------------------------------------------------------------------


def test_config_normalises_and_builds_through_the_registry():
    config = make_config("neighborhood", window=[3, 9, 9], tile=[1, 4, 4])
    assert isinstance(config, NeighborhoodConfig) and config.window == (3, 9, 9) and config.tile == (1, 4, 4)
    assert is_static(config) and NeighborhoodConfig in PATTERNS
    layout = VideoLayout(2, 6, 8)
    mask = build_mask(layout, config)
    assert torch.equal(mask.to_dense(), neighborhood(layout, window=(3, 9, 9), tile=(1, 4, 4)).to_dense())
    exact = build_mask(layout, make_config(config, exact=True, window=(1, 3, 3), stride=(1, 1, 2)))
    assert torch.equal(exact.to_dense()[0, 0], _natten_brute_force(layout, (1, 3, 3), (1, 1, 2), (1, 1, 1)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": (3, 9)}, r"NeighborhoodConfig.window must be three positive ints .*got \(3, 9\)"),
        ({"window": (3, 0, 9)}, r"window must be three positive ints .*got \(3, 0, 9\)"),
        ({"stride": (1, 1, 2.0)}, r"stride must be three positive ints .*got \(1, 1, 2.0\)"),
        ({"dilation": "2"}, r"dilation must be three positive ints .*got '2'"),
        ({"tile": (1, 8, 12)}, r"tile \(1, 8, 12\) holds 96 tokens; it must hold a power of two >= 16"),
        ({"tile": (1, 2, 4)}, r"tile \(1, 2, 4\) holds 8 tokens"),
        ({"exact": True, "window": (3, 3, 3), "stride": (1, 4, 1)}, r"stride \(1, 4, 1\) must not exceed window"),
        ({"exact": 1}, r"exact must be a bool, got 1"),
        ({"stride": (1, 2, 2)}, r"stride \(1, 2, 2\) and dilation \(1, 1, 1\) need exact=True"),
        ({"dilation": (1, 2, 1)}, r"dilation \(1, 2, 1\) need exact=True"),
    ],
)
def test_config_rejects_bad_values_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        NeighborhoodConfig(**options)
    with pytest.raises(ValueError, match=message):
        neighborhood(VideoLayout(2, 8, 8), **{"window": (3, 3, 3), **options})


def test_sparsify_neighborhood_on_a_tiny_wan_pipeline():
    from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(seed=0)
    # 17 frames at 96 px: 5 latent frames of 6 x 6 tokens.
    call = dict(prompt="a red fish", num_frames=17, height=96, width=96, num_inference_steps=1, output_type="latent")
    dense = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    # the exact window on small tiles: sparse, and the video changes
    dit_sparse.sparsify(pipe, "neighborhood", window=(3, 3, 3), stride=(1, 2, 1), tile=(1, 4, 4), exact=True)
    try:
        latents = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)
    assert stats["method"] == "neighborhood" and 0 < stats["density"] < 1
    assert torch.isfinite(latents).all() and not torch.equal(latents, dense)
    # the brief's call, default tile (1, 8, 16): the 9 x 9 window covers the 6 x 6 frames, 3 of the 5 frames
    dit_sparse.sparsify(pipe, "neighborhood", window=(3, 9, 9))
    try:
        latents = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
        stats = dit_sparse.sparsity_stats(pipe)
    finally:
        dit_sparse.unsparsify(pipe)
    assert stats["method"] == "neighborhood" and 0 < stats["density"] <= 1 and torch.isfinite(latents).all()
