"""The shipped tiny TRAINED Wan text-to-video model (tiny-shapes-wan): `load()` gives its `WanPipeline`.

It is a `save_pretrained` folder (`pipelines/tiny_model/`, safetensors) of the real diffusers/transformers classes,
trained by `dit_sparse.pipelines.train_tiny` on `dit_sparse.pipelines.shapes_dataset`: prompts such as
"a red circle moves right on a blue background". Its model card is the folder's README.md.
"""

from __future__ import annotations

import os
import warnings

import torch

TINY_LABEL = "tiny-shapes-wan"
#: The model folder shipped inside the package.
MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_model")
#: Denoising steps the model is rendered with (the CLI's and the demo's default, caption scoring's): at 8 its shapes
#: vanish; 25 and 50 follow the same number of captions.
DEFAULT_STEPS = 25


def available(folder: str | os.PathLike | None = None) -> bool:
    """Whether the model folder (None: `MODEL_DIR`) is there (it has its model_index.json)."""
    return os.path.isfile(os.path.join(MODEL_DIR if folder is None else folder, "model_index.json"))


def load(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, folder: str | os.PathLike | None = None
):
    """The tiny trained model as a `WanPipeline` (via `WanPipeline.from_pretrained`) from `folder` (None:
    `MODEL_DIR`), on `device` in `dtype`.

    Raises FileNotFoundError, saying how to make it, when the folder is missing (a checkout before training).
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    folder = MODEL_DIR if folder is None else folder
    if not available(folder):
        raise FileNotFoundError(
            f"the tiny trained model is not at {os.fspath(folder)!r} (no model_index.json). Train and export it with "
            "`python -m dit_sparse.pipelines.train_tiny --checkpoint CKPT --minutes 10` (repeat until done) then "
            f"`python -m dit_sparse.pipelines.train_tiny --checkpoint CKPT --minutes 0 --export {os.fspath(folder)}`"
        )
    from diffusers import WanPipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*", category=FutureWarning)
        pipe = WanPipeline.from_pretrained(os.fspath(folder), dtype=dtype)
    return pipe.to(device)
