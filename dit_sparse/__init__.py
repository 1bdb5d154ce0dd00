"""dit-sparse: training-free sparse attention for video and image diffusion transformers.

    import dit_sparse
    dit_sparse.sparsify(pipe, "radial")     # wrap the pipeline's self-attention
    video = pipe(prompt).frames[0]
    dit_sparse.unsparsify(pipe)             # restore it exactly
"""

import importlib.util
import os
import sys


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

from dit_sparse.api import sparsify, sparsity_stats, unsparsify
from dit_sparse.attention import sparse_attention
from dit_sparse.blockmask import BlockMask
from dit_sparse.calibrate import calibrate
from dit_sparse.config import MethodConfig
from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import enable_context_parallel
from dit_sparse.patterns import (
    CONFIGS,
    DenseConfig,
    DraftConfig,
    NeighborhoodConfig,
    RadialConfig,
    RandomBlocksConfig,
    ReorderConfig,
    VditConfig,
    make_config,
)
from dit_sparse.plot import plot_mask
from dit_sparse.profile import Profile

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
    "sparse_attention",
    "sparsify",
    "sparsity_stats",
    "unsparsify",
]
