"""`calibrate`: run a pipeline densely on a few prompts, measure per layer and head what a method needs (a dynamic
method's density or token order, `vdit`'s pattern), and write a `Profile` that `sparsify(pipe, profile=...)` runs
with no search.

Generic over methods: `CALIBRATORS` maps a method to a `Calibrator`: `measure(layout, q, k, v, config, settings)`
turns one attention call's video q, k, v (B, H, S, D) into one dict per head; `reduce(samples, settings)` turns one
head's dicts over prompts and steps into its profile entry; `settings` holds the `calibrate` keywords the method
reads (`target_recall`; `max_error`, `cost_weight`).
"""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from dit_sparse import hooks
from dit_sparse.api import unsparsify
from dit_sparse.layout import VideoLayout
from dit_sparse.patterns import DraftConfig, ReorderConfig, VditConfig, make_config
from dit_sparse.patterns.draft import draft_calibration
from dit_sparse.patterns.reorder import AXIS_ORDERS, axes_calibration, cluster_calibration
from dit_sparse.patterns.vdit import (
    DEFAULT_CANDIDATES,
    candidate_errors,
    check_search_settings,
    choose_head_patterns,
    combine_errors,
    pattern_costs,
)
from dit_sparse.pipelines.adapters import find_adapter, transformers_of
from dit_sparse.profile import Profile


def _measure_draft(layout: VideoLayout, q, k, v, config: DraftConfig, settings: dict) -> list[dict]:
    return draft_calibration(layout, q, k, tile=config.tile, target_recall=settings["target_recall"])


def _measure_reorder(layout: VideoLayout, q, k, v, config: ReorderConfig, settings: dict) -> list[dict]:
    if config.strategy == "axes":
        return axes_calibration(layout, q, k, block_size=config.block_size, density=config.density,
                                target_recall=settings["target_recall"])
    return cluster_calibration(layout, q, k, block_size=config.block_size, clusters=config.clusters,
                               kmeans_iters=config.kmeans_iters, target_recall=settings["target_recall"])


