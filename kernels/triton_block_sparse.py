"""Our Triton block-sparse flash-attention forward: the portable GPU backend (and the CPU one under TRITON_INTERPRET=1).

One kernel, read top to bottom as the algorithm. A program owns `BLOCK_M` query rows of one (batch, head) and runs an
online softmax (exp2, scale folded in, fp32 accumulation) over, in order:

1. an optional starting state `(O0, LSE0)`: the output and log-sum-exp of an earlier pass over other keys (FA4's
   block-sparse output), so that a second pass continues it exactly instead of being merged afterwards;
2. the kept key blocks of a `BlockMask` (`HAS_SPARSE`): only the blocks in `kv_block_indices[.., :count]`, the short
   tail block (S not a multiple of the block) masked by position, everything else unmasked. With in-block masking
   (`HAS_BOXES`: the mask's `kv_block_partial` and `token_boxes`) each row's kept blocks come in two runs, prepared
   once per mask on the host: the whole blocks first, unmasked exactly as above, then the partial ones (and the tail
   block), masked per (query, key) pair by the query's box and the key's coordinates;
3. an optional dense run of extra keys `KX, VX` (`HAS_EXTRA`) with an optional per-batch validity mask: the joint text
   keys with their padding, or, with no sparse part, every key of the sequence (text queries). The extra keys can be
   split over a third grid axis (split-K) when there are few query rows, merged afterwards by log-sum-exp.

q/k/v are (B, S, H, D) with any strides; the output is written in the same (B, S, H, D) layout and the log-sum-exp
(B, H, S) in fp32. With a token permutation (`PERMUTED`), query row r and key j of the blocked order are read from
original positions perm[r] and perm[j] and the output row is written back to perm[r]: the permutation costs no
extra pass. Rows with no kept block and no valid extra key get a zero output and lse = -inf.

Low precision (`QUANT`, a compile-time switch: the bf16 path's code is unchanged): q, k, v and the extra keys come
quantized from one pre-pass (`triton_quantize.py`, SageAttention's schemes) in the blocked order, so the key loads
skip the permutation; each tile's scores are dequantized by one scalar (softmax scale x q block scale x k block
scale), P goes to e4m3 (FP8 PV) or to V's dtype, and with FP8 PV the epilogue applies V's channel scales and adds back
its channel means. The lse adds back q . mean(K) (from the pre-pass), so it is the unsmoothed scores' log-sum-exp.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from dit_sparse.blockmask import BlockMask

from . import triton_quantize
from .triton_quantize import round_to_bits
from .backend import fp8_pv, interpreting, qk_format

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, pair_ok, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax: m, l and acc updated in the log2 domain. `pair_ok` (1 or BLOCK_M, BLOCK_N)
    bool: the pairs kept when MASKED."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
    if MASKED:
        qk = tl.where(pair_ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED:
        # A row that has seen only masked keys keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _softmax_step_lowbit(acc, l_i, m_i, q, k, v, tile_scale, pair_ok, MASKED: tl.constexpr, QK_INT8: tl.constexpr,
                         PV_FP8: tl.constexpr, INTERPRETED: tl.constexpr):
    """`_softmax_step` on quantized tiles (`triton_quantize.py`): q, k int8 or e4m3 with the tile's dequantization
    folded into `tile_scale` (softmax scale x log2(e) x q block scale x k block scale); v e4m3 (P scaled by 256
    and rounded to e4m3, the accumulator in units of v's channel scales / 256) or bf16/fp16 (P in v's dtype).
    INTERPRETED (TRITON_INTERPRET=1): P rounded by `round_to_bits` first, and a bf16 PV product in fp32 of the
    bf16-rounded values (the interpreter's bf16 dot is broken)."""
    if QK_INT8:
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)  # (BLOCK_M, BLOCK_N)
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(pair_ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * tile_scale)
    if MASKED:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk * tile_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        p = p * 256.0
        if INTERPRETED:
            p = round_to_bits(p, 3)
        acc = tl.dot(p.to(v.dtype), v, acc)
    elif INTERPRETED:
        if v.dtype == tl.bfloat16:
            acc = tl.dot(round_to_bits(p, 7), v.to(tl.float32), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _axis_ok(lo, hi, coord, step, HAS_STEP: tl.constexpr):
    """(BLOCK_M, BLOCK_N): key coordinate in each query's [lo, hi) on the step lattice from lo, on one axis."""
    ok = (coord[None, :] >= lo[:, None]) & (coord[None, :] < hi[:, None])
    if HAS_STEP:
        ok = ok & ((coord[None, :] - lo[:, None]) % step == 0)
    return ok


@triton.jit
def _in_boxes(K_COORD, cols, col_ok, lo_0, hi_0, lo_1, hi_1, lo_2, hi_2, step_0, step_1, step_2,
              AXES: tl.constexpr, HAS_STEP: tl.constexpr):
    """(BLOCK_M, BLOCK_N): the pairs the query boxes allow; `cols` are key positions in the blocked order."""
    ok = _axis_ok(lo_0, hi_0, tl.load(K_COORD + cols * AXES, mask=col_ok, other=0), step_0, HAS_STEP)
    if AXES > 1:
        ok = ok & _axis_ok(lo_1, hi_1, tl.load(K_COORD + cols * AXES + 1, mask=col_ok, other=0), step_1, HAS_STEP)
    if AXES > 2:
        ok = ok & _axis_ok(lo_2, hi_2, tl.load(K_COORD + cols * AXES + 2, mask=col_ok, other=0), step_2, HAS_STEP)
    return ok


@triton.jit
def _load_rows(base, rows, row_ok, stride_s, stride_d, offs_d, MASKED: tl.constexpr):
    ptrs = base + rows[:, None] * stride_s + offs_d[None, :] * stride_d
    if MASKED:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit(do_not_specialize=["seq_q", "seq_x", "split_len"])
def _block_sparse_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_osplit, stride_ob, stride_os, stride_oh, stride_od,
    stride_lsplit, stride_lb, stride_lh, stride_ls,
    KV_IDX, KV_CNT,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    FULL_CNT, PARTIAL, Q_LO, Q_HI, K_COORD,
    stride_pb, stride_ph, stride_pq, stride_pk,
    step_0, step_1, step_2,
    PERM,
    O0, LSE0,
    stride_0b, stride_0s, stride_0h, stride_0d,
    stride_l0b, stride_l0h, stride_l0s,
    KX, VX, X_VALID,
    stride_kxb, stride_kxs, stride_kxh, stride_kxd,
    stride_vxb, stride_vxs, stride_vxh, stride_vxd,
    stride_mb, stride_ms,
    seq_q, seq_x, split_len, heads, qk_scale,
    Q_SCALE, K_SCALE, KX_SCALE, V_SCALE, Q_DOT_MEAN, n_q_scales, n_kv_scales, n_x_scales,
    HEAD_DIM: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SPARSE: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BOXES: tl.constexpr,
    AXES: tl.constexpr,
    HAS_STEP: tl.constexpr,
    PERMUTED: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    HAS_X_VALID: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr = 0,
    PV_FP8: tl.constexpr = False,
    X_BLOCK: tl.constexpr = 128,
    INTERPRETED: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows in kernel (blocked) order
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    if PERMUTED:
        q_rows = tl.load(PERM + offs_m, mask=row_ok, other=0)  # original positions of these rows
    else:
        q_rows = offs_m

    if QUANT:
        # Quantized inputs (QUANT 1: int8, 2: e4m3) come in the blocked order: row r at r; scales per block.
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, row_ok, stride_qs, stride_qd, offs_d, True)
        q_scale = tl.load(Q_SCALE + pid_bh * n_q_scales + (pid_m * BLOCK_M) // Q_BLOCK) * qk_scale
        k_scales = K_SCALE + pid_bh * n_kv_scales
    else:
        q = _load_rows(Q + b * stride_qb + h * stride_qh, q_rows, row_ok, stride_qs, stride_qd, offs_d, True)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of scaled scores, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_INIT:
        # Continue an earlier pass: its normalised output with m = its lse (log2 units) and l = 1.
        lse0 = tl.load(LSE0 + b * stride_l0b + h * stride_l0h + offs_m * stride_l0s, mask=row_ok, other=float("-inf"))
        m_i = lse0 * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        acc = _load_rows(O0 + b * stride_0b + h * stride_0h, offs_m, row_ok, stride_0s, stride_0d, offs_d, True)
        acc = acc.to(tl.float32)

    if HAS_SPARSE:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        q_block = (pid_m * BLOCK_M) // Q_BLOCK
        count = tl.load(KV_CNT + b * stride_cb + h * stride_ch + q_block * stride_cq)
        idx_base = KV_IDX + b * stride_ib + h * stride_ih + q_block * stride_iq
        n_unmasked = count
        if HAS_BOXES:
            # Whole blocks first, then the masked run (partial blocks and the tail block); see `_box_lists`.
            n_unmasked = tl.load(FULL_CNT + b * stride_cb + h * stride_ch + q_block * stride_cq)
        elif not EVEN_K:
            # Indices ascend, so the short tail block, when kept, is the last one.
            last = tl.load(idx_base + tl.maximum(count - 1, 0) * stride_ik)
            tail_kept = (count > 0) & (last == (seq_q - 1) // KV_BLOCK)
            n_unmasked = count - tail_kept.to(tl.int32)
        for i in range(0, n_unmasked):
            kv_block = tl.load(idx_base + i * stride_ik)
            kv_start = kv_block * KV_BLOCK
            for sub in tl.static_range(KV_BLOCK // BLOCK_N):
                cols = kv_start + sub * BLOCK_N + offs_n
                if PERMUTED:
                    if not QUANT:  # quantized keys come in the blocked order
                        cols = tl.load(PERM + cols)
                k = _load_rows(k_base, cols, cols, stride_ks, stride_kd, offs_d, False)
                v = _load_rows(v_base, cols, cols, stride_vs, stride_vd, offs_d, False)
                if QUANT:
                    acc, l_i, m_i = _softmax_step_lowbit(acc, l_i, m_i, q, k, v,
                                                         q_scale * tl.load(k_scales + kv_block), cols, False,
                                                         QUANT == 1, PV_FP8, INTERPRETED)
                else:
                    acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, cols, False, DOT_PRECISION)
        if HAS_BOXES:
            # Each query's box, loaded once: (BLOCK_M,) per axis, unused axes repeat axis 0.
            lo_0 = tl.load(Q_LO + offs_m * AXES, mask=row_ok, other=0)
            hi_0 = tl.load(Q_HI + offs_m * AXES, mask=row_ok, other=0)
            lo_1, hi_1, lo_2, hi_2 = lo_0, hi_0, lo_0, hi_0
            if AXES > 1:
                lo_1 = tl.load(Q_LO + offs_m * AXES + 1, mask=row_ok, other=0)
                hi_1 = tl.load(Q_HI + offs_m * AXES + 1, mask=row_ok, other=0)
            if AXES > 2:
                lo_2 = tl.load(Q_LO + offs_m * AXES + 2, mask=row_ok, other=0)
                hi_2 = tl.load(Q_HI + offs_m * AXES + 2, mask=row_ok, other=0)
            part_base = PARTIAL + b * stride_pb + h * stride_ph + q_block * stride_pq
            for i in range(n_unmasked, count):
                kv_block = tl.load(idx_base + i * stride_ik)
                kv_start = kv_block * KV_BLOCK
                whole = tl.load(part_base + i * stride_pk) == 0  # the tail block, kept whole
                for sub in tl.static_range(KV_BLOCK // BLOCK_N):
                    blocked = kv_start + sub * BLOCK_N + offs_n
                    col_ok = blocked < seq_q
                    cols = blocked
                    if PERMUTED:
                        if not QUANT:  # quantized keys come in the blocked order
                            cols = tl.load(PERM + blocked, mask=col_ok, other=0)
                    k = _load_rows(k_base, cols, col_ok, stride_ks, stride_kd, offs_d, True)
                    v = _load_rows(v_base, cols, col_ok, stride_vs, stride_vd, offs_d, True)
                    in_box = _in_boxes(K_COORD, blocked, col_ok, lo_0, hi_0, lo_1, hi_1, lo_2, hi_2,
                                       step_0, step_1, step_2, AXES, HAS_STEP)
                    pair_ok = col_ok[None, :] & (in_box | whole)
                    if QUANT:
                        acc, l_i, m_i = _softmax_step_lowbit(acc, l_i, m_i, q, k, v,
                                                             q_scale * tl.load(k_scales + kv_block), pair_ok, True,
                                                             QUANT == 1, PV_FP8, INTERPRETED)
                    else:
                        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, pair_ok, True,
                                                      DOT_PRECISION)
        elif not EVEN_K:
            if n_unmasked < count:
                kv_block = tl.load(idx_base + n_unmasked * stride_ik)
                kv_start = kv_block * KV_BLOCK
                for sub in tl.static_range(KV_BLOCK // BLOCK_N):
                    cols = kv_start + sub * BLOCK_N + offs_n
                    col_ok = cols < seq_q
                    if PERMUTED:
                        if not QUANT:  # quantized keys come in the blocked order
                            cols = tl.load(PERM + cols, mask=col_ok, other=0)
                    k = _load_rows(k_base, cols, col_ok, stride_ks, stride_kd, offs_d, True)
                    v = _load_rows(v_base, cols, col_ok, stride_vs, stride_vd, offs_d, True)
                    if QUANT:
                        acc, l_i, m_i = _softmax_step_lowbit(acc, l_i, m_i, q, k, v,
                                                             q_scale * tl.load(k_scales + kv_block),
                                                             col_ok[None, :], True, QUANT == 1, PV_FP8, INTERPRETED)
                    else:
                        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok[None, :], True,
                                                      DOT_PRECISION)

    if HAS_EXTRA:
        kx_base = KX + b * stride_kxb + h * stride_kxh
        vx_base = VX + b * stride_vxb + h * stride_vxh
        x_start = split * split_len
        x_end = tl.minimum(x_start + split_len, seq_x)
        for n0 in range(x_start, x_end, BLOCK_N):
            cols = n0 + offs_n
            col_ok = cols < x_end
            k = _load_rows(kx_base, cols, col_ok, stride_kxs, stride_kxd, offs_d, True)
            v = _load_rows(vx_base, cols, col_ok, stride_vxs, stride_vxd, offs_d, True)
            if HAS_X_VALID:
                valid = tl.load(X_VALID + b * stride_mb + cols * stride_ms, mask=col_ok, other=0)
                col_ok = col_ok & (valid != 0)
            if QUANT:
                x_scale = q_scale * tl.load(KX_SCALE + pid_bh * n_x_scales + n0 // X_BLOCK)
                acc, l_i, m_i = _softmax_step_lowbit(acc, l_i, m_i, q, k, v, x_scale, col_ok[None, :], True,
                                                     QUANT == 1, PV_FP8, INTERPRETED)
            else:
                acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, qk_scale, col_ok[None, :], True,
                                              DOT_PRECISION)

    # Epilogue: rows that saw no key keep l = 0 (or l = 1 with m = -inf after a start state): zeros, lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if PV_FP8:  # the accumulator is in units of V's channel scales / 256 (P was scaled by 256), V less its mean
        v_stats = V_SCALE + pid_bh * 2 * HEAD_DIM  # (2, D): scales, means
        acc = acc * (tl.load(v_stats + offs_d) * (1.0 / 256.0))[None, :]
        out = acc / l_safe[:, None] + tl.where(empty[:, None], 0.0, tl.load(v_stats + HEAD_DIM + offs_d)[None, :])
    else:
        out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    if QUANT:  # the scores were of K less its mean: add back q . mean(K) x scale, the true log-sum-exp
        q_dot_mean = tl.load(Q_DOT_MEAN + pid_bh * seq_q + offs_m, mask=row_ok, other=0.0)
        lse = lse + q_dot_mean * (qk_scale * 0.6931471805599453)
    o_ptrs = (
        O + split * stride_osplit + b * stride_ob + h * stride_oh
        + q_rows[:, None] * stride_os + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + split * stride_lsplit + b * stride_lb + h * stride_lh + q_rows * stride_ls, lse, mask=row_ok)


# ---- launch configuration ----------------------------------------------------------------------------------------

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on a GPU for the block-sparse pass, in order of
#: preference (the first one that fits is used untuned). Two stages of 128x128 K and V tiles at D 128 take 160 KB of
#: shared memory: Hopper has 227 KB, Ampere 163 KB, Ada/consumer cards 99 KB, hence the smaller fallbacks.
GPU_CONFIGS = (
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (64, 128, 4, 3),
    (128, 64, 8, 4),
    (64, 64, 4, 2),
)
#: For the short passes (text keys after FA4, text queries over all keys): smaller tiles, two stages.
GPU_CONFIGS_EXTRA = (
    (128, 64, 4, 2),
    (64, 64, 4, 2),
)

_chosen_configs: dict[tuple, tuple[int, int, int, int]] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("DIT_SPARSE_TRITON_AUTOTUNE", "1") != "0" and not interpreting()


def _candidate_configs(q_block: int | None, kv_block: int | None, head_dim: int, device: torch.device):
    """Configs whose BLOCK_M divides the mask's q block and BLOCK_N its kv block (no mask: the short-pass configs)."""
    if device.type != "cuda":
        # The interpreter: one small tile, any warps.
        bm = min(32, q_block or 32)
        bn = min(32, kv_block or 32)
        return [(bm, bn, 4, 1)]
    configs = []
    for bm, bn, warps, stages in GPU_CONFIGS if q_block else GPU_CONFIGS_EXTRA:
        bm_fit = min(bm, q_block) if q_block else bm
        bn_fit = min(bn, kv_block) if kv_block else bn
        if (q_block and q_block % bm_fit) or (kv_block and kv_block % bn_fit):
            continue
        config = (bm_fit, bn_fit, warps, stages)
        if config not in configs:
            configs.append(config)
    return configs


def chosen_configs() -> dict:
    """The launch configuration the autotuner kept for each kernel variant (for benchmark reports)."""
    return {str(key): value for key, value in _chosen_configs.items()}


def _launch(config, args: dict, grid_rows: int, grid_bh: int, splits: int):
    bm, bn, warps, stages = config
    grid = (triton.cdiv(grid_rows, bm), grid_bh, splits)
    kwargs = dict(BLOCK_M=bm, BLOCK_N=bn)
    if not interpreting():
        kwargs.update(num_warps=warps, num_stages=stages)
    _block_sparse_fwd[grid](**args, **kwargs)


def _run(key: tuple, configs, args: dict, grid_rows: int, grid_bh: int, splits: int, tune: bool):
    """Launch with the cached best config for `key`, timing the candidates the first time when `tune`."""
    config = _chosen_configs.get(key)
    if config is None:
        if tune and len(configs) > 1 and _autotune_enabled():
            timings = {}
            for candidate in configs:
                try:
                    timings[candidate] = triton.testing.do_bench(
                        lambda c=candidate: _launch(c, args, grid_rows, grid_bh, splits),
                        warmup=5, rep=20, return_mode="median",
                    )
                except Exception:  # a config that does not compile or fit (shared memory) is skipped
                    continue
            if not timings:
                raise RuntimeError(f"no Triton config could run for {key}")
            config = min(timings, key=timings.get)
        else:
            for config in configs:  # the first config that fits this GPU's shared memory
                try:
                    _launch(config, args, grid_rows, grid_bh, splits)
                except OutOfResources:
                    continue
                _chosen_configs[key] = config
                return
            raise RuntimeError(f"no Triton config fits this GPU for {key}: tried {configs}")
        _chosen_configs[key] = config
    _launch(config, args, grid_rows, grid_bh, splits)


# ---- the launcher's own limit ----------------------------------------------------------------------------------
# Every other argument rule is checked once at the public edge (`kernels.block_sparse_attention`,
# `sparse_attention`) and by the backend record (`triton_backend.py`); the kernel indexes within a batch entry in int32.


def _check_int32_span(*tensors: torch.Tensor) -> None:
    for name, x in zip(("q", "k", "v"), tensors):
        span = sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:]))
        if span >= 2**31:
            raise ValueError(f"{name} spans {span} elements within one batch entry; the kernel indexes in int32")


