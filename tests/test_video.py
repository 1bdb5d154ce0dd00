"""dit_sparse.video: atomic H.264 writing, OpenCV reading, PSNR against hand-computed values."""

import math
import os

import imageio_ffmpeg
import numpy as np
import pytest

from dit_sparse.video import psnr, read_video, to_float, to_uint8, write_mp4


def _smooth_video(frames=5, height=32, width=48) -> np.ndarray:
    """Float (T, H, W, 3) in [0, 1]: gradients that move, which H.264 keeps nearly exactly."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    video = np.stack([x / width, y / height, 0.5 + 0.4 * np.sin(t / 2 + x / 10)], axis=-1)
    return video.astype(np.float32)


def test_write_mp4_round_trips_through_opencv_at_size_and_frame_count(tmp_path):
    video = _smooth_video()
    path = write_mp4(video, tmp_path / "clip.mp4", fps=8)
    assert path == str(tmp_path / "clip.mp4")
    decoded = read_video(path)
    assert decoded.shape == (5, 32, 48, 3) and decoded.dtype == np.uint8
    assert psnr(video, decoded) > 35
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_write_mp4_takes_uint8_frames_unchanged(tmp_path):
    video = to_uint8(_smooth_video())
    decoded = read_video(write_mp4(video, tmp_path / "u8.mp4", fps=8))
    assert psnr(video, decoded) > 35


def _failing_writer(fail_at: int):
    real = imageio_ffmpeg.write_frames

    def write_frames(*args, **kwargs):
        generator = real(*args, **kwargs)

        def wrapped():
            generator.send(None)  # start ffmpeg, as write_mp4 does
            for index in range(10**6):
                frame = yield
                if index == fail_at:
                    generator.close()
                    raise OSError("disk full (simulated)")
                generator.send(frame)

        return wrapped()

    return write_frames


def test_write_mp4_failure_midway_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", _failing_writer(fail_at=3))
    with pytest.raises(OSError, match="simulated"):
        write_mp4(_smooth_video(), tmp_path / "clip.mp4", fps=8)
    assert os.listdir(tmp_path) == []


def test_write_mp4_failure_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_mp4(_smooth_video(frames=3), path, fps=8)
    before = path.read_bytes()
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", _failing_writer(fail_at=2))
    with pytest.raises(OSError):
        write_mp4(_smooth_video(frames=5), path, fps=8)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["clip.mp4"]


@pytest.mark.parametrize(
    "frames, match",
    [
        (np.zeros((2, 31, 32, 3), np.uint8), "even"),
        (np.zeros((2, 32, 32), np.uint8), "shape"),
        (np.zeros((2, 32, 32, 3), np.int32), "dtype"),
    ],
)
def test_write_mp4_rejects_bad_frames_before_creating_anything(tmp_path, frames, match):
    with pytest.raises((ValueError, TypeError), match=match):
        write_mp4(frames, tmp_path / "bad.mp4", fps=8)
    assert os.listdir(tmp_path) == []


def test_read_video_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")


def test_psnr_matches_a_hand_computed_value():
    a = np.zeros((1, 2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # one of 12 values off by the full range: MSE 1/12 on [0, 1]
    assert psnr(a, b) == pytest.approx(10 * math.log10(12))
    c = np.full((1, 2, 2, 3), 10, np.uint8)  # every value off by 10/255
    assert psnr(a, c) == pytest.approx(20 * math.log10(255 / 10))


def test_psnr_mixes_uint8_and_float_and_is_inf_for_identical_videos():
    video = to_uint8(_smooth_video())
    assert psnr(video, video) == math.inf
    assert psnr(video, video / 255.0) == math.inf
    with pytest.raises(ValueError, match="same shape"):
        psnr(video, video[:-1])


def test_frame_conversions_clip_and_round():
    floats = np.array([-0.5, 0.0, 0.5, 1.0, 2.0], np.float32).reshape(1, 1, 5, 1).repeat(3, axis=-1)
    assert to_uint8(floats)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert to_float(to_uint8(floats))[0, 0, :, 0].tolist() == [0.0, 0.0, 128 / 255, 1.0, 1.0]
