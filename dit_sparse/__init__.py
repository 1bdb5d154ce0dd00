"""dit-sparse: training-free sparse attention for video and image diffusion transformers.

    import dit_sparse
    dit_sparse.sparsify(pipe, "radial")     # wrap the pipeline's self-attention
    video = pipe(prompt).frames[0]
    dit_sparse.unsparsify(pipe)             # restore it exactly
"""

import importlib
import importlib.util
import os
import sys
import types


def _unshadow_hugging_face_kernels() -> None:
    """Keep a source checkout's `kernels/` folder (the `dit_sparse.kernels` sub-package, mapped in pyproject.toml)
    from being taken for the Hugging Face `kernels` package that transformers and diffusers import.

    `python -m ...` run in the checkout puts its root first on `sys.path`, where `kernels/` is an importable top-level
    package; `from kernels import CUDAProperties` (transformers' hub kernels, imported by diffusers' Wan pipeline)
    then fails. So, once, with every checkout root taken off the path: import the installed `kernels` if there is
    one, or mark it absent (as if it were not installed: `find_spec` then says None). The path is restored."""
    if "kernels" in sys.modules:
        return

    def is_checkout(entry: str) -> bool:
        root = os.path.abspath(entry or os.curdir)
        return os.path.isfile(os.path.join(root, "kernels", "__init__.py")) and os.path.isdir(
            os.path.join(root, "dit_sparse")
        )

    if not any(is_checkout(entry) for entry in sys.path):
        return
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if not is_checkout(entry)]
    try:
        if importlib.util.find_spec("kernels") is None:
            sys.modules["kernels"] = None  # absent: `import kernels` raises ImportError, find_spec returns None
        else:
            importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


_unshadow_hugging_face_kernels()

#: The public names and the module each comes from. They are imported on first use (PEP 562), so that importing a
#: sub-module (`dit_sparse.cli`: `dit-sparse --help`) does not import torch and the model code.
_PUBLIC = {
    "optimize": "dit_sparse.api",
    "restore": "dit_sparse.api",
    "sparsify": "dit_sparse.api",
    "sparsity_stats": "dit_sparse.api",
    "unsparsify": "dit_sparse.api",
    "sparse_attention": "dit_sparse.attention",
    "BlockMask": "dit_sparse.blockmask",
    "calibrate": "dit_sparse.calibrate",
    "CONFIGS": "dit_sparse.patterns",
    "DenseConfig": "dit_sparse.patterns",
    "DraftConfig": "dit_sparse.patterns",
    "MethodConfig": "dit_sparse.config",
    "RadialConfig": "dit_sparse.patterns",
    "RandomBlocksConfig": "dit_sparse.patterns",
    "ReorderConfig": "dit_sparse.patterns",
    "VditConfig": "dit_sparse.patterns",
    "make_config": "dit_sparse.patterns",
    "NeighborhoodConfig": "dit_sparse.patterns",
    "VideoLayout": "dit_sparse.layout",
    "enable_context_parallel": "dit_sparse.parallel",
    "plot_mask": "dit_sparse.plot",
    "Profile": "dit_sparse.profile",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dit_sparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _Package(types.ModuleType):
    """`dit_sparse` itself: a sub-module named like the public function it holds (`dit_sparse.calibrate`) does not
    take the function's place when it is imported (as it did not when the names were imported eagerly)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "CONFIGS",
    "DenseConfig",
    "DraftConfig",
    "MethodConfig",
    "NeighborhoodConfig",
    "Profile",
    "RadialConfig",
    "RandomBlocksConfig",
    "ReorderConfig",
    "VditConfig",
    "VideoLayout",
    "calibrate",
    "enable_context_parallel",
    "make_config",
    "optimize",
    "restore",
    "sparse_attention",
    "sparsify",
    "sparsity_stats",
    "unsparsify",
]
