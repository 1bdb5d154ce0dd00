"""The render engine: what `dit-sparse render` and `demo` run, and what `eval` and the app build on.

- Jobs: `RenderJob` (everything that decides one video, the manifest key), `make_job` (a checked job), the prompts
  files (`read_prompts_file`), the one option-value parser of every command (`parse_option_value`, from
  `dit_sparse.options`).
- Manifests: a `manifest.jsonl` row per finished video; resumable (a video whose settings are already in the
  manifest and whose mp4 exists is skipped) and atomic (an mp4 appears only complete, and its row only after it).
- Several processes (`accelerate launch -m dit_sparse.cli render ...`, or `render --num-processes N`, which launches
  that) split the unfinished videos between them (`PartialState.split_between_processes`), one device each; each
  appends to its own `manifest.rank<r>.jsonl`, which the main process merges into `manifest.jsonl` at the end (or,
  after a run that died, at the next start).
- The demo's two jobs (dense, then radial, same seed) and the Wan VAE geometry the size checks follow.

The model (`render --model`; `demo` takes the default) is resolved by `dit_sparse.pipelines.models`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from dit_sparse.files import write_atomic
from dit_sparse.options import parse_option_value  # noqa: F401  (the one option parser, re-exported here)
from dit_sparse.patterns import make_config
from dit_sparse.pipelines import models, tiny
from dit_sparse.video import psnr, read_video, to_uint8, write_mp4

# ---- defaults: the tiny trained model's own size and steps (`render`'s, the demo's and the app's).
# 81 frames (Wan's own count) at 160 x 160 px: 21 latent frames of 10 x 10 tokens = 2,100 video tokens. Radial's
# sparsity comes from the frame distance, so many short frames beat few large ones.
DEFAULT_FRAMES = 81
DEFAULT_HEIGHT = 160
DEFAULT_WIDTH = 160
DEFAULT_STEPS = tiny.DEFAULT_STEPS
DEFAULT_GUIDANCE = 5.0
DEFAULT_SEED = 0
DEFAULT_FPS = 16
DEFAULT_METHOD = "radial"
DEMO_PROMPT = "a red circle moves right on a blue background"  # a caption of the tiny model's shapes dataset
# Tokens per attention block in the demo (and the app). A latent frame is 100 tokens here: at 64, 33 x 33 blocks of
# which radial keeps 0.50. A block larger than a frame (128) makes radial's far-frame skip drop even the neighbouring
# frames (distances 1 to 3), keeping 0.16.
DEMO_BLOCK_SIZE = 64
MANIFEST_NAME = "manifest.jsonl"
PROCESS_WAIT = datetime.timedelta(hours=24)  # how long a process may wait for the others (shares are uneven)
SHARD_PATTERN = re.compile(r"manifest\.rank(\d+)\.jsonl")  # one process's rows before the merge

# ---- the Wan geometry the checks follow: the VAE compresses time 4x and space 8x; the transformer's patch is 2x2.
WAN_TEMPORAL_FACTOR = 4
WAN_SPATIAL_FACTOR = 8
WAN_PATCH = 2
SIZE_MULTIPLE = WAN_SPATIAL_FACTOR * WAN_PATCH  # 16

DTYPES = ("float32", "bfloat16", "float16")
MAX_SEED = 2**63 - 1  # a signed 64-bit int: torch.Generator.manual_seed and numpy's int64 both take it


# ---- checks ------------------------------------------------------------------------------------------------------
def check_int(name: str, value, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_seed(seed) -> int:
    """A noise seed: an int in 0 .. 2**63 - 1 (what `torch.Generator.manual_seed` takes; beyond 64 bits it fails with
    "Overflow when unpacking long long" once the model has loaded)."""
    check_int("seed", seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in 0..{MAX_SEED} (2**63 - 1), got {seed}")
    return seed


def check_frames(frames) -> int:
    """Frames the Wan VAE takes: 4k + 1 (a first frame, then whole groups of 4)."""
    check_int("frames", frames)
    if frames < 1 or (frames - 1) % WAN_TEMPORAL_FACTOR:
        below = frames - (frames - 1) % WAN_TEMPORAL_FACTOR
        nearest = f"{below} or {below + WAN_TEMPORAL_FACTOR}" if frames > 1 else "1"
        raise ValueError(
            f"frames={frames} cannot be taken by the Wan VAE: it needs {WAN_TEMPORAL_FACTOR}k + 1 frames "
            f"(1, 5, 9, ...); nearest allowed: {nearest}"
        )
    return frames


def check_size(name: str, value) -> int:
    """A height or width: a positive multiple of 16 (the VAE's 8x times the 2x2 patch)."""
    check_int(name, value)
    if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
        below = value - value % SIZE_MULTIPLE
        nearest = f"{below} or {below + SIZE_MULTIPLE}" if below >= SIZE_MULTIPLE else str(SIZE_MULTIPLE)
        raise ValueError(
            f"{name}={value} is not a positive multiple of {SIZE_MULTIPLE} (the VAE's {WAN_SPATIAL_FACTOR}x times the "
            f"{WAN_PATCH}x{WAN_PATCH} patch); nearest allowed: {nearest}"
        )
    return value


def wan_video_tokens(frames: int, height: int, width: int) -> int:
    """Video tokens one Wan transformer call sees for a video of this size."""
    latent_frames = (frames - 1) // WAN_TEMPORAL_FACTOR + 1
    return latent_frames * (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)


def check_device(device: str) -> str:
    """A torch device this machine has: "cpu", "cuda" / "cuda:N" with a CUDA GPU there, "mps" on Apple silicon;
    anything else is a ValueError that says which devices exist here."""
    import torch

    available = ["cpu"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        available += ["cuda"] + [f"cuda:{index}" for index in range(count)]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        available.append("mps")
    if device not in available:
        why = ""
        if device.split(":")[0] == "cuda" and not torch.cuda.is_available():
            why = f" (this torch {torch.__version__} sees no CUDA GPU)"
        raise ValueError(f"device {device!r} is not available here{why}; available: {', '.join(available)}")
    return device


def apply_run_settings(args: argparse.Namespace) -> None:
    """What every command does with --device, --dtype and --threads before anything else: the default device (cuda
    if there is one, else cpu), checked; the default dtype (bfloat16 on cuda, float32 otherwise); torch's CPU threads
    (None: torch's default)."""
    import torch

    args.device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.threads is not None:
        torch.set_num_threads(check_int("threads", args.threads, 1))


def check_output_dir(path: str, flag: str = "--output-dir") -> str:
    """Make sure the folder `path` exists (created if needed) and can be written: a probe file is created and removed,
    so a render is never lost to a folder it cannot write. A file in its place, or a folder that cannot be created
    or written, is a ValueError naming it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dit-sparse-probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path!r} cannot be written: {exc.strerror or exc}") from exc
    return path


# ---- one video's settings ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderJob:
    """Everything that decides one video (the manifest key). `options` is the method's full config."""

    prompt: str
    seed: int
    method: str
    options: dict
    frames: int
    height: int
    width: int
    steps: int
    guidance: float
    model: str
    #: What `dit_sparse.optimize` stacks on the method (`cache`, `fp8`, `compile`: only those set); empty: none, and
    #: the key (so the hash and file name) is as before stacks existed.
    stack: dict = dataclasses.field(default_factory=dict)

    def key(self) -> dict:
        key = dataclasses.asdict(self)
        if not key["stack"]:
            del key["stack"]
        return key

    def key_hash(self) -> str:
        return key_hash(self.key())

    def file_name(self) -> str:
        """`<prompt slug>-seed<seed>-<method>-<key hash>.mp4`: different settings never share a file."""
        return f"{slugify(self.prompt)}-seed{self.seed}-{self.method}-{self.key_hash()}.mp4"


#: The fields that identify a video: same key, same video (the resume rule).
KEY_FIELDS = tuple(field.name for field in dataclasses.fields(RenderJob))
#: The fields a .jsonl prompts line may set besides "prompt" (one model per run).
OVERRIDE_FIELDS = tuple(name for name in KEY_FIELDS if name not in ("prompt", "model"))


def key_hash(fields: dict) -> str:
    """A short stable hash of a video's key fields (a job's, or a manifest row's)."""
    key = {name: fields[name] for name in KEY_FIELDS if name != "stack"}
    if fields.get("stack"):
        key["stack"] = fields["stack"]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def slugify(text: str, max_length: int = 40) -> str:
    """A file-name-safe short form of a prompt: lower-case ASCII words joined by dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length].rstrip("-")
    return slug or "video"


def make_job(prompt, settings: dict, model: str) -> RenderJob:
    """A validated job from a prompt and its settings (every `OVERRIDE_FIELDS` key); raises ValueError."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(settings["options"], dict):
        raise ValueError(f"options must be an object of option names to values, got {settings['options']!r}")
    guidance = settings["guidance"]
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not np.isfinite(guidance):
        raise ValueError(f"guidance must be a number, got {guidance!r}")
    if not isinstance(settings["method"], str):
        raise ValueError(f"method must be a method name, got {settings['method']!r}")
    config = make_config(settings["method"], **settings["options"])
    stack = check_stack(settings.get("stack") or {})
    return RenderJob(
        prompt=prompt.strip(),
        seed=check_seed(settings["seed"]),
        method=settings["method"],
        options=config.options(),
        frames=check_frames(settings["frames"]),
        height=check_size("height", settings["height"]),
        width=check_size("width", settings["width"]),
        steps=check_int("steps", settings["steps"], 1),
        guidance=float(guidance),
        model=model,
        stack=stack,
    )


def check_stack(stack: dict) -> dict:
    """A job's stack (`cache`: a cache string, `fp8`: bool, `compile`: "regional" | "full") checked as far as it can
    be without a pipeline (the cache name and option syntax, the compile mode); only the parts set are kept."""
    from dit_sparse import stack as stacking

    if not isinstance(stack, dict) or set(stack) - {"cache", "fp8", "compile"}:
        raise ValueError(f"stack must be an object with keys among cache, fp8, compile, got {stack!r}")
    cache = None
    if stack.get("cache") is not None:
        cache = stacking.CachePlan(stacking.parse_cache(stack["cache"])[0])
    stacking.check_compile(stack.get("compile"), cache)
    if stack.get("fp8") not in (None, True, False):
        raise ValueError(f"fp8 must be true or false, got {stack['fp8']!r}")
    return {name: value for name, value in stack.items() if value not in (None, False)}


def stack_from_args(args: argparse.Namespace) -> dict:
    """The stack of `--cache SPEC`, `--fp8` and `--compile MODE`."""
    return check_stack({"cache": getattr(args, "cache", None), "fp8": getattr(args, "fp8", False),
                        "compile": getattr(args, "compile", None)})


#: What a `--stacks` entry may be (`parse_stack_spec`).
STACK_SPEC_HELP = ("none (the method alone) or items joined by '+': cache=NAME[:KEY=VALUE...], fp8, "
                   "compile=regional|full")


def parse_stack_spec(text: str) -> dict:
    """The stack a `--stacks` entry names: `none` (the method alone) or items joined by `+`: `cache=SPEC` (SPEC as
    `--cache` takes it), `fp8`, `compile=regional|full`; checked by `check_stack`. A bad entry is a ValueError
    naming it and what is allowed."""
    if not isinstance(text, str):
        raise ValueError(f"a stack spec must be a string ({STACK_SPEC_HELP}), got {text!r}")
    if text.strip() == "none":
        return {}
    stack = {}
    for item in (part.strip() for part in text.split("+")):
        name, sep, value = item.partition("=")
        if (name, bool(sep)) not in (("cache", True), ("compile", True), ("fp8", False)) or (sep and not value):
            raise ValueError(f"--stacks entry {text!r}: {item!r} is not a stack item; allowed: {STACK_SPEC_HELP}")
        if name in stack:
            raise ValueError(f"--stacks entry {text!r} names {name} twice; allowed: {STACK_SPEC_HELP}, each once")
        stack[name] = True if name == "fp8" else value
    try:
        return check_stack(stack)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--stacks entry {text!r}: {exc}") from exc


def _stack_parts(stack: dict, cache_prefix: str) -> list[str]:
    """A checked stack's parts in one order: its cache spec (after `cache_prefix`), `fp8`, `compile=MODE`."""
    parts = [f"{cache_prefix}{stack['cache']}"] if stack.get("cache") else []
    parts += ["fp8"] if stack.get("fp8") else []
    parts += [f"compile={stack['compile']}"] if stack.get("compile") else []
    return parts


def stack_spec(stack: dict) -> str:
    """The `--stacks` entry of a checked stack (`parse_stack_spec`'s inverse): "none" for the empty stack."""
    return "+".join(_stack_parts(stack, "cache=")) or "none"


def stack_label(method: str, stack: dict) -> str:
    """A report row's name: the method, then each part of its stack after " + " (`radial + first_block:threshold=0.1
    + fp8`); the method alone keeps its plain name."""
    return " + ".join([method, *_stack_parts(stack, "")])


# ---- prompts -----------------------------------------------------------------------------------------------------
def read_prompts_file(path: str) -> list[tuple[str, dict, str | None]]:
    """(prompt, overrides, "file:line") per entry of a .txt (a prompt a line) or .jsonl prompts file.

    Blank lines and, in .txt, lines starting with `#` are skipped. A .jsonl line is an object with
    "prompt" and optionally any of `OVERRIDE_FIELDS`.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".txt", ".jsonl"):
        raise ValueError(f"prompts file {path!r} must end in .txt or .jsonl")
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read prompts file {path!r}: {exc}") from exc
    entries = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or (extension == ".txt" and text.startswith("#")):
            continue
        where = f"{path}:{number}"
        entries.append(_parse_jsonl_line(text, where) if extension == ".jsonl" else (text, {}, where))
    if not entries:
        raise ValueError(f"prompts file {path!r} has no prompts")
    return entries


def _parse_jsonl_line(text: str, where: str) -> tuple[str, dict, str]:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON: {exc.msg}") from exc
    if not isinstance(entry, dict) or "prompt" not in entry:
        raise ValueError(f'{where}: each line must be a JSON object with a "prompt"')
    unknown = sorted(set(entry) - {"prompt", *OVERRIDE_FIELDS})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {['prompt', *OVERRIDE_FIELDS]}")
    overrides = {name: value for name, value in entry.items() if name != "prompt"}
    return entry["prompt"], overrides, where


def command_line_options(args: argparse.Namespace) -> dict:
    """Method options from `--option KEY=VALUE` and the convenience flags; a key given twice is an error."""
    pairs = []
    for text in args.option:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--option must be KEY=VALUE, got {text!r}")
        pairs.append((name.strip(), parse_option_value(value)))
    for name in ("dense_steps", "dense_layers", "backend", "block_size", "precision"):
        if getattr(args, name, None) is not None:
            pairs.append((name, getattr(args, name)))
    options = {}
    for name, value in pairs:
        if name in options:
            raise ValueError(f"option {name!r} given twice ({options[name]!r} and {value!r})")
        options[name] = value
    return options


def jobs_from_args(args: argparse.Namespace) -> list[RenderJob]:
    """Every job of a `render` call, all validated; the prompts file's overrides apply per line."""
    defaults = {
        "seed": args.seed,
        "method": args.method,
        "options": command_line_options(args),
        "frames": args.frames,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "guidance": args.guidance,
        "stack": stack_from_args(args),
    }
    entries = [(prompt, {}, None) for prompt in args.prompt]
    if args.prompts is not None:
        entries += read_prompts_file(args.prompts)
    if not entries:
        raise ValueError("no prompt given: pass --prompt TEXT (repeatable) or --prompts FILE (.txt or .jsonl)")
    label, _ = models.resolve_model_label(models.check_model(args.model))
    jobs = []
    for prompt, overrides, where in entries:
        settings = {**defaults, **overrides}
        if isinstance(overrides.get("options"), dict):
            settings["options"] = {**defaults["options"], **overrides["options"]}
        try:
            jobs.append(make_job(prompt, settings, label))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}" if where else str(exc)) from exc
    return jobs


# ---- the manifest ------------------------------------------------------------------------------------------------
def read_manifest(path: str) -> list[dict]:
    """The manifest's rows; a line that is not a JSON object (a write cut short) is skipped with a warning."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                warning = f"dit-sparse: warning: {path}:{number}: skipping a line that is not a JSON object"
                print(warning, file=sys.stderr)
    return rows


def finished_videos(output_dir: str) -> dict[str, dict]:
    """Key hash -> manifest row, for the rows whose mp4 is on disk."""
    finished = {}
    for row in read_manifest(os.path.join(output_dir, MANIFEST_NAME)):
        if row_key(row) is not None and _has_file(output_dir, row):
            finished[row_key(row)] = row
    return finished


def append_row(path: str, row: dict) -> None:
    """Append one JSON line and fsync it; a torn last line from an earlier crash is closed off first."""
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with open(path, "a+b") as file:  # reads seek anywhere, writes always append
        file.seek(0, os.SEEK_END)
        if file.tell() > 0:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                line = "\n" + line
        file.write(line.encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())


def shard_name(rank: int) -> str:
    """The manifest file process `rank` appends to while several processes render into one folder."""
    return f"manifest.rank{rank}.jsonl"


def merge_manifest_shards(output_dir: str) -> int:
    """Fold every `manifest.rank<r>.jsonl` into `manifest.jsonl` (rank order, rows already there skipped), then
    delete the shards; returns the number of rows added. Atomic: the merged manifest is written to a temporary file
    and renamed over the old one, so a crash leaves either the old manifest and the shards or the merged one (and
    maybe stale shards, whose rows a later merge skips). Only one process may call it at a time."""
    if not os.path.isdir(output_dir):
        return 0
    shards = sorted(
        (int(match.group(1)), name) for name in os.listdir(output_dir) if (match := SHARD_PATTERN.fullmatch(name))
    )
    if not shards:
        return 0
    manifest = os.path.join(output_dir, MANIFEST_NAME)
    rows = read_manifest(manifest)
    seen = {json.dumps(row, sort_keys=True) for row in rows}
    added = 0
    for _, name in shards:
        for row in read_manifest(os.path.join(output_dir, name)):
            text = json.dumps(row, sort_keys=True)
            if text not in seen:
                seen.add(text)
                rows.append(row)
                added += 1
    write_manifest(manifest, rows)
    for _, name in shards:
        os.remove(os.path.join(output_dir, name))
    return added


def write_manifest(path: str, rows: list[dict]) -> None:
    """Replace the manifest at `path` with `rows`, atomically (a temporary file renamed over it)."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def tidy_output_dir(output_dir: str, jobs: list[RenderJob]) -> None:
    """Clear what a killed or edited earlier run left in `output_dir` before this one renders: the hidden partial mp4s
    of this run's videos (`.<file>.*.part.mp4`, left by a kill during the write) are removed, and the manifest keeps
    one row per key, the last, and only while its mp4 is there (a deleted mp4's row goes; its re-render appends a
    new one). Only one process may call it at a time."""
    if not os.path.isdir(output_dir):
        return
    prefixes = tuple(f".{job.file_name()}." for job in jobs)  # atomic_path's temporary names
    for name in os.listdir(output_dir):
        if name.startswith(prefixes) and name.endswith(".part.mp4"):
            os.remove(os.path.join(output_dir, name))
    manifest = os.path.join(output_dir, MANIFEST_NAME)
    rows = read_manifest(manifest)
    last = {row_key(row): index for index, row in enumerate(rows)}
    kept = [
        row for index, row in enumerate(rows)
        if row_key(row) is None or (last[row_key(row)] == index and _has_file(output_dir, row))
    ]  # fmt: skip
    if len(kept) != len(rows):
        write_manifest(manifest, kept)


def row_key(row: dict) -> str | None:
    """The key hash of a manifest row, None for a row that is not a video's (a field missing)."""
    try:
        return key_hash(row)
    except KeyError:
        return None


def _has_file(output_dir: str, row: dict) -> bool:
    return isinstance(row.get("file"), str) and os.path.isfile(os.path.join(output_dir, row["file"]))


def pending_jobs(jobs: list[RenderJob], finished: dict[str, dict]) -> list[RenderJob]:
    """The jobs not finished yet, one per key, in prompt-list order: what a run (or its processes, split in order)
    renders. A pure function of the prompt list and the manifest, so every process computes the same list."""
    return list({job.key_hash(): job for job in jobs if job.key_hash() not in finished}.values())


# ---- rendering ---------------------------------------------------------------------------------------------------
def render_video(pipe, job: RenderJob) -> tuple[np.ndarray, float | None]:
    """One video `(T, H, W, 3)` float in [0, 1] with `job`'s method applied, and the attention density it ran at."""
    import torch

    import dit_sparse

    if job.stack:
        dit_sparse.optimize(pipe, job.method, **job.stack, **job.options)
    else:
        dit_sparse.sparsify(pipe, job.method, **job.options)
    try:
        dit_sparse.sparsity_stats(pipe, reset=True)
        output = pipe(
            prompt=job.prompt,
            num_frames=job.frames,
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            generator=torch.Generator().manual_seed(job.seed),  # CPU generator: the same noise on any device
            output_type="np",
        )
        density = dit_sparse.sparsity_stats(pipe)["density"]
    finally:
        dit_sparse.restore(pipe)  # unsparsify, and whatever the stack added
    return output.frames[0], density


def render_to_file(pipe, job: RenderJob, output_dir: str, fps: float) -> tuple[dict, np.ndarray]:
    """Render `job` and write its mp4 atomically; returns its manifest row (not yet appended) and uint8 frames."""
    start = time.perf_counter()
    frames, density = render_video(pipe, job)
    seconds = time.perf_counter() - start
    frames = to_uint8(frames)
    write_mp4(frames, os.path.join(output_dir, job.file_name()), fps)
    row = {
        **job.key(),
        "density": None if density is None else round(float(density), 6),
        "seconds": round(seconds, 3),
        "fps": fps,
        "file": job.file_name(),
    }
    return row, frames


def render_jobs(
    jobs: list[RenderJob],
    output_dir: str,
    model: str | None,
    device: str,
    dtype: str,
    fps: float,
    rendered: dict[str, np.ndarray] | None = None,
    state=None,
) -> list[dict]:
    """Render the jobs not finished yet into `output_dir`; returns every job's manifest row, in order.

    `rendered`, if given, receives key hash -> uint8 frames of each video rendered by this call (not the skipped).
    `state`: accelerate's `PartialState` when several processes render (each its share of the unfinished jobs, on
    `device`, rows into its own manifest shard, merged by the main process after a barrier); None for one process.
    """
    from tqdm.auto import tqdm

    processes = 1 if state is None else state.num_processes
    rank = 0 if state is None else state.process_index
    os.makedirs(output_dir, exist_ok=True)
    manifest = os.path.join(output_dir, MANIFEST_NAME)
    if rank == 0:
        merge_manifest_shards(output_dir)  # rows a run that died before its merge left behind
        tidy_output_dir(output_dir, jobs)
    if processes > 1:
        state.wait_for_everyone()
    finished = finished_videos(output_dir)
    pending = pending_jobs(jobs, finished)
    skipped = len({job.key_hash() for job in jobs}) - len(pending)
    if skipped and rank == 0:
        print(f"skipping {skipped} video(s) already in {manifest}")
    rows_file = manifest if processes == 1 else os.path.join(output_dir, shard_name(rank))
    mine = pending
    if processes > 1:
        with state.split_between_processes(pending) as share:  # contiguous shares, the same cut on every process
            mine = list(share)
    if mine:
        pipe = models.load_pipeline(model, device, dtype)
        pipe.set_progress_bar_config(desc="denoising", leave=False, disable=rank != 0)
        for job in tqdm(mine, desc="videos" if processes == 1 else f"videos (process {rank})", unit="video"):
            row, frames = render_to_file(pipe, job, output_dir, fps)
            append_row(rows_file, row)
            finished[job.key_hash()] = row
            if rendered is not None:
                rendered[job.key_hash()] = frames
    if processes > 1:
        state.wait_for_everyone()
        if rank == 0:
            merge_manifest_shards(output_dir)
        state.wait_for_everyone()
        finished = finished_videos(output_dir)
    return [finished[job.key_hash()] for job in jobs]


# ---- commands ----------------------------------------------------------------------------------------------------
def print_model_label(model: str | None) -> None:
    """The label `model` renders under and, when the tiny random pipeline stands in for the trained model, the note
    saying so (the one `eval` and the app show)."""
    label, note = models.resolve_model_label(model)
    print(f"model: {label}")
    if note:
        print(note)


def run_render(args: argparse.Namespace) -> int:
    check_fps(args.fps)
    check_int("num_processes", args.num_processes, 1)
    jobs = jobs_from_args(args)
    check_output_dir(args.output_dir)
    if args.num_processes > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--num-processes is for a plain run; under `accelerate launch` or torchrun leave it out")
        return launch_processes(args.num_processes, args.argv)
    state = process_state(args.device)
    device = args.device if state is None or not args.device.startswith("cuda") else str(state.device)
    if state is None or state.is_main_process:
        print_model_label(args.model)
    rows = render_jobs(jobs, args.output_dir, args.model, device, args.dtype, args.fps, state=state)
    if state is None or state.is_main_process:
        manifest = os.path.join(args.output_dir, MANIFEST_NAME)
        print(f"{len(rows)} video(s) in {args.output_dir} (manifest: {manifest})")
    return 0


def process_state(device: str):
    """accelerate's `PartialState` when this process is one of several (`accelerate launch`, torchrun), else None.
    CPU processes talk over gloo; GPU processes each take their own GPU (`state.device`). The collective timeout is
    `PROCESS_WAIT`: a process that finished its share waits at the final barrier for the others' last videos."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not device.startswith("cuda"), timeout=PROCESS_WAIT)


def launch_command(num_processes: int, argv: list[str]) -> list[str]:
    """`accelerate launch` of this `render` call on `num_processes` processes, `--num-processes` left out."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            rest.append(arg)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dit_sparse.cli", *rest]


