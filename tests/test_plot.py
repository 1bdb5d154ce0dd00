"""`plot_mask`: the plotted image is the block mask, frames are marked, PNGs save, matplotlib stays optional."""

import sys

import numpy as np
import pytest
import torch

import dit_sparse
from dit_sparse import BlockMask, VideoLayout
from dit_sparse.patterns import neighborhood, radial
from dit_sparse.plot import PARTIAL, WHOLE


def _image(figure) -> np.ndarray:
    (axes,) = figure.axes
    (image,) = axes.images
    return np.asarray(image.get_array())


def test_plotted_image_is_the_block_mask_with_frame_lines():
    pytest.importorskip("matplotlib")
    layout = VideoLayout(4, 8, 12)
    mask = radial(layout, block_size=16)
    figure = dit_sparse.plot_mask(mask, layout)
    image = _image(figure)
    assert np.array_equal(image > 0, mask.to_block_dense()[0, 0].numpy())
    assert not (image == PARTIAL).any()
    axes = figure.axes[0]
    assert f"density {mask.density:.3f}" in axes.get_title()
    # natural order: one horizontal and one vertical line where each frame after the first begins (96 tokens apart)
    positions = sorted({round(float(line.get_ydata()[0]), 3) for line in axes.lines if line.get_ydata()[0] ==
                        line.get_ydata()[1]})
    assert positions == [round(f * 96 / 16 - 0.5, 3) for f in (1, 2, 3)]
    assert len(axes.lines) == 2 * (layout.frames - 1)


@pytest.mark.parametrize("frames", [1, 3])  # a map of one block, and of a few
def test_axes_tick_whole_block_indices(frames):
    pytest.importorskip("matplotlib")
    layout = VideoLayout(frames, 4, 4)
    figure = dit_sparse.plot_mask(BlockMask.full(layout.video_len, 16), layout)
    figure.canvas.draw()  # the locators place their ticks
    axes = figure.axes[0]
    for ticks in (axes.get_xticks(), axes.get_yticks()):
        shown = [t for t in ticks if -0.5 <= t <= frames - 0.5]
        assert shown and all(float(t).is_integer() for t in shown), ticks


def test_partial_blocks_and_per_head_masks_are_shown_as_they_are():
    pytest.importorskip("matplotlib")
    layout = VideoLayout(3, 7, 10)
    exact = neighborhood(layout, window=(3, 5, 3), stride=(1, 2, 1), tile=(1, 4, 4), exact=True)
    image = _image(dit_sparse.plot_mask(exact, layout))
    assert np.array_equal(image > 0, exact.to_block_dense()[0, 0].numpy())
    assert np.array_equal(image == PARTIAL, exact.to_block_partial()[0, 0].numpy()) and (image == PARTIAL).any()
    assert (image == WHOLE).any()

    per_head = BlockMask.from_block_dense(torch.rand(2, 3, 14, 14, generator=torch.Generator().manual_seed(0)) < 0.5,
                                          layout.video_len, 16)
    for batch, head in [(0, 0), (1, 2)]:
        shown = _image(dit_sparse.plot_mask(per_head, layout, head=head, batch=batch))
        assert np.array_equal(shown > 0, per_head.to_block_dense()[batch, head].numpy())
    with pytest.raises(ValueError, match=r"3 heads, got batch=0, head=3"):
        dit_sparse.plot_mask(per_head, layout, head=3)
    with pytest.raises(ValueError, match=r"covers 210 tokens.*has 60 video tokens"):
        dit_sparse.plot_mask(per_head, VideoLayout(1, 6, 10))


def test_figure_saves_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    layout = VideoLayout(21, 30, 52)  # Wan2.1 480p, tile-aligned neighborhood window
    path = tmp_path / "mask.png"
    dit_sparse.plot_mask(neighborhood(layout, window=(7, 24, 48)), layout).savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (640, 640)


def test_missing_matplotlib_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.colors", None)
    with pytest.raises(ImportError, match=r"dit-sparse\[eval\]"):
        dit_sparse.plot_mask(BlockMask.full(64, 16), VideoLayout(1, 8, 8))
