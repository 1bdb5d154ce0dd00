"""The eval render loop: every (prompt, seed) of a suite rendered by the baseline and by each method, timed.

- The baseline is the pipeline as diffusers runs it (no dit-sparse hooks): the reference every method's fidelity and
  speed is measured against. It is rendered once per (model, prompt, seed, frames, size, steps, guidance, device,
  dtype) and cached on disk, so adding a method later renders only that method. The `dense` method is a separate
  render: dit-sparse's full mask through the sparse path (its fidelity shows numeric agreement, its speed the cost
  of the path).
- Resumable like `dit-sparse render`: each finished video is a lossless `.npy` (uint8 frames, written atomically) in
  the cache folder plus a row in its `manifest.jsonl` (appended after the frames); a video whose row and file are
  there is not rendered again.
- Timing (`time.perf_counter`, with `torch.cuda.synchronize` on GPU): end-to-end seconds of the pipeline call (text
  encoding, denoising, VAE decode); seconds per denoising step from the first transformer call to each step's end
  (`callback_on_step_end`; without it, to the last transformer call); on GPU, the attention share: CUDA events
  around every self-attention module the adapter names (projections, RoPE and the attention call), summed, over the
  denoising time; on CPU it is not measured (None).
- Peak memory: on GPU `torch.cuda.max_memory_allocated` during the call; on CPU the process's peak resident set
  size sampled every 5 ms during the call (`/proc/self/statm`; None elsewhere), which includes the weights and what
  the allocator keeps, so compare it only between methods of one run.
- Before the first timed video of each method, one untimed warm-up call (`warmup_steps` steps, same size) absorbs
  one-time costs (kernel compilation, allocator growth).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import inspect
import json
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from dit_sparse import stack as stacking
from dit_sparse.eval import render
from dit_sparse.eval.render import MANIFEST_NAME
from dit_sparse.eval.suites import Suite, SuitePrompt, load_suite
from dit_sparse.files import atomic_path
from dit_sparse.patterns import CONFIGS, make_config
from dit_sparse.pipelines import models
from dit_sparse.pipelines.adapters import transformers_of
from dit_sparse.video import to_uint8

BASELINE = "baseline"
DEFAULT_WARMUP_STEPS = 1
# Eval's defaults for a model other than the tiny trained one are smaller and fewer steps than `render`'s
# (render.DEFAULT_*): a suite is tens of prompts times every method, and these keep a CPU run to minutes. The tiny
# trained model runs at its training size and the steps it needs (`settings_for`): at 8 steps its shapes vanish.
DEFAULT_FRAMES = 17
DEFAULT_SIZE = 128
DEFAULT_STEPS = 8


def settings_for(label: str) -> dict:
    """Eval's default frames, height, width and steps for the model recorded under `label`."""
    from dit_sparse.pipelines import tiny

    if label == tiny.TINY_LABEL:
        return dict(frames=render.DEFAULT_FRAMES, height=render.DEFAULT_HEIGHT, width=render.DEFAULT_WIDTH,
                    steps=tiny.DEFAULT_STEPS)
    return dict(frames=DEFAULT_FRAMES, height=DEFAULT_SIZE, width=DEFAULT_SIZE, steps=DEFAULT_STEPS)


# ---- the plan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One method of the eval: its name and full config options (defaults filled in)."""

    name: str
    options: dict


@dataclass(frozen=True)
class EvalRow:
    """One row of the report: a method with the stack `optimize` puts on it (empty: the method alone), named by
    `label` (`render.stack_label` in a `--stacks` run, else the method's name)."""

    label: str
    method: str
    options: dict
    stack: dict


BASELINE_ROW = EvalRow(BASELINE, BASELINE, {}, {})