# ---- launchers ---------------------------------------------------------------------------------------------------


def _strides(x: torch.Tensor | None, n: int) -> tuple:
    return tuple(x.stride()) if x is not None else (0,) * n


def _broadcast_strides(x: torch.Tensor) -> tuple:
    """Strides with size-1 (broadcast) dims set to 0."""
    return tuple(0 if size == 1 else stride for size, stride in zip(x.shape, x.stride()))


def _output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _permutation_int32(mask: BlockMask) -> torch.Tensor:
    """The mask's permutation as int32 on its device, converted once and kept with the mask."""
    return mask.cached("int32_permutation",
                       lambda: mask.permutation.to(device=mask.device, dtype=torch.int32).contiguous())


def _quant_args(q, quantized: dict | None, precision: str, pv: str, qk: str = "") -> dict:
    """The quantized pass's scales and switches (`triton_quantize.quantize`'s result), or unused ones for bf16."""
    if quantized is None:
        return dict(Q_SCALE=q, K_SCALE=q, KX_SCALE=q, V_SCALE=q, Q_DOT_MEAN=q, n_q_scales=0, n_kv_scales=0,
                    n_x_scales=0)
    extra_scale = quantized["extra_scale"]
    return dict(
        Q_SCALE=quantized["q_scale"], K_SCALE=quantized["k_scale"], V_SCALE=quantized["v_scale"],
        Q_DOT_MEAN=quantized["q_dot_mean"],
        KX_SCALE=extra_scale if extra_scale is not None else quantized["q_scale"],
        n_q_scales=quantized["q_scale"].shape[-1], n_kv_scales=quantized["k_scale"].shape[-1],
        n_x_scales=extra_scale.shape[-1] if extra_scale is not None else 0,
        QUANT=1 if qk == "int8" else 2, PV_FP8=precision == "fp8" and pv == "fp8",
        X_BLOCK=triton_quantize.EXTRA_BLOCK, INTERPRETED=q.device.type == "cpu",
    )


