"""`sparse_attention`: block-sparse attention over video tokens with joint text handled densely."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_sparse import kernels
from dit_sparse.blockmask import BlockMask
from dit_sparse.layout import VideoLayout


def _check_inputs(q, k, v, mask, layout, text_padding_mask, backend, scale) -> float:
    """The call's rules (the kernels' own, `kernels.check_*`, and the layout's), checked before anything runs;
    returns the scale."""
    kernels.check_qkv(q, k, v)
    kernels.check_backend_name(backend)
    batch, seq_len, heads, _ = q.shape
    if layout is not None and layout.seq_len != seq_len:
        raise ValueError(f"layout {layout} covers {layout.seq_len} tokens, but q has S={seq_len}")
    kernels.check_mask(mask, batch, heads, seq_len if layout is None else layout.video_len)
    if text_padding_mask is not None:
        text_len = 0 if layout is None else layout.text_len
        if text_padding_mask.dtype != torch.bool or tuple(text_padding_mask.shape) != (batch, text_len):
            raise ValueError(
                f"text_padding_mask must be bool ({batch}, {text_len}), got {text_padding_mask.dtype} "
                f"{tuple(text_padding_mask.shape)}"
            )
    return kernels.check_scale(scale, q.shape[-1])


def _full_mask_on_cpu(q: torch.Tensor, mask: BlockMask, backend: str) -> bool:
    """Whether this call is dense attention on the CPU's reference path: every block kept, in token order, no
    in-block masking. (Reading the counts is free on a CPU; the device check comes first, so CUDA never syncs.)"""
    return (
        q.device.type == "cpu"
        and mask.permutation is None
        and mask.kv_permutation is None
        and mask.kv_block_partial is None
        and kernels.resolve_backend(backend, q, mask) == "reference"
        and bool((mask.kv_block_counts == mask.n_kv_blocks).all())
    )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    layout: VideoLayout | None = None,
    *,
    text_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    compensate: bool = False,
) -> torch.Tensor:
    """Block-sparse self-attention of a video DiT; q, k, v (B, S, H, D) as diffusers passes them.

    Video queries attend to the key blocks `mask` keeps (over the video tokens) plus every valid joint key; joint
    queries (`layout.text_len` text tokens before or after the video, and `layout.extra_len` tokens off the grid on
    its other side) attend to every valid key. `text_padding_mask` (B, text_len) bool marks real text tokens (True)
    and padding (False, zero weight); extra tokens are never padding. `scale` defaults to 1/sqrt(D). A query block
    with no kept key block and no joint token gets zeros. Output: (B, S, H, D), q's dtype. `compensate=True`: each
    video query block's dropped key blocks still contribute through their pooled keys (SVG-EAR; DraftAttention;
    `kernels.block_sparse_attention` documents the rule); the joint keys and the joint rows are unaffected.
    """
    scale = _check_inputs(q, k, v, mask, layout, text_padding_mask, backend, scale)
    if layout is None or layout.joint_len == 0:
        if _full_mask_on_cpu(q, mask, backend):
            # A full mask is dense attention: torch's fused SDPA computes it 2-3x faster than the reference kernel's
            # block loop (the `dense` method on a CPU, the demo's baseline), equal to fp32 rounding.
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
        return kernels.block_sparse_attention(q, k, v, mask, scale=scale, backend=backend, compensate=compensate)[0]

    # Video rows: kept blocks plus every valid joint key (text, then extra), in one pass (the joint keys continue the
    # kernel's online softmax). Joint rows: dense over every valid key. Each writes its slice of one output; no
    # S x S mask, no (S, T) score tensor, padding exact.
    video = layout.video_slice
    joint = [part for part in (layout.text_slice, layout.extra_slice) if part.stop > part.start]
    joint_valid = text_padding_mask
    if text_padding_mask is not None and layout.extra_len:
        extra_valid = torch.ones(q.shape[0], layout.extra_len, dtype=torch.bool, device=q.device)
        joint_valid = torch.cat([text_padding_mask, extra_valid], dim=1)
    joint_k, joint_v = ((x[:, joint[0]] if len(joint) == 1 else torch.cat([x[:, part] for part in joint], dim=1))
                        for x in (k, v))  # (B, joint_len, H, D): a view, or a copy of the joint tokens only
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    kernels.block_sparse_attention(
        q[:, video], k[:, video], v[:, video], mask, scale=scale, backend=backend,
        extra_k=joint_k, extra_v=joint_v, extra_key_valid=joint_valid, out=out[:, video], compensate=compensate,
    )
    key_valid = None
    if text_padding_mask is not None:
        key_valid = torch.ones(q.shape[0], layout.seq_len, dtype=torch.bool, device=q.device)
        key_valid[:, layout.text_slice] = text_padding_mask
    for part in joint:
        kernels.dense_attention(q[:, part], k, v, key_valid=key_valid, scale=scale, backend=backend, out=out[:, part])
    return out
