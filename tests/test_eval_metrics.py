"""dit_sparse.eval.metrics against formulas: PSNR, SSIM (Wang et al.), VBench flicker, smoothness, dynamic degree."""

import math

import numpy as np
import pytest

from dit_sparse.eval import metrics


def _texture(height=96, width=96, seed=0) -> np.ndarray:
    """A smooth random uint8 RGB texture (Farneback needs texture to track), (H, W, 3)."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, size=(height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


def _translated(dx: int, dy: int, frames=5, size=64, seed=0) -> np.ndarray:
    """A window sliding over a larger texture: content moves by (dx, dy) pixels per frame. (T, size, size, 3)."""
    margin = 4 * (abs(dx) + abs(dy)) * frames + 8
    texture = _texture(size + 2 * margin, size + 2 * margin, seed)
    # the window moves by (-dx, -dy) so the content inside it moves by (+dx, +dy)
    top, left = margin - np.arange(frames) * dy, margin - np.arange(frames) * dx
    return np.stack([texture[y : y + size, x : x + size] for y, x in zip(top, left)])


# ---- PSNR ------------------------------------------------------------------------------------------------------------
def test_psnr_of_identical_videos_is_infinite():
    video = _translated(1, 0)
    assert metrics.psnr(video, video.copy()) == math.inf


def test_psnr_of_a_known_noise_level_matches_the_formula():
    rng = np.random.default_rng(1)
    clean = np.full((3, 16, 16, 3), 128, dtype=np.uint8)
    sigma = 5  # every pixel off by exactly +-5: MSE = 25 on the 0-255 scale
    noisy = (clean.astype(int) + sigma * rng.choice([-1, 1], size=clean.shape)).astype(np.uint8)
    assert metrics.psnr(clean, noisy) == pytest.approx(10 * math.log10(255**2 / sigma**2), abs=1e-9)


def test_psnr_takes_lists_of_frames_and_single_frames():
    video = _translated(1, 1, frames=3)
    other = np.clip(video.astype(int) + 2, 0, 255).astype(np.uint8)
    assert metrics.psnr(list(video), list(other)) == metrics.psnr(video, other)
    assert metrics.psnr(video[0], other[0]) == metrics.psnr(video[:1], other[:1])


def test_psnr_and_ssim_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(np.zeros((2, 16, 16, 3), np.uint8), np.zeros((2, 16, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        metrics.ssim(np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16), np.uint8))


# ---- SSIM ------------------------------------------------------------------------------------------------------------
def test_ssim_of_identical_frames_is_one():
    video = _translated(2, 0)
    assert metrics.ssim(video, video.copy()) == 1.0
    frame = video[0].astype(np.float64).mean(-1)
    assert metrics.ssim_frame(frame, frame) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_flat_frames_is_the_luminance_term_of_the_formula():
    # Flat images: variances and covariance are 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1).
    a, b = np.full((2, 20, 20, 3), 100, np.uint8), np.full((2, 20, 20, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100**2 + 140**2 + c1), rel=1e-9)


def test_ssim_matches_scikit_image_on_luma():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    a = _translated(1, 0, frames=3, size=48)
    b = np.clip(a.astype(int) + np.random.default_rng(2).integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    luma_a = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    luma_b = b.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = np.mean([
        skimage_metrics.structural_similarity(
            x, y, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        for x, y in zip(luma_a, luma_b)
    ])  # fmt: skip
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-9)
    assert 0 < metrics.ssim(a, b) < 1


def test_ssim_rejects_frames_smaller_than_its_window():
    tiny = np.zeros((1, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(tiny, tiny)


# ---- VBench dimensions -------------------------------------------------------------------------------------------
def test_flicker_of_a_static_video_is_perfect_and_of_alternating_frames_follows_the_formula():
    static = np.repeat(_texture(32, 32)[None], 6, axis=0)
    assert metrics.temporal_flickering(static) == 1.0
    alternating = np.stack([np.full((8, 8, 3), 10 if t % 2 else 60, np.uint8) for t in range(5)])
    assert metrics.temporal_flickering(alternating) == pytest.approx((255 - 50) / 255)


@pytest.mark.parametrize("dx, dy", [(3, 0), (0, -2), (2, 2)])
def test_a_translated_video_gives_its_shift_as_flow_magnitude(dx, dy):
    video = _translated(dx, dy, frames=4, size=96)
    expected = math.hypot(dx, dy)
    assert metrics.flow_magnitudes(video) == pytest.approx([expected] * 3, rel=0.1)
    flow = metrics.farneback_flow(video[0], video[1])[16:-16, 16:-16].reshape(-1, 2).mean(0)
    assert flow == pytest.approx([dx, dy], abs=0.15)  # direction: first[y, x] ~ second[y + dy, x + dx]


def test_dynamic_degree_follows_vbenchs_threshold_rule():
    moving = _translated(4, 0, frames=9, size=64)  # 4 px per frame at 8 fps, threshold 6 * 64 / 256 = 1.5 px
    decision = metrics.dynamic_motion(moving, fps=8)
    assert decision["threshold"] == pytest.approx(1.5) and decision["needed"] == round(4 * 9 / 16)
    assert decision["scores"] == pytest.approx([4.0] * 8, rel=0.15)
    assert decision["dynamic"] and metrics.dynamic_degree(moving, fps=8)
    static = np.repeat(moving[:1], 9, axis=0)
    assert not metrics.dynamic_degree(static, fps=8)
    # at 16 fps every second frame is used (VBench samples about 8 fps): the pairs are 2 frames apart
    assert metrics.dynamic_motion(moving, fps=16)["scores"] == pytest.approx([8.0] * 4, rel=0.15)


def test_motion_smoothness_is_perfect_when_static_and_high_for_linear_motion_low_for_jumps():
    static = np.repeat(_texture(48, 48)[None], 5, axis=0)
    assert metrics.motion_smoothness(static) == 1.0
    linear = _translated(2, 1, frames=7, size=64)
    jumpy = np.stack([_texture(64, 64, seed=t) for t in range(7)])  # unrelated frames: nothing to interpolate
    assert metrics.motion_smoothness(linear) > 0.97
    assert metrics.motion_smoothness(jumpy) < metrics.motion_smoothness(linear) - 0.1


def test_interpolate_middle_recreates_a_translated_frame():
    video = _translated(3, 0, frames=3, size=64)
    middle = metrics.interpolate_middle(video[0], video[2])
    assert metrics.psnr(video[1][8:-8, 8:-8], middle[8:-8, 8:-8]) > 30


def test_optional_metrics_are_skipped_with_a_note_when_not_available_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("DIT_SPARSE_CLIP_MODEL", str(tmp_path / "no-clip-here"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found, notes = metrics.optional_metrics()
    assert "clip_score" not in found
    assert any(note.startswith("CLIP score skipped") and "no-clip-here" in note for note in notes)
    if "lpips" not in found:
        assert any(note.startswith("LPIPS skipped") for note in notes)
