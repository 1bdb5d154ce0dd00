"""Does a rendered video follow its shapes caption? An OpenCV check of the main blob's colour and motion.

For each frame, the background is estimated from the frame's border (a robust least-squares plane per channel,
which fits a plain background and a linear vertical or horizontal gradient exactly); the main blob is the largest
connected region of pixels far from that estimate. The video follows its caption when
- the blob is found in at least half of the frames,
- the nearest of `SHAPE_COLOURS` to the blob's median colour is the caption's colour, and
- the blob's centroid track (a least-squares line through the frames) is displaced by at least
  `min_displacement` of the shorter frame side, at an angle within `max_angle_deg` of the captioned direction.
A static video fails (no displacement), and so does noise (no consistent blob, colour or track).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dit_sparse.video import to_uint8

from .shapes import DIRECTIONS, SHAPE_COLOURS, parse_caption, video_params
from . import DEFAULT_STEPS

BORDER = 3  # pixels of each edge the background is fitted to
FOREGROUND_THRESHOLD = 40  # max channel difference (of 255) from the background estimate that makes a pixel "blob"
MIN_BLOB_AREA = 0.002  # of the frame's pixels, for a blob to count in a frame
MIN_BLOB_FRAMES = 0.5  # of the frames, for a track to exist
MIN_DISPLACEMENT = 0.1  # of the shorter side, over the whole video
MAX_ANGLE_DEG = 45.0

_PALETTE_NAMES = tuple(SHAPE_COLOURS)
_PALETTE = np.array([SHAPE_COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float64)  # (K, 3)


def nearest_colour(rgb: Sequence[float]) -> str:
    """The name in `SHAPE_COLOURS` nearest to an RGB colour (0-255), in Euclidean RGB distance."""
    distances = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float64)[None, :], axis=1)
    return _PALETTE_NAMES[int(np.argmin(distances))]


def direction_angle(direction: str) -> float:
    """A direction's angle in degrees, counter-clockwise from "right" with y UP (so "up" is 90)."""
    dx, dy = DIRECTIONS[direction]
    return math.degrees(math.atan2(-dy, dx))


def background_estimate(frame: np.ndarray, border: int = BORDER) -> np.ndarray:
    """The background under a frame `(H, W, 3)` uint8: per channel, a plane a + b x + c y fitted to the border
    pixels, refitted once without the 20% that fit worst (a shape touching the edge). Returns `(H, W, 3)` float."""
    height, width, _ = frame.shape
    ys, xs = np.mgrid[0:height, 0:width]
    ring = np.zeros((height, width), dtype=bool)
    ring[:border], ring[-border:], ring[:, :border], ring[:, -border:] = True, True, True, True
    design = np.stack([np.ones(ring.sum()), xs[ring] / width, ys[ring] / height], axis=1)  # (N, 3)
    values = frame[ring].astype(np.float64)  # (N, 3)
    coefficients = np.linalg.lstsq(design, values, rcond=None)[0]
    residual = np.abs(design @ coefficients - values).max(axis=1)
    keep = residual <= np.quantile(residual, 0.8)
    coefficients = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
    full = np.stack([np.ones(height * width), xs.ravel() / width, ys.ravel() / height], axis=1)
    return (full @ coefficients).reshape(height, width, 3)


def main_blob(frame: np.ndarray, threshold: float = FOREGROUND_THRESHOLD, min_area: float = MIN_BLOB_AREA):
    """The largest region far from the background in a frame `(H, W, 3)` uint8: its boolean mask, or None."""
    import cv2

    difference = np.abs(frame.astype(np.float64) - background_estimate(frame)).max(axis=2)  # (H, W)
    foreground = (difference > threshold).astype(np.uint8)
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))  # drop specks
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[largest, cv2.CC_STAT_AREA] < min_area * frame.shape[0] * frame.shape[1]:
        return None
    return labels == largest