def launch_processes(num_processes: int, argv: list[str]) -> int:
    """Run this `render` call as `accelerate launch --num_processes N -m dit_sparse.cli render ...`; its status."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("accelerate") is None:
        raise ValueError("--num-processes needs accelerate (pip install accelerate)")
    command = launch_command(num_processes, argv)
    print("launching: " + " ".join(command[2:]), flush=True)
    return subprocess.call(command)


def demo_jobs() -> list[RenderJob]:
    """The demo's two videos: the same prompt and seed, dense then radial, at the default size."""
    settings = {
        "seed": DEFAULT_SEED,
        "options": {"block_size": DEMO_BLOCK_SIZE},
        "frames": DEFAULT_FRAMES,
        "height": DEFAULT_HEIGHT,
        "width": DEFAULT_WIDTH,
        "steps": DEFAULT_STEPS,
        "guidance": DEFAULT_GUIDANCE,
    }
    label, _ = models.resolve_model_label(None)
    return [make_job(DEMO_PROMPT, {**settings, "method": method}, label) for method in ("dense", "radial")]


def run_demo(args: argparse.Namespace) -> int:
    check_fps(args.fps)
    dense, radial = demo_jobs()
    check_output_dir(args.output_dir)
    print_model_label(None)
    tokens = wan_video_tokens(dense.frames, dense.height, dense.width)
    print(
        f"prompt: {dense.prompt!r}; {dense.frames} frames at {dense.width}x{dense.height} px "
        f"({tokens} video tokens), {dense.steps} steps, block size {DEMO_BLOCK_SIZE}, device {args.device}"
    )
    rendered = {}
    rows = render_jobs([dense, radial], args.output_dir, None, args.device, args.dtype, args.fps, rendered)
    print(f"\n{'method':<8} {'seconds':>8} {'density':>8}")
    for job, row in zip((dense, radial), rows):
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        reused = "" if job.key_hash() in rendered else "  (reused: an earlier run's video and seconds)"
        print(f"{row['method']:<8} {row['seconds']:>8.2f} {density:>8}{reused}")
    print(f"PSNR radial vs dense: {demo_psnr(dense, radial, args.output_dir, rendered)}")
    for job, row in zip((dense, radial), rows):
        path = os.path.join(args.output_dir, row["file"])
        print(f"wrote {path}" if job.key_hash() in rendered else f"reused {path} (delete it to render it again)")
    return 0


def demo_psnr(dense: RenderJob, radial: RenderJob, output_dir: str, rendered: dict[str, np.ndarray]) -> str:
    """PSNR of radial against dense, as text: on the rendered frames when both were rendered now, and on the mp4s.

    The mp4s' figure includes H.264's 4:2:0 chroma loss on both, which caps it (near 40 dB on noise-like video).
    """
    on_files = psnr(*(read_video(os.path.join(output_dir, job.file_name())) for job in (dense, radial)))
    text = f"{on_files:.2f} dB between the mp4s (H.264 4:2:0 loss included)"
    if dense.key_hash() in rendered and radial.key_hash() in rendered:
        on_frames = psnr(rendered[dense.key_hash()], rendered[radial.key_hash()])
        text = f"{on_frames:.2f} dB on the rendered frames; {text}"
    return text


def check_fps(fps) -> None:
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
