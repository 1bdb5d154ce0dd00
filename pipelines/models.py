"""Which pipeline a model name means: one place for `render`, `demo`, `eval` and the app.

A model name is `TINY` (the tiny trained model, `dit_sparse.pipelines.tiny`; while its folder is absent, the tiny
random pipeline, with `resolve_model_label`'s note saying so), `TINY_RANDOM` (the tiny random pipeline,
`dit_sparse.pipelines.tiny.random_tiny`), a local diffusers folder or a hub id; None means `TINY`. `check_model`
checks a name before anything is loaded, `resolve_model_label` gives the label it is recorded under (manifests, resume
keys, reports), and `load_pipeline` loads it.
"""

from __future__ import annotations

import os

#: model names besides a folder or hub id: the tiny trained model (random fallback while absent), the random one.
TINY, TINY_RANDOM = "tiny", "tiny-random"
#: `--model`'s help, for every command that takes one.
MODEL_HELP = (
    f"{TINY!r} (default: the tiny trained model, the random one while it is absent), {TINY_RANDOM!r}, a local "
    "diffusers folder, or a hub id"
)
#: What the tiny random pipeline's videos are worth (the fallback note and eval's report say it).
RANDOM_WEIGHTS = "its videos are noise, so only timing and agreement with the baseline mean anything"
#: the file `python -m dit_sparse.pipelines.tiny.random_wan` leaves in the pipeline folders it writes
RANDOM_WEIGHTS_MARKER = "dit_sparse_random_weights.json"


def random_weights_origin(model: str | None) -> str | None:
    """What a local pipeline folder written with random weights says of itself (`RANDOM_WEIGHTS_MARKER`: the
    config and seed it was drawn from), None for any other model; reads no weights."""
    import json

    marker = os.path.join(model, RANDOM_WEIGHTS_MARKER) if model and os.path.isdir(model) else None
    if marker is None or not os.path.isfile(marker):
        return None
    try:
        with open(marker, encoding="utf-8") as file:
            origin = json.load(file)
        return f"{origin['config']}, seed {origin['seed']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its random-weights marker file is unreadable"


def check_model(model: str | None) -> str | None:
    """A model name, a diffusers folder (it must hold model_index.json) or a hub id; ValueError naming it otherwise."""
    if model is None or model in (TINY, TINY_RANDOM):
        return model
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"--model must be {TINY!r}, {TINY_RANDOM!r}, a diffusers folder or a hub id, got {model!r}")
    if os.path.exists(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(f"model folder {model!r} is not a diffusers pipeline folder (no model_index.json)")
        return model
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") != 1 or os.sep in model.split("/", 1)[1]
    if looks_like_path:
        raise ValueError(
            f"no model folder {model!r}; --model takes {TINY!r}, {TINY_RANDOM!r}, a diffusers folder with "
            "model_index.json, or a hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        )
    return model  # a hub id: from_pretrained decides (the local cache, or a download)


def resolve_model_label(model: str | None) -> tuple[str, str | None]:
    """The label a `check_model`-checked model is recorded under (a folder: its absolute path; a hub id: itself),
    and a note to print when the tiny random pipeline stands in for the absent trained model; loads nothing."""
    from dit_sparse.pipelines import tiny
    from dit_sparse.pipelines.tiny.random_tiny import TINY_RANDOM_LABEL

    if model in (None, TINY):
        if tiny.available():
            return tiny.TINY_LABEL, None
        note = (
            "note: the tiny trained model (dit_sparse/pipelines/tiny_model) is not there yet; using the tiny RANDOM "
            f"pipeline, {TINY_RANDOM_LABEL}: {RANDOM_WEIGHTS}"
        )
        return TINY_RANDOM_LABEL, note
    if model == TINY_RANDOM:
        return TINY_RANDOM_LABEL, None
    return (os.path.abspath(model) if os.path.isdir(model) else model), None


def _check_makes_videos(model: str, pipe) -> None:
    """`render`, `eval` and the app call a pipeline with `num_frames` and read `.frames`: an image pipeline (FLUX,
    Qwen-Image, ...) is refused by name, before its weights move to the device, instead of failing on its first
    call."""
    import inspect

    if "num_frames" not in inspect.signature(pipe.__call__).parameters:
        raise ValueError(
            f"model {model!r} is a {type(pipe).__name__}, an image pipeline (its call takes no num_frames): render, "
            "eval and the app make videos; sparsify an image pipeline from Python instead, e.g. "
            "dit_sparse.sparsify(pipe, 'neighborhood') (README, 'Supported models')"
        )


def load_pipeline(model: str | None, device: str, dtype: str, progress_bar: bool = False):
    """The pipeline of a `check_model`-checked `model` on `device` in `dtype` (a name such as "float32"): None /
    "tiny" the tiny trained model (the random one while it is absent; `resolve_model_label` gives the note),
    "tiny-random", a folder or a hub id. A folder or hub id that fails to load is a ValueError naming it. The
    pipeline's own progress bar shows only if asked."""
    import torch

    from dit_sparse.pipelines import tiny

    torch_dtype = getattr(torch, dtype)
    if model in (None, TINY) and tiny.available():
        pipe = tiny.load(device, torch_dtype)
    elif model in (None, TINY, TINY_RANDOM):
        from dit_sparse.pipelines.tiny.random_tiny import build_tiny_wan_pipeline

        pipe = build_tiny_wan_pipeline(dtype=torch_dtype).to(device)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype)
        except Exception as exc:  # diffusers raises OSError, ValueError, EnvironmentError ... for a bad model
            raise ValueError(f"cannot load model {model!r}: {type(exc).__name__}: {exc}") from exc
        _check_makes_videos(model, pipe)
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe
