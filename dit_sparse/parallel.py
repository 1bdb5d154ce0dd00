"""Sparse attention under diffusers' context parallelism (Ulysses): one video across several GPUs.

diffusers splits the token sequence across ranks (`ContextParallelConfig`, the transformer's `_cp_plan`); at each
attention call its Ulysses all-to-all (`TemplatedUlyssesAttention`) gives every rank the full sequence for a slice
of the heads, then calls the native backend's `scaled_dot_product_attention`, which dit-sparse intercepts as on one
GPU. Three things differ there, handled here:

- **heads**: rank r holds heads `[r * H_local, (r + 1) * H_local)` of the module's H (`UlyssesShard`); a mask with
  one row per head takes this rank's rows (`mask_for_heads`), and per-head settings of a profile this rank's
  entries (`config_for_heads`). A mask shared by all heads needs nothing.
- **token order**: the gathered sequence is the ranks' local sequences one after another. Each rank holds its
  equal share of the video and of the joint text, so with text the order is [video_0; text_0; video_1; text_1; ...]
  (text after, or before, each share as the family puts it); `gathered_order` gives the permutation to the
  natural [video; text] order the layout and the masks assume. Without joint text (Wan) it is the natural order.
- **HunyuanVideo**, which diffusers ships no plan for: `HUNYUAN_VIDEO_CP_PLAN` splits the video and text tokens
  after their embedders and gathers at `proj_out`; its joint attention mask, built inside the transformer's forward
  for the full text, is replaced before each block by this rank's share (`_LocalTextMaskHook`).

`enable_context_parallel(pipe, ContextParallelConfig(ulysses_degree=N))` applies diffusers' `enable_parallelism`
with the right plan to each transformer of a pipeline; `sparsify` works before or after it. Ring attention
(`ring_degree > 1`) and `ulysses_anything` are not supported with sparse attention (an error says so).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from dit_sparse.blockmask import BlockMask
from dit_sparse.config import MethodConfig
from dit_sparse.layout import VideoLayout
from dit_sparse.pipelines.adapters import transformers_of

LOCAL_TEXT_MASK_HOOK = "dit_sparse.cp_local_text_mask"
TEXT_MASK_SOURCE_HOOK = "dit_sparse.cp_text_mask_source"


@dataclass(frozen=True)
class UlyssesShard:
    """This rank's place in the Ulysses group: `rank` in [0, `world`)."""

    rank: int
    world: int

    def head_offset(self, local_heads: int) -> int:
        """The first of this rank's heads, when each rank holds `local_heads` of them."""
        return self.rank * local_heads


def ulysses_shard(module: torch.nn.Module, site_name: str) -> UlyssesShard | None:
    """The Ulysses shard an attention module's calls run on (its processor's `_parallel_config`), or None when the
    module does not run context parallel. Raises NotImplementedError for the setups sparse attention cannot serve."""
    processor = getattr(module, "processor", None)
    parallel_config = getattr(processor, "_parallel_config", None)
    config = getattr(parallel_config, "context_parallel_config", None)
    if config is None:
        return None
    if config.ring_degree > 1 or config.ulysses_anything or config.ring_anything:
        raise NotImplementedError(
            f"{site_name}: dit-sparse supports diffusers' Ulysses context parallelism (ContextParallelConfig("
            f"ulysses_degree=N)) only; got ring_degree={config.ring_degree}, ulysses_anything="
            f"{config.ulysses_anything}, ring_anything={config.ring_anything}"
        )
    if config.ulysses_degree <= 1:
        return None
    return UlyssesShard(int(config._ulysses_local_rank), int(config.ulysses_degree))