@dataclass(frozen=True)
class EvalPlan:
    """Everything one eval renders and how; built and checked by `make_plan` before any model is loaded."""

    model: str | None  # as given: None / "tiny", "tiny-random", a folder or a hub id
    model_label: str
    suite: Suite
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...]
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    fps: float
    device: str
    dtype: str
    warmup_steps: int
    output_dir: str
    cache_dir: str
    side_by_side_videos: bool = True  # False: the report's side-by-sides are still frames only (no mp4s)
    stack: dict = dataclasses.field(default_factory=dict)  # what optimize stacks on every method (`--cache`, ...)
    #: `--stacks`: each method is rendered once per stack, a report row each; empty: one row per method, `stack` on it
    stacks: tuple[dict, ...] = ()

    def rows(self) -> list[EvalRow]:
        """The report's rows after the baseline: per method, one per stack of `stacks` (method-major), or one with
        `stack` when `stacks` is empty."""
        if not self.stacks:
            return [EvalRow(m.name, m.name, m.options, self.stack) for m in self.methods]
        return [EvalRow(render.stack_label(m.name, stack), m.name, m.options, stack)
                for m in self.methods for stack in self.stacks]  # fmt: skip

    def job(self, prompt: str, seed: int, row: EvalRow) -> render.RenderJob:
        return render.RenderJob(
            prompt=prompt, seed=seed, method=row.method, options=row.options, frames=self.frames, height=self.height,
            width=self.width, steps=self.steps, guidance=self.guidance, model=self.model_label, stack=row.stack,
        )  # fmt: skip

    def videos(self) -> list[tuple[SuitePrompt, int]]:
        """Every (prompt, seed) pair, prompt-major."""
        return [(prompt, seed) for prompt in self.suite.prompts for seed in self.seeds]

    def jobs(self) -> list[render.RenderJob]:
        """Per (prompt, seed): the baseline, then each row."""
        return [self.job(prompt.prompt, seed, row) for prompt, seed in self.videos()
                for row in [BASELINE_ROW, *self.rows()]]  # fmt: skip

    def video_key(self, job: render.RenderJob) -> dict:
        return video_key(job, self.device, self.dtype)

    def video_hash(self, job: render.RenderJob) -> str:
        return video_hash(job, self.device, self.dtype)

    def frames_file(self, job: render.RenderJob) -> str:
        return frames_file(job, self.device, self.dtype)


def video_key(job: render.RenderJob, device: str, dtype: str) -> dict:
    """What decides a video's frames: the job's key plus the device type and dtype it runs in."""
    return {**job.key(), "device": device.split(":")[0], "dtype": dtype}


def video_hash(job: render.RenderJob, device: str, dtype: str) -> str:
    """A short stable hash of `video_key`: a video's name in the cache."""
    return hashlib.sha256(json.dumps(video_key(job, device, dtype), sort_keys=True).encode()).hexdigest()[:12]


def frames_file(job: render.RenderJob, device: str, dtype: str) -> str:
    """The cache's file name of a video's lossless frames."""
    return f"{render.slugify(job.prompt)}-seed{job.seed}-{job.method}-{video_hash(job, device, dtype)}.npy"


