"""Procedural captioned videos of one coloured shape moving in a straight line: the tiny model's training data.

Each video is drawn from `(seed, index)` alone (`video_params`), so a dataset is reproducible, needs no storage, and
any sample can be regenerated out of order (a resumed training run continues the same stream). A video has:

- one shape (circle, square or triangle, all of the same area) in one of `SHAPE_COLOURS`;
- a straight, constant-speed track in one of 8 `DIRECTIONS` (on square frames the diagonals are at exactly 45°),
  from a random start, always wholly inside the frame;
- a background that is plain, or a linear gradient between two `BACKGROUND_COLOURS` from top to bottom
  ("vertical") or left to right ("horizontal"), never using the shape's colour.

Its caption follows one template, e.g. "a red circle moves right on a blue background" or
"an orange triangle moves up and left on a white to gray vertical gradient"; every word is in `VOCABULARY`.

Sizes and positions are fractions of the frame, so the same parameters render at any size and frame count
(`render_videos`, batched and on any torch device; `render_video`, one uint8 video).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .random_tiny import VOCABULARY as TINY_VOCABULARY
from .random_tiny import build_tiny_tokenizer

SHAPES = ("circle", "square", "triangle")

#: Shape colours, RGB: far enough apart that the nearest name of a blurred blob's mean colour is still its own.
SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "purple": (140, 50, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
#: Background colours: the shape colours and gray (gray is never a shape's, so a grayish blur is never "right").
BACKGROUND_COLOURS = {**SHAPE_COLOURS, "gray": (128, 128, 128)}

#: Direction name -> unit vector (x right, y DOWN, as in image rows).
DIRECTIONS = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up and right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "up and left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "down and right": (math.sqrt(0.5), math.sqrt(0.5)),
    "down and left": (-math.sqrt(0.5), math.sqrt(0.5)),
}
#: Each direction's opposite (the negated unit vector): a video played backwards moves the opposite way.
OPPOSITE = {
    name: next(other for other, (ox, oy) in DIRECTIONS.items() if (ox, oy) == (-dx, -dy))
    for name, (dx, dy) in DIRECTIONS.items()
}
BACKGROUNDS = ("plain", "vertical", "horizontal")

#: Ranges the parameters are drawn from (fractions of the shorter frame side; positions of the frame's width/height).
SIZE_RANGE = (0.07, 0.12)  # the circle's radius; the square and triangle have the same area
TRAVEL_RANGE = (0.25, 0.55)  # the centre's displacement over the whole clip
EDGE_MARGIN = 0.02  # between the shape's circumcircle and the frame's edge, at every frame

#: Per shape, for a circle of radius 1: the half side (square, triangle), so that all have the circle's area, and
#: the circumradius about the centroid (what must stay inside the frame).
HALF_SIDE = {"circle": 1.0, "square": math.sqrt(math.pi) / 2, "triangle": math.sqrt(math.pi / math.sqrt(3.0))}
CIRCUMRADIUS = {
    "circle": 1.0,
    "square": HALF_SIDE["square"] * math.sqrt(2.0),
    "triangle": HALF_SIDE["triangle"] * 2 / math.sqrt(3.0),
}

#: Every word a caption can use (the template's and the names'), and the tokenizer's vocabulary: random_tiny's
#: words first (their ids unchanged), then the ones captions add.
CAPTION_WORDS = tuple(
    dict.fromkeys(
        "a an moves on background to gradient".split()
        + list(SHAPES)
        + list(BACKGROUND_COLOURS)
        + [word for name in DIRECTIONS for word in name.split()]
        + list(BACKGROUNDS[1:])
    )
)
VOCABULARY = TINY_VOCABULARY + tuple(word for word in CAPTION_WORDS if word not in TINY_VOCABULARY)


def build_tokenizer():
    """The word-level tokenizer of the trained tiny model (random_tiny's, over `VOCABULARY`)."""
    return build_tiny_tokenizer(VOCABULARY)


@dataclass(frozen=True)
class ShapeVideo:
    """The ground truth of one video. Fractions: `size`, `travel` of the shorter side; `start` of (width, height)."""

    shape: str
    colour: str
    direction: str
    background: str  # "plain", "vertical" (first colour at the top) or "horizontal" (first colour at the left)
    background_colours: tuple[str, str]  # (first, second); equal for "plain"
    size: float  # the circle's radius
    start: tuple[float, float]  # the centre at the first frame, (x, y)
    travel: float  # the centre's displacement from the first frame to the last

    @property
    def caption(self) -> str:
        first, second = self.background_colours
        if self.background == "plain":
            where = f"{_article(first)} {first} background"
        else:
            where = f"{_article(first)} {first} to {second} {self.background} gradient"
        return f"{_article(self.colour)} {self.colour} {self.shape} moves {self.direction} on {where}"

    def centres(self, frames: int, height: int, width: int) -> np.ndarray:
        """The shape's centre in pixels at each frame, `(frames, 2)` as (x, y), y down."""
        return _centres([self], frames, height, width, torch.device("cpu"))[0].numpy()

    def speed(self, frames: int, height: int, width: int) -> float:
        """Pixels per frame (0 for a single frame)."""
        return self.travel * min(height, width) / max(frames - 1, 1)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def video_params(seed: int, index: int) -> ShapeVideo:
    """The parameters of video `index` of the dataset drawn from `seed`; the same pair always gives the same video."""
    for name, value in (("seed", seed), ("index", index)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    rng = np.random.default_rng([int(seed), int(index)])
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(SHAPE_COLOURS)[rng.integers(len(SHAPE_COLOURS))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    allowed = [name for name in BACKGROUND_COLOURS if name != colour]
    picked = rng.choice(len(allowed), size=2, replace=False)
    first, second = allowed[picked[0]], allowed[picked[1]]
    if background == "plain":
        second = first
    size = float(rng.uniform(*SIZE_RANGE))
    travel = float(rng.uniform(*TRAVEL_RANGE))
    margin = CIRCUMRADIUS[shape] * size + EDGE_MARGIN  # as a fraction of either side (the shorter side's is largest)
    start = []
    for unit in DIRECTIONS[direction]:
        shift = travel * unit
        low, high = margin - min(shift, 0.0), 1.0 - margin - max(shift, 0.0)
        start.append(float(rng.uniform(low, high)))
    return ShapeVideo(shape, colour, direction, background, (first, second), size, (start[0], start[1]), travel)


def reversed_in_time(params: ShapeVideo) -> ShapeVideo:
    """The same video played backwards: the opposite direction from the last frame's centre (an in-distribution
    video: its track fits the frame, and `start` stays within the range `video_params` draws it from)."""
    unit = DIRECTIONS[params.direction]
    end = tuple(start + params.travel * u for start, u in zip(params.start, unit))
    return dataclasses.replace(params, direction=OPPOSITE[params.direction], start=(end[0], end[1]))


def _centres(params: Sequence[ShapeVideo], frames: int, height: int, width: int, device) -> torch.Tensor:
    """Centres in pixels, `(B, T, 2)` float32 as (x, y)."""
    start = torch.tensor([p.start for p in params], dtype=torch.float32, device=device)  # (B, 2)
    shift = torch.tensor(
        [[p.travel * u for u in DIRECTIONS[p.direction]] for p in params], dtype=torch.float32, device=device
    )  # (B, 2)
    progress = torch.linspace(0.0, 1.0, frames, device=device) if frames > 1 else torch.zeros(1, device=device)
    scale = torch.tensor([width, height], dtype=torch.float32, device=device)
    return (start[:, None, :] + progress[None, :, None] * shift[:, None, :]) * scale  # (B, T, 2)


def _colour_table(names: Sequence[str], device) -> torch.Tensor:
    return torch.tensor([BACKGROUND_COLOURS[name] for name in names], dtype=torch.float32, device=device) / 255.0


def _check_size(frames: int, height: int, width: int) -> None:
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def shape_alpha(
    params: Sequence[ShapeVideo], frames: int, height: int, width: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The shapes' coverage of each pixel, `(B, frames, height, width)` float32 in [0, 1]: signed-distance fields
    with a one-pixel anti-aliased edge (what `render_videos` composites over the background)."""
    _check_size(frames, height, width)
    if not params:
        raise ValueError("params must hold at least one ShapeVideo")
    device = torch.device(device)
    centres = _centres(params, frames, height, width, device)  # (B, T, 2)
    radius = torch.tensor([p.size for p in params], device=device) * min(height, width)  # (B,)
    xs = torch.arange(width, dtype=torch.float32, device=device) + 0.5  # pixel centres
    ys = torch.arange(height, dtype=torch.float32, device=device) + 0.5
    dx = xs[None, None, None, :] - centres[:, :, 0, None, None]  # (B, T, 1, W)
    dy = ys[None, None, :, None] - centres[:, :, 1, None, None]  # (B, T, H, 1)
    r = radius[:, None, None, None]
    circle = torch.sqrt(dx**2 + dy**2) - r  # (B, T, H, W)
    square = torch.maximum(dx.abs(), dy.abs()) - r * HALF_SIDE["square"]
    triangle = _triangle_distance(dx, -dy, r * HALF_SIDE["triangle"])
    kind = torch.tensor([SHAPES.index(p.shape) for p in params], device=device)[:, None, None, None]
    distance = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    return (0.5 - distance).clamp(0.0, 1.0)


def render_videos(
    params: Sequence[ShapeVideo], frames: int, height: int, width: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Render videos on `device`: `(B, frames, height, width, 3)` float32 in [0, 1]: `shape_alpha` composited over
    the background (`composite`)."""
    return composite(params, shape_alpha(params, frames, height, width, device))


def composite(params: Sequence[ShapeVideo], alpha: torch.Tensor) -> torch.Tensor:
    """The videos of `params` from their shapes' coverage `alpha` `(B, T, H, W)` (`shape_alpha`): each shape's
    colour over its background, `(B, T, H, W, 3)` float32 in [0, 1] on alpha's device (for a caller that needs the
    coverage too, without computing it twice)."""
    _, _, height, width = alpha.shape
    device = alpha.device
    alpha = alpha[..., None]  # (B, T, H, W, 1)
    xs = torch.arange(width, dtype=torch.float32, device=device) + 0.5
    ys = torch.arange(height, dtype=torch.float32, device=device) + 0.5
    first = _colour_table([p.background_colours[0] for p in params], device)  # (B, 3)
    second = _colour_table([p.background_colours[1] for p in params], device)
    mode = torch.tensor([BACKGROUNDS.index(p.background) for p in params], device=device)[:, None, None]
    along_y = (ys / height)[None, :, None].expand(len(params), height, width)
    along_x = (xs / width)[None, None, :].expand(len(params), height, width)
    weight = torch.where(mode == 1, along_y, torch.where(mode == 2, along_x, torch.zeros_like(along_x)))  # (B, H, W)
    background = first[:, None, None, :] + (second - first)[:, None, None, :] * weight[..., None]  # (B, H, W, 3)
    colour = _colour_table([p.colour for p in params], device)[:, None, None, None, :]  # (B, 1, 1, 1, 3)
    return background[:, None] * (1.0 - alpha) + colour * alpha


def _triangle_distance(x: torch.Tensor, y: torch.Tensor, half_side: torch.Tensor) -> torch.Tensor:
    """Signed distance to an upright equilateral triangle centred on its centroid (Quilez's exact formula), y up."""
    k = math.sqrt(3.0)
    x = x.abs() - half_side
    y = y + half_side / k
    fold = (x + k * y) > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * half_side), torch.zeros_like(x))
    return -torch.sqrt(x**2 + y**2) * torch.sign(y)


def to_uint8(videos: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 (rounded)."""
    return (videos.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def render_video(params: ShapeVideo, frames: int, height: int, width: int) -> np.ndarray:
    """One video as uint8 `(frames, height, width, 3)`, rendered on the CPU."""
    return to_uint8(render_videos([params], frames, height, width))[0].numpy()


_CAPTION = re.compile(
    r"^an? (?P<colour>{c}) (?P<shape>{s}) moves (?P<direction>{d}) on ".format(
        c="|".join(SHAPE_COLOURS), s="|".join(SHAPES), d="|".join(sorted(DIRECTIONS, key=len, reverse=True))
    )
)


def parse_caption(caption: str) -> dict:
    """The shape's colour, shape and direction named by a caption of the dataset's template (ValueError if not)."""
    match = _CAPTION.match(" ".join(str(caption).lower().split()))
    if match is None:
        raise ValueError(
            f"caption {caption!r} does not follow the template 'a(n) <colour> <shape> moves <direction> on ...' "
            f"(colours {list(SHAPE_COLOURS)}, shapes {list(SHAPES)}, directions {list(DIRECTIONS)})"
        )
    return match.groupdict()


class ShapesVideoDataset(torch.utils.data.Dataset):
    """`length` videos drawn from `seed`: item i is video `video_params(seed, i)`, rendered on the CPU.

    Items are dicts: "frames" `(frames, height, width, 3)`, float32 in [-1, 1] (`output="float"`) or uint8
    (`output="uint8"`); "caption"; "params" (the ground truth, as a dict).
    """

    def __init__(self, length: int, frames: int, height: int, width: int, seed: int = 0, output: str = "float"):
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an int >= 1, got {length!r}")
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        self.length, self.frames, self.height, self.width = length, frames, height, width
        self.seed, self.output = seed, output

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        params = video_params(self.seed, index)
        video = render_videos([params], self.frames, self.height, self.width)[0]  # (T, H, W, 3) in [0, 1]
        frames = to_uint8(video) if self.output == "uint8" else video * 2.0 - 1.0
        return {"frames": frames, "caption": params.caption, "params": dataclasses.asdict(params)}
