"""`BlockMask`: which key blocks each query block attends to, as index lists every backend can read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, TypeVar

import torch

T = TypeVar("T")


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True, eq=False)
class TokenBoxes:
    """Token-level masking inside kept blocks: each query's allowed keys form a box on a lattice.

    Query row r may attend to key j when, on every axis a,
    `query_lo[r, a] <= key_coords[j, a] < query_hi[r, a]` and `(key_coords[j, a] - query_lo[r, a]) % step[a] == 0`.
    This is exactly a (dilated, strided, border-clamped) neighborhood window of NATTEN, in any number of axes.

    - `query_lo`, `query_hi` (seq_len, A) int32: each query token's box, `query_hi` exclusive.
    - `key_coords` (seq_len, A) int32: each key token's coordinates (e.g. frame, row, column).
    - `step`: A ints >= 1, the lattice step per axis (NATTEN's dilation); 1 means every coordinate in the box.

    Rows of all three tensors are in the mask's blocked order (row r is token `permutation[r]`, or r without a
    permutation), which is the order kernels read them in. Shared by every batch entry and head. 1 <= A <= 3.
    """

    query_lo: torch.Tensor
    query_hi: torch.Tensor
    key_coords: torch.Tensor
    step: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "step", tuple(self.step))
        lo, hi, coords = self.query_lo, self.query_hi, self.key_coords
        for name, x in (("query_lo", lo), ("query_hi", hi), ("key_coords", coords)):
            if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or x.dim() != 2:
                raise ValueError(f"TokenBoxes.{name} must be an int32 (seq_len, axes) tensor, got "
                                 f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if not (lo.shape == hi.shape == coords.shape):
            raise ValueError(f"TokenBoxes tensors must share one shape, got {tuple(lo.shape)}, {tuple(hi.shape)}, "
                             f"{tuple(coords.shape)}")
        if not 1 <= lo.shape[1] <= 3:
            raise ValueError(f"TokenBoxes supports 1 to 3 axes, got {lo.shape[1]}")
        if len(self.step) != lo.shape[1] or any(not isinstance(s, int) or isinstance(s, bool) or s < 1
                                                for s in self.step):
            raise ValueError(f"TokenBoxes.step must be {lo.shape[1]} ints >= 1, got {self.step!r}")

    @property
    def seq_len(self) -> int:
        return self.query_lo.shape[0]

    @property
    def axes(self) -> int:
        return self.query_lo.shape[1]

    def allows(self, rows: torch.Tensor | slice = slice(None), cols: torch.Tensor | slice = slice(None)):
        """Bool (len(rows), len(cols)) (or broadcast over leading dims of `cols`): the box rule for those query rows
        and key columns, both in the blocked order."""
        lo, hi = self.query_lo[rows], self.query_hi[rows]  # (r, A)
        coords = self.key_coords[cols]  # (..., c, A)
        allowed = None
        for axis, step in enumerate(self.step):
            c = coords[..., None, :, axis]  # (..., 1, c)
            low = lo[:, axis, None]  # (r, 1)
            ok = (c >= low) & (c < hi[:, axis, None])
            if step > 1:
                ok &= (c - low) % step == 0
            allowed = ok if allowed is None else allowed & ok
        return allowed

    def to(self, device) -> "TokenBoxes":
        return TokenBoxes(self.query_lo.to(device), self.query_hi.to(device), self.key_coords.to(device), self.step)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Kept key blocks per (batch or 1, head or 1, query block) over the video tokens of one attention call.

    - `kv_block_indices` (Bm, Hm, n_q_blocks, max_kept) int32: kept key block indices of each query block, ascending;
      entries at or past `kv_block_counts` are padding (0) and must be ignored.
    - `kv_block_counts` (Bm, Hm, n_q_blocks) int32: how many entries of each row are kept blocks.
    - `seq_len`: tokens the mask covers (the video tokens; joint text is handled by `sparse_attention`).
    - `q_block_size`, `kv_block_size`: tokens per block; the last block of each is short when `seq_len` is not a
      multiple (the ragged tail).
    - `permutation` (seq_len,) int64 or None: the token order the blocks are cut in (`x_blocked = x[:, perm]`),
      e.g. `VideoLayout.tile_permutation`; None means the natural order. Dynamic patterns may give one order per
      batch entry and head instead: (Pb, Ph, seq_len) with Pb in (1, batch), Ph in (1, heads)
      (`x_blocked[b, :, h] = x[b, perm[b, h], h]`).
    - `kv_permutation`: None (keys and values use `permutation`), or the keys' own order, shaped like a per-head
      `permutation` (SVG2 clusters queries and keys separately). Needs `permutation`.
    - `kv_block_partial` (Bm, Hm, n_q_blocks, max_kept) bool or None, with `token_boxes` (`TokenBoxes`): optional
      masking inside blocks. A kept block flagged partial keeps only the token pairs `token_boxes` allows; one not
      flagged keeps every pair (kernels skip the masking there). None (the default): every kept block is whole.

    - `rows_all_kept`: True when the builder guarantees that every query block keeps at least one key block (e.g.
      a top-k selection). Kernels that must otherwise check for empty rows (FA4's fix-up) skip the check, which on
      CUDA is a host sync per new mask, i.e. per call of a dynamic pattern. Not checked here (that would be the
      sync); False (the default) makes no promise.

    Bm and Hm are 1 when the mask is shared over the batch or the heads. A query block with no kept key block gets a
    zero output, and so does a query row that no kept key allows.

    What backends derive from a mask (its FA4 tensors, an int32 permutation, its copy on another device, ...) is kept
    with it through `cached(key, build)`, one private dict dropped with the mask.
    """

    kv_block_indices: torch.Tensor
    kv_block_counts: torch.Tensor
    seq_len: int
    q_block_size: int = 128
    kv_block_size: int = 128
    permutation: torch.Tensor | None = None
    kv_block_partial: torch.Tensor | None = None
    token_boxes: TokenBoxes | None = None
    kv_permutation: torch.Tensor | None = None
    rows_all_kept: bool = False
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"BlockMask.seq_len must be a positive int, got {self.seq_len!r}")
        for name in ("q_block_size", "kv_block_size"):
            if not _is_power_of_two(getattr(self, name)):
                raise ValueError(f"BlockMask.{name} must be a power of two, got {getattr(self, name)!r}")
        idx, cnt = self.kv_block_indices, self.kv_block_counts
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
            raise ValueError(f"BlockMask index tensors must be int32, got {idx.dtype} and {cnt.dtype}")
        if idx.dim() != 4 or cnt.dim() != 3 or idx.shape[:3] != cnt.shape:
            raise ValueError(
                "BlockMask wants kv_block_indices (Bm, Hm, n_q_blocks, max_kept) and kv_block_counts "
                f"(Bm, Hm, n_q_blocks), got {tuple(idx.shape)} and {tuple(cnt.shape)}"
            )
        if cnt.shape[2] != self.n_q_blocks:
            raise ValueError(
                f"BlockMask has {cnt.shape[2]} query blocks, but seq_len {self.seq_len} with q_block_size "
                f"{self.q_block_size} needs {self.n_q_blocks}"
            )
        if idx.shape[3] > self.n_kv_blocks:
            raise ValueError(f"BlockMask keeps up to {idx.shape[3]} key blocks per row, more than {self.n_kv_blocks}")
        for name in ("permutation", "kv_permutation"):
            perm = getattr(self, name)
            if perm is not None and (perm.dim() not in (1, 3) or perm.shape[-1] != self.seq_len):
                raise ValueError(
                    f"BlockMask.{name} must have shape ({self.seq_len},) or (batch or 1, heads or 1, {self.seq_len}), "
                    f"got {tuple(perm.shape)}"
                )
        if self.kv_permutation is not None and self.permutation is None:
            raise ValueError("BlockMask.kv_permutation needs a (query) permutation")
        partial, boxes = self.kv_block_partial, self.token_boxes
        if (partial is None) != (boxes is None):
            raise ValueError("BlockMask.kv_block_partial and BlockMask.token_boxes go together (both or neither)")
        if partial is not None:
            if partial.dtype != torch.bool or partial.shape != idx.shape:
                raise ValueError(f"BlockMask.kv_block_partial must be bool {tuple(idx.shape)} like kv_block_indices, "
                                 f"got {partial.dtype} {tuple(partial.shape)}")
            if not isinstance(boxes, TokenBoxes) or boxes.seq_len != self.seq_len:
                raise ValueError(f"BlockMask.token_boxes must be TokenBoxes over {self.seq_len} tokens, got {boxes!r}")
            if self.per_head_order:
                raise ValueError("BlockMask.token_boxes take one shared token order; this mask has per-head orders")

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def n_q_blocks(self) -> int:
        return math.ceil(self.seq_len / self.q_block_size)

    @property
    def n_kv_blocks(self) -> int:
        return math.ceil(self.seq_len / self.kv_block_size)

    @property
    def block_size(self) -> int | tuple[int, int]:
        """The block size, or (q_block_size, kv_block_size) when they differ."""
        if self.q_block_size == self.kv_block_size:
            return self.q_block_size
        return (self.q_block_size, self.kv_block_size)

    @property
    def device(self) -> torch.device:
        return self.kv_block_indices.device

    @property
    def per_head_order(self) -> bool:
        """Whether queries (or keys) are ordered per batch entry and head, or keys apart from queries: the kernels'
        dispatch then gathers q, k, v into the blocked order itself (`kernels.block_sparse_attention`)."""
        return self.kv_permutation is not None or (self.permutation is not None and self.permutation.dim() == 3)

    def orders(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query order, key order), each (Pb, Ph, seq_len) int64: the natural order, `permutation` and
        `kv_permutation` as per-head orders (a shared one as (1, 1, seq_len))."""
        natural = torch.arange(self.seq_len, device=self.device)
        q_order = natural if self.permutation is None else self.permutation.to(self.device).long()
        k_order = q_order if self.kv_permutation is None else self.kv_permutation.to(self.device).long()
        return tuple(x if x.dim() == 3 else x.view(1, 1, -1) for x in (q_order, k_order))

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        """`build()`, computed once per `key` and kept with this mask (dropped with it): what a backend derives from
        the mask and would otherwise recompute per call. Keys name what is kept, e.g. `("on_device", "cuda:0")`."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def in_blocked_order(self) -> "BlockMask":
        """The same kept blocks with no permutation: the mask a kernel runs on q, k, v already gathered into the
        blocked order (kept with this mask, built once)."""
        return self.cached("in_blocked_order", lambda: BlockMask(
            self.kv_block_indices, self.kv_block_counts, self.seq_len, self.q_block_size, self.kv_block_size,
            rows_all_kept=self.rows_all_kept,
        ))

    @property
    def has_token_boxes(self) -> bool:
        """Whether some kept blocks are masked inside (`kv_block_partial`, `token_boxes`)."""
        return self.token_boxes is not None

    @property
    def density(self) -> float:
        """Fraction of (query, key) token pairs kept, counting the short tail blocks at their true size.

        With in-block masking, partial blocks count whole: this is the fraction of pairs the kernel visits (its work);
        the allowed fraction, `to_dense().double().mean()`, is smaller."""
        return float(self.kept_fraction)

    @property
    def kept_fraction(self) -> torch.Tensor:
        """`density` as a 0-dim fp64 tensor on the mask's device, with no host sync (per-call statistics)."""
        q_sizes = _block_sizes(self.seq_len, self.q_block_size, self.device)
        k_sizes = _block_sizes(self.seq_len, self.kv_block_size, self.device)
        pairs = (self.to_block_dense().double() * q_sizes[:, None] * k_sizes[None, :]).sum(dim=(-1, -2))
        return pairs.mean() / (self.seq_len**2)

    def check_fits(self, batch: int, heads: int, seq_len: int) -> None:
        """Raise ValueError unless this mask serves a call of `batch` x `heads` over `seq_len` tokens."""
        if self.seq_len != seq_len:
            raise ValueError(f"mask was built for seq_len {self.seq_len} video tokens, but this call has S={seq_len}")
        mask_batch, mask_heads = self.kv_block_counts.shape[:2]
        if mask_heads not in (1, heads):
            raise ValueError(f"mask has {mask_heads} heads; q has {heads} (a mask needs 1 or {heads})")
        if mask_batch not in (1, batch):
            raise ValueError(f"mask has batch {mask_batch}; q has {batch} (a mask needs 1 or {batch})")
        for name in ("permutation", "kv_permutation"):
            perm = getattr(self, name)
            if perm is not None and perm.dim() == 3 and (perm.shape[0] not in (1, batch) or perm.shape[1] not in (1, heads)):
                raise ValueError(f"mask's {name} is {tuple(perm.shape)}; q has batch {batch}, {heads} heads "
                                 "(each needs 1 or the call's)")

    # ---- conversions -------------------------------------------------------------------------------------------
    def to_block_dense(self) -> torch.Tensor:
        """Bool (Bm, Hm, n_q_blocks, n_kv_blocks): True where a key block is kept."""
        idx, cnt = self.kv_block_indices.long(), self.kv_block_counts
        valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
        dense = torch.zeros(*idx.shape[:3], self.n_kv_blocks + 1, dtype=torch.bool, device=idx.device)
        # Padding entries are sent to a spare column that is dropped afterwards.
        dense.scatter_(-1, torch.where(valid, idx, self.n_kv_blocks), True)
        return dense[..., : self.n_kv_blocks]

    def to_block_partial(self) -> torch.Tensor:
        """Bool (Bm, Hm, n_q_blocks, n_kv_blocks): True where a kept block is masked inside (all False without
        in-block masking)."""
        if self.kv_block_partial is None:
            return torch.zeros(*self.kv_block_counts.shape, self.n_kv_blocks, dtype=torch.bool, device=self.device)
        idx, cnt = self.kv_block_indices.long(), self.kv_block_counts
        flagged = (torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]) & self.kv_block_partial
        dense = torch.zeros(*idx.shape[:3], self.n_kv_blocks + 1, dtype=torch.bool, device=idx.device)
        dense.scatter_(-1, torch.where(flagged, idx, self.n_kv_blocks), True)
        return dense[..., : self.n_kv_blocks]

    def to_dense(self) -> torch.Tensor:
        """Bool (Bm, Hm, seq_len, seq_len) in the natural token order: True where query i may attend to key j."""
        block = self.to_block_dense()
        q_of = torch.arange(self.seq_len, device=self.device) // self.q_block_size
        k_of = torch.arange(self.seq_len, device=self.device) // self.kv_block_size
        dense = block[..., q_of, :][..., k_of]
        if self.token_boxes is not None:
            partial = self.to_block_partial()[..., q_of, :][..., k_of]
            dense = dense & (~partial | self.token_boxes.to(self.device).allows())
        if self.per_head_order:
            q_order, k_order = self.orders()
            lead = torch.broadcast_shapes(dense.shape[:2], q_order.shape[:2], k_order.shape[:2])
            q_inverse = inverse_order(q_order).expand(*lead, -1)  # (B*, H*, S)
            k_inverse = inverse_order(k_order).expand(*lead, -1)
            dense = dense.expand(*lead, -1, -1)
            dense = dense.gather(2, q_inverse[..., :, None].expand(-1, -1, -1, self.seq_len))
            return dense.gather(3, k_inverse[..., None, :].expand(-1, -1, self.seq_len, -1))
        if self.permutation is not None:
            inverse = inverse_order(self.permutation.to(self.device))
            dense = dense[..., inverse, :][..., inverse]
        return dense

    @classmethod
    def from_block_dense(
        cls,
        block_dense: torch.Tensor,
        seq_len: int,
        q_block_size: int = 128,
        kv_block_size: int | None = None,
        permutation: torch.Tensor | None = None,
        block_partial: torch.Tensor | None = None,
        token_boxes: TokenBoxes | None = None,
    ) -> "BlockMask":
        """Build from a bool (n_q, n_k), (H, n_q, n_k) or (B, H, n_q, n_k) block map; `block_partial`, a bool map of
        the same shape, flags the kept blocks `token_boxes` masks inside."""
        kv_block_size = q_block_size if kv_block_size is None else kv_block_size
        if block_dense.dtype != torch.bool:
            raise ValueError(f"block_dense must be a bool tensor, got {block_dense.dtype}")
        if not 2 <= block_dense.dim() <= 4:
            raise ValueError(f"block_dense must have 2 to 4 dims, got shape {tuple(block_dense.shape)}")
        while block_dense.dim() < 4:
            block_dense = block_dense.unsqueeze(0)
        n_q, n_k = math.ceil(seq_len / q_block_size), math.ceil(seq_len / kv_block_size)
        if tuple(block_dense.shape[-2:]) != (n_q, n_k):
            raise ValueError(
                f"block_dense ends in {tuple(block_dense.shape[-2:])}, but seq_len {seq_len} with blocks "
                f"({q_block_size}, {kv_block_size}) needs ({n_q}, {n_k})"
            )
        counts = block_dense.sum(-1, dtype=torch.int32)
        fewest, most = (int(x) for x in torch.stack(torch.aminmax(counts)).tolist())  # one host sync for both
        max_kept = max(most, 1)
        # A stable descending sort on the bool map puts kept columns first, in ascending order.
        order = torch.sort(block_dense.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :max_kept]
        kept = torch.arange(max_kept, device=block_dense.device) < counts[..., None]
        indices = torch.where(kept, order, 0).to(torch.int32)
        partial = None
        if block_partial is not None:
            if block_partial.dtype != torch.bool or block_partial.shape[-2:] != block_dense.shape[-2:]:
                raise ValueError(f"block_partial must be a bool map like block_dense {tuple(block_dense.shape)}, "
                                 f"got {block_partial.dtype} {tuple(block_partial.shape)}")
            while block_partial.dim() < 4:
                block_partial = block_partial.unsqueeze(0)
            block_partial = block_partial.expand_as(block_dense)
            partial = (block_partial.gather(-1, order) & kept).contiguous()
        return cls(indices.contiguous(), counts.contiguous(), seq_len, q_block_size, kv_block_size, permutation,
                   partial, token_boxes, rows_all_kept=fewest > 0)

    @classmethod
    def full(
        cls, seq_len: int, q_block_size: int = 128, kv_block_size: int | None = None, device="cpu"
    ) -> "BlockMask":
        """Every query block keeps every key block: dense attention through the sparse path."""
        kv_block_size = q_block_size if kv_block_size is None else kv_block_size
        n_q, n_k = math.ceil(seq_len / q_block_size), math.ceil(seq_len / kv_block_size)
        return cls.from_block_dense(
            torch.ones(n_q, n_k, dtype=torch.bool, device=device), seq_len, q_block_size, kv_block_size
        )

    def to(self, device) -> "BlockMask":
        device = torch.device(device)
        if self.device == device:
            return self
        perm = None if self.permutation is None else self.permutation.to(device)
        partial = None if self.kv_block_partial is None else self.kv_block_partial.to(device)
        boxes = None if self.token_boxes is None else self.token_boxes.to(device)
        kv_perm = None if self.kv_permutation is None else self.kv_permutation.to(device)
        return BlockMask(
            self.kv_block_indices.to(device),
            self.kv_block_counts.to(device),
            self.seq_len,
            self.q_block_size,
            self.kv_block_size,
            perm,
            partial,
            boxes,
            kv_perm,
            self.rows_all_kept,
        )

    def __repr__(self) -> str:
        bm, hm, n_q, max_kept = self.kv_block_indices.shape
        return (
            f"BlockMask(seq_len={self.seq_len}, block_size={self.block_size}, batch={bm}, heads={hm}, "
            f"n_q_blocks={n_q}, max_kept={max_kept}, permuted={self.permutation is not None}"
            + (", per-head order" if self.per_head_order else "")
            + (f", token_boxes={self.token_boxes.axes} axes" if self.token_boxes is not None else "")
            + ")"
        )


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The inverse of token orders (..., S) int64 (`inverse[..., order[..., i]] = i`): one scatter, not a sort."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _block_sizes(seq_len: int, block_size: int, device) -> torch.Tensor:
    """Tokens in each block, the last one short when seq_len is not a multiple."""
    n = math.ceil(seq_len / block_size)
    sizes = torch.full((n,), float(block_size), dtype=torch.float64, device=device)
    sizes[-1:].fill_(seq_len - (n - 1) * block_size)  # a fill, not a copy from the host: no sync on a GPU
    return sizes
