"""Videos on disk: frame conversion, atomic H.264 mp4 writing (imageio-ffmpeg), reading back (OpenCV), PSNR (SSIM and the other metrics: `dit_sparse.eval.metrics`).

A video in memory is a numpy array `(T, H, W, 3)`: either uint8 in [0, 255] or float in [0, 1]
(what diffusers pipelines return with `output_type="np"`).
"""

from __future__ import annotations

import os

import numpy as np

from dit_sparse.files import atomic_path

#: imageio-ffmpeg's quality scale (0-10); 9 maps to x264 CRF 5, visually lossless, so files can be compared.
MP4_QUALITY = 9


def _check_video(frames: np.ndarray, name: str = "frames") -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{name} must have shape (T, H, W, 3) with T >= 1, got {frames.shape}")
    return frames


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """A video as uint8 `(T, H, W, 3)`: uint8 passes through, floats in [0, 1] are clipped, scaled and rounded."""
    frames = _check_video(frames)
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_float(frames: np.ndarray) -> np.ndarray:
    """A video as float64 in [0, 1]: uint8 is divided by 255, floats are taken as already in [0, 1]."""
    frames = _check_video(frames)
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    if not np.issubdtype(frames.dtype, np.floating):
        raise TypeError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    return frames.astype(np.float64)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float, quality: float = MP4_QUALITY) -> str:
    """Write `frames` (T, H, W, 3) as an H.264 (yuv420p) mp4 at `path`, atomically; returns the path.

    The video is encoded into a temporary file in the same folder and renamed over `path` only when
    complete, so `path` never holds a partial video; on any failure the temporary file is removed.
    H and W must be even (H.264 with 4:2:0 chroma); multiples of 16 avoid any rescaling.
    """
    import imageio_ffmpeg

    video = to_uint8(frames)
    _, height, width, _ = video.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    path = os.fspath(path)
    with atomic_path(path, suffix=".part.mp4") as tmp_path:
        writer = imageio_ffmpeg.write_frames(
            tmp_path,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=quality,
            macro_block_size=16,
            ffmpeg_log_level="error",
        )
        writer.send(None)  # start ffmpeg
        try:
            for frame in video:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()  # waits for ffmpeg; raises if it failed
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file with OpenCV into uint8 RGB frames `(T, H, W, 3)`."""
    import cv2

    path = os.fspath(path)
    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise ValueError(f"cannot open video {path!r}")
        frames = []
        while True:
            ok, frame = capture.read()  # (H, W, 3) BGR
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise ValueError(f"no frames could be decoded from {path!r}")
    return np.stack(frames)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of video `b` against `a` in dB, over all frames, pixels and channels.

    Each video is uint8 (peak 255) or float in [0, 1]; both are compared on the [0, 1] scale, so a uint8
    and a float video can be mixed. Identical videos give `inf`.
    """
    a, b = to_float(a), to_float(b)
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else 10.0 * float(np.log10(1.0 / mse))
