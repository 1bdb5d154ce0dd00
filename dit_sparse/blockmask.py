"""`BlockMask`: which key blocks each query block attends to, as index lists every backend can read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


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
      e.g. `VideoLayout.tile_permutation`; None means the natural order.

    Bm and Hm are 1 when the mask is shared over the batch or the heads. A query block with no kept key block gets a
    zero output.
    """

    kv_block_indices: torch.Tensor
    kv_block_counts: torch.Tensor
    seq_len: int
    q_block_size: int = 128
    kv_block_size: int = 128
    permutation: torch.Tensor | None = None

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
        if self.permutation is not None and tuple(self.permutation.shape) != (self.seq_len,):
            raise ValueError(
                f"BlockMask.permutation must have shape ({self.seq_len},), got {tuple(self.permutation.shape)}"
            )

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
    def density(self) -> float:
        """Fraction of (query, key) token pairs kept, counting the short tail blocks at their true size."""
        q_sizes = _block_sizes(self.seq_len, self.q_block_size, self.device)
        k_sizes = _block_sizes(self.seq_len, self.kv_block_size, self.device)
        pairs = (self.to_block_dense().double() * q_sizes[:, None] * k_sizes[None, :]).sum(dim=(-1, -2))
        return float(pairs.mean() / (self.seq_len**2))

    def check_fits(self, batch: int, heads: int, seq_len: int) -> None:
        """Raise ValueError unless this mask serves a call of `batch` x `heads` over `seq_len` tokens."""
        if self.seq_len != seq_len:
            raise ValueError(f"mask was built for seq_len {self.seq_len} video tokens, but this call has S={seq_len}")
        mask_batch, mask_heads = self.kv_block_counts.shape[:2]
        if mask_heads not in (1, heads):
            raise ValueError(f"mask has {mask_heads} heads; q has {heads} (a mask needs 1 or {heads})")
        if mask_batch not in (1, batch):
            raise ValueError(f"mask has batch {mask_batch}; q has {batch} (a mask needs 1 or {batch})")

    # ---- conversions -------------------------------------------------------------------------------------------
    def to_block_dense(self) -> torch.Tensor:
        """Bool (Bm, Hm, n_q_blocks, n_kv_blocks): True where a key block is kept."""
        idx, cnt = self.kv_block_indices.long(), self.kv_block_counts
        valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
        dense = torch.zeros(*idx.shape[:3], self.n_kv_blocks + 1, dtype=torch.bool, device=idx.device)
        # Padding entries are sent to a spare column that is dropped afterwards.
        dense.scatter_(-1, torch.where(valid, idx, self.n_kv_blocks), True)
        return dense[..., : self.n_kv_blocks]

    def to_dense(self) -> torch.Tensor:
        """Bool (Bm, Hm, seq_len, seq_len) in the natural token order: True where query i may attend to key j."""
        block = self.to_block_dense()
        q_of = torch.arange(self.seq_len, device=self.device) // self.q_block_size
        k_of = torch.arange(self.seq_len, device=self.device) // self.kv_block_size
        dense = block[..., q_of, :][..., k_of]
        if self.permutation is not None:
            inverse = torch.argsort(self.permutation.to(self.device))
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
    ) -> "BlockMask":
        """Build from a bool (n_q, n_k), (H, n_q, n_k) or (B, H, n_q, n_k) block map."""
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
        max_kept = max(int(counts.max()), 1)
        # A stable descending sort on the bool map puts kept columns first, in ascending order.
        order = torch.sort(block_dense.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :max_kept]
        kept = torch.arange(max_kept, device=block_dense.device) < counts[..., None]
        indices = torch.where(kept, order, 0).to(torch.int32)
        return cls(indices.contiguous(), counts.contiguous(), seq_len, q_block_size, kv_block_size, permutation)

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
        return BlockMask(
            self.kv_block_indices.to(device),
            self.kv_block_counts.to(device),
            self.seq_len,
            self.q_block_size,
            self.kv_block_size,
            perm,
        )

    def __repr__(self) -> str:
        bm, hm, n_q, max_kept = self.kv_block_indices.shape
        return (
            f"BlockMask(seq_len={self.seq_len}, block_size={self.block_size}, batch={bm}, heads={hm}, "
            f"n_q_blocks={n_q}, max_kept={max_kept}, permuted={self.permutation is not None})"
        )


def _block_sizes(seq_len: int, block_size: int, device) -> torch.Tensor:
    """Tokens in each block, the last one short when seq_len is not a multiple."""
    n = math.ceil(seq_len / block_size)
    sizes = torch.full((n,), float(block_size), dtype=torch.float64, device=device)
    sizes[-1] = seq_len - (n - 1) * block_size
    return sizes
