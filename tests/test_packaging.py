"""What a non-editable install ships, read from pyproject.toml against the checkout's folders: every package folder is
listed (a sub-package left out, such as `dit_sparse.pipelines.tiny`, is missing from the wheel though the editable
install finds it), and the shipped tiny model's files are package data."""

import fnmatch
import os

import pytest

from dit_sparse.pipelines import tiny

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setuptools() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        return tomllib.load(file)["tool"]["setuptools"]


def _files(folder: str) -> list[str]:
    """Every file below `folder`, as a path relative to it with `/`, caches left out."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        relative = os.path.relpath(dirpath, folder)
        paths += [name if relative == "." else f"{relative.replace(os.sep, '/')}/{name}" for name in filenames]
    return paths


def test_every_package_folder_of_the_checkout_is_a_listed_package():
    setuptools = _setuptools()
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for path in _files(os.path.join(ROOT, folder)):
            if path == "__init__.py" or path.endswith("/__init__.py"):
                found.add(".".join([name, *path.split("/")[:-1]]))
    listed = set(setuptools["packages"])
    assert sorted(found - listed) == [], "package folders pyproject.toml does not list"
    assert sorted(listed - found) == [], "listed packages without a folder"


def test_the_shipped_tiny_model_files_are_package_data_of_the_pipelines_package():
    setuptools = _setuptools()
    pipelines = os.path.join(ROOT, setuptools["package-dir"]["dit_sparse.pipelines"])
    assert os.path.samefile(tiny.MODEL_DIR, os.path.join(pipelines, "tiny_model")) and tiny.available()
    model_files = ["tiny_model/" + path for path in _files(tiny.MODEL_DIR)]
    assert "tiny_model/model_index.json" in model_files and "tiny_model/README.md" in model_files
    globs = setuptools["package-data"]["dit_sparse.pipelines"]
    # a setuptools package-data glob's `*` stops at a `/`
    unshipped = [
        path
        for path in model_files
        if not any(fnmatch.fnmatch(path, glob) and path.count("/") == glob.count("/") for glob in globs)
    ]
    assert unshipped == []


def test_the_test_data_is_not_shipped():
    # tests/data (the official radial masks) is for the checkout's tests only: no package folder holds it.
    setuptools = _setuptools()
    tests = os.path.join(ROOT, "tests")
    assert os.path.isdir(os.path.join(tests, "data"))
    for folder in setuptools["package-dir"].values():
        folder = os.path.realpath(os.path.join(ROOT, folder))
        assert os.path.commonpath([folder, os.path.realpath(tests)]) != os.path.realpath(tests)
        assert not os.path.realpath(tests).startswith(folder + os.sep)