def check_video(
    video: np.ndarray,
    caption: str,
    min_displacement: float = MIN_DISPLACEMENT,
    max_angle_deg: float = MAX_ANGLE_DEG,
) -> dict:
    """Check one video `(T, H, W, 3)` (uint8, or float in [0, 1]) against its caption; returns the details.

    Keys: ok, colour_ok, direction_ok, expected (colour, shape, direction), colour (found), rgb, blob_frames,
    displacement (pixels, (dx, dy) with y down), angle_error (degrees), reason (why not ok, "" if ok).
    """
    import cv2

    expected = parse_caption(caption)
    frames = to_uint8(video)
    count, height, width, _ = frames.shape
    centroids, colours = [], []
    for index, frame in enumerate(frames):
        mask = main_blob(frame)
        if mask is None:
            continue
        ys, xs = np.nonzero(mask)
        centroids.append((index, xs.mean() + 0.5, ys.mean() + 0.5))
        core = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # no anti-aliased edge
        colours.append(frame[core if core.any() else mask])
    details = {
        "ok": False, "colour_ok": False, "direction_ok": False, "expected": expected, "colour": None, "rgb": None,
        "blob_frames": len(centroids), "displacement": None, "angle_error": None, "reason": "",
    }  # fmt: skip
    if len(centroids) < max(2, math.ceil(MIN_BLOB_FRAMES * count)):
        details["reason"] = f"a blob in only {len(centroids)} of {count} frames"
        return details

    rgb = np.median(np.concatenate(colours), axis=0)
    details["rgb"] = [round(float(c), 1) for c in rgb]
    details["colour"] = nearest_colour(rgb)
    details["colour_ok"] = details["colour"] == expected["colour"]

    track = np.array(centroids)  # (N, 3): frame, x, y
    slope_x, slope_y = (np.polyfit(track[:, 0], track[:, axis], 1)[0] for axis in (1, 2))
    dx, dy = slope_x * (count - 1), slope_y * (count - 1)  # over the whole video, pixels
    details["displacement"] = (round(float(dx), 2), round(float(dy), 2))
    moved = math.hypot(dx, dy)
    if moved >= min_displacement * min(height, width):
        error = abs(math.degrees(math.atan2(-dy, dx)) - direction_angle(expected["direction"])) % 360.0
        details["angle_error"] = round(min(error, 360.0 - error), 2)
        details["direction_ok"] = details["angle_error"] <= max_angle_deg
    details["ok"] = details["colour_ok"] and details["direction_ok"]
    if not details["ok"]:
        reasons = []
        if not details["colour_ok"]:
            reasons.append(f"colour {details['colour']} (rgb {details['rgb']}), not {expected['colour']}")
        if details["angle_error"] is None:
            reasons.append(f"moved {moved:.1f} px, under {min_displacement:.0%} of {min(height, width)} px")
        elif not details["direction_ok"]:
            reasons.append(f"moved {details['angle_error']:.0f} degrees off {expected['direction']!r}")
        details["reason"] = "; ".join(reasons)
    return details


def score(videos: Sequence[np.ndarray], captions: Sequence[str], **options) -> tuple[int, list[dict]]:
    """How many videos follow their captions, and each one's `check_video` details (same order)."""
    if len(videos) != len(captions):
        raise ValueError(f"need one caption per video, got {len(videos)} videos and {len(captions)} captions")
    details = [check_video(video, caption, **options) for video, caption in zip(videos, captions)]
    return sum(d["ok"] for d in details), details


#: The dataset seed the evaluation prompts are drawn from (training draws from its own seed, 0 by default).
EVALUATION_SEED = 1_000


def evaluation_prompts(n: int = 10) -> list[str]:
    """`n` fixed captions for judging a trained model: videos 0..n-1 of the shapes dataset at `EVALUATION_SEED`."""
    return [video_params(EVALUATION_SEED, index).caption for index in range(n)]


def caption_following(
    pipe,
    n: int = 10,
    frames: int = 81,
    height: int = 160,
    width: int = 160,
    steps: int = DEFAULT_STEPS,
    guidance: float = 5.0,
) -> dict:
    """Render `evaluation_prompts(n)` with `pipe` (prompt i at noise seed i, a CPU generator so any device gives the
    same noise) and score them. Returns n_ok, prompts, details (per video) and videos (uint8)."""
    import torch

    prompts = evaluation_prompts(n)
    videos = []
    for seed, prompt in enumerate(prompts):
        output = pipe(
            prompt=prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
            guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np",
        )  # fmt: skip
        videos.append(to_uint8(output.frames[0]))
    n_ok, details = score(videos, prompts)
    return {"n_ok": n_ok, "prompts": prompts, "details": details, "videos": videos}
