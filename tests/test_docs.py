"""README.md and docs/*.md name only what a clone has: every local link (and its #anchor) resolves, every repo path
in backticks or in a shell block exists, every `python -m MODULE` is a module, every `dit_sparse` command line parses,
and README's Python quickstart on the shipped tiny model runs.

What counts as a repo path (a rule a reader can check): a token with a '/' made of path characters only (letters,
digits, `_ . - / *`), not a URL, whose first segment is `.`, `..` or an entry of the repo's root, or whose name ends
in one of `EXTENSIONS`. Hub ids (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) and folders a command creates (`renders/`) are
neither. `*` is a glob that must match at least one file. Paths are relative to the repo root; links to the file.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXTENSIONS = {
    ".py", ".md", ".sh", ".json", ".jsonl", ".toml", ".txt", ".png", ".jpg", ".mp4", ".html", ".csv", ".log", ".pt",
    ".safetensors",
}
#: Folders the documented commands create (outputs), never in a clone.
GENERATED = ("demo-out/", "renders/", "eval-out/", "eval-wan/", "eval-wan13-random/", "wan13-random/", "runs/",
             "test-artifacts/", "OUTPUT/", "/tmp/")
PATH_TOKEN = re.compile(r"^[\w.\-/*]+$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`]+)`")  # a code span may wrap a line


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", text)


def _shell_blocks(text: str) -> list[str]:
    """The bodies of the page's ```bash blocks, backslash continuations joined."""
    return [body.replace("\\\n", " ") for lang, body in FENCE.findall(text) if lang in ("bash", "sh", "shell")]


def _python_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == "python"]


def is_repo_path(token: str, top_level: set[str]) -> bool:
    """Whether `token` names a path of the repo (see the module docstring for the rule)."""
    token = token.strip("'\"")
    if "/" not in token or "://" in token or not PATH_TOKEN.match(token) or token.startswith(GENERATED):
        return False
    first = token.split("/")[0]
    if first in (".", "..") or first in top_level:
        return True
    return Path(token.rstrip("/")).suffix in EXTENSIONS


def repo_path_exists(token: str) -> bool:
    token = token.strip("'\"")
    if "*" in token:
        return bool(glob.glob(str(ROOT / token)))
    return (ROOT / token).exists()


def _top_level() -> set[str]:
    return {entry.name for entry in ROOT.iterdir()}


def named_paths(page: Path) -> list[str]:
    """The repo paths a page names: in `inline code` of its prose and as words of its shell blocks."""
    text = _text(page)
    tokens = []
    for code in INLINE_CODE.findall(_prose(text)):
        tokens += code.split()
    for block in _shell_blocks(text):
        tokens += block.split()
    top = _top_level()
    return [token for token in tokens if is_repo_path(token, top)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*]{1,2}", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in _prose(_text(page)).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def local_links(page: Path) -> list[str]:
    links = []
    for match in LINK.finditer(_prose(_text(page))):
        target = match.group(1) or match.group(2)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not local
            links.append(target)
    return links


def test_path_rule_tells_repo_paths_from_hub_ids_and_outputs():
    top = {"dit_sparse", "pipelines", "docs", "README.md"}
    assert is_repo_path("dit_sparse/pipelines/tiny_model/", top)
    assert is_repo_path("../shared/ARCHITECTURE.md", top)
    assert is_repo_path("somewhere/notes.md", top)
    assert is_repo_path("docs/sample-report/masks/*.png", top)
    assert not is_repo_path("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", top)
    assert not is_repo_path("renders/", top)
    assert not is_repo_path("http://127.0.0.1:7860/", top)
    assert not is_repo_path("README.md", top)  # no '/': a file name, not a path
    assert not is_repo_path("(B, 1, 1, S)", top)


def test_slug_follows_github_anchor_rule():
    assert slug("Kernel backends") == "kernel-backends"
    assert slug("Dynamic methods, step caching and calibration profiles") == (
        "dynamic-methods-step-caching-and-calibration-profiles"
    )
    assert slug("`torch.compile`") == "torchcompile"
    assert slug("A new model family (an adapter)") == "a-new-model-family-an-adapter"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_local_links_resolve(page):
    broken = []
    for target in local_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_repo_paths_exist(page):
    missing = sorted({token for token in named_paths(page) if not repo_path_exists(token)})
    assert not missing, f"{page.name} names paths a clone does not have: {missing}"


