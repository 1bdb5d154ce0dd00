"""The package's imports: every module imports first, alone, in a process of its own; the module-level imports form no
circle; and they follow ARCHITECTURE.md's arrows (never kernels -> pipelines or patterns, patterns -> pipelines,
core -> eval or app, adapters -> app).

The graph is read from the source (`ast`): an import counts when it runs at import time (module level, class bodies,
`try` / `if` blocks), not inside a function (lazy) nor under `if TYPE_CHECKING:`. `import a.b` and `from a import b`
point at the module a.b when it is one of ours, else at a (a name `from` a package is that package's `__init__`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

#: the top-level package and the sub-packages pyproject.toml maps from the checkout's folders
PACKAGES = ("dit_sparse", "dit_sparse.patterns", "dit_sparse.kernels", "dit_sparse.pipelines", "dit_sparse.eval",
            "dit_sparse.app")

#: import names of the optional extras (pyproject.toml: app, eval, fa4): a module needing an absent one is skipped
OPTIONAL = {"gradio", "gradio_client", "matplotlib", "skimage", "flash_attn", "cutlass", "websockets"}

#: (from room, to room) pairs ARCHITECTURE.md forbids, directly or through other modules
FORBIDDEN = (("kernels", "pipelines"), ("kernels", "patterns"), ("patterns", "pipelines"), ("core", "eval"),
             ("core", "app"), ("adapters", "app"))


def package_modules() -> dict[str, Path]:
    """Module name -> source file of every module of the installed package (sub-packages' sub-packages included)."""
    modules: dict[str, Path] = {}

    def walk(package: str, folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            if path.suffix == ".py":
                modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
            elif (path / "__init__.py").is_file():
                walk(f"{package}.{path.name}", path)

    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in spec.submodule_search_locations:
            walk(package, Path(folder))
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def eager_imports(tree: ast.Module):
    """The Import / ImportFrom nodes that run when the module is imported (not in functions, not TYPE_CHECKING)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
            for handler in getattr(node, "handlers", ()):  # try: ... except: bodies
                pending.extend(handler.body)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules its eager imports name."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        targets = set()
        for node in eager_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    owned = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules]
                    targets.update(owned[:1])
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    targets.add(f"{base}.{alias.name}")
                elif base in modules:
                    targets.add(base)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module, as [a, b, ..., a] (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path(component[0], {component[0]}, graph, within=set(component)) for component in components]


def _path(start: str, goals: set[str], graph: dict[str, set[str]], within: set[str] | None = None) -> list[str] | None:
    """A shortest path start -> ... -> a goal (at least one edge) over `graph`, or None."""
    previous: dict[str, str] = {}
    frontier = [start]
    seen: set[str] = set()
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if within is not None and target not in within:
                    continue
                if target in goals:
                    path = [target, node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1]
                if target not in seen:
                    seen.add(target)
                    previous[target] = node
                    following.append(target)
        frontier = following
    return None


def rooms(module: str) -> set[str]:
    """ARCHITECTURE.md's rooms a module is in: core, patterns, kernels, pipelines (adapters among them), eval, app."""
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 and parts[1] in ("patterns", "kernels", "pipelines", "eval", "app") else "core"
    return {room, "adapters"} if module == "dit_sparse.pipelines.adapters" else {room}


# ---- the graph helpers, on small made-up packages --------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    modules = {}
    for name, source in files.items():
        parts = name.split(".")
        is_package = any(other.startswith(name + ".") for other in files)
        path = root.joinpath(*parts, "__init__.py") if is_package else root.joinpath(*parts[:-1], parts[-1] + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        modules[name] = path
    return modules


def test_graph_counts_eager_imports_and_resolves_relative_and_from_imports(tmp_path):
    modules = _write(tmp_path, {
        "pkg": "from pkg import a\nfrom .sub import thing\n",
        "pkg.a": "import os\nimport pkg.b as bee\n"
                 "try:\n    from . import c\nexcept ImportError:\n    from pkg import d\n",
        "pkg.b": "def later():\n    from pkg import a\n",
        "pkg.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                 "class C:\n    from pkg.sub import x\n",
        "pkg.d": "",
        "pkg.sub": "from ..d import name\n",
        "pkg.sub.x": "from .. import b\n",
    })
    graph = import_graph(modules)
    assert graph == {
        "pkg": {"pkg.a", "pkg.sub"},
        "pkg.a": {"pkg.b", "pkg.c", "pkg.d"},
        "pkg.b": set(),  # the import in a function is lazy
        "pkg.c": {"pkg.sub.x"},  # TYPE_CHECKING skipped, the class body counts
        "pkg.d": set(),
        "pkg.sub": {"pkg.d"},
        "pkg.sub.x": {"pkg.b"},
    }
    assert cycles(graph) == []


def test_cycles_finds_each_circle_and_names_its_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert _path("a", {"d"}, graph) == ["a", "b", "c", "d"] and _path("d", {"a"}, graph) is None


# ---- the package -----------------------------------------------------------------------------------------------------


def test_the_package_modules_are_found_in_every_mapped_folder():
    modules = package_modules()
    assert {"dit_sparse.config", "dit_sparse.patterns.radial", "dit_sparse.kernels.reference",
            "dit_sparse.pipelines.adapters", "dit_sparse.eval.runner", "dit_sparse.app"} <= set(modules)
    assert set(PACKAGES) <= set(modules)


def test_module_level_imports_form_no_circle():
    found = cycles(import_graph(package_modules()))
    assert not found, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in found)


def test_imports_follow_the_architecture_arrows():
    graph = import_graph(package_modules())
    broken = []
    for source_room, target_room in FORBIDDEN:
        goals = {module for module in graph if target_room in rooms(module)}
        for module in sorted(graph):
            if source_room in rooms(module):
                path = _path(module, goals, graph)
                if path is not None:
                    broken.append(f"{source_room} -> {target_room}: " + " -> ".join(path))
    assert not broken, "imports against ARCHITECTURE.md's arrows:\n" + "\n".join(broken)


# Each module is imported first in a process of its own, forked from a parent that has run the package's third-party
# module-level imports (torch, diffusers, gradio, ...) and no module of the package: as fresh as a new interpreter
# for the package's import order, at a fraction of the cost of starting ~50 interpreters that each load torch.
_IMPORT_EACH_ALONE = r"""
import importlib, json, os, sys, traceback

modules, preload, optional, out = json.loads(sys.argv[1])
for statement in preload:
    try:
        exec(statement, {})
    except Exception:
        pass  # the module that needs it reports the failure itself
assert not [m for m in sys.modules if m == "dit_sparse" or m.startswith("dit_sparse.")], "a dit_sparse module preloaded"

running = set()
for i, module in enumerate(modules):
    if len(running) >= max(2, os.cpu_count() or 1):
        running.discard(os.waitpid(-1, 0)[0])
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
            result = {"status": "ok"}
        except ModuleNotFoundError as error:
            if error.name in optional:  # the extra's package itself is absent (not a part of an installed one)
                result = {"status": "skip", "detail": f"its optional dependency {error.name} is absent"}
            else:
                result = {"status": "fail", "detail": traceback.format_exc()}
        except BaseException:
            result = {"status": "fail", "detail": traceback.format_exc()}
        with open(os.path.join(out, f"{i}.json"), "w") as file:
            json.dump(result, file)
        os._exit(0)
    running.add(pid)
while running:
    running.discard(os.waitpid(-1, 0)[0])
"""

#: what `python -m` runs (the CLI), not a module to import
IMPORTABLE = sorted(name for name in package_modules() if not name.endswith(".__main__"))


def _third_party_imports(modules: dict[str, Path]) -> list[str]:
    """The package's eager import statements that name no module of it (nor the `kernels` its __init__ guards)."""
    statements = set()
    for path in modules.values():
        for node in eager_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            if not any(name.split(".")[0] in ("dit_sparse", "kernels") for name in names):
                statements.add(ast.unparse(node))
    return sorted(statements)


def import_each_alone(modules: list[str], preload: list[str], folder: Path, optional=OPTIONAL) -> dict[str, dict]:
    """Module -> {"status": "ok" | "skip" | "fail", "detail"} of importing it first in its own process, after the
    `preload` statements (`folder`: the working directory, where the results are written); a module is skipped when
    a package of `optional` is absent."""
    arguments = json.dumps([modules, preload, sorted(optional), str(folder)])
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, arguments], cwd=folder, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = {}
    for i, module in enumerate(modules):
        path = folder / f"{i}.json"
        results[module] = json.loads(path.read_text()) if path.is_file() else {
            "status": "fail", "detail": "its process died before reporting"}
    return results


def test_import_each_alone_tells_ok_optional_absent_missing_and_circular(tmp_path):
    _write(tmp_path, {
        "fakepkg": "",
        "fakepkg.good": "import json\n",
        "fakepkg.extra": "import an_absent_extra\n",
        "fakepkg.broken": "import json.an_absent_part\n",
        "fakepkg.first": "from fakepkg.second import B\nA = 1\n",  # fine only when second is imported first
        "fakepkg.second": "from fakepkg.first import A\nB = 2\n",
    })
    modules = ["fakepkg.good", "fakepkg.extra", "fakepkg.broken", "fakepkg.first"]
    results = import_each_alone(modules, ["import json"], tmp_path, optional={"an_absent_extra", "json"})
    assert {module: result["status"] for module, result in results.items()} == {
        "fakepkg.good": "ok", "fakepkg.extra": "skip", "fakepkg.broken": "fail", "fakepkg.first": "fail"}
    assert "an_absent_extra" in results["fakepkg.extra"]["detail"]
    assert "partially initialized module 'fakepkg.first'" in results["fakepkg.first"]["detail"]


@pytest.fixture(scope="module")
def import_results(tmp_path_factory) -> dict[str, dict]:
    """Every package module imported alone, outside the checkout."""
    return import_each_alone(IMPORTABLE, _third_party_imports(package_modules()), tmp_path_factory.mktemp("imports"))


@pytest.mark.parametrize("module", IMPORTABLE)
def test_module_imports_alone_in_a_fresh_process(module, import_results):
    result = import_results[module]
    if result["status"] == "skip":
        pytest.skip(f"{module}: {result['detail']}")
    assert result["status"] == "ok", f"{module} does not import alone:\n{result['detail']}"
