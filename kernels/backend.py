"""`Backend`: the record each attention backend provides, and the few helpers the records share.

The table of records is `dit_sparse.kernels.REGISTRY` (fastest first, the order `backend="auto"` tries); `auto`, the
errors, `MethodConfig.backend`'s allowed values and `describe_backends()` all read it. A new backend is one module
that defines `BACKEND = Backend(...)` plus its line in that table. A record knows no model and no pattern.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from dit_sparse.blockmask import BlockMask


@functools.lru_cache(maxsize=None)
def import_error(module: str) -> str | None:
    """None when `module` imports, else the error text (tried once per process)."""
    try:
        importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken install raising something else
        return f"{type(error).__name__}: {error}"
    return None


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`: tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The environment switch `name`: one of `choices`, the first when unset or empty; a ValueError otherwise."""
    value = os.environ.get(name, "").strip() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


#: The internal switch for precision="fp8": its PV product in bf16 ("bf16", the default) or in e4m3 ("fp8",
#: per-channel V scales). The Triton kernel and the reference's emulation both read it; benchmarks/attention.py
#: measures both. bf16 PV is the default from that measurement (H100, Wan2.1-1.3B 480p,
#: benchmarks/results/attention-precision-h100-80gb-hbm3-2026-12-08.md): 1.04-1.20x our bf16 kernel where e4m3 PV ran at
#: 0.65-0.81x (not yet profiled; its pre-pass alone takes 0.45 ms against 0.24 ms), with half the error (rel. L2
#: 1.4% against 2.9% on the tiny model's q, k, v).
FP8_PV_ENV = "DIT_SPARSE_FP8_PV"
FP8_PV_CHOICES = ("bf16", "fp8")


def fp8_pv() -> str:
    """The PV operands of precision="fp8": `DIT_SPARSE_FP8_PV` ("bf16", the default, or "fp8")."""
    return _env_choice(FP8_PV_ENV, FP8_PV_CHOICES)


#: The second switch of precision="fp8": its QK product on int8 per-block scales ("int8", the default:
#: SageAttention2's Hopper kernel, qk_int8_pv_fp8; int8 and e4m3 MMAs run at the same rate on Hopper) or on e4m3
#: ("e4m3": 3 mantissa bits, about 4-8% relative L2 error on random inputs, over the 3% the accuracy tests allow).
FP8_QK_ENV = "DIT_SPARSE_FP8_QK"
FP8_QK_CHOICES = ("int8", "e4m3")


def fp8_qk() -> str:
    """The QK operands of precision="fp8": `DIT_SPARSE_FP8_QK` ("int8", the default, or "e4m3")."""
    return _env_choice(FP8_QK_ENV, FP8_QK_CHOICES)


def qk_format(precision: str) -> str:
    """The QK operands' format of a low `precision`: "int8" or "e4m3"."""
    return "int8" if precision == "int8" else fp8_qk()


def write_into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    """`result`, copied into `out` when one is given (a backend's `out=` contract)."""
    if out is None:
        return result
    out.copy_(result)
    return out


@dataclass(frozen=True)
class Backend:
    """One attention backend: where it runs, what it takes, and its calls.

    - `name`: what `backend=` says; `where`, `summary`: one line each for the docs (`describe_backends`).
    - `device_reason(device) -> str | None`: why it cannot run on `device` here (hardware, package); None when it can.
    - `dtypes`: the q/k/v dtypes it takes (None: any floating dtype); `head_dims`: the head dims (None: any).
    - `token_boxes`: whether it masks tokens inside kept blocks (`BlockMask.token_boxes`, e.g. exact windows).
    - `mask_reason(mask, head_dim, device) -> str | None`: why it cannot take this mask's block sizes (None: it can).
    - `attention(q, k, v, mask, scale, extra_k, extra_v, extra_key_valid, out) -> (out, lse)`: the block-sparse call,
      the joint text keys (`extra_k`) continuing each row's softmax; arguments already checked at the public edge,
      the mask on q's device with one shared token order (`kernels.block_sparse_attention` documents the contract).
    - `dense_attention(q, k, v, key_valid, scale, out) -> (out, lse)`: dense attention with key padding (the text
      queries), or None when the backend has none: its text queries run on the first backend `auto` takes that has.
    - `auto_skips_cpu`: why `auto` never takes it on a CPU though it can run there (None: auto may).
    - `precisions`: the `precision=` values it takes (`kernels.PRECISIONS`; "bf16": the inputs' own dtype, no
      quantization); `precision_reason(precision, device, head_dim) -> str | None`: why it cannot run a low
      precision on this device or head_dim (None: it can); `emulates_low_precision`: its low precisions are a
      fake-quantized emulation (the reference: the oracle of the quantized kernels), taken only when named, never
      by `auto`.
    """

    name: str
    where: str
    summary: str
    device_reason: Callable[[torch.device], str | None]
    dtypes: tuple[torch.dtype, ...] | None
    head_dims: tuple[int, ...] | None
    token_boxes: bool
    attention: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    dense_attention: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    mask_reason: Callable[[BlockMask, int | None, torch.device], str | None] | None = None
    auto_skips_cpu: str | None = None
    precisions: tuple[str, ...] = ("bf16",)
    precision_reason: Callable[[str, torch.device, int | None], str | None] | None = None
    emulates_low_precision: bool = False

    def unavailable_reason(
        self,
        device: torch.device,
        dtype: torch.dtype | None = None,
        head_dim: int | None = None,
        mask: BlockMask | None = None,
        precision: str = "bf16",
    ) -> str | None:
        """Why this backend cannot run a call on `device` with this dtype, head_dim, mask and precision; None when it
        can."""
        if precision not in self.precisions:
            return f"the {self.name} backend takes precisions {self.precisions}, got {precision!r}"
        if mask is not None and mask.token_boxes is not None and not self.token_boxes:
            return (f"the {self.name} backend runs whole blocks only, and this mask masks tokens inside blocks "
                    "(token_boxes, e.g. an exact neighborhood window): use triton or reference")
        reason = self.device_reason(device)
        if reason is not None:
            return reason
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f"the {self.name} backend takes dtypes {self.dtypes}, got {dtype}"
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            return f"the {self.name} backend supports head_dim {self.head_dims}, got {head_dim}"
        if precision != "bf16" and self.precision_reason is not None:
            reason = self.precision_reason(precision, device, head_dim)
            if reason is not None:
                return reason
        if mask is not None and self.mask_reason is not None:
            return self.mask_reason(mask, head_dim, device)
        return None