def _commands(prefix_words: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(page, argv after the prefix) for each line of every shell block that runs `python[3] -m <prefix>`."""
    found = []
    for page in PAGES:
        for block in _shell_blocks(_text(page)):
            for line in block.splitlines():
                words = shlex.split(line.split(" #")[0])
                for i in range(len(words) - 1):
                    if re.fullmatch(r"python3?", words[i]) and words[i + 1] == "-m" and i + 2 < len(words):
                        found.append((page.name, words[i + 2:]))
                        break
                    if words[i] == "-m" and words[i + 1] == "dit_sparse.cli":  # accelerate launch -m dit_sparse.cli
                        found.append((page.name, ["dit_sparse", *words[i + 2:]]))
                        break
                else:
                    if words and words[0] == "dit-sparse":
                        found.append((page.name, ["dit_sparse", *words[1:]]))
    return [(name, argv) for name, argv in found if argv[0].startswith(prefix_words)]


def test_documented_modules_exist():
    import importlib.util

    missing = []
    for name, argv in _commands(("",)):
        module = argv[0]
        try:
            spec = importlib.util.find_spec(module) if not module.startswith("benchmarks.") else None
        except ModuleNotFoundError:
            spec = None
        if module.startswith("benchmarks."):
            exists = (ROOT / (module.replace(".", "/") + ".py")).exists()
        else:
            exists = spec is not None
        if not exists:
            missing.append(f"{name}: python -m {module}")
    assert not missing, f"documented modules that do not exist: {missing}"


def test_documented_command_lines_parse():
    """Every `python3 -m dit_sparse ...` / `dit-sparse ...` line in the docs is accepted by the command's parser
    (its options exist and take the values shown); nothing runs."""
    import inspect

    from dit_sparse import cli

    def parser_for(command: str):
        # the split cli (the render engine in eval/render.py) builds only the named command's arguments
        if "command" in inspect.signature(cli.build_parser).parameters:
            return cli.build_parser(command)
        return cli.build_parser()

    refused = []
    for name, argv in _commands(("dit_sparse",)):
        if argv[0] not in ("dit_sparse", "dit_sparse.cli"):
            continue
        args = [word for word in argv[1:] if word != "--help"]
        try:
            parser_for(args[0] if args else None).parse_args(args)
        except (ValueError, SystemExit) as exc:
            refused.append(f"{name}: {' '.join(args)}: {exc}")
    assert not refused, f"documented command lines the parser refuses: {refused}"


def test_readme_says_what_the_suite_and_demo_take():
    """A newcomer learns the cost before running: the test suite's time with its slow test, the quick run, the demo's
    seconds and the thread option."""
    readme = _text(ROOT / "README.md")
    assert readme.startswith(
        "# dit-sparse\n\n```bash\nbash scripts/setup.sh && python3 -m dit_sparse demo\n"
        "bash scripts/setup.sh test && python3 -m pytest -q\n```"
    ), "README must open with the two commands, unchanged"
    assert 'python3 -m pytest -q -m "not slow"' in readme
    assert "--threads" in readme
    words = " ".join(readme.split())
    assert re.search(r"\d+ passed and \d+ skipped in \d+ s", words), "README must give the suite's last measured time"
    assert re.search(r"dense \d+(\.\d+)? s, radial \d+(\.\d+)? s", words), "README must give the demo's seconds"
    assert len(readme.splitlines()) <= 150


@pytest.mark.slow
def test_readme_tiny_quickstart_runs(tmp_path):
    """README's Python block on the shipped tiny model runs on a CPU (one fresh interpreter), in 2 steps."""
    blocks = [block for block in _python_blocks(_text(ROOT / "README.md")) if "tiny.load(" in block]
    assert len(blocks) == 1, "README shows one Python quickstart on the tiny model"
    # As written but for the step count (25 -> 2: the same code path, a tenth of the suite's time for it).
    assert blocks[0].count("num_inference_steps=25") == 1, "the quickstart's step count moved: update this test"
    code = blocks[0].replace("num_inference_steps=25", "num_inference_steps=2")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'method': 'radial'" in result.stdout, result.stdout[-2000:]
    assert list(tmp_path.glob("*.mp4")), "the quickstart writes its video"