def parse_methods(text: str | None) -> list[str]:
    """Method names from "a,b,c" (None: every method in `CONFIGS`); unknown or repeated names are a ValueError."""
    if text is None:
        return list(CONFIGS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--methods must name at least one method; allowed: {sorted(CONFIGS)}")
    for name in names:
        if name == BASELINE:
            raise ValueError(f"{BASELINE!r} is always rendered (the reference); --methods takes {sorted(CONFIGS)}")
        if name not in CONFIGS:
            raise ValueError(f"unknown method {name!r}; allowed: {sorted(CONFIGS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"method(s) {repeated} given twice in --methods")
    return names


def parse_seeds(text) -> tuple[int, ...]:
    """Seeds from "0,1,2" (or a list of ints); each an int >= 0, no repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    seeds = []
    for item in items:
        try:
            seed = int(item.strip()) if isinstance(item, str) else item
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated ints >= 0, got {text!r}") from None
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seeds must be ints >= 0, got {item!r}")
        seeds.append(render.check_seed(seed))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name at least one seed, each once, got {text!r}")
    return tuple(seeds)


def parse_stacks(specs) -> tuple[dict, ...]:
    """The stacks of `--stacks` (each a spec `render.parse_stack_spec` reads, or a stack dict); none given, or one
    stack given twice (in any spelling: `fp8+cache=pab` is `cache=pab+fp8`), is a ValueError."""
    specs = list(specs)
    if not specs:
        raise ValueError(f"--stacks must name at least one stack: {render.STACK_SPEC_HELP}")
    seen, stacks = {}, []
    for spec in specs:
        stack = render.check_stack(spec) if isinstance(spec, dict) else render.parse_stack_spec(spec)
        cache = stack.get("cache")
        identity = json.dumps({**stack, **({"cache": stacking.parse_cache(cache)} if cache else {})}, sort_keys=True)
        if identity in seen:
            raise ValueError(f"--stacks {spec!r} is the same stack as {seen[identity]!r}: give each stack once")
        seen[identity] = spec
        stacks.append(stack)
    return tuple(stacks)


def parse_method_options(pairs: list[str], methods: list[str], block_size: int | None) -> dict[str, dict]:
    """Per method, its options from `--option METHOD.KEY=VALUE` and `--block-size` (every method with a
    `block_size` field, unless set for it by --option); each method's config is built, so bad values fail here."""
    given: dict[str, dict] = {name: {} for name in methods}
    for text in pairs:
        target, sep, value = text.partition("=")
        method, dot, key = target.strip().partition(".")
        if not sep or not dot or not method or not key:
            raise ValueError(f"--option must be METHOD.KEY=VALUE (e.g. radial.decay_factor=0.5), got {text!r}")
        if method not in given:
            raise ValueError(f"--option {text!r} names method {method!r}, which is not in --methods {methods}")
        if key in given[method]:
            raise ValueError(f"option {method}.{key} given twice")
        given[method][key] = render.parse_option_value(value)
    if block_size is not None:
        for name in methods:
            if "block_size" in {f.name for f in dataclasses.fields(CONFIGS[name])}:
                given[name].setdefault("block_size", block_size)
    options = {}
    for name in methods:
        try:
            options[name] = make_config(name, **given[name]).options()
        except ValueError as exc:
            raise ValueError(f"method {name}: {exc}") from exc
    return options


def make_plan(
    *,
    suite: str,
    methods: str | None = None,
    options: list[str] = (),
    block_size: int | None = None,
    model: str | None = None,
    seeds="0",
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance: float = render.DEFAULT_GUIDANCE,
    fps: float = render.DEFAULT_FPS,
    device: str = "cpu",
    dtype: str = "float32",
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    output_dir: str = "eval-out",
    cache_dir: str | None = None,
    side_by_side_videos: bool = True,
    stack: dict | None = None,
    stacks: list | None = None,
) -> EvalPlan:
    """A checked `EvalPlan`; every bad input is a ValueError naming the value and what is allowed. `frames`,
    `height`, `width`, `steps` left None take the model's defaults (`settings_for`). `stack`: one stack on every
    method (`--cache`, `--fp8`, `--compile`); `stacks`: several, each method rendered once per stack (`--stacks`);
    not both."""
    names = parse_methods(methods)
    stack = render.check_stack(stack or {})
    if stacks is not None and stack:
        raise ValueError(f"--stacks {' '.join(map(str, stacks))} cannot be combined with --cache, --fp8 or --compile "
                         f"(given: {render.stack_spec(stack)}): put that stack in --stacks instead")
    stacks = () if stacks is None else parse_stacks(stacks)
    method_options = parse_method_options(list(options), names, block_size)
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not np.isfinite(guidance):
        raise ValueError(f"guidance must be a number, got {guidance!r}")
    if not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if dtype not in render.DTYPES:
        raise ValueError(f"dtype must be one of {render.DTYPES}, got {dtype!r}")
    model = models.check_model(model)
    label, _ = models.resolve_model_label(model)
    given = dict(frames=frames, height=height, width=width, steps=steps)
    settings = settings_for(label) | {name: value for name, value in given.items() if value is not None}
    frames, height, width, steps = (settings[name] for name in given)
    output_dir = os.path.abspath(output_dir)
    return EvalPlan(
        model=model,
        model_label=label,
        suite=load_suite(suite),
        methods=tuple(MethodSpec(name, method_options[name]) for name in names),
        stack=stack,
        stacks=stacks,
        seeds=parse_seeds(seeds),
        frames=render.check_frames(frames),
        height=render.check_size("height", height),
        width=render.check_size("width", width),
        steps=render.check_int("steps", steps, 1),
        guidance=float(guidance),
        fps=float(fps),
        device=device,
        dtype=dtype,
        warmup_steps=render.check_int("warmup_steps", warmup_steps, 0),
        output_dir=output_dir,
        cache_dir=os.path.abspath(cache_dir) if cache_dir else os.path.join(output_dir, "videos"),
        side_by_side_videos=bool(side_by_side_videos),
    )


# ---- the model ---------------------------------------------------------------------------------------------------
def load_eval_model(plan: EvalPlan):
    """The pipeline of `plan.model` on its device and dtype, progress bar off."""
    return models.load_pipeline(plan.model, plan.device, plan.dtype)


# ---- measuring one call ------------------------------------------------------------------------------------------
class PeakRSS:
    """The process's peak resident set size (bytes) while the block runs, sampled every `interval` seconds from
    /proc/self/statm; `peak` is None where that file does not exist."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, None
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _read(self) -> int | None:
        try:
            with open("/proc/self/statm") as file:
                return int(file.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.peak = max(self.peak or 0, value)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._read()
        if self.peak is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.peak is not None:
            self._thread.join()
            self.peak = max(self.peak, self._read() or 0)
        return False


class CallProbe:
    """Timing probes for one pipeline call: the first transformer call, each step's end, and (CUDA) events around
    every self-attention module. Remove with `close()`."""

    def __init__(self, pipe, cuda: bool):
        import torch

        from dit_sparse.pipelines.adapters import find_adapter

        self.cuda, self.torch = cuda, torch
        self.first_call: float | None = None
        self.last_call: float | None = None
        self.step_ends: list[float] = []
        self.events: list = []
        self.handles = []
        for transformer in transformers_of(pipe):
            self.handles.append(transformer.register_forward_pre_hook(self._before_transformer))
            self.handles.append(transformer.register_forward_hook(self._after_transformer))
            if cuda:
                for site in find_adapter(transformer).attention_sites(transformer):
                    self.handles.append(site.module.register_forward_pre_hook(self._before_attention))
                    self.handles.append(site.module.register_forward_hook(self._after_attention))

    def _now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _before_transformer(self, module, args):
        if self.first_call is None:
            self.first_call = self._now()

    def _after_transformer(self, module, args, output):
        self.last_call = time.perf_counter()

    def _before_attention(self, module, args):
        start = self.torch.cuda.Event(enable_timing=True)
        start.record()
        self.events.append([start, None])

    def _after_attention(self, module, args, output):
        end = self.torch.cuda.Event(enable_timing=True)
        end.record()
        self.events[-1][1] = end

    def step_end(self, pipe, step, timestep, callback_kwargs):
        self.step_ends.append(self._now())
        return callback_kwargs

    def attention_seconds(self) -> float | None:
        if not self.cuda:
            return None
        self.torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events if end is not None) / 1000.0

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _call_pipe(pipe, job: render.RenderJob, steps: int, callback=None):
    import torch

    kwargs = dict(
        prompt=job.prompt, num_frames=job.frames, height=job.height, width=job.width, num_inference_steps=steps,
        guidance_scale=job.guidance, generator=torch.Generator().manual_seed(job.seed), output_type="np",
    )  # fmt: skip
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    return pipe(**kwargs).frames[0]


def _session_details(pipe) -> tuple[dict | None, list[int] | None]:
    """The config a sparsified pipeline ran (family defaults included) and its video layout in tokens."""
    from dit_sparse import hooks

    for transformer in transformers_of(pipe):
        session = hooks.session_of(transformer)
        if session is not None:
            layouts = [key[0] for key in session.plans]
            layout = [layouts[0].frames, layouts[0].height, layouts[0].width] if layouts else None
            return session.config.options(), layout
    return None, None


def render_timed(pipe, job: render.RenderJob, device: str) -> tuple[np.ndarray, dict]:
    """Render one job (the baseline untouched, a method sparsified) and measure it: uint8 frames and the stats."""
    import torch

    import dit_sparse

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if job.method != BASELINE:
        if job.stack:
            dit_sparse.optimize(pipe, job.method, **job.stack, **job.options)
        else:
            dit_sparse.sparsify(pipe, job.method, **job.options)
        dit_sparse.sparsity_stats(pipe, reset=True)
    probe = CallProbe(pipe, cuda)
    has_callback = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            start = probe._now()
            frames = _call_pipe(pipe, job, job.steps, probe.step_end if has_callback else None)
            end = probe._now()
        density, config, layout, cached = 1.0, None, None, {}
        if job.method != BASELINE:
            counts = dit_sparse.sparsity_stats(pipe)
            density = counts["density"]
            config, layout = _session_details(pipe)
            cached = {name: counts[name] for name in CACHE_FIELDS if name in counts}
    finally:
        probe.close()
        if job.method != BASELINE:
            dit_sparse.restore(pipe)  # unsparsify, and whatever the stack added
    denoise_end = probe.step_ends[-1] if probe.step_ends else probe.last_call
    denoise = denoise_end - probe.first_call if probe.first_call is not None and denoise_end else None
    step_seconds = list(np.diff([probe.first_call, *probe.step_ends])) if probe.step_ends and probe.first_call else []
    attention = probe.attention_seconds()
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    stats = {
        "density": None if density is None else round(float(density), 6),
        "config": config,
        "layout": layout,
        "seconds": end - start,
        "denoise_seconds": denoise,
        "seconds_per_step": denoise / job.steps if denoise is not None else None,
        "step_seconds": [round(float(s), 6) for s in step_seconds],
        "attention_seconds": attention,
        "attention_share": attention / denoise if attention is not None and denoise else None,
        "peak_memory_mb": None if peak is None else peak / 2**20,
        "memory_source": "torch.cuda.max_memory_allocated" if cuda else ("peak RSS (sampled)" if peak else None),
        **cached,  # under a step cache: the self-attention computations it served instead (`sparsity_stats`)
    }
    return to_uint8(frames), stats


# ---- files -------------------------------------------------------------------------------------------------------
def save_frames(frames: np.ndarray, path: str) -> None:
    """Write uint8 frames as .npy atomically (a temporary file renamed over `path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            np.save(file, np.ascontiguousarray(frames))
            file.flush()
            os.fsync(file.fileno())


def load_frames(plan: EvalPlan, row: dict) -> np.ndarray:
    return np.load(os.path.join(plan.cache_dir, row["file"]))


def damaged_frames(path: str, shape=None) -> str | None:
    """Why the cached frames at `path` cannot be trusted (not a .npy file, cut short, not `shape` when given), None
    when they are whole; reads the header only."""
    try:
        with open(path, "rb") as file:
            version = np.lib.format.read_magic(file)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            found, _, dtype = header(file)
            expected = file.tell() + int(np.prod(found)) * dtype.itemsize
            size = os.fstat(file.fileno()).st_size
    except (OSError, ValueError) as exc:
        return f"not a readable .npy file ({exc})"
    if size < expected:
        return f"cut short ({size} of {expected} bytes)"
    if shape is not None and list(found) != list(shape):
        return f"its frames are {list(found)}, its manifest row says {list(shape)}"
    return None


def cached_rows(cache_dir: str, hashes=None) -> dict[str, dict]:
    """Video hash -> manifest row, for the rows of the cache whose frames file is there and whole (the last row wins);
    only those in `hashes` when given. A damaged file (a write cut short by a full disk or a kill) is reported by
    path and left out: it is rendered again, never trusted. Each file's header is read once."""
    rows = {}
    for row in render.read_manifest(os.path.join(cache_dir, MANIFEST_NAME)):
        name = row.get("file")
        if isinstance(row.get("hash"), str) and isinstance(name, str) and os.path.isfile(os.path.join(cache_dir, name)):
            rows[row["hash"]] = row
    finished = {}
    for key, row in rows.items():
        if hashes is not None and key not in hashes:
            continue
        path = os.path.join(cache_dir, row["file"])
        problem = damaged_frames(path, row.get("shape"))
        if problem is None:
            finished[key] = row
        else:
            print(f"dit-sparse: warning: {path}: {problem}; rendering it again", file=sys.stderr)
    return finished


def finished_rows(plan: EvalPlan) -> dict[str, dict]:
    return cached_rows(plan.cache_dir)


def render_into_cache(pipe, job: render.RenderJob, device: str, dtype: str, cache_dir: str) -> tuple[np.ndarray, dict]:
    """Render and measure `job` (`render_timed`), then store its frames and append its manifest row to the cache;
    returns the uint8 frames and the row."""
    frames, stats = render_timed(pipe, job, device)
    row = {
        **video_key(job, device, dtype),
        "hash": video_hash(job, device, dtype),
        **stats,
        "file": frames_file(job, device, dtype),
        "shape": list(frames.shape),
        "rendered_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(cache_dir, exist_ok=True)
    save_frames(frames, os.path.join(cache_dir, row["file"]))
    render.append_row(os.path.join(cache_dir, MANIFEST_NAME), row)
    return frames, row


def render_cached(
    pipe, job: render.RenderJob, device: str, dtype: str, cache_dir: str, warmup_steps: int = 0
) -> tuple[np.ndarray, dict, bool]:
    """`job`'s uint8 frames, manifest row and whether they came from the cache: a video already in `cache_dir` is
    loaded (its row keeps the seconds measured when it was rendered), else it is rendered into it, after an untimed
    warm-up call of `warmup_steps` steps (0: none). The app's dense video is the `BASELINE` job, cached this way."""
    key = video_hash(job, device, dtype)
    row = cached_rows(cache_dir, hashes={key}).get(key)
    if row is not None:
        return np.load(os.path.join(cache_dir, row["file"])), row, True
    if warmup_steps > 0:
        render_timed(pipe, dataclasses.replace(job, steps=warmup_steps), device)
    frames, row = render_into_cache(pipe, job, device, dtype, cache_dir)
    return frames, row, False


# ---- the loop ----------------------------------------------------------------------------------------------------
def render_all(plan: EvalPlan, pipe=None, log=print) -> dict[str, dict]:
    """Render every job of `plan` not in the cache yet; returns video hash -> manifest row for all of them.

    The model is loaded only if something is left to render (or `pipe` is given)."""
    from tqdm.auto import tqdm

    os.makedirs(plan.cache_dir, exist_ok=True)
    finished = finished_rows(plan)
    jobs = plan.jobs()
    pending = list({plan.video_hash(job): job for job in jobs if plan.video_hash(job) not in finished}.values())
    reused = len({plan.video_hash(job) for job in jobs}) - len(pending)
    if reused:
        log(f"reusing {reused} video(s) from {plan.cache_dir}")
    if not pending:
        return finished
    if pipe is None:
        pipe = load_eval_model(plan)
    warmed = set()
    for job in tqdm(pending, desc="eval videos", unit="video"):
        warm_key = (job.method, json.dumps(job.stack, sort_keys=True))  # each stack its own warm-up (compilation)
        if warm_key not in warmed and plan.warmup_steps > 0:
            warm = dataclasses.replace(job, steps=plan.warmup_steps)
            render_timed(pipe, warm, plan.device)
            warmed.add(warm_key)
        _, row = render_into_cache(pipe, job, plan.device, plan.dtype, plan.cache_dir)
        finished[row["hash"]] = row
    return finished


# ---- scoring -----------------------------------------------------------------------------------------------------
#: per-video result fields, in table order (None where a metric does not apply or was not measured)
RESULT_FIELDS = (
    "prompt", "category", "seed", "method", "density", "seconds", "seconds_per_step", "speedup", "step_speedup",
    "attention_share", "peak_memory_mb", "psnr", "ssim", "lpips", "clip_score", "temporal_flickering",
    "motion_smoothness", "dynamic", "flow_px",
)  # fmt: skip


#: what a video rendered under a step cache adds (in a `--stacks` run): the self-attention computations the cache
#: served instead, and their share of all (`dit_sparse.sparsity_stats`)
CACHE_FIELDS = ("cache_skipped_blocks", "cache_skip_share")


def _score_video(video_path: str, reference_path: str | None, fps: float) -> dict:
    """The scores of one cached video that need only its frames: fidelity against the reference video (when given)
    and the VBench-style dimensions. A module-level function: it runs in `score_videos`' worker processes."""
    from dit_sparse.eval import metrics

    video = np.load(video_path)
    scores = {} if reference_path is None else metrics.fidelity(np.load(reference_path), video)
    return {**scores, **metrics.video_dimensions(video, fps)}


def _single_threaded_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV's own threads would oversubscribe the cores


def score_workers(videos: int, workers: int | None = None) -> int:
    """Processes that score `videos` videos: `workers` (None: one per CPU core this process may run on, as `nproc`
    counts them), at most one per video, at least 1."""
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"score workers must be an int >= 1, got {workers!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(videos, workers or cores))


def score_videos(plan: EvalPlan, finished: dict[str, dict], optional: dict | None = None,
                 workers: int | None = None) -> list[dict]:  # fmt: skip
    """One result row per (prompt, seed, row of `plan.rows()`), the baseline first: its speed, fidelity against the
    baseline and the VBench-style dimensions; in a `--stacks` run also its `label`, `stack` and `CACHE_FIELDS`.
    `optional`: learnt metrics from `metrics.optional_metrics` ("lpips", "clip_score"), computed in this process.
    The frame metrics (SSIM and optical flow: about 30 s a video at 480p) run in `score_workers(videos, workers)`
    spawned processes, each reading its video from the cache; the rows are the same as from one process."""
    from tqdm.auto import tqdm

    optional = optional or {}
    results, tasks = [], []
    for prompt, seed in plan.videos():
        base_row = finished[plan.video_hash(plan.job(prompt.prompt, seed, BASELINE_ROW))]
        for entry in [BASELINE_ROW, *plan.rows()]:
            row = finished[plan.video_hash(plan.job(prompt.prompt, seed, entry))]
            result = {field: None for field in RESULT_FIELDS}
            result.update(
                prompt=prompt.prompt, category=prompt.category, seed=seed, method=entry.method,
                **({"label": entry.label, "stack": entry.stack} if plan.stacks else {}), density=row["density"],
                seconds=row["seconds"], seconds_per_step=row["seconds_per_step"],
                attention_share=row["attention_share"], peak_memory_mb=row["peak_memory_mb"],
                speedup=base_row["seconds"] / row["seconds"],
            )  # fmt: skip
            if row["seconds_per_step"] and base_row["seconds_per_step"]:
                result["step_speedup"] = base_row["seconds_per_step"] / row["seconds_per_step"]
            result["config"], result["layout"], result["file"] = row["config"], row["layout"], row["file"]
            if plan.stacks:
                result.update({field: row[field] for field in CACHE_FIELDS if field in row})
            results.append(result)
            reference = None if entry.method == BASELINE else os.path.join(plan.cache_dir, base_row["file"])
            tasks.append((os.path.join(plan.cache_dir, row["file"]), reference, plan.fps))
    processes = score_workers(len(tasks), workers)
    progress = tqdm(total=len(tasks), desc=f"scoring ({processes} process{'es' if processes > 1 else ''})",
                    unit="video")  # fmt: skip
    scores = []
    with contextlib.ExitStack() as stack:
        if processes == 1:
            mapped = map(_score_video, *zip(*tasks))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads (and CUDA)
            pool = stack.enter_context(ProcessPoolExecutor(processes, mp_context=context,
                                                           initializer=_single_threaded_worker))  # fmt: skip
            mapped = pool.map(_score_video, *zip(*tasks))
        for score in mapped:
            scores.append(score)
            progress.update()
    progress.close()
    load = functools.lru_cache(maxsize=2)(np.load)  # a prompt's baseline stays loaded while its methods pass
    for result, task, score in zip(results, tasks, scores):
        result.update(score)
        if optional:
            video = load(task[0])
            if "lpips" in optional and task[1] is not None:
                result["lpips"] = optional["lpips"](load(task[1]), video)
            if "clip_score" in optional:
                result["clip_score"] = optional["clip_score"](video, result["prompt"])
    return results


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def row_label(result: dict) -> str:
    """The report row a result or mean row belongs to: its `label` in a `--stacks` run, else its method."""
    return result.get("label", result["method"])


def method_means(plan: EvalPlan, results: list[dict]) -> list[dict]:
    """Per row of `plan.rows()` (a method, or a method with one stack), the mean of each result field over its
    videos. PSNR: the mean over the videos that differ from the baseline (`identical` counts the rest; inf when all
    are identical). Speedups: the ratio of total times (baseline over row, same videos). Dynamic: the fraction of
    dynamic videos (VBench's dynamic degree). In a `--stacks` run, its `label` and `stack`, and under a cache the
    mean `CACHE_FIELDS`."""
    means = []
    for entry in [BASELINE_ROW, *plan.rows()]:
        name = entry.method
        rows = [r for r in results if row_label(r) == entry.label]
        base = [r for r in results if r["method"] == BASELINE]
        mean = {field: None for field in RESULT_FIELDS}
        mean.update(prompt="MEAN", category="", seed=None, method=name, videos=len(rows))
        if plan.stacks:
            mean.update(label=entry.label, stack=entry.stack)
        for field in RESULT_FIELDS[4:]:
            mean[field] = _mean(r[field] for r in rows)
        psnrs = [r["psnr"] for r in rows if r["psnr"] is not None]
        finite = [p for p in psnrs if np.isfinite(p)]
        mean["identical"] = len(psnrs) - len(finite) if name != BASELINE else None
        mean["psnr"] = (float(np.mean(finite)) if finite else float("inf")) if psnrs else None
        mean["speedup"] = sum(r["seconds"] for r in base) / sum(r["seconds"] for r in rows)
        steps = [r["seconds_per_step"] for r in rows]
        base_steps = [r["seconds_per_step"] for r in base]
        if all(steps) and all(base_steps):
            mean["step_speedup"] = sum(base_steps) / sum(steps)
        mean["dynamic"] = _mean(float(r["dynamic"]) for r in rows)
        configs = [r["config"] for r in rows if r["config"] is not None]
        mean["config"] = configs[0] if configs else None
        layouts = [r["layout"] for r in rows if r["layout"] is not None]
        mean["layout"] = layouts[0] if layouts else None
        for field in CACHE_FIELDS:
            if any(field in r for r in rows):
                mean[field] = _mean(r.get(field) for r in rows)
        means.append(mean)
    return means
