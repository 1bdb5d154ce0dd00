"""`plot_mask`: a picture of a block mask, for the app, the eval report and debugging a pattern."""

from __future__ import annotations

import numpy as np
import torch

from dit_sparse.blockmask import BlockMask
from dit_sparse.layout import VideoLayout

#: image values: dropped, kept but masked inside (partial), kept whole
DROPPED, PARTIAL, WHOLE = 0, 1, 2


def block_image(mask: BlockMask, head: int = 0, batch: int = 0) -> np.ndarray:
    """Int8 (n_q_blocks, n_kv_blocks): `WHOLE` where a key block is kept whole, `PARTIAL` where it is kept and masked
    inside (`token_boxes`), `DROPPED` elsewhere; for one head and batch entry (index 0 of a shared mask)."""
    mask_batch, mask_heads = mask.kv_block_counts.shape[:2]
    for name, value, size in (("head", head, mask_heads), ("batch", batch, mask_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    # A mask shared over heads (or the batch) serves every head (entry): its one row is shown.
    b, h = (batch if mask_batch > 1 else 0), (head if mask_heads > 1 else 0)
    if b >= mask_batch or h >= mask_heads:
        raise ValueError(f"mask has batch {mask_batch} and {mask_heads} heads, got batch={batch}, head={head}")
    kept = mask.to_block_dense()[b, h].cpu()
    partial = mask.to_block_partial()[b, h].cpu()
    image = torch.where(kept, torch.where(partial, PARTIAL, WHOLE), DROPPED)
    return image.to(torch.int8).numpy()


def _frame_starts(mask: BlockMask, layout: VideoLayout) -> list[float]:
    """Where frames begin along a mask axis, in block units (block i spans [i - 0.5, i + 0.5] in the image).

    In the natural order, frame f begins at token f * tokens_per_frame. With a permutation frames interleave, so a line
    marks each block whose first token lies in another frame than the previous block's first token."""
    block = mask.q_block_size
    if mask.permutation is None:
        return [f * layout.tokens_per_frame / block - 0.5 for f in range(1, layout.frames)]
    first_frames = mask.permutation.cpu()[::block] // layout.tokens_per_frame  # frame of each block's first token
    changes = torch.nonzero(first_frames[1:] != first_frames[:-1]).flatten() + 1
    return [float(i) - 0.5 for i in changes.tolist()]


def plot_mask(mask: BlockMask, layout: VideoLayout, head: int = 0, batch: int = 0):
    """A matplotlib Figure of `mask`'s kept blocks (query blocks down, key blocks across) for one head and batch entry:
    kept blocks dark, blocks masked inside (exact windows) lighter, frame boundaries as lines, density in the title.

    matplotlib is optional (the `eval` extra); the Figure is built without pyplot, so nothing global changes. Save it
    with `fig.savefig("mask.png")`.
    """
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as error:
        raise ImportError(
            "dit_sparse.plot_mask needs matplotlib: pip install 'dit-sparse[eval]' (or pip install matplotlib)"
        ) from error
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a dit_sparse.BlockMask, got {type(mask).__name__}")
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a dit_sparse.VideoLayout, got {type(layout).__name__}")
    if layout.video_len != mask.seq_len:
        raise ValueError(f"mask covers {mask.seq_len} tokens, but layout {layout} has {layout.video_len} video tokens")
    image = block_image(mask, head, batch)

    figure = Figure(figsize=(6.4, 6.4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    colors = ListedColormap(["#ffffff", "#8ecae6", "#023047"])
    axes.imshow(image, cmap=colors, vmin=DROPPED, vmax=WHOLE, interpolation="nearest", aspect="equal")
    for axis in (axes.xaxis, axes.yaxis):  # block indices: whole numbers, even on a map of a few blocks
        axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if mask.q_block_size == mask.kv_block_size:
        for position in _frame_starts(mask, layout):
            axes.axhline(position, color="#fb8500", linewidth=0.6)
            axes.axvline(position, color="#fb8500", linewidth=0.6)
    partial = int((image == PARTIAL).sum())
    title = (f"density {mask.density:.3f}: {int((image > 0).sum())} of {image.size} blocks kept"
             + (f", {partial} masked inside" if partial else ""))
    axes.set_title(title, fontsize=10)
    order = "tile order" if mask.permutation is not None else "natural order"
    axes.set_xlabel(f"key block ({mask.kv_block_size} tokens, {order})")
    axes.set_ylabel(f"query block ({mask.q_block_size} tokens)")
    figure.suptitle(
        f"{layout.frames} x {layout.height} x {layout.width} tokens, head {head}, batch {batch}; lines: frames",
        fontsize=9,
    )
    return figure
