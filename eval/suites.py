"""Prompt suites for `dit-sparse eval`: named built-in lists, VBench's lists when installed, or a user's file.

- `tiny`: 24 captions in the tiny trained model's own vocabulary (`dit_sparse.pipelines.tiny.shapes`): every shape,
  shape colour, direction and background kind, each caption in the dataset's template.
- `standard`: `eval/prompts/standard.json`, our own 60 prompts, 10 for each of VBench's dimension categories
  (subject, multiple objects, motion, camera motion, scene, style).
- `vbench` / `vbench:<dimension>`: VBench's prompt lists (all prompts, or one dimension's), only when the `vbench`
  package is installed (read from its `VBench_full_info.json`).
- a FILE: `.txt` (one prompt a line; blank lines and `#` comments skipped) or `.json` (a list of prompts, or of
  {"prompt", "category"} objects, or an object with such a "prompts" list).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

from dit_sparse.pipelines.tiny.shapes import (
    BACKGROUND_COLOURS,
    BACKGROUNDS,
    DIRECTIONS,
    SHAPE_COLOURS,
    SHAPES,
    ShapeVideo,
)

PROMPTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
BUILT_IN = ("tiny", "standard")
TINY_SUITE_SIZE = 24


@dataclass(frozen=True)
class SuitePrompt:
    prompt: str
    category: str = ""


@dataclass(frozen=True)
class Suite:
    """A named, ordered list of prompts; `source` says where it came from (for the report)."""

    name: str
    prompts: tuple[SuitePrompt, ...]
    source: str

    def __post_init__(self):
        if not self.prompts:
            raise ValueError(f"suite {self.name!r} ({self.source}) has no prompts")

    def categories(self) -> list[str]:
        return list(dict.fromkeys(p.category for p in self.prompts if p.category))


# ---- built-in suites ---------------------------------------------------------------------------------------------
def tiny_suite(size: int = TINY_SUITE_SIZE) -> Suite:
    """`size` captions of the shapes dataset's template, cycling through shapes (3), colours (8), directions (8, in
    steps of 3 so each colour meets several) and background kinds (plain, vertical, horizontal gradient, 8 each)."""
    colours, directions = list(SHAPE_COLOURS), list(DIRECTIONS)
    prompts = []
    for i in range(size):
        colour = colours[i % len(colours)]
        background = BACKGROUNDS[(i // len(colours)) % len(BACKGROUNDS)]
        allowed = [name for name in BACKGROUND_COLOURS if name != colour]
        first = allowed[(5 * i + 1) % len(allowed)]
        second = first if background == "plain" else allowed[(5 * i + 4) % len(allowed)]
        video = ShapeVideo(
            shape=SHAPES[i % len(SHAPES)],
            colour=colour,
            direction=directions[(3 * i) % len(directions)],
            background=background,
            background_colours=(first, second),
            size=0.1,
            start=(0.5, 0.5),
            travel=0.4,
        )  # only the caption is used
        category = "plain background" if background == "plain" else f"{background} gradient"
        prompts.append(SuitePrompt(video.caption, category))
    return Suite("tiny", tuple(prompts), "the tiny model's caption template (dit_sparse.pipelines.tiny.shapes)")


def standard_suite() -> Suite:
    path = os.path.join(PROMPTS_DIR, "standard.json")
    suite = read_suite_file(path)
    return Suite("standard", suite.prompts, "eval/prompts/standard.json (dit-sparse's own prompts)")


# ---- VBench ------------------------------------------------------------------------------------------------------
def vbench_info_path() -> str | None:
    """VBench's `VBench_full_info.json` inside the installed `vbench` package, or None."""
    spec = importlib.util.find_spec("vbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "VBench_full_info.json")
        if os.path.isfile(path):
            return path
    return None


def vbench_suite(name: str) -> Suite:
    """`vbench` (every prompt of VBench's full info) or `vbench:<dimension>` (the prompts of one dimension)."""
    path = vbench_info_path()
    if path is None:
        raise ValueError(f"suite {name!r} needs the `vbench` package (pip install vbench); it is not installed")
    with open(path, encoding="utf-8") as file:
        entries = json.load(file)
    dimension = name.partition(":")[2]
    dimensions = sorted({d for entry in entries for d in entry.get("dimension", [])})
    if dimension and dimension not in dimensions:
        raise ValueError(f"unknown VBench dimension {dimension!r}; allowed: {dimensions}")
    prompts = [
        SuitePrompt(entry["prompt_en"], ",".join(entry.get("dimension", [])))
        for entry in entries
        if not dimension or dimension in entry.get("dimension", [])
    ]
    return Suite(name, tuple(prompts), f"VBench prompts ({path})")


# ---- files -------------------------------------------------------------------------------------------------------
def read_suite_file(path: str) -> Suite:
    """A suite from a .txt (a prompt a line) or .json file; raises ValueError naming the file and what is wrong."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".txt", ".json"):
        raise ValueError(f"suite file {path!r} must end in .txt or .json")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read suite file {path!r}: {exc}") from exc
    name = os.path.splitext(os.path.basename(path))[0]
    if extension == ".txt":
        lines = [line.strip() for line in text.splitlines()]
        prompts = [SuitePrompt(line) for line in lines if line and not line.startswith("#")]
    else:
        prompts = _json_prompts(text, path)
    if not prompts:
        raise ValueError(f"suite file {path!r} has no prompts")
    return Suite(name, tuple(prompts), os.path.abspath(path))


def _json_prompts(text: str, path: str) -> list[SuitePrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"suite file {path!r} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    entries = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f'suite file {path!r} must hold a list of prompts or an object with a "prompts" list')
    prompts = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict):
            prompt, category = entry.get("prompt"), entry.get("category", "")
        else:
            prompt, category = entry, ""
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(category, str):
            raise ValueError(
                f'suite file {path!r}: entry {index} must be a non-empty string or {{"prompt": str, "category": str}}, '
                f"got {entry!r}"
            )
        prompts.append(SuitePrompt(" ".join(prompt.split()), category))
    return prompts


# ---- the one entry -----------------------------------------------------------------------------------------------
def available_suites() -> list[str]:
    """The suite names `load_suite` takes (besides a file path)."""
    return [*BUILT_IN, *(("vbench", "vbench:<dimension>") if vbench_info_path() else ())]


def load_suite(name_or_file: str) -> Suite:
    """A suite by name (`available_suites()`) or from a .txt/.json file; ValueError naming the bad value otherwise."""
    if not isinstance(name_or_file, str) or not name_or_file.strip():
        raise ValueError(f"suite must be a name {available_suites()} or a .txt/.json file, got {name_or_file!r}")
    if name_or_file == "tiny":
        return tiny_suite()
    if name_or_file == "standard":
        return standard_suite()
    if name_or_file == "vbench" or name_or_file.startswith("vbench:"):
        return vbench_suite(name_or_file)
    if os.path.splitext(name_or_file)[1].lower() in (".txt", ".json") or os.path.exists(name_or_file):
        return read_suite_file(name_or_file)
    raise ValueError(f"unknown suite {name_or_file!r}; allowed: {available_suites()} or a .txt/.json file")
