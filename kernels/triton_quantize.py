"""The low-precision pre-pass: q, k, v (and the joint text keys) quantized in ONE Triton kernel, in the blocked order.

SageAttention's schemes (Zhang et al., "SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference
Acceleration", ICLR 2025; "SageAttention2", ICML 2025):

- K is smoothed first: its per-(batch, head) mean over the tokens is subtracted. Every score of a query row then
  shifts by the same q . mean, which softmax ignores, while the channel offsets that dominate K's range (and its
  quantization error) are gone. The joint text keys are smoothed by the same mean, so a row's scores stay comparable.
- Q and K get one scale per block of tokens (the mask's query block for Q, its key block for K, `EXTRA_BLOCK` tokens
  for the text keys): `amax / 448` for e4m3 ("fp8"), `amax / 127` for int8 (rounded half away from zero).
- V: "fp8" with FP8 PV: smoothed by its per-(batch, head) channel mean (SageAttention2's V smoothing: the mean is
  added back to each normalised output row, exact since a row's weights sum to one) and e4m3 with one scale per
  (batch, head, channel) over every token (video and text), stored transposed (B, H, D, S), the token axis contiguous, as Hopper's FP8 MMA wants its second operand; "fp8" with bf16
  PV: bf16; "int8": fp16 (SageAttention 1's FP16 PV).

The per-channel statistics (K's mean, V's channel maxima) need every token before any block can be quantized: they
are one torch reduction each (as SageAttention computes K's mean), then one kernel launch does all the rest. The
outputs are in the mask's blocked order (token r of the blocked order at row r), contiguous, so the attention kernel
reads whole rows without the permutation. `quantize_emulated` in `reference.py` is the same arithmetic in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: the largest finite e4m3 value and int8's symmetric range: a block's amax maps onto them.
FP8_MAX = 448.0
INT8_MAX = 127.0
#: P in [0, 1] is scaled by this power of two before its e4m3 rounding (exact; the range stays below FP8_MAX).
P_SCALE = 256.0
#: tokens per quantization block of the joint text keys (the attention kernel's BLOCK_N divides it).
EXTRA_BLOCK = 128
#: the smallest block amax (a block of zeros gets this, not a zero scale).
TINY = 1e-30


@triton.jit
def round_to_bits(x, MANTISSA: tl.constexpr):
    """fp32 `x` rounded to nearest-even on `MANTISSA` mantissa bits (normal range; the carry into the exponent
    included). Only under TRITON_INTERPRET=1, whose casts to e4m3 drop that carry (127.4 -> 64) and to bf16
    truncate: the values then cast exactly. On a GPU the casts round to nearest-even themselves."""
    drop: tl.constexpr = 23 - MANTISSA
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)
    bits = bits & ~((1 << drop) - 1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows(X, MEAN, XO, SCALE, rows_in, rows_out, row_ok, stride_xs, stride_xd, offs_d, stride_os,
                   SMOOTH: tl.constexpr, INT8: tl.constexpr, INTERPRETED: tl.constexpr):
    """One block of rows: optional mean subtracted, one scale for the block, rounded to e4m3 or int8. Returns the
    rows as loaded, fp32."""
    x = tl.load(X + rows_in[:, None] * stride_xs + offs_d[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    loaded = x
    if SMOOTH:
        x = x - tl.load(MEAN + offs_d)[None, :]
        x = tl.where(row_ok[:, None], x, 0.0)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-30)
    if INT8:
        scale = amax / 127.0
        y = x / scale
        y = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # truncation: rounds half away from zero
    else:
        scale = amax / 448.0
        y = x / scale
        if INTERPRETED:
            y = round_to_bits(y, 3)
        y = y.to(XO.dtype.element_ty)
    tl.store(XO + rows_out[:, None] * stride_os + offs_d[None, :], y, mask=row_ok[:, None])
    tl.store(SCALE, scale)
    return loaded


@triton.jit
def _convert_values(V, V_SCALE, VO, rows_in, rows_out, row_ok, stride_vs, stride_vd, offs_d, stride_os, stride_od,
                    HEAD_DIM: tl.constexpr, V_FP8: tl.constexpr, INTERPRETED: tl.constexpr):
    """Rows of V: minus their channel's mean, divided by its scale and rounded to e4m3 (V_STATS (2, D): scales then
    means), or cast to VO's dtype."""
    v = tl.load(V + rows_in[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=row_ok[:, None], other=0.0)
    v = v.to(tl.float32)
    if V_FP8:
        v = (v - tl.load(V_SCALE + HEAD_DIM + offs_d)[None, :]) / tl.load(V_SCALE + offs_d)[None, :]
        if INTERPRETED:
            v = round_to_bits(v, 3)
    elif INTERPRETED:
        if VO.dtype.element_ty == tl.bfloat16:
            v = round_to_bits(v, 7)
    tl.store(VO + rows_out[:, None] * stride_os + offs_d[None, :] * stride_od, v.to(VO.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit(do_not_specialize=["seq_len", "seq_x"])
def _quantize_fwd(
    Q, K, V, KX, VX, K_MEAN, V_SCALE, PERM,
    QO, KO, VO, KXO, VXO, Q_SCALE, K_SCALE, KX_SCALE, Q_DOT_MEAN,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_kxb, stride_kxs, stride_kxh, stride_kxd,
    stride_vxb, stride_vxs, stride_vxh, stride_vxd,
    stride_vo_s, stride_vo_d, stride_vxo_s, stride_vxo_d,
    seq_len, seq_x, heads, n_q_blocks, n_kv_blocks, n_x_blocks,
    HEAD_DIM: tl.constexpr,
    Q_BLOCK: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    X_BLOCK: tl.constexpr,
    Q_TILE: tl.constexpr,
    KV_TILE: tl.constexpr,
    PERMUTED: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    INT8: tl.constexpr,
    V_FP8: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """Program (i, b * heads + h): query block i, key block i (with its V rows) and text block i of that head."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    mean = K_MEAN + pid_bh * HEAD_DIM  # (B, H, D) fp32, contiguous
    v_scale = V_SCALE + pid_bh * 2 * HEAD_DIM  # (B, H, 2, D): channel scales, channel means
    out_rows = pid_bh.to(tl.int64) * seq_len  # QO, KO: (B, H, S, D) contiguous; VO (B, H, S, D) or (B, H, D, S)

    if pid < n_q_blocks:
        blocked = pid * Q_BLOCK + tl.arange(0, Q_TILE)  # Q_TILE: Q_BLOCK up to a power of two
        ok = (tl.arange(0, Q_TILE) < Q_BLOCK) & (blocked < seq_len)
        rows = blocked
        if PERMUTED:
            rows = tl.load(PERM + blocked, mask=ok, other=0)
        q = _quantize_rows(Q + b * stride_qb + h * stride_qh, mean, QO + out_rows * HEAD_DIM,
                           Q_SCALE + pid_bh * n_q_blocks + pid, rows, blocked, ok, stride_qs, stride_qd, offs_d,
                           HEAD_DIM, False, INT8, INTERPRETED)
        # q . mean(K) per row: what smoothing K took from each row's scores, for the true log-sum-exp
        tl.store(Q_DOT_MEAN + out_rows + blocked, tl.sum(q * tl.load(mean + offs_d)[None, :], 1), mask=ok)
    if pid < n_kv_blocks:
        blocked = pid * KV_BLOCK + tl.arange(0, KV_TILE)
        ok = (tl.arange(0, KV_TILE) < KV_BLOCK) & (blocked < seq_len)
        rows = blocked
        if PERMUTED:
            rows = tl.load(PERM + blocked, mask=ok, other=0)
        _quantize_rows(K + b * stride_kb + h * stride_kh, mean, KO + out_rows * HEAD_DIM,
                       K_SCALE + pid_bh * n_kv_blocks + pid, rows, blocked, ok, stride_ks, stride_kd, offs_d,
                       HEAD_DIM, True, INT8, INTERPRETED)
        _convert_values(V + b * stride_vb + h * stride_vh, v_scale, VO + out_rows * HEAD_DIM, rows, blocked, ok,
                        stride_vs, stride_vd, offs_d, stride_vo_s, stride_vo_d, HEAD_DIM, V_FP8, INTERPRETED)
    if HAS_EXTRA:
        if pid < n_x_blocks:
            rows = pid * X_BLOCK + tl.arange(0, X_BLOCK)
            ok = rows < seq_x
            x_rows = pid_bh.to(tl.int64) * seq_x
            _quantize_rows(KX + b * stride_kxb + h * stride_kxh, mean, KXO + x_rows * HEAD_DIM,
                           KX_SCALE + pid_bh * n_x_blocks + pid, rows, rows, ok, stride_kxs, stride_kxd, offs_d,
                           HEAD_DIM, True, INT8, INTERPRETED)
            _convert_values(VX + b * stride_vxb + h * stride_vxh, v_scale, VXO + x_rows * HEAD_DIM, rows, rows, ok,
                            stride_vxs, stride_vxd, offs_d, stride_vxo_s, stride_vxo_d, HEAD_DIM, V_FP8,
                            INTERPRETED)


def _values(shape_bhsd: tuple, dtype: torch.dtype, device, transposed: bool):
    """An empty V buffer (B, H, S, D), or (B, H, D, S) when `transposed`; returns (buffer, its (B, S, H, D) view,
    the (token, channel) strides of the buffer within one head)."""
    batch, heads, seq, dim = shape_bhsd
    if transposed:
        buffer = torch.empty(batch, heads, dim, seq, dtype=dtype, device=device)
        return buffer.permute(0, 3, 1, 2), (1, seq)
    buffer = torch.empty(batch, heads, seq, dim, dtype=dtype, device=device)
    return buffer.permute(0, 2, 1, 3), (dim, 1)


def quantize(q, k, v, permutation, q_block: int, kv_block: int, precision: str, pv: str, qk: str,
             extra_k=None, extra_v=None) -> dict:
    """q, k, v (B, S, H, D) (and extra_k/extra_v (B, T, H, D)) in the blocked order of `permutation` ((S,) int32 or
    None), quantized for `precision` ("fp8" or "int8") with the PV operands of `pv` ("fp8" or "bf16", fp8 only)
    and the QK operands of `qk` ("int8" or "e4m3", fp8 only: `backend.qk_format`).

    Returns a dict of (B, S, H, D)-shaped views `q`, `k`, `v`, `extra_k`, `extra_v` (row r: token r of the blocked
    order) and fp32 scales `q_scale` (B, H, n_q_blocks), `k_scale` (B, H, n_kv_blocks), `extra_scale`
    (B, H, n_text_blocks), `v_scale` (B, H, 2, D): V's channel scales and means (ones and zeros unless V is e4m3),
    `q_dot_mean` (B, H, S): q . mean(K) of each row of the blocked order (unquantized q)."""
    batch, seq_len, heads, head_dim = q.shape
    device = q.device
    int8 = qk == "int8"
    v_fp8 = precision == "fp8" and pv == "fp8"
    qk_dtype = torch.int8 if int8 else torch.float8_e4m3fn
    v_dtype = torch.float8_e4m3fn if v_fp8 else (torch.float16 if precision == "int8" else torch.bfloat16)
    k_mean = k.mean(1, dtype=torch.float32).contiguous()  # (B, H, D)
    v_scale = torch.empty(batch, heads, 2, head_dim, dtype=torch.float32, device=device)
    if v_fp8:
        v_mean = v.mean(1, dtype=torch.float32)  # (B, H, D)
        low, high = torch.aminmax(v, dim=1)
        if extra_v is not None:
            low_x, high_x = torch.aminmax(extra_v, dim=1)
            low, high = torch.minimum(low, low_x), torch.maximum(high, high_x)
        v_scale[:, :, 0] = torch.maximum(high.float() - v_mean, v_mean - low.float()).clamp_min(TINY) / FP8_MAX
        v_scale[:, :, 1] = v_mean
    else:
        v_scale[:, :, 0], v_scale[:, :, 1] = 1.0, 0.0
    n_q, n_kv = triton.cdiv(seq_len, q_block), triton.cdiv(seq_len, kv_block)
    q_out = torch.empty(batch, heads, seq_len, head_dim, dtype=qk_dtype, device=device)
    k_out = torch.empty_like(q_out)
    v_out, (vo_s, vo_d) = _values((batch, heads, seq_len, head_dim), v_dtype, device, transposed=v_fp8)
    q_scale = torch.empty(batch, heads, n_q, dtype=torch.float32, device=device)
    q_dot_mean = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=device)  # blocked order
    k_scale = torch.empty(batch, heads, n_kv, dtype=torch.float32, device=device)
    seq_x = extra_k.shape[1] if extra_k is not None else 0
    n_x = triton.cdiv(seq_x, EXTRA_BLOCK)
    if extra_k is not None:
        kx_out = torch.empty(batch, heads, seq_x, head_dim, dtype=qk_dtype, device=device)
        vx_out, (vxo_s, vxo_d) = _values((batch, heads, seq_x, head_dim), v_dtype, device, transposed=v_fp8)
        x_scale = torch.empty(batch, heads, n_x, dtype=torch.float32, device=device)
        kx_in, vx_in = extra_k, extra_v
    else:
        kx_out = vx_out = x_scale = q_scale
        kx_in = vx_in = q
        vxo_s = vxo_d = 0
    grid = (max(n_q, n_kv, n_x), batch * heads)
    _quantize_fwd[grid](
        q, k, v, kx_in, vx_in, k_mean, v_scale, permutation if permutation is not None else q_scale,
        q_out, k_out, v_out, kx_out, vx_out, q_scale, k_scale, x_scale, q_dot_mean,
        *q.stride(), *k.stride(), *v.stride(), *kx_in.stride(), *vx_in.stride(),
        vo_s, vo_d, vxo_s, vxo_d,
        seq_len, seq_x, heads, n_q, n_kv, n_x,
        HEAD_DIM=head_dim, Q_BLOCK=q_block, KV_BLOCK=kv_block, X_BLOCK=EXTRA_BLOCK,
        Q_TILE=triton.next_power_of_2(q_block), KV_TILE=triton.next_power_of_2(kv_block),
        PERMUTED=permutation is not None, HAS_EXTRA=extra_k is not None, INT8=int8, V_FP8=v_fp8,
        INTERPRETED=device.type == "cpu",
        **({} if device.type == "cpu" else dict(num_warps=8)),
    )
    result = dict(q=q_out.transpose(1, 2), k=k_out.transpose(1, 2), v=v_out, q_scale=q_scale, k_scale=k_scale,
                  v_scale=v_scale, q_dot_mean=q_dot_mean, extra_k=None, extra_v=None, extra_scale=None)
    if extra_k is not None:
        result.update(extra_k=kx_out.transpose(1, 2), extra_v=vx_out, extra_scale=x_scale)
    return result
