"""The OpenCV caption scorer: all ground-truth videos pass; a wrong colour, a wrong direction, a static video or noise
fails."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from dit_sparse.pipelines.tiny import caption_score as cs
from dit_sparse.pipelines.tiny import shapes as sd

from dit_sparse.video import read_video, write_mp4

FRAMES, HEIGHT, WIDTH = 17, 64, 64
OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _opposite(direction: str) -> str:
    return " and ".join(OPPOSITE[word] for word in direction.split(" and "))


def _perpendicular(direction: str) -> str:
    dx, dy = sd.DIRECTIONS[direction]
    return next(name for name, (x, y) in sd.DIRECTIONS.items() if abs(x * dx + y * dy) < 1e-9)


@pytest.fixture(scope="module")
def ground_truth():
    """48 videos: every direction and every shape colour at least 5 times, over all background kinds."""
    params = [sd.video_params(11, i) for i in range(48)]
    videos = list(sd.to_uint8(sd.render_videos(params, FRAMES, HEIGHT, WIDTH)).numpy())
    return params, videos


def test_every_ground_truth_video_passes(ground_truth):
    params, videos = ground_truth
    assert {p.direction for p in params} == set(sd.DIRECTIONS) and {p.colour for p in params} == set(sd.SHAPE_COLOURS)
    n_ok, details = cs.score(videos, [p.caption for p in params])
    assert n_ok == len(params), [d["reason"] for d in details if not d["ok"]]
    for p, d in zip(params, details):
        assert d["colour"] == p.colour and d["angle_error"] < 5 and d["blob_frames"] == FRAMES


def test_a_caption_with_another_colour_fails(ground_truth):
    for p, video in itertools.islice(zip(*ground_truth), 16):
        for colour in sd.SHAPE_COLOURS:
            if colour != p.colour:
                details = cs.check_video(video, dataclasses.replace(p, colour=colour).caption)
                assert not details["ok"] and not details["colour_ok"] and details["direction_ok"]


def test_a_caption_with_the_opposite_or_a_perpendicular_direction_fails(ground_truth):
    for p, video in zip(*ground_truth):
        for wrong in (_opposite(p.direction), _perpendicular(p.direction)):
            details = cs.check_video(video, dataclasses.replace(p, direction=wrong).caption)
            assert not details["ok"] and details["colour_ok"] and not details["direction_ok"], (p.caption, wrong)
            assert details["angle_error"] >= 89


def test_a_static_video_fails(ground_truth):
    for p, video in itertools.islice(zip(*ground_truth), 8):
        details = cs.check_video(np.repeat(video[:1], FRAMES, axis=0), p.caption)
        assert not details["ok"] and details["colour_ok"] and details["angle_error"] is None
        assert "moved 0.0 px" in details["reason"]


def test_noise_and_a_blank_video_fail():
    caption = "a red circle moves right on a blue background"
    noise = np.random.default_rng(0).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    blank = np.full((FRAMES, HEIGHT, WIDTH, 3), 90, dtype=np.uint8)
    for video in (noise, blank):
        assert not cs.check_video(video, caption)["ok"]
    assert "a blob in only 0 of" in cs.check_video(blank, caption)["reason"]


def test_float_videos_and_h264_round_trips_score_like_uint8(ground_truth, tmp_path):
    params, videos = ground_truth
    floats = [video.astype(np.float32) / 255.0 for video in videos[:6]]
    decoded = [read_video(write_mp4(video, tmp_path / f"{i}.mp4", fps=16)) for i, video in enumerate(videos[:6])]
    captions = [p.caption for p in params[:6]]
    assert cs.score(floats, captions)[0] == 6
    assert cs.score(decoded, captions)[0] == 6


def test_each_named_colour_is_its_own_nearest_colour():
    for name, rgb in sd.SHAPE_COLOURS.items():
        assert cs.nearest_colour(rgb) == name
    assert cs.nearest_colour((128, 128, 128)) != "gray"  # gray is a background colour only


def test_captions_outside_the_template_and_mismatched_lists_are_errors(ground_truth):
    video = ground_truth[1][0]
    with pytest.raises(ValueError, match="template"):
        cs.check_video(video, "a red fox runs through the snow")
    with pytest.raises(ValueError, match="one caption per video"):
        cs.score([video, video], ["a red circle moves up on a blue background"])


def test_evaluation_prompts_are_fixed_template_captions():
    prompts = cs.evaluation_prompts(10)
    assert prompts == cs.evaluation_prompts(10) and len(set(prompts)) == 10
    for prompt in prompts:
        sd.parse_caption(prompt)