def _base_args(q, k, v, out, lse, scale):
    return dict(
        Q=q, K=k, V=v, O=out, LSE=lse,
        **dict(zip(("stride_qb", "stride_qs", "stride_qh", "stride_qd"), q.stride())),
        **dict(zip(("stride_kb", "stride_ks", "stride_kh", "stride_kd"), k.stride())),
        **dict(zip(("stride_vb", "stride_vs", "stride_vh", "stride_vd"), v.stride())),
        heads=q.shape[2],
        qk_scale=scale * LOG2E,
        HEAD_DIM=q.shape[-1],
        DOT_PRECISION=_dot_precision(q.dtype),
        **_quant_args(q, None, "bf16", "", ""),
    )


def _output_args(out, lse, split_dims: bool) -> dict:
    o_strides = out.stride() if split_dims else (0,) + out.stride()
    l_strides = lse.stride() if split_dims else (0,) + lse.stride()
    return dict(
        **dict(zip(("stride_osplit", "stride_ob", "stride_os", "stride_oh", "stride_od"), o_strides)),
        **dict(zip(("stride_lsplit", "stride_lb", "stride_lh", "stride_ls"), l_strides)),
    )


def _no_box_args(q) -> dict:
    return dict(FULL_CNT=q, PARTIAL=q, Q_LO=q, Q_HI=q, K_COORD=q, stride_pb=0, stride_ph=0, stride_pq=0, stride_pk=0,
                step_0=1, step_1=1, step_2=1, HAS_BOXES=False, AXES=1, HAS_STEP=False)


