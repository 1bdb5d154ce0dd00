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
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: str | None = None

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VideoLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.text_len, int) or self.text_len < 0:
            raise ValueError(f"VideoLayout.text_len must be an int >= 0, got {self.text_len!r}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"VideoLayout.text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")
        if (self.text_len > 0) != (self.text_position is not None):
            raise ValueError(
                f"VideoLayout.text_position must be 'prefix' or 'suffix' exactly when text_len > 0, "
                f"got text_len={self.text_len} and text_position={self.text_position!r}"
            )

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def video_len(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def video_slice(self) -> slice:
        start = self.text_len if self.text_position == "prefix" else 0
        return slice(start, start + self.video_len)

    @property
    def text_slice(self) -> slice:
        if self.text_position == "prefix":
            return slice(0, self.text_len)
        return slice(self.video_len, self.video_len + self.text_len)

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
