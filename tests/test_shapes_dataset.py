"""The procedural shapes dataset: deterministic, captioned truthfully, and tokenisable by the tiny tokenizer."""

import itertools
import math

import numpy as np
import pytest
import torch
from dit_sparse.pipelines.tiny import shapes as sd
from dit_sparse.pipelines.tiny.random_tiny import VOCABULARY as TINY_VOCABULARY
from dit_sparse.pipelines.tiny.random_tiny import build_tiny_tokenizer

FRAMES, HEIGHT, WIDTH = 9, 64, 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_params_are_a_function_of_seed_and_index_alone():
    forward = [sd.video_params(3, i) for i in range(20)]
    backward = [sd.video_params(3, i) for i in reversed(range(20))][::-1]
    assert forward == backward
    assert len({p.caption + str(p.start) for p in forward}) == 20
    assert sd.video_params(4, 0) != sd.video_params(3, 0)


def test_render_is_bit_identical_on_repeat_and_in_a_batch():
    params = [sd.video_params(0, i) for i in range(4)]
    alone = np.stack([sd.render_video(p, FRAMES, HEIGHT, WIDTH) for p in params])
    batched = sd.to_uint8(sd.render_videos(params, FRAMES, HEIGHT, WIDTH)).numpy()
    assert np.array_equal(alone, batched)
    assert np.array_equal(alone[0], sd.render_video(params[0], FRAMES, HEIGHT, WIDTH))


def test_dataset_items_have_the_requested_shape_range_and_ground_truth():
    floats = sd.ShapesVideoDataset(3, FRAMES, HEIGHT, 48, seed=5)
    item = floats[2]
    assert item["frames"].shape == (FRAMES, HEIGHT, 48, 3) and item["frames"].dtype == torch.float32
    assert -1.0 <= item["frames"].min() and item["frames"].max() <= 1.0
    assert item["caption"] == sd.video_params(5, 2).caption
    assert item["params"] == sd.video_params(5, 2).__dict__ | {
        "background_colours": item["params"]["background_colours"]
    }
    raw = sd.ShapesVideoDataset(3, FRAMES, HEIGHT, 48, seed=5, output="uint8")[2]["frames"]
    assert raw.dtype == torch.uint8
    assert torch.allclose((raw.float() / 255.0) * 2 - 1, item["frames"], atol=1 / 255.0 + 1e-6)
    with pytest.raises(IndexError):
        floats[3]
    with pytest.raises(ValueError, match="output"):
        sd.ShapesVideoDataset(3, FRAMES, HEIGHT, WIDTH, output="float16")


def _shape_mask(video: np.ndarray, params: sd.ShapeVideo) -> np.ndarray:
    """Pixels that are exactly the shape's colour, per frame."""
    return np.all(video == np.array(sd.SHAPE_COLOURS[params.colour], dtype=np.uint8), axis=-1)


@pytest.mark.parametrize("direction", list(sd.DIRECTIONS))
def test_shape_moves_in_its_direction_by_its_travel_and_stays_inside(direction):
    index = next(i for i in itertools.count() if sd.video_params(1, i).direction == direction)
    params = sd.video_params(1, index)
    video = sd.render_video(params, FRAMES, HEIGHT, WIDTH)
    mask = _shape_mask(video, params)
    assert mask.any(axis=(1, 2)).all()
    assert not mask[:, [0, -1], :].any() and not mask[:, :, [0, -1]].any()  # never touches the edge
    centroids = np.array([[xs.mean(), ys.mean()] for ys, xs in (np.nonzero(m) for m in mask)])
    moved = centroids[-1] - centroids[0]
    unit = np.array(sd.DIRECTIONS[direction])
    expected = params.travel * np.array([WIDTH, HEIGHT]) * unit
    assert np.allclose(moved, expected, atol=1.5)
    assert math.isclose(params.speed(FRAMES, HEIGHT, WIDTH) * (FRAMES - 1), params.travel * HEIGHT)


def test_no_shape_ever_reaches_the_frame_edge():
    params = [sd.video_params(6, i) for i in range(300)]
    ends = sd.to_uint8(sd.render_videos(params, 2, HEIGHT, WIDTH)).numpy()  # first and last frame: a straight track
    for p, video in zip(params, ends):
        mask = _shape_mask(video, p)
        assert mask.any(axis=(1, 2)).all()
        assert not mask[:, [0, -1], :].any() and not mask[:, :, [0, -1]].any(), p


@pytest.mark.parametrize("shape", sd.SHAPES)
def test_shapes_have_equal_areas_and_their_own_outline(shape):
    params = sd.ShapeVideo(shape, "red", "right", "plain", ("blue", "blue"), 0.2, (0.5, 0.5), 0.3)
    frame = sd.render_video(params, 1, 128, 128)[0]
    mask = _shape_mask(frame, params)
    area = math.pi * (0.2 * 128) ** 2
    assert abs(mask.sum() - area) < 0.08 * area
    corner_reach = mask[43:45, 43:45].any()  # near the bounding square's corner: only the square fills it
    assert corner_reach == (shape == "square")
    rows = mask.sum(axis=1)[mask.any(axis=1)]  # widths of the rows the shape covers, top to bottom
    widening = rows[-1] > rows[0] + 10  # a triangle's base is much wider than its apex
    assert widening == (shape == "triangle")


