"""Where the tokens of one attention call sit: video tokens in (frame, row, column) order, plus joint text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT_POSITIONS = (None, "prefix", "suffix")


@dataclass(frozen=True)
class VideoLayout:
    """Token geometry of a video DiT's self-attention sequence.

    `frames`, `height`, `width` are sizes in tokens after patchify (latent frames / t-patch, latent height / h-patch,
    latent width / w-patch). Video tokens are ordered frame-major, then row, then column, as every diffusers video
    transformer flattens them. `text_len` joint text tokens sit before (`"prefix"`: CogVideoX, FLUX) or after
    (`"suffix"`: HunyuanVideo) the video tokens; `text_position` is `None` when there are none (Wan).

    `extra_len` tokens off the video grid that are not text (FLUX.1 Kontext's, FLUX.2's and Qwen-Image-Edit's
    reference images after the image, LTXConditionPipeline's conditioning tokens before the video) sit at
    `extra_position`, on the other side of the video from the text. Attention treats them as joint text: they see
    and are seen by every token. Every joint token (text or extra) lies outside `video_slice`.
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: str | None = None
    extra_len: int = 0
    extra_position: str | None = None

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VideoLayout.{name} must be a positive int, got {value!r}")
        for kind in ("text", "extra"):
            length, position = getattr(self, f"{kind}_len"), getattr(self, f"{kind}_position")
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise ValueError(f"VideoLayout.{kind}_len must be an int >= 0, got {length!r}")
            if position not in TEXT_POSITIONS:
                raise ValueError(f"VideoLayout.{kind}_position must be one of {TEXT_POSITIONS}, got {position!r}")
            if (length > 0) != (position is not None):
                raise ValueError(
                    f"VideoLayout.{kind}_position must be 'prefix' or 'suffix' exactly when {kind}_len > 0, "
                    f"got {kind}_len={length} and {kind}_position={position!r}"
                )
        if self.text_position is not None and self.text_position == self.extra_position:
            raise ValueError(
                f"VideoLayout's extra tokens must sit on the other side of the video from the text, got both "
                f"{self.text_position!r}"
            )

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width

    @property
    def joint_len(self) -> int:
        """The tokens outside the video grid, text and extra, which attend and are attended densely."""
        return self.text_len + self.extra_len

    @property
    def seq_len(self) -> int:
        return self.video_len + self.joint_len

    @property
    def prefix_len(self) -> int:
        """The joint tokens before the video (text or extra: never both, they sit on either side)."""
        return (self.text_len if self.text_position == "prefix" else 0) + (
            self.extra_len if self.extra_position == "prefix" else 0)

    @property
    def video_slice(self) -> slice:
        return slice(self.prefix_len, self.prefix_len + self.video_len)

    @property
    def text_slice(self) -> slice:
        return self._joint_slice(self.text_len, self.text_position)

    @property
    def extra_slice(self) -> slice:
        return self._joint_slice(self.extra_len, self.extra_position)

    def _joint_slice(self, length: int, position: str | None) -> slice:
        start = 0 if position == "prefix" else self.prefix_len + self.video_len
        return slice(start, start + length)

    def tile_permutation(self, tile: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Order of video tokens that makes each run of `prod(tile)` tokens one compact (t, h, w) space-time cube.

        Returns `perm` (video_len,) int64 with `x_tiled = x[:, perm]`; tiles at the borders are cut short, so the
        cubes there are smaller. Invert with `torch.argsort(perm)`.
        """
        if len(tile) != 3 or any((not isinstance(t, int)) or t < 1 for t in tile):
            raise ValueError(f"tile must be three positive ints (t, h, w), got {tile!r}")
        index = torch.arange(self.video_len, device=device).view(self.frames, self.height, self.width)
        tt, th, tw = tile
        # Pad the grid up to whole tiles with -1, reorder tile-major, then drop the padding.
        pf, ph, pw = (-self.frames) % tt, (-self.height) % th, (-self.width) % tw
        padded = torch.nn.functional.pad(index, (0, pw, 0, ph, 0, pf), value=-1)
        nf, nh, nw = padded.shape[0] // tt, padded.shape[1] // th, padded.shape[2] // tw
        tiled = padded.view(nf, tt, nh, th, nw, tw).permute(0, 2, 4, 1, 3, 5).reshape(-1)
        return tiled[tiled >= 0]
