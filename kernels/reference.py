"""Block-sparse attention in plain PyTorch: the oracle every kernel is tested against; runs on any device.

Chunked over query blocks: each block gathers only its kept key blocks, so memory stays O(S x block) per head and
the work is proportional to the density. Each chunk's softmax over its keys (`_attend`) is torch's fused CPU flash
attention for fp32 on a CPU (one pass, where the explicit fp32 scores that every other case computes make several;
the fused kernel rounds fp16/bf16 scores to the input's precision, so those stay explicit), the same result to fp32
rounding.
"""

from __future__ import annotations

import torch

from dit_sparse.blockmask import BlockMask, inverse_order

from .backend import Backend, fp8_pv, qk_format, write_into

#: Mirrors of `triton_quantize`'s constants (that module needs triton; this one must import without it).
FP8_MAX, INT8_MAX, P_SCALE, EXTRA_BLOCK, TINY = 448.0, 127.0, 256.0, 128, 1e-30


def _cpu_flash_op():
    """torch's fused CPU attention returning the log-sum-exp, `aten::_scaled_dot_product_flash_attention_for_cpu`,
    when this torch has it with an `attn_mask` argument; else None (the explicit path runs)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    try:
        return op if op is not None and "attn_mask" in str(op.default._schema) else None
    except AttributeError:
        return None


#: The fused CPU kernel `_attend` uses on a CPU, or None (tests set None to run the explicit path on a CPU).
CPU_FLASH = _cpu_flash_op()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, scale: float,
            out_dtype: torch.dtype | None = None, p_round=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (B, H, r, D) over k, v (B, H, n, D), only over the keys `allowed` (bool,
    broadcastable to (B, H, r, n); None: all) keeps, accumulated in fp32. Returns (out (B, H, r, D) in `out_dtype`
    (None: q's; the fused kernel rounds to q's first), lse (B, H, r) fp32); a row with no allowed key gets zeros and
    -inf. `p_round` (the low precisions' emulation): the rounding of the un-normalised probabilities exp(s - max)
    before the PV product, the sum still of the exact ones, as the Triton kernel does."""
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if p_round is not None:
        return _attend_rounded(q, k, v, allowed, scale, out_dtype, p_round)
    # fp32 only: on fp16/bf16 the kernel rounds the scores to the input's precision (lse off by ~4e-5)
    fused = q.device.type == "cpu" and CPU_FLASH is not None and q.dtype == torch.float32
    if fused and k.shape[2] == 0:  # no key at all
        return q.new_zeros(*q.shape[:3], v.shape[-1], dtype=out_dtype), torch.full(q.shape[:3], float("-inf"))
    if fused:
        if allowed is not None and bool(allowed.all()):  # free to read on a CPU; the kernel is faster unmasked
            allowed = None
        bias = None
        if allowed is not None:  # the kernel takes an additive mask in q's dtype
            bias = torch.zeros(allowed.shape, dtype=q.dtype).masked_fill_(~allowed, float("-inf"))
        out, lse = CPU_FLASH(q, k, v, attn_mask=bias, scale=scale)
        lse = lse.float()
        if allowed is not None:
            empty = ~allowed.any(-1)  # (B or 1, H or 1, r or 1): reading it is free on a CPU
            if bool(empty.any()):  # the kernel leaves such rows' lse at 0
                lse = lse.masked_fill(empty, float("-inf"))
                out = out.masked_fill(empty[..., None], 0.0)
        return out.to(out_dtype), lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, r, n)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, r)
    weights = torch.exp(scores - lse[..., None]).nan_to_num_(0.0)
    return torch.matmul(weights, v.float()).to(out_dtype), lse