def _no_sparse_args(q) -> dict:
    return dict(
        KV_IDX=q, KV_CNT=q,
        stride_ib=0, stride_ih=0, stride_iq=0, stride_ik=0, stride_cb=0, stride_ch=0, stride_cq=0,
        Q_BLOCK=128, KV_BLOCK=128, HAS_SPARSE=False, EVEN_K=True, **_no_box_args(q),
    )


def _box_lists(mask: BlockMask) -> tuple:
    """For a mask with in-block masking: each row's kept blocks reordered into whole blocks then masked ones (partial
    blocks and the short tail block), the count of whole ones, the partial flags in the new order (int8), and the
    boxes as contiguous int32. Computed once per mask and kept with it."""
    def build():
        idx, cnt = mask.kv_block_indices, mask.kv_block_counts
        slots = torch.arange(idx.shape[-1], device=idx.device)
        valid = slots < cnt[..., None]
        masked = mask.kv_block_partial.clone()
        if mask.seq_len % mask.kv_block_size:
            masked |= idx == mask.n_kv_blocks - 1
        # A stable sort on (invalid, masked) keeps each run ascending.
        order = torch.sort((~valid).to(torch.int8) * 2 + masked.to(torch.int8), dim=-1, stable=True).indices
        boxes = mask.token_boxes
        return (
            idx.gather(-1, order).contiguous(),
            (valid & ~masked).sum(-1, dtype=torch.int32).contiguous(),
            mask.kv_block_partial.gather(-1, order).to(torch.int8).contiguous(),
            boxes.query_lo.contiguous(), boxes.query_hi.contiguous(), boxes.key_coords.contiguous(),
        )

    return mask.cached("triton_box_lists", build)


