"""Video metrics for the eval suite: fidelity against a reference video, and weight-free VBench-style dimensions.

Videos are uint8 RGB `(T, H, W, 3)` numpy arrays, or lists of `(H, W, 3)` frames; a single `(H, W, 3)` frame is a
one-frame video. Floats in [0, 1] are accepted too (they are rounded to uint8 where a metric works on 0-255).

Fidelity (`b` against the reference `a`):
- `psnr`: `dit_sparse.video.psnr` over all frames, pixels and channels; identical videos give `inf`.
- `ssim`: Wang et al. (2004), "Image quality assessment: from error visibility to structural similarity": an 11 x 11
  Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, on each frame's BT.601 luma
  (Y = 0.299 R + 0.587 G + 0.114 B, unrounded), the mean over the window positions that fit inside the frame
  ("valid", as Wang's reference code), then the mean over frames. No automatic downsampling.
- `lpips`, `clip_score`: optional (`optional_metrics`): used only when their package imports AND their weights are
  already on disk; nothing is ever downloaded.

VBench dimensions (Huang et al., 2024, "VBench: Comprehensive Benchmark Suite for Video Generative Models"), as VBench
defines them, with OpenCV's Farneback optical flow in place of the learnt models where one is needed:
- `temporal_flickering`: VBench's own (no model): 1 - mean |frame[i+1] - frame[i]| / 255 over pixels, channels and
  consecutive pairs. 1.0 is a perfectly static video.
- `motion_smoothness`: VBench drops the odd frames, re-creates each from its two even neighbours with the AMT
  interpolation network, and scores 1 - mean |original - interpolated| / 255 over the odd frames. Here the middle
  frame is interpolated from Farneback flows in both directions (Super SloMo's intermediate-flow approximation at
  t = 1/2, no occlusion maps) instead of AMT: smooth, linear motion is re-created closely and scores near 1.
- `dynamic_degree`: VBench's rule on Farneback flow instead of RAFT: frames sampled at about 8 fps, per consecutive
  pair the mean of the largest 5% flow magnitudes (pixels), a pair "moves" above 6 px x (short side / 256)
  (x max(1, 8 / fps)), and the video is dynamic (True) when at least round(4 x frames / 16) pairs move. A method's
  dynamic degree is the fraction of its videos that are dynamic.
Farneback is a classical estimator: it follows textured, moderate motion (a few pixels per frame) well and
underestimates large or textureless motion where RAFT would not, so these scores are comparable between methods of
one eval, not with published VBench numbers.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from dit_sparse.video import psnr as _video_psnr
from dit_sparse.video import to_uint8

#: SSIM constants (Wang et al., 2004).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # BT.601

#: Farneback parameters (OpenCV's sample values); one call per frame pair, on luma.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
#: dynamic degree (VBench): the sampling rate, the share of largest magnitudes, the threshold at 256 px.
DYNAMIC_FPS = 8.0
DYNAMIC_TOP_SHARE = 0.05
DYNAMIC_THRESHOLD_PX = 6.0


# ---- inputs ------------------------------------------------------------------------------------------------------
def as_video(frames, name: str = "video") -> np.ndarray:
    """A uint8 `(T, H, W, 3)` array from a video array, a list of frames, or one `(H, W, 3)` frame."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError(f"{name} must hold at least one frame, got an empty {type(frames).__name__}")
        frames = np.stack([np.asarray(frame) for frame in frames])
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"{name} must have shape (T, H, W, 3) or (H, W, 3), got {frames.shape}")
    return to_uint8(frames)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_video(a, "a"), as_video(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"videos must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def luma(video: np.ndarray) -> np.ndarray:
    """BT.601 luma of uint8 RGB frames, float64 `(T, H, W)` in [0, 255] (unrounded)."""
    return np.asarray(video, dtype=np.float64) @ np.asarray(LUMA_WEIGHTS)


# ---- fidelity ----------------------------------------------------------------------------------------------------
def psnr(a, b) -> float:
    """PSNR of `b` against `a` in dB (`dit_sparse.video.psnr`, peak 255 on uint8); identical videos give `inf`."""
    return _video_psnr(*_pair(a, b))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()  # (size,): the 2D window is its outer product


def _valid_filter(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The separable Gaussian filter at the positions where the whole window fits in the image."""
    import cv2

    filtered = cv2.sepFilter2D(image, cv2.CV_64F, window, window, borderType=cv2.BORDER_REFLECT)
    pad = (len(window) - 1) // 2
    return filtered[pad:-pad, pad:-pad]


def ssim_frame(x: np.ndarray, y: np.ndarray, data_range: float = 255.0) -> float:
    """SSIM of two float64 `(H, W)` images (Wang et al., 2004), the mean of the valid SSIM map."""
    window = _gaussian_window()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _valid_filter(x, window), _valid_filter(y, window)
    var_x = _valid_filter(x * x, window) - mu_x**2
    var_y = _valid_filter(y * y, window) - mu_y**2
    cov = _valid_filter(x * y, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def ssim(a, b) -> float:
    """Mean over frames of the SSIM of `b`'s luma against `a`'s (11 x 11 Gaussian window, sigma 1.5); 1.0 when equal.

    Frames must be at least 11 x 11 pixels.
    """
    a, b = _pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape[1:3]}")
    if np.array_equal(a, b):
        return 1.0
    ya, yb = luma(a), luma(b)
    return float(np.mean([ssim_frame(x, y) for x, y in zip(ya, yb)]))


# ---- optical flow ------------------------------------------------------------------------------------------------
def farneback_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Dense flow from `first` to `second` (uint8 RGB `(H, W, 3)` frames): `(H, W, 2)` float32 (dx, dy) pixels, such
    that first[y, x] ~ second[y + dy, x + dx]."""
    import cv2

    gray = [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in (first, second)]
    return cv2.calcOpticalFlowFarneback(gray[0], gray[1], None, **FARNEBACK)


def flow_magnitudes(video) -> np.ndarray:
    """Mean Farneback flow magnitude (pixels per frame) of each consecutive frame pair: `(T - 1,)`."""
    video = as_video(video)
    return np.array(
        [float(np.linalg.norm(farneback_flow(f0, f1), axis=-1).mean()) for f0, f1 in zip(video[:-1], video[1:])]
    )


def _top_share_mean(flow: np.ndarray, share: float = DYNAMIC_TOP_SHARE) -> float:
    """VBench's per-pair motion score: the mean of the largest `share` of flow magnitudes."""
    magnitudes = np.sort(np.linalg.norm(flow, axis=-1).ravel())[::-1]
    return float(magnitudes[: max(1, int(magnitudes.size * share))].mean())


# ---- VBench dimensions -------------------------------------------------------------------------------------------
def temporal_flickering(video) -> float:
    """VBench temporal flickering: 1 - mean |frame[i+1] - frame[i]| / 255; 1.0 for a static (or one-frame) video."""
    video = as_video(video).astype(np.float32)
    if len(video) < 2:
        return 1.0
    return float((255.0 - np.abs(np.diff(video, axis=0)).mean()) / 255.0)


def _warp(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: out[y, x] = frame[y + flow_y, x + flow_x] (bilinear, border replicated)."""
    import cv2

    height, width = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return cv2.remap(frame, xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def interpolate_middle(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The frame halfway between two uint8 frames, from Farneback flows both ways (Super SloMo at t = 1/2:
    F(t->0) = (F(1->0) - F(0->1)) / 4, F(t->1) = -F(t->0), the two warped frames averaged)."""
    forward, backward = farneback_flow(first, second), farneback_flow(second, first)
    to_first = 0.25 * (backward - forward)
    middle = 0.5 * (_warp(first.astype(np.float32), to_first) + _warp(second.astype(np.float32), -to_first))
    return np.clip(np.round(middle), 0, 255).astype(np.uint8)


def motion_smoothness(video) -> float:
    """VBench motion smoothness with flow interpolation in place of AMT: each odd frame re-created from its even
    neighbours, scored 1 - mean |original - interpolated| / 255. Needs 3 frames; 1.0 for a static video."""
    video = as_video(video)
    if len(video) < 3:
        raise ValueError(f"motion_smoothness needs at least 3 frames, got {len(video)}")
    errors = [
        np.abs(video[i].astype(np.float32) - interpolate_middle(video[i - 1], video[i + 1])).mean()
        for i in range(1, len(video) - 1, 2)
    ]
    return float((255.0 - np.mean(errors)) / 255.0)


def dynamic_motion(video, fps: float) -> dict:
    """VBench's dynamic-degree decision for one video, on Farneback flow: the frames sampled at about 8 fps, the
    per-pair scores (mean of the largest 5% magnitudes, pixels), the threshold, the pairs needed, and `dynamic`."""
    video = as_video(video)
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    sampled = video[:: max(1, round(fps / DYNAMIC_FPS))]
    threshold = max(1.0, DYNAMIC_FPS / fps) * DYNAMIC_THRESHOLD_PX * min(video.shape[1:3]) / 256.0
    needed = round(4 * len(sampled) / 16.0)
    scores = [_top_share_mean(farneback_flow(f0, f1)) for f0, f1 in zip(sampled[:-1], sampled[1:])]
    moving = sum(score > threshold for score in scores)
    # VBench counts pairs in order and stops at `needed`; with needed == 0 its loop answers True at the first pair.
    dynamic = bool(scores) and moving >= needed
    return {"scores": scores, "threshold": threshold, "needed": needed, "dynamic": dynamic}


def dynamic_degree(video, fps: float) -> bool:
    """Whether a video is dynamic by VBench's rule (`dynamic_motion`); a method's dynamic degree is the mean."""
    return dynamic_motion(video, fps)["dynamic"]


def video_dimensions(video, fps: float) -> dict:
    """The reference-free dimensions of one video: flicker, smoothness, dynamic (bool), and the mean flow (px)."""
    video = as_video(video)
    motion = dynamic_motion(video, fps)
    return {
        "temporal_flickering": temporal_flickering(video),
        "motion_smoothness": motion_smoothness(video) if len(video) >= 3 else None,
        "dynamic": motion["dynamic"],
        "flow_px": float(flow_magnitudes(video).mean()) if len(video) >= 2 else 0.0,
    }


def fidelity(reference, video) -> dict:
    """PSNR (dB) and SSIM of `video` against `reference`."""
    return {"psnr": psnr(reference, video), "ssim": ssim(reference, video)}


# ---- optional, learnt metrics ------------------------------------------------------------------------------------
#: The CLIP checkpoint looked for in the local Hugging Face cache (override with DIT_SPARSE_CLIP_MODEL).
CLIP_MODEL = "openai/clip-vit-base-patch32"


def _lpips_weights() -> str | None:
    """The AlexNet checkpoint LPIPS builds on, if torchvision's cache holds it."""
    import torch

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    if not os.path.isdir(folder):
        return None
    found = sorted(name for name in os.listdir(folder) if name.startswith("alexnet-owt"))
    return os.path.join(folder, found[0]) if found else None


class LPIPS:
    """LPIPS (Zhang et al., 2018), AlexNet variant, per frame in [-1, 1], averaged over frames; lower is closer."""

    name = "lpips"

    def __init__(self, device: str = "cpu"):
        import lpips

        self.device = device
        self.model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def __call__(self, reference, video) -> float:
        import torch

        a, b = _pair(reference, video)
        def to_tensor(video):  # (T, 3, H, W) in [-1, 1]
            return torch.from_numpy(video).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)

        with torch.no_grad():
            return float(self.model(to_tensor(a), to_tensor(b)).mean())


class CLIPScore:
    """CLIP score (Hessel et al., 2021, as torchmetrics): 100 x max(cos(image, text), 0), the mean over frames."""

    name = "clip_score"

    def __init__(self, device: str = "cpu", model: str | None = None):
        from transformers import CLIPModel, CLIPProcessor

        self.model_id = model or os.environ.get("DIT_SPARSE_CLIP_MODEL", CLIP_MODEL)
        self.device = device
        self.model = CLIPModel.from_pretrained(self.model_id, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.model_id, local_files_only=True)

    def __call__(self, video, prompt: str) -> float:
        import torch

        frames = list(as_video(video))
        inputs = self.processor(text=[prompt], images=frames, return_tensors="pt", padding=True, truncation=True)
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        with torch.no_grad():
            image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        return float(100.0 * cosine.clamp(min=0).mean())


def optional_metrics(device: str = "cpu") -> tuple[dict, list[str]]:
    """The learnt metrics that can run offline here ({"lpips": LPIPS, "clip_score": CLIPScore}, each only if its
    package imports and its weights are on disk), and a note per metric skipped, saying why."""
    metrics, notes = {}, []
    if importlib.util.find_spec("lpips") is None:
        notes.append("LPIPS skipped: the `lpips` package is not installed (pip install lpips)")
    elif _lpips_weights() is None:
        notes.append(
            "LPIPS skipped: no AlexNet weights (alexnet-owt-*.pth) in torch's hub cache; nothing is downloaded"
        )
    else:
        try:
            metrics["lpips"] = LPIPS(device)
        except Exception as exc:  # a broken install must not stop an eval
            notes.append(f"LPIPS skipped: {type(exc).__name__}: {exc}")
    try:
        metrics["clip_score"] = CLIPScore(device)
    except Exception as exc:  # OSError when the weights are not in the local cache
        model = os.environ.get("DIT_SPARSE_CLIP_MODEL", CLIP_MODEL)
        reason = "weights not in the local Hugging Face cache" if isinstance(exc, OSError) else type(exc).__name__
        notes.append(f"CLIP score skipped: {model} {reason}; nothing is downloaded")
    return metrics, notes