def _attend_rounded(q, k, v, allowed, scale: float, out_dtype: torch.dtype, p_round) -> tuple[torch.Tensor, torch.Tensor]:
    """`_attend` with P rounded by `p_round` before the PV product (fp32 otherwise)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, r, n)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(-1, keepdim=True) if scores.shape[-1] else scores.new_full((*scores.shape[:-1], 1),
                                                                                      float("-inf"))
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)
    p = torch.exp(scores - row_max)  # (B, H, r, n), masked pairs 0
    total = p.sum(-1)  # (B, H, r)
    safe = total.masked_fill(total == 0, 1.0)
    out = torch.matmul(p_round(p), v.float()) / safe[..., None]
    lse = torch.where(total == 0, float("-inf"), row_max[..., 0] + torch.log(safe))
    return out.to(out_dtype), lse


# ---- the low precisions' emulation (fake quantization in fp32) --------------------------------------------------


def _round_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).float()


def _round_int8(x: torch.Tensor) -> torch.Tensor:
    """Rounded half away from zero, as the Triton pre-pass does (to int8's range: |x| <= 127 here)."""
    return torch.trunc(x + 0.5 * torch.sign(x))


def _fake_quantize_blocks(x: torch.Tensor, block: int, qk: str) -> torch.Tensor:
    """x (B, S, H, D) fp32 in the blocked order, one scale per `block` tokens per (batch, head): amax / 448
    (`qk` "e4m3") or amax / 127 ("int8"); returns the dequantized values (B, S, H, D) fp32."""
    batch, seq, heads, dim = x.shape
    blocks = -(-seq // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, blocks * block - seq)).view(batch, blocks, block, heads, dim)
    amax = padded.abs().amax(dim=(2, 4), keepdim=True).clamp_min(TINY)  # (B, n, 1, H, 1)
    if qk == "int8":
        scale = amax / INT8_MAX
        quantized = _round_int8(padded / scale)
    else:
        scale = amax / FP8_MAX
        quantized = _round_fp8(padded / scale)
    return (quantized * scale).view(batch, blocks * block, heads, dim)[:, :seq]


def quantize_emulated(q, k, v, mask: BlockMask, precision: str, pv: str, qk: str, extra_k=None,
                      extra_v=None) -> tuple:
    """The Triton pre-pass (`triton_quantize.quantize`) in fp32: returns dequantized (q, k, v, extra_k, extra_v) in
    the original token order (fp32; extra None when not given; V less its channel mean `v_mean` (B, 1, H, D) for
    fp8 PV, zeros otherwise: the caller adds it to the output's non-empty rows), the P rounding of the PV
    product, and K's mean `k_mean` (B, 1, H, D) (the caller adds q . k_mean x scale to the lse).

    K (and the extra keys) minus K's per-(batch, head) mean over the tokens; one scale per query block (Q) and key
    block (K) of the mask's blocked order, per `EXTRA_BLOCK` extra keys, in `qk` ("int8" or "e4m3"); V per channel
    in e4m3 (fp8 PV), else rounded to bf16 (fp8 with bf16 PV) or fp16 (int8)."""
    q, k, v = q.float(), k.float(), v.float()
    k_mean = k.mean(1, keepdim=True)  # (B, 1, H, D)
    k = k - k_mean
    perm = mask.permutation.to(q.device) if mask.permutation is not None else None
    if perm is not None:
        q, k = q.index_select(1, perm), k.index_select(1, perm)
    q = _fake_quantize_blocks(q, mask.q_block_size, qk)
    k = _fake_quantize_blocks(k, mask.kv_block_size, qk)
    if perm is not None:
        inverse = inverse_order(perm)
        q, k = q.index_select(1, inverse), k.index_select(1, inverse)
    if extra_k is not None:
        extra_k = _fake_quantize_blocks(extra_k.float() - k_mean, EXTRA_BLOCK, qk)
        extra_v = extra_v.float()
    v_mean = torch.zeros_like(k_mean)
    if precision == "fp8" and pv == "fp8":
        v_mean = v.mean(1, keepdim=True)  # (B, 1, H, D)
        deviation = (v - v_mean).abs().amax(1, keepdim=True)
        if extra_v is not None:
            deviation = torch.maximum(deviation, (extra_v - v_mean).abs().amax(1, keepdim=True))
        v_scale = deviation.clamp_min(TINY) / FP8_MAX
        v = _round_fp8((v - v_mean) / v_scale) * v_scale
        extra_v = None if extra_v is None else _round_fp8((extra_v - v_mean) / v_scale) * v_scale
        p_round = lambda p: _round_fp8(p * P_SCALE) / P_SCALE  # noqa: E731
    else:
        low = torch.float16 if precision == "int8" else torch.bfloat16
        v = v.to(low).float()
        extra_v = None if extra_v is None else extra_v.to(low).float()
        p_round = lambda p: p.to(low).float()  # noqa: E731
    return q, k, v, extra_k, extra_v, v_mean, p_round, k_mean


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, scale: float, p_round=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the kept key blocks of `mask`, accumulated in fp32.

    q, k, v: (B, S, H, D), S == mask.seq_len, already checked by the caller. Returns the output (B, S, H, D) in q's
    dtype and the log-sum-exp of the scaled scores (B, H, S) in fp32, -inf for rows with no kept key (their output
    is zero). Kept blocks flagged in `mask.kv_block_partial` keep only the pairs `mask.token_boxes` allows.
    """
    batch, seq_len, heads, _ = q.shape
    if mask.permutation is not None:
        perm = mask.permutation.to(q.device)
        q, k, v = (x.index_select(1, perm) for x in (q, k, v))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
    shared = mask.kv_block_indices.shape[:2] == (1, 1)
    indices = mask.kv_block_indices.to(q.device).long().expand(batch, heads, -1, -1)  # (B, H, n_q, max_kept)
    counts = mask.kv_block_counts.to(q.device).expand(batch, heads, -1)  # (B, H, n_q)
    qbs, kbs = mask.q_block_size, mask.kv_block_size
    max_kept = indices.shape[-1]
    slot_offsets = torch.arange(kbs, device=q.device)
    boxes = mask.token_boxes.to(q.device) if mask.token_boxes is not None else None
    if boxes is not None:
        partial = mask.kv_block_partial.to(q.device).expand(batch, heads, -1, -1)  # (B, H, n_q, max_kept)

    out = torch.empty(batch, heads, seq_len, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    on_cpu = q.device.type == "cpu"
    for block in range(mask.n_q_blocks):
        rows = slice(block * qbs, min(seq_len, (block + 1) * qbs))
        # On a CPU reading the counts is free: gather only this block's widest kept list, not the mask's (a radial
        # mask keeps every block in a few rows, so padding each row to max_kept did dense work everywhere).
        width = int(counts[:, :, block].max()) if on_cpu else max_kept
        tokens = (indices[:, :, block, :width, None] * kbs + slot_offsets).flatten(-2)  # (B, H, width * kbs)
        slot_kept = torch.arange(width, device=q.device) < counts[:, :, block, None]  # (B, H, width)
        key_valid = slot_kept.repeat_interleave(kbs, dim=-1) & (tokens < seq_len)
        tokens = tokens.clamp(max=seq_len - 1)
        if shared:  # one list for every batch and head (radial, neighborhood): a plain index_select
            k_kept, v_kept = (x.index_select(2, tokens[0, 0]) for x in (kh, vh))
        else:
            k_kept, v_kept = (x.gather(2, tokens[..., None].expand(-1, -1, -1, x.shape[-1])) for x in (kh, vh))
        allowed = key_valid[:, :, None, :]  # (B, H, 1 or rows, keys)
        if boxes is not None:
            # Partial blocks keep only the pairs the boxes allow; whole blocks keep every pair.
            slot_partial = partial[:, :, block, :width].repeat_interleave(kbs, dim=-1)  # (B, H, keys)
            in_box = boxes.allows(torch.arange(rows.start, rows.stop, device=q.device), tokens)  # (B, H, rows, keys)
            allowed = allowed & (~slot_partial[:, :, None, :] | in_box)
        out[:, :, rows], lse[:, :, rows] = _attend(qh[:, :, rows], k_kept, v_kept, allowed, scale, p_round=p_round)
    out = out.transpose(1, 2)  # (B, S, H, D)
    if mask.permutation is not None:
        inverse = inverse_order(mask.permutation.to(q.device))
        out, lse = out.index_select(1, inverse), lse.index_select(2, inverse)
    return out, lse


def _attention_chunk(q, k, v, key_valid, scale, p_round=None):
    """Attention of a query chunk q (B, c, H, D) over all keys k, v (B, Sk, H, D) but those `key_valid` (B, Sk)
    marks False: (out (B, c, H, D) fp32, lse (B, H, c) fp32)."""
    allowed = None if key_valid is None else key_valid[:, None, None, :]
    out, lse = _attend(*(x.transpose(1, 2) for x in (q, k, v)), allowed, scale, out_dtype=torch.float32,
                       p_round=p_round)
    return out.transpose(1, 2), lse


def _chunk_rows(q: torch.Tensor, keys: int, budget: int = 1 << 24) -> int:
    """Query rows per chunk so that one chunk's fp32 scores stay under `budget` elements."""
    batch, _, heads, _ = q.shape
    return max(1, budget // max(1, batch * heads * keys))


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with key padding, chunked over queries so memory stays bounded; fp32 accumulation.

    q (B, Sq, H, D), k/v (B, Sk, H, D), key_valid (B, Sk) bool or None. Returns (out (B, Sq, H, D) in q's dtype,
    lse (B, H, Sq) fp32; -inf and zeros for a row with no valid key).
    """
    batch, seq_q, heads, _ = q.shape
    out = torch.empty(batch, seq_q, heads, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    step = _chunk_rows(q, k.shape[1])
    for start in range(0, seq_q, step):
        rows = slice(start, min(seq_q, start + step))
        chunk_out, lse[:, :, rows] = _attention_chunk(q[:, rows], k, v, key_valid, scale)
        out[:, rows] = chunk_out.to(q.dtype)
    return out, lse


def extend_attention(
    out0: torch.Tensor,
    lse0: torch.Tensor,
    q: torch.Tensor,
    extra_k: torch.Tensor,
    extra_v: torch.Tensor,
    extra_key_valid: torch.Tensor | None,
    scale: float,
    p_round=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine an attention result (out0 (B, S, H, D), lse0 (B, H, S)) with attention over extra keys, by the
    log-sum-exps: the exact attention over the union of the two disjoint key sets. Chunked over queries."""
    batch, seq_len, heads, _ = q.shape
    out = torch.empty(batch, seq_len, heads, extra_v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    step = _chunk_rows(q, extra_k.shape[1])
    for start in range(0, seq_len, step):
        rows = slice(start, min(seq_len, start + step))
        extra_out, extra_lse = _attention_chunk(q[:, rows], extra_k, extra_v, extra_key_valid, scale, p_round)
        first_lse = lse0[:, :, rows]
        total = torch.logaddexp(first_lse, extra_lse)  # (B, H, c); -inf only when both are
        weight_first = torch.exp(first_lse - total).nan_to_num_(0.0).transpose(1, 2)[..., None]  # (B, c, H, 1)
        weight_extra = torch.exp(extra_lse - total).nan_to_num_(0.0).transpose(1, 2)[..., None]
        out[:, rows] = (out0[:, rows].float() * weight_first + extra_out * weight_extra).to(q.dtype)
        lse[:, :, rows] = total
    return out, lse


def _attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out, precision="bf16"):
    if precision != "bf16":  # the emulation: the same attention on the fake-quantized inputs, P rounded
        dtype, q_in = q.dtype, q
        q, k, v, extra_k, extra_v, v_mean, p_round, k_mean = quantize_emulated(q, k, v, mask, precision, fp8_pv(),
                                                                qk_format(precision), extra_k, extra_v)
        result, lse = block_sparse_attention(q, k, v, mask, scale, p_round)
        if extra_k is not None:
            result, lse = extend_attention(result, lse, q, extra_k, extra_v, extra_key_valid, scale, p_round)
        result = result + torch.where(torch.isinf(lse).transpose(1, 2)[..., None], 0.0, v_mean)
        lse = lse + scale * (q_in.float() * k_mean).sum(-1).transpose(1, 2)  # the unsmoothed scores' lse
        return write_into(out, result.to(dtype)), lse
    result, lse = block_sparse_attention(q, k, v, mask, scale)
    if extra_k is not None:
        result, lse = extend_attention(result, lse, q, extra_k, extra_v, extra_key_valid, scale)
    return write_into(out, result), lse


def _dense_attention(q, k, v, key_valid, scale, out):
    result, lse = dense_attention(q, k, v, key_valid, scale)
    return write_into(out, result), lse


BACKEND = Backend(
    name="reference",
    where="anywhere, CPU included",
    summary="plain PyTorch, chunked over query blocks (memory O(S x block)), fp32 accumulation; the oracle",
    device_reason=lambda device: None,
    dtypes=None,
    head_dims=None,
    token_boxes=True,
    attention=_attention,
    dense_attention=_dense_attention,
    precisions=("bf16", "fp8", "int8"),
    emulates_low_precision=True,
)


# ---- compensation: the dropped key blocks through their pooled keys ---------------------------------------------


def block_means(x: torch.Tensor, block_size: int, permutation: torch.Tensor | None = None):
    """Mean of x (B, S, H, D) over each block of `block_size` tokens cut in `permutation`'s order (None: natural),
    the ragged last block over its real tokens only. Returns (means (B, n_blocks, H, D) fp32, counts (n_blocks,)
    fp32 on x's device). Tensor ops only: no host sync, no fp32 copy of x."""
    batch, seq_len, heads, dim = x.shape
    if permutation is not None:
        x = x.index_select(1, permutation.to(x.device))
    full = seq_len // block_size
    sums = [x[:, : full * block_size].view(batch, full, block_size, heads, dim).sum(2, dtype=torch.float32)]
    if full * block_size < seq_len:  # the ragged tail
        sums.append(x[:, full * block_size:].sum(1, keepdim=True, dtype=torch.float32))
    sums = torch.cat(sums, dim=1) if len(sums) > 1 else sums[0]  # (B, n_blocks, H, D)
    counts = torch.full((sums.shape[1],), float(block_size), device=x.device)
    counts[-1:].fill_(seq_len - (sums.shape[1] - 1) * block_size)  # a fill, not a host copy: no sync
    return sums / counts[:, None, None], counts


def pooled_keys(k: torch.Tensor, v: torch.Tensor, mask: BlockMask):
    """The pooled key and value of every key block of `mask` (its blocked order) and the log of its real token count:
    (k_pool, v_pool (B, n_kv, H, D) fp32, log_counts (n_kv,) fp32). A pooled key's score plus log(count) is the
    log of the block's summed weight when all its keys score alike (SVG-EAR's centroid compensation)."""
    k_pool, counts = block_means(k, mask.kv_block_size, mask.permutation)
    v_pool, _ = block_means(v, mask.kv_block_size, mask.permutation)
    return k_pool, v_pool, counts.log()


def dropped_blocks(mask: BlockMask) -> torch.Tensor:
    """Bool (Bm, Hm, n_q, n_kv): the key blocks each query block's row drops (kept with the mask, built once)."""
    return mask.cached("dropped_blocks", lambda: ~mask.to_block_dense())


def merge_by_lse(out0: torch.Tensor, lse0: torch.Tensor, out1: torch.Tensor, lse1: torch.Tensor):
    """The attention over the union of two disjoint key sets from each one's (out (B, r, H, D), lse (B, H, r)): the
    log-sum-exp merge (`extend_attention` does the same for the joint text). fp32 out, fp32 lse."""
    total = torch.logaddexp(lse0, lse1)  # (B, H, r); -inf only when both are
    weight0 = torch.exp(lse0 - total).nan_to_num_(0.0).transpose(1, 2)[..., None]  # (B, r, H, 1)
    weight1 = torch.exp(lse1 - total).nan_to_num_(0.0).transpose(1, 2)[..., None]
    return out0.float() * weight0 + out1.float() * weight1, total


def compensate_attention(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Add to a block-sparse result (out (B, S, H, D), lse (B, H, S), natural order) each query block's dropped key
    blocks, each through one pooled key (block-mean key, score + log(real token count)) and its mean value, inside
    the same softmax: SVG-EAR's centroid compensation (Zhou et al. 2026, arXiv:2603.08982) and DraftAttention's
    pooled map (Shen et al. 2025, arXiv:2505.14708). The merge is by log-sum-exp, so a row that drops nothing keeps
    its output exactly; a row that keeps nothing gets attention over the pooled keys (+ the joint keys the first pass
    saw). Kept blocks masked inside (token boxes) count as kept: their masked-out tokens stay out. `out` is written
    in place; returns (out, lse). The reference's pooled pass: chunked over query blocks, fp32, any device."""
    seq_len = q.shape[1]
    perm = mask.permutation
    k_pool, v_pool, log_counts = pooled_keys(k, v, mask)
    kh, vh = k_pool.transpose(1, 2), v_pool.transpose(1, 2)  # (B, H, n_kv, D)
    dropped = dropped_blocks(mask).to(q.device)  # (Bm, Hm, n_q, n_kv)
    qbs = mask.q_block_size
    blocks_per_chunk = max(1, _chunk_rows(q, k_pool.shape[1]) // qbs)
    for first in range(0, mask.n_q_blocks, blocks_per_chunk):
        blocks = range(first, min(mask.n_q_blocks, first + blocks_per_chunk))
        rows = torch.arange(blocks.start * qbs, min(seq_len, blocks.stop * qbs), device=q.device)  # blocked rows
        tokens = rows if perm is None else perm.to(q.device)[rows]  # their natural positions
        q_rows = q.index_select(1, tokens).transpose(1, 2).float()  # (B, H, r, D)
        scores = torch.matmul(q_rows, kh.transpose(-1, -2)) * scale + log_counts  # (B, H, r, n_kv)
        allowed = dropped[:, :, rows // qbs]  # (Bm, Hm, r, n_kv)
        scores = scores.masked_fill(~allowed, float("-inf"))
        pooled_lse = torch.logsumexp(scores, dim=-1)  # (B, H, r)
        pooled_out = torch.matmul(torch.exp(scores - pooled_lse[..., None]).nan_to_num_(0.0), vh)  # (B, H, r, D)
        merged, total = merge_by_lse(out.index_select(1, tokens), lse.index_select(2, tokens),
                                     pooled_out.transpose(1, 2), pooled_lse)
        out.index_copy_(1, tokens, merged.to(out.dtype))
        lse = lse.index_copy(2, tokens, total)
    return out, lse
