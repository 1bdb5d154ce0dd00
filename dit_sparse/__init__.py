"""dit-sparse: training-free sparse attention for video and image diffusion transformers.

    import dit_sparse
    dit_sparse.sparsify(pipe, "radial")     # wrap the pipeline's self-attention
    video = pipe(prompt).frames[0]
    dit_sparse.unsparsify(pipe)             # restore it exactly
"""

from dit_sparse.api import sparsify, sparsity_stats, unsparsify
from dit_sparse.attention import sparse_attention
from dit_sparse.blockmask import BlockMask
from dit_sparse.calibrate import calibrate
from dit_sparse.config import (
    CONFIGS,
    DenseConfig,
    DraftConfig,
    MethodConfig,
    RadialConfig,
    RandomBlocksConfig,
    ReorderConfig,
    VditConfig,
    make_config,
)
from dit_sparse.layout import VideoLayout
from dit_sparse.parallel import enable_context_parallel
from dit_sparse.plot import plot_mask
from dit_sparse.profile import Profile

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "CONFIGS",
    "DenseConfig",
    "DraftConfig",
    "MethodConfig",
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
