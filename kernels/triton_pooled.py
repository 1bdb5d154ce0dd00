"""The pooled pass of compensated block-sparse attention, in Triton: one launch after any backend's main pass.

SVG-EAR (Zhou et al. 2026, arXiv:2603.08982: centroid compensation) and DraftAttention (Shen et al. 2025,
arXiv:2505.14708: the pooled map) let the key blocks a mask drops still contribute:
each through one pooled key (the block's mean key, its score raised by log of its real token count) and the block's
mean value, inside the same softmax as the kept keys. A program owns `BLOCK_M` query rows of one (batch, head), all
in one query block; it runs an online softmax (exp2, fp32 accumulation) over the pooled keys of the blocks that query
block drops (`n_kv` pooled keys, tiles of `BLOCK_N`), then merges the result into the main pass's (out, lse) by
log-sum-exp, in place. A row that drops nothing is not written (its output stays bit-identical). With a token
permutation (`PERMUTED`) row r of the blocked order is read from and written to token perm[r], as the main kernel
does. It reads n_q x n_kv pooled keys per (batch, head): no S x S work, no host sync, no Python loop over blocks.
`reference.compensate_attention` defines the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit_sparse.blockmask import BlockMask

from . import reference
from .triton_block_sparse import LOG2E, _broadcast_strides, _dot_precision, _permutation_int32


@triton.jit
def _pooled_fwd(
    Q, O, LSE, KP, VP, LOG_COUNT, DROPPED, PERM,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_pb, stride_pn, stride_ph, stride_pd,
    stride_db, stride_dh, stride_dq, stride_dn,
    heads, seq_len, n_kv, qk_scale,
    Q_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERMUTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # blocked order; BLOCK_M divides Q_BLOCK
    row_ok = rows < seq_len
    q_block = (pid_m * BLOCK_M) // Q_BLOCK
    if PERMUTED:
        tokens = tl.load(PERM + rows, mask=row_ok, other=0)
    else:
        tokens = rows
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + tokens[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    drop_row = DROPPED + b * stride_db + h * stride_dh + q_block * stride_dq
    pooled = b * stride_pb + h * stride_ph
    for start in range(0, n_kv, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_kv
        dropped = tl.load(drop_row + cols * stride_dn, mask=col_ok, other=0) != 0  # (BLOCK_N,)
        offsets = pooled + cols[:, None] * stride_pn + offs_d[None, :] * stride_pd
        kp = tl.load(KP + offsets, mask=col_ok[:, None], other=0.0)  # (BLOCK_N, D)
        vp = tl.load(VP + offsets, mask=col_ok[:, None], other=0.0)
        log_count = tl.load(LOG_COUNT + cols, mask=col_ok, other=0.0)
        # log2-domain scores of the pooled keys, raised by log(count): the block's summed weight
        qk = tl.dot(q, tl.trans(kp), input_precision=DOT_PRECISION) * qk_scale + log_count[None, :] * 1.4426950408889634
        qk = tl.where(dropped[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that dropped nothing yet: exp2 gives 0
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vp.dtype), vp, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    # Merge into the main pass's (out, lse) by log-sum-exp (natural log), only where a block was dropped.
    has_pooled = l_i > 0.0
    l_safe = tl.where(has_pooled, l_i, 1.0)
    pooled_lse = tl.where(has_pooled, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + tokens * stride_ls
    o_ptrs = O + b * stride_ob + h * stride_oh + tokens[:, None] * stride_os + offs_d[None, :] * stride_od
    write = row_ok & has_pooled
    lse0 = tl.load(lse_ptrs, mask=write, other=float("-inf"))
    o0 = tl.load(o_ptrs, mask=write[:, None], other=0.0).to(tl.float32)
    top = tl.maximum(lse0, pooled_lse)
    top = tl.where(top == float("-inf"), 0.0, top)
    w0 = tl.exp(lse0 - top)
    w1 = tl.exp(pooled_lse - top)
    total = w0 + w1
    total_safe = tl.where(total > 0.0, total, 1.0)
    merged = (o0 * w0[:, None] + (acc / l_safe[:, None]) * w1[:, None]) / total_safe[:, None]
    tl.store(o_ptrs, merged.to(O.dtype.element_ty), mask=write[:, None])
    tl.store(lse_ptrs, top + tl.log(total_safe), mask=write)


#: pooled keys per tile; rows per program (at most the query block).
BLOCK_N = 64
MAX_BLOCK_M = 64


def dropped_blocks_u8(mask: BlockMask) -> torch.Tensor:
    """(Bm, Hm, n_q, n_kv) uint8, 1 where a query block's row drops a key block (kept with the mask, built once)."""
    return mask.cached("dropped_blocks_u8", lambda: reference.dropped_blocks(mask).to(torch.uint8).contiguous())


def compensate_attention(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.compensate_attention` in one Triton launch (plus the block means, a few tensor ops): out
    (B, S, H, D) and lse (B, H, S) fp32 of the main pass, natural order, updated in place; returns (out, lse).
    q, k, v (B, S, H, D) any strides; the mask's permutation, if any, is one shared order."""
    batch, seq_len, heads, head_dim = q.shape
    k_pool, v_pool, log_counts = reference.pooled_keys(k, v, mask)  # (B, n_kv, H, D) fp32
    k_pool, v_pool = (x.to(q.dtype).contiguous() for x in (k_pool, v_pool))
    dropped = dropped_blocks_u8(mask)
    perm = _permutation_int32(mask) if mask.permutation is not None else None
    block_m = min(mask.q_block_size, MAX_BLOCK_M)
    grid = (triton.cdiv(seq_len, block_m), batch * heads)
    _pooled_fwd[grid](
        q, out, lse, k_pool, v_pool, log_counts, dropped, perm if perm is not None else dropped,
        *q.stride(), *out.stride(), *lse.stride(), *k_pool.stride(), *_broadcast_strides(dropped),
        heads, seq_len, k_pool.shape[1], scale * LOG2E,
        Q_BLOCK=mask.q_block_size, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        PERMUTED=perm is not None, DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse
