"""Run from the checkout's root (as README's commands are), `kernels/` is importable as a top-level package; importing
dit_sparse must keep it from standing in for Hugging Face's `kernels`, which transformers and diffusers import."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_checkouts_kernels_folder_is_importable_from_the_root_without_the_guard():
    """The hazard is real: without dit_sparse first, `import kernels` from the root is the checkout's folder."""
    done = _run("import kernels, os; print(os.path.abspath(kernels.__file__))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == os.path.join(ROOT, "kernels", "__init__.py")


def test_after_dit_sparse_kernels_is_hugging_faces_or_absent_and_the_wan_pipeline_imports():
    code = (
        "import sys, os, importlib.util, dit_sparse\n"
        "from diffusers import WanPipeline\n"
        "module = sys.modules.get('kernels')\n"
        "print('absent' if module is None else os.path.abspath(module.__file__))\n"
        "print(sys.path[0] == '' or os.path.abspath(sys.path[0]) == os.getcwd())\n"  # the path was restored
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    where, restored = done.stdout.split()
    assert where == "absent" or not where.startswith(os.path.join(ROOT, "kernels")), where
    assert restored == "True"
    assert os.path.isfile(os.path.join(ROOT, "kernels", "__init__.py"))  # dit_sparse.kernels still comes from there
    done = _run("import dit_sparse.kernels, os; print(os.path.abspath(dit_sparse.kernels.__file__))")
    assert done.returncode == 0 and done.stdout.strip() == os.path.join(ROOT, "kernels", "__init__.py"), done.stderr
