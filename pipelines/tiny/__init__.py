"""The shipped tiny TRAINED Wan text-to-video model (tiny-shapes-wan): `load()` gives its `WanPipeline`.

It is a `save_pretrained` folder (`pipelines/tiny_model/`, safetensors) of the real diffusers/transformers classes,
trained by `dit_sparse.pipelines.tiny.train` on `dit_sparse.pipelines.tiny.shapes`: prompts such as
"a red circle moves right on a blue background". Its model card is the folder's README.md.

The package is the tiny-model lab; this module is its loader. Beside it: `random_tiny` (the tiny UNTRAINED Wan
pipeline, built in code), `random_wan` (a random-weight pipeline folder at a real Wan's size, for GPU timing),
`shapes` (the procedural dataset), `train` (training and export), `caption_score` (caption following, checked with
OpenCV) and TRAINING_NOTES.md (the experiments behind the recipe).
"""

from __future__ import annotations

import os
import warnings

import torch

TINY_LABEL = "tiny-shapes-wan"
#: The model folder shipped inside the package (`pipelines/tiny_model/`, beside this package).
MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tiny_model")
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
    `MODEL_DIR`), on `device` in `dtype`. On a CPU its VAE's 3D convolutions get channels-last weights
    (`channels_last_convolutions`, oneDNN's faster layout for them there): the same video to fp32 rounding.

    Raises FileNotFoundError, saying how to make it, when the folder is missing (a checkout before training).
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    folder = MODEL_DIR if folder is None else folder
    if not available(folder):
        raise FileNotFoundError(
            f"the tiny trained model is not at {os.fspath(folder)!r} (no model_index.json). Train and export it with "
            "`python -m dit_sparse.pipelines.tiny.train --checkpoint CKPT --minutes 10` (repeat until done) then "
            f"`python -m dit_sparse.pipelines.tiny.train --checkpoint CKPT --minutes 0 --export {os.fspath(folder)}`"
        )
    from diffusers import WanPipeline

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*", category=FutureWarning)
        pipe = WanPipeline.from_pretrained(os.fspath(folder), dtype=dtype)
    pipe = pipe.to(device)
    if pipe.vae.device.type == "cpu":
        channels_last_convolutions(pipe.vae)
    return pipe


def channels_last_convolutions(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with the weight of each of its `Conv3d` layers in channels-last (NDHWC) memory, in place: values
    unchanged. On a CPU, oneDNN then runs those convolutions in channels-last, and the channel norms between them
    read contiguous channels (the tiny model's VAE decode spent a quarter of its time in those norms before)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv3d):
            layer.weight.data = layer.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return module