def _sparse_args(mask: BlockMask, seq_len: int) -> dict:
    idx, cnt = mask.kv_block_indices, mask.kv_block_counts
    boxes = dict(**_no_box_args(idx))
    if mask.token_boxes is not None:
        idx, full_cnt, partial, lo, hi, coords = _box_lists(mask)
        cnt = cnt.contiguous()  # FULL_CNT is read with the counts' strides
        steps = tuple(mask.token_boxes.step) + (1,) * (3 - mask.token_boxes.axes)
        boxes = dict(
            FULL_CNT=full_cnt, PARTIAL=partial, Q_LO=lo, Q_HI=hi, K_COORD=coords,
            **dict(zip(("stride_pb", "stride_ph", "stride_pq", "stride_pk"), _broadcast_strides(partial))),
            step_0=steps[0], step_1=steps[1], step_2=steps[2],
            HAS_BOXES=True, AXES=mask.token_boxes.axes, HAS_STEP=any(step > 1 for step in steps),
        )
    return dict(
        KV_IDX=idx, KV_CNT=cnt,
        **dict(zip(("stride_ib", "stride_ih", "stride_iq", "stride_ik"), _broadcast_strides(idx))),
        **dict(zip(("stride_cb", "stride_ch", "stride_cq"), _broadcast_strides(cnt))),
        Q_BLOCK=mask.q_block_size, KV_BLOCK=mask.kv_block_size, HAS_SPARSE=True,
        EVEN_K=seq_len % mask.kv_block_size == 0, **boxes,
    )