def test_background_is_plain_or_the_captioned_gradient():
    for background, corners in (
        ("plain", {(0, 0): "green", (-1, -1): "green"}),
        ("vertical", {(0, 0): "green", (0, -1): "green", (-1, 0): "white", (-1, -1): "white"}),
        ("horizontal", {(0, 0): "green", (-1, 0): "green", (0, -1): "white", (-1, -1): "white"}),
    ):
        second = "green" if background == "plain" else "white"
        params = sd.ShapeVideo("circle", "red", "up", background, ("green", second), 0.1, (0.5, 0.5), 0.3)
        frame = sd.render_video(params, 1, HEIGHT, WIDTH)[0].astype(int)
        for (y, x), name in corners.items():
            assert np.abs(frame[y, x] - np.array(sd.BACKGROUND_COLOURS[name])).max() <= 255 / HEIGHT * 2, (
                background,
                y,
                x,
            )
        assert params.caption.endswith(
            "on a green background" if background == "plain" else f"on a green to white {background} gradient"
        )
    orange = sd.ShapeVideo("circle", "orange", "up", "plain", ("orange", "orange"), 0.1, (0.5, 0.5), 0.3)
    assert orange.caption == "an orange circle moves up on an orange background"


def test_background_never_uses_the_shapes_colour():
    for i in range(300):
        params = sd.video_params(2, i)
        assert params.colour not in params.background_colours
        assert (params.background == "plain") == (params.background_colours[0] == params.background_colours[1])


def test_every_caption_tokenises_without_unknown_tokens():
    tokenizer = sd.build_tokenizer()
    captions = {sd.video_params(0, i).caption for i in range(300)}
    captions |= {
        sd.ShapeVideo(shape, colour, direction, background, (first, second), 0.1, (0.5, 0.5), 0.3).caption
        for shape, colour, direction, background in itertools.product(
            sd.SHAPES, sd.SHAPE_COLOURS, sd.DIRECTIONS, sd.BACKGROUNDS
        )
        for first, second in [("gray", "white")]
    }
    for caption in captions:
        ids = tokenizer(caption).input_ids
        assert tokenizer.unk_token_id not in ids, caption
        assert len(ids) == len(caption.split()) + 1  # one id a word, then </s>


def test_extended_vocabulary_keeps_every_tiny_random_token_id():
    old, new = build_tiny_tokenizer(), sd.build_tokenizer()
    assert sd.VOCABULARY[: len(TINY_VOCABULARY)] == TINY_VOCABULARY
    assert all(old.convert_tokens_to_ids(word) == new.convert_tokens_to_ids(word) for word in TINY_VOCABULARY)
    assert len(new) == len(old) + len(set(sd.CAPTION_WORDS) - set(TINY_VOCABULARY))


def test_parse_caption_reads_back_the_ground_truth():
    for i in range(100):
        params = sd.video_params(7, i)
        assert sd.parse_caption(params.caption) == {
            "colour": params.colour, "shape": params.shape, "direction": params.direction
        }  # fmt: skip
    with pytest.raises(ValueError, match="template"):
        sd.parse_caption("a red fox runs through the snow")


def test_bad_arguments_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="index must be an int >= 0, got -1"):
        sd.video_params(0, -1)
    with pytest.raises(ValueError, match="frames must be an int >= 1, got 0"):
        sd.render_videos([sd.video_params(0, 0)], 0, HEIGHT, WIDTH)


def test_opposite_directions_are_the_negated_vectors_and_pair_up():
    for name, (dx, dy) in sd.DIRECTIONS.items():
        assert sd.DIRECTIONS[sd.OPPOSITE[name]] == (-dx, -dy) and sd.OPPOSITE[sd.OPPOSITE[name]] == name


@pytest.mark.parametrize("index", range(6))
def test_the_time_reversed_twin_is_the_video_played_backwards_and_in_distribution(index):
    params = sd.video_params(3, index)
    twin = sd.reversed_in_time(params)
    assert twin.direction == sd.OPPOSITE[params.direction] and twin.caption != params.caption
    forward, backward = sd.render_videos([params, twin], 17, 48, 64)
    assert torch.allclose(backward, forward.flip(0), atol=1e-4)  # frame t of the twin is frame T - 1 - t
    assert np.allclose(twin.centres(17, 48, 64), params.centres(17, 48, 64)[::-1], atol=1e-4)
    # its start lies in the range video_params draws starts from for its direction (the track fits the frame)
    margin = sd.CIRCUMRADIUS[twin.shape] * twin.size + sd.EDGE_MARGIN
    for start, unit in zip(twin.start, sd.DIRECTIONS[twin.direction]):
        shift = twin.travel * unit
        assert margin - min(shift, 0.0) - 1e-9 <= start <= 1.0 - margin - max(shift, 0.0) + 1e-9
    again = sd.reversed_in_time(twin)
    assert again.direction == params.direction and np.allclose(again.start, params.start)


def test_shape_alpha_is_where_the_render_shows_the_shape_colour():
    params = [sd.video_params(0, index) for index in range(4)]
    alpha = sd.shape_alpha(params, 9, 32, 40)
    videos = sd.render_videos(params, 9, 32, 40)
    assert alpha.shape == (4, 9, 32, 40) and 0.0 <= alpha.min() and alpha.max() == 1.0
    for video, a, p in zip(videos, alpha, params):
        colour = torch.tensor(sd.SHAPE_COLOURS[p.colour]) / 255.0
        assert torch.allclose(video[a == 1.0], colour.expand(int((a == 1.0).sum()), 3))
        inside = 0.0 < a.sum(dim=(1, 2))
        assert bool(inside.all())  # the shape is in every frame
        area = a.sum(dim=(1, 2)) / (math.pi * (p.size * 32) ** 2)  # the circle's area at the shorter side, 32 px
        assert torch.allclose(area, torch.ones_like(area), atol=0.1)