def _measure_vdit(layout: VideoLayout, q, k, v, config: VditConfig, settings: dict) -> list[dict]:
    """Per head, each `DEFAULT_CANDIDATES` pattern's output error against dense (`candidate_errors`) and its cost
    on this layout (`pattern_costs`)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, S, H, D)
    errors = candidate_errors(q, k, v, layout, DEFAULT_CANDIDATES, config.block_size, config.tile)  # (C, H)
    costs = pattern_costs(layout, DEFAULT_CANDIDATES, config.block_size, config.tile).tolist()  # (C,)
    return [{"errors": head_errors, "costs": costs} for head_errors in errors.T.tolist()]


def _reduce_density(samples: list[dict], settings: dict) -> dict:
    """The mean density the head needed over the calibration calls."""
    return {"density": statistics.fmean(s["density"] for s in samples)}


def _reduce_reorder(samples: list[dict], settings: dict) -> dict:
    """axes: the order with the highest mean concentration, and the mean density it needed; cluster: the density."""
    if "concentration" not in samples[0]:
        return _reduce_density(samples, settings)
    best = max(AXIS_ORDERS, key=lambda a: statistics.fmean(s["concentration"][a] for s in samples))
    return {"axes": best, "density": statistics.fmean(s["density"][best] for s in samples)}


def _reduce_vdit(samples: list[dict], settings: dict) -> dict:
    """Sparse-vDiT's search for one head: the candidates' errors averaged over the calls (`combine_errors`), then
    `choose_head_patterns` (per head, so the same as choosing a layer's heads together). Costs are averaged too (they
    differ only when the calibration ran several sizes)."""
    errors = combine_errors([torch.tensor(s["errors"])[:, None] for s in samples])  # (C, 1)
    costs = torch.tensor([s["costs"] for s in samples], dtype=torch.float64).mean(dim=0)  # (C,)
    (pattern,) = choose_head_patterns(errors, DEFAULT_CANDIDATES, costs, max_error=settings["max_error"],
                                      cost_weight=settings["cost_weight"])
    return {"pattern": pattern.to_dict()}


class Calibrator(NamedTuple):
    """How `calibrate` measures one method: `measure` per attention call, `reduce` per head over the calls, and the
    names of the `calibrate` settings they read (recorded in the profile's meta)."""

    measure: Callable[..., list[dict]]
    reduce: Callable[[list[dict], dict], dict]
    settings: tuple[str, ...]


#: method -> its Calibrator
CALIBRATORS: dict[str, Calibrator] = {
    "draft": Calibrator(_measure_draft, _reduce_density, ("target_recall",)),
    "reorder": Calibrator(_measure_reorder, _reduce_reorder, ("target_recall",)),
    "vdit": Calibrator(_measure_vdit, _reduce_vdit, ("max_error", "cost_weight")),
}


def calibrate(
    pipe: Any,
    prompts: Sequence[str],
    method: str = "draft",
    *,
    target_recall: float = 0.9,
    max_error: float | None = 0.05,
    cost_weight: float = 0.1,
    steps: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    path=None,
    pipe_kwargs: dict | None = None,
    progress: bool = True,
    **options,
) -> Profile:
    """Calibrate `method` on `pipe` (one transformer): a dense run per (prompt, seed); at the denoising `steps`
    (None: every step) each self-attention call's q, k, v are measured per head (`CALIBRATORS`); the per-head
    results are reduced over prompts, seeds, steps and CFG branches into a `Profile`, saved to `path` when given.

    Settings: `draft`, `reorder`: `target_recall`, the share of the attention mass a head's density keeps. `vdit`
    (Sparse-vDiT's search, `dit_sparse.patterns.vdit.choose_head_patterns`): per head the cheapest candidate pattern
    whose mean output error is at most `max_error`, or with `max_error=None` the smallest error + `cost_weight` x
    cost. `options` are the method's own (e.g. `tile`, `strategy="axes"`, `block_size`); `pipe_kwargs` go to every
    pipeline call (size, `num_inference_steps`, ...). The videos themselves are dense and discarded.
    """
    if method not in CALIBRATORS:
        raise ValueError(f"calibrate supports methods {sorted(CALIBRATORS)}, got {method!r}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
    check_search_settings(max_error, cost_weight)
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of prompts, got {prompts!r}")
    config = make_config(method, **options)
    transformers = transformers_of(pipe, require_adapter=True)
    if len(transformers) != 1:
        raise ValueError(f"calibrate takes a pipeline with one transformer (a profile is per transformer), got "
                         f"{len(transformers)}: calibrate each one as its own transformer")
    transformer = transformers[0]
    adapter = find_adapter(transformer)
    sites = adapter.attention_sites(transformer)
    heads = {getattr(site.module, "heads", None) for site in sites}
    if len(heads) != 1 or None in heads:
        raise ValueError(f"calibrate needs one head count over the layers, got {sorted(heads, key=str)}")
    measure, reduce, names = CALIBRATORS[method]
    all_settings = dict(target_recall=target_recall, max_error=max_error, cost_weight=cost_weight)
    settings = {name: all_settings[name] for name in names}
    samples: list[list[list[dict]]] = [[[] for _ in range(next(iter(heads)))] for _ in sites]
    layouts: set = set()
    wanted = None if steps is None else set(steps)

    def observe(layer: int, step: int, layout: VideoLayout, q, k, v) -> None:
        if wanted is not None and step not in wanted:
            return
        video = layout.video_slice
        layouts.add((layout.frames, layout.height, layout.width))
        with torch.no_grad():
            for head, entry in enumerate(measure(layout, *(x[:, :, video] for x in (q, k, v)), config, settings)):
                samples[layer][head].append(entry)

    runs = [(prompt, seed) for prompt in prompts for seed in seeds]
    unsparsify(pipe)
    with hooks.observe(transformer, adapter, observe):  # every call dense (the original call), observed on the way
        from tqdm.auto import tqdm

        for prompt, seed in tqdm(runs, desc=f"calibrate {method}", disable=not progress):
            pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="latent",
                 **(pipe_kwargs or {}))
    if any(not head for layer in samples for head in layer):
        raise ValueError(f"no attention call was measured at steps {sorted(wanted)}; the runs have fewer steps?")
    entries = [[reduce(head, settings) for head in layer] for layer in samples]
    profile = Profile(
        method=method, transformer=type(transformer).__name__, layers=len(sites), heads=next(iter(heads)),
        layout=sorted(layouts)[0], entries=entries,
        options={k: v for k, v in config.options().items() if not k.startswith("layer_")},  # entries set those
        meta=dict(prompts=list(prompts), seeds=list(seeds), steps=None if steps is None else sorted(wanted),
                  **settings, date=datetime.date.today().isoformat(), pipe_kwargs=pipe_kwargs or {},
                  samples_per_head=len(samples[0][0]), layouts=sorted(layouts)),
    )
    if path is not None:
        profile.save(path)
    return profile


__all__ = ["CALIBRATORS", "Calibrator", "calibrate"]