def _init_args(q, out0, lse0) -> dict:
    if out0 is None:
        return dict(O0=q, LSE0=q, stride_0b=0, stride_0s=0, stride_0h=0, stride_0d=0,
                    stride_l0b=0, stride_l0h=0, stride_l0s=0, HAS_INIT=False)
    return dict(
        O0=out0, LSE0=lse0,
        **dict(zip(("stride_0b", "stride_0s", "stride_0h", "stride_0d"), out0.stride())),
        **dict(zip(("stride_l0b", "stride_l0h", "stride_l0s"), lse0.stride())),
        HAS_INIT=True,
    )


def _extra_args(q, extra_k, extra_v, extra_key_valid, split_len: int) -> dict:
    if extra_k is None:
        return dict(KX=q, VX=q, X_VALID=q, stride_kxb=0, stride_kxs=0, stride_kxh=0, stride_kxd=0,
                    stride_vxb=0, stride_vxs=0, stride_vxh=0, stride_vxd=0, stride_mb=0, stride_ms=0,
                    seq_x=0, split_len=0, HAS_EXTRA=False, HAS_X_VALID=False)
    valid = extra_key_valid.view(torch.uint8) if extra_key_valid is not None else None
    return dict(
        KX=extra_k, VX=extra_v, X_VALID=valid if valid is not None else extra_k,
        **dict(zip(("stride_kxb", "stride_kxs", "stride_kxh", "stride_kxd"), extra_k.stride())),
        **dict(zip(("stride_vxb", "stride_vxs", "stride_vxh", "stride_vxd"), extra_v.stride())),
        **dict(zip(("stride_mb", "stride_ms"), _strides(valid, 2))),
        seq_x=extra_k.shape[1], split_len=split_len, HAS_EXTRA=True, HAS_X_VALID=valid is not None,
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    scale: float,
    *,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_key_valid: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    precision: str = "bf16",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the kept key blocks of `mask` (plus, optionally, every valid extra key) in one launch.

    q, k, v: (B, S, H, D) fp16/bf16/fp32, any strides, S == mask.seq_len, D in `triton_backend.HEAD_DIMS`;
    extra_k/extra_v (B, T, H, D), e.g. the joint text keys, extra_key_valid (B, T) bool (False: padding, zero weight). Returns
    out (B, S, H, D) in q's dtype and lse (B, H, S) fp32 (-inf for rows with no kept key: their output is zero).
    `out`, when given, is written in place (any strides, e.g. a slice of the joint sequence's output).
    `precision` "fp8" / "int8" (head_dim 64 or 128, checked at the public edge): one pre-pass
    (`triton_quantize.quantize`) quantizes q, k, v and the extra keys in the blocked order, then this kernel runs on
    them with the same masks, permutation (fused into the output store) and extra keys.
    """
    _check_int32_span(q, k, v)
    batch, seq_len, heads, head_dim = q.shape
    out = _output(out, q)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    perm = _permutation_int32(mask) if mask.permutation is not None else None
    pv = fp8_pv() if precision == "fp8" else ""
    qk = qk_format(precision) if precision != "bf16" else ""
    quantized = None
    if precision != "bf16":
        quantized = triton_quantize.quantize(q, k, v, perm, mask.q_block_size, mask.kv_block_size, precision, pv, qk,
                                             extra_k, extra_v)
        q_in, k, v = quantized["q"], quantized["k"], quantized["v"]
        if extra_k is not None:
            extra_k, extra_v = quantized["extra_k"], quantized["extra_v"]
    else:
        q_in = q
    args = dict(
        **_base_args(q_in, k, v, out, lse, scale),
        **_output_args(out, lse, split_dims=False),
        **_sparse_args(mask, seq_len),
        **_init_args(q, None, None),
        **_extra_args(q, extra_k, extra_v, extra_key_valid, extra_k.shape[1] if extra_k is not None else 0),
        PERM=perm if perm is not None else q, PERMUTED=perm is not None,
        seq_q=seq_len,
    )
    if quantized is not None:
        args.update(_quant_args(q, quantized, precision, pv, qk))
    key = ("sparse", head_dim, q.dtype, mask.q_block_size, mask.kv_block_size, args["EVEN_K"], perm is not None,
           extra_k is not None, extra_key_valid is not None)
    if quantized is not None:
        key += (precision, pv, qk)
    if args["HAS_BOXES"]:
        key += ("boxes", args["AXES"], args["HAS_STEP"])
    configs = _candidate_configs(mask.q_block_size, mask.kv_block_size, head_dim, q.device)
    _run(key, configs, args, seq_len, batch * heads, 1, tune=True)
    return out, lse


def extend_attention(
    out0: torch.Tensor,
    lse0: torch.Tensor,
    q: torch.Tensor,
    extra_k: torch.Tensor,
    extra_v: torch.Tensor,
    extra_key_valid: torch.Tensor | None,
    scale: float,
    *,
    permutation: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue an attention result `(out0 (B, S, H, D), lse0 (B, H, S))` over extra keys, exactly.

    The result is what attention over the union of out0's keys and the valid extra keys gives, with no separate merge
    pass. With `permutation` (S,) int32, row r of out0/lse0 belongs to original query perm[r]; q and the result are in
    the original order (the inverse permutation is fused into the store).
    """
    _check_int32_span(q, extra_k, extra_v)
    batch, seq_len, heads, head_dim = q.shape
    out = _output(out, q)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    args = dict(
        **_base_args(q, q, q, out, lse, scale),
        **_output_args(out, lse, split_dims=False),
        **_no_sparse_args(q),
        **_init_args(q, out0, lse0),
        **_extra_args(q, extra_k, extra_v, extra_key_valid, extra_k.shape[1]),
        PERM=permutation if permutation is not None else q, PERMUTED=permutation is not None,
        seq_q=seq_len,
    )
    configs = _candidate_configs(None, None, head_dim, q.device)
    key = ("extend", head_dim, q.dtype, permutation is not None, extra_key_valid is not None)
    _run(key, configs, args, seq_len, batch * heads, 1, tune=False)
    return out, lse


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of few query rows (the joint text) over many keys with optional key padding, split-K.

    q (B, Sq, H, D), k/v (B, Sk, H, D), key_valid (B, Sk) bool or None. Returns (out (B, Sq, H, D) in q's dtype,
    lse (B, H, Sq) fp32). The keys are split over enough programs to fill the GPU (or into `splits` parts);
    partial results are merged by their log-sum-exps.
    """
    _check_int32_span(q, k, v)
    batch, seq_q, heads, head_dim = q.shape
    seq_k = k.shape[1]
    configs = _candidate_configs(None, None, head_dim, q.device)
    bm = configs[0][0]
    programs = triton.cdiv(seq_q, bm) * batch * heads
    target = 4 * (torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1)
    if splits is None:
        splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(seq_k, 1024)))
    split_len = triton.cdiv(triton.cdiv(seq_k, splits), 128) * 128
    splits = triton.cdiv(seq_k, split_len)
    final = _output(out, q)
    if splits == 1:
        out = final
        lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(splits, batch, seq_q, heads, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, batch, heads, seq_q, dtype=torch.float32, device=q.device)
    args = dict(
        **_base_args(q, q, q, out, lse, scale),
        **_output_args(out, lse, split_dims=splits > 1),
        **_no_sparse_args(q),
        **_init_args(q, None, None),
        **_extra_args(q, k, v, key_valid, split_len),
        PERM=q, PERMUTED=False,
        seq_q=seq_q,
    )
    key = ("dense", head_dim, q.dtype, key_valid is not None)
    _run(key, configs, args, seq_q, batch * heads, splits, tune=False)
    if splits == 1:
        return out, lse
    total = torch.logsumexp(lse, dim=0)  # (B, H, Sq)
    weights = torch.exp(lse - total).nan_to_num_(0.0)  # (splits, B, H, Sq)
    final.copy_((out * weights.transpose(2, 3)[..., None]).sum(0))
    return final, total