def gathered_order(layout: VideoLayout, world: int) -> torch.Tensor | None:
    """(S,) int64: for each token of the natural order ([video; text], or [text; video] for a prefix), its index in
    the sequence Ulysses gathers from `world` ranks (each rank's video share, then its text share, or text first);
    None when the two orders agree (no joint text, or one rank)."""
    if world == 1 or layout.text_len == 0:
        return None
    # The extra tokens off the grid come with the video in the transformer's hidden states (a reference image after
    # the image): each rank's share of hidden states holds both, in [video; extra] order.
    video_len, text_len = layout.video_len + layout.extra_len, layout.text_len
    if video_len % world or text_len % world:
        raise ValueError(
            f"context parallel over {world} ranks needs the video ({video_len}) and text ({text_len}) token counts to "
            "divide evenly (diffusers' equal split)"
        )
    video_local, text_local = video_len // world, text_len // world
    chunk = video_local + text_local
    video, text = torch.arange(video_len), torch.arange(text_len)
    text_first = layout.text_position == "prefix"
    video_at = (video // video_local) * chunk + video % video_local + (text_local if text_first else 0)
    text_at = (text // text_local) * chunk + text % text_local + (0 if text_first else video_local)
    return torch.cat([text_at, video_at] if text_first else [video_at, text_at])


def mask_for_heads(mask: BlockMask, offset: int, count: int, total: int) -> BlockMask:
    """`mask` for heads `[offset, offset + count)` of `total`: its rows of those heads when it has one row per head
    of all `total`; as is when shared by the heads (1 row) or already this rank's (`count` rows, estimated from the
    rank's own q and k). The slice is kept with the mask, so kernel caches on it survive between calls."""
    heads = mask.kv_block_counts.shape[1]
    if heads == 1 or (heads == count and heads != total):
        return mask
    if heads != total:
        raise ValueError(f"mask has {heads} heads; the module has {total} ({count} on this rank)")
    rows = slice(offset, offset + count)

    def per_head(x):
        return x if x is None or x.dim() != 3 or x.shape[1] == 1 else x[:, rows].contiguous()

    return mask.cached(("heads", offset, count), lambda: BlockMask(
        mask.kv_block_indices[:, rows].contiguous(), mask.kv_block_counts[:, rows].contiguous(), mask.seq_len,
        mask.q_block_size, mask.kv_block_size, per_head(mask.permutation),
        None if mask.kv_block_partial is None else mask.kv_block_partial[:, rows].contiguous(), mask.token_boxes,
        per_head(mask.kv_permutation), mask.rows_all_kept,
    ))


def config_for_heads(config: MethodConfig, offset: int, count: int) -> MethodConfig:
    """`config` with its per-layer, per-head fields (a profile's `layer_density`, `layer_axes`, `layer_pattern`)
    cut to heads `[offset, offset + count)`; the config itself when it has none."""
    changes = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name.startswith("layer_") and isinstance(value, tuple) and value:
            changes[field.name] = tuple(tuple(row)[offset : offset + count] for row in value)
    return dataclasses.replace(config, **changes) if changes else config


# ---- HunyuanVideo: a context-parallel plan diffusers does not ship ----------------------------------------------
def hunyuan_video_cp_plan() -> dict:
    """Split the video tokens (after `x_embedder`, RoPE to match) and the text tokens (after the token refiner) over
    the ranks; gather the video at `proj_out`. The joint mask is made local by `_LocalTextMaskHook`."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    split_out = ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)
    rope_out = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: rope_out, 1: rope_out},
        "x_embedder": {0: split_out},
        "context_embedder": {0: split_out},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


class _TextMaskSourceHook(ModelHook):
    """On the transformer: keeps each forward's `encoder_attention_mask` (B, T) for the blocks' mask hooks."""

    def __init__(self):
        super().__init__()
        self.text_mask = None

    def pre_forward(self, module, *args, **kwargs):
        mask = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
        self.text_mask = None if mask is None else mask.bool()
        return args, kwargs


class _LocalTextMaskHook(ModelHook):
    """On each block: its `attention_mask` (B, 1, 1, V_local + T_local), built by the forward from the full text's
    valid count, becomes this rank's [all video; its share of the text mask], the layout Ulysses gathers."""

    def __init__(self, source: _TextMaskSourceHook, shard: UlyssesShard):
        super().__init__()
        self.source, self.shard = source, shard

    def pre_forward(self, module, *args, **kwargs):
        args = list(args)
        in_kwargs = "attention_mask" in kwargs
        mask = kwargs["attention_mask"] if in_kwargs else args[3]
        text_mask = self.source.text_mask  # (B, T) over the full text
        if mask is not None and text_mask is not None:
            text_local = text_mask.shape[1] // self.shard.world
            video_local = mask.shape[-1] - text_local
            share = text_mask[:, self.shard.rank * text_local : (self.shard.rank + 1) * text_local]
            video = torch.ones(share.shape[0], video_local, dtype=torch.bool, device=share.device)
            local = torch.cat([video, share.to(share.device)], dim=1)[:, None, None, :]  # (B, 1, 1, V_l + T_l)
            if in_kwargs:
                kwargs["attention_mask"] = local
            else:
                args[3] = local
        return tuple(args), kwargs


def _install_hunyuan_mask_hooks(transformer: torch.nn.Module, shard: UlyssesShard) -> None:
    source = _TextMaskSourceHook()
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(source, TEXT_MASK_SOURCE_HOOK)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            _LocalTextMaskHook(source, shard), LOCAL_TEXT_MASK_HOOK
        )


#: transformer class -> the plan `enable_context_parallel` passes (classes diffusers ships a `_cp_plan` for need none)
CP_PLANS = {"HunyuanVideoTransformer3DModel": hunyuan_video_cp_plan}


def enable_context_parallel(pipe, config) -> object:
    """Run each transformer of `pipe` (a pipeline, a transformer or a list) context parallel with diffusers'
    `enable_parallelism(config=config)`, with dit-sparse's plan where diffusers has none (HunyuanVideo); returns
    `pipe`. Call it in every process of a `torchrun --nproc_per_node N` launch, after `torch.distributed` is
    initialized and the model is on the process's GPU; `config` is a `diffusers.ContextParallelConfig` with
    `ulysses_degree=N` (ring attention is not supported with sparse attention)."""
    from diffusers import ContextParallelConfig

    if not isinstance(config, ContextParallelConfig):
        raise TypeError(f"config must be a diffusers ContextParallelConfig, got {type(config).__name__}")
    if config.ring_degree > 1 or config.ulysses_anything or config.ring_anything:
        raise ValueError(
            f"dit-sparse supports Ulysses context parallelism only (ContextParallelConfig(ulysses_degree=N)); got "
            f"ring_degree={config.ring_degree}, ulysses_anything={config.ulysses_anything}, "
            f"ring_anything={config.ring_anything}"
        )
    for transformer in transformers_of(pipe):
        plan = CP_PLANS.get(type(transformer).__name__)
        own = dataclasses.replace(config)  # each transformer sets up its own mesh on its config
        transformer.enable_parallelism(config=own, cp_plan=None if plan is None else plan())
        if plan is not None and type(transformer).__name__ == "HunyuanVideoTransformer3DModel":
            cp = transformer._parallel_config.context_parallel_config
            _install_hunyuan_mask_hooks(transformer, UlyssesShard(int(cp._ulysses_local_rank), cp.ulysses_degree))
    return pipe
