"""Model adapters: a declarative description of where a transformer's self-attention is and what its tokens are.

An adapter does not copy any diffusers processor code. It names the self-attention modules (with their block
index, for `dense_layers`), derives the video part of the token layout from the transformer's forward arguments,
says where the joint text tokens sit and how the family passes their padding, and reads the denoising timestep so
the step counter can follow CFG's two calls per step. The text length itself is not the adapter's business: the
interceptor sees the sequence length S of each attention call, and the text is the S - video_len tokens beyond the
video.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from diffusers.utils.torch_utils import unwrap_module

from dit_sparse.layout import TEXT_POSITIONS, VideoLayout

#: How a family passes the joint text's padding to its attention call.
#: - None: no mask at all (a mask seen in an attention call is an error).
#: - "key_padding": a bool mask (B or 1, 1, 1 or S, S), True where a key may be attended; every video key is True,
#:   so the mask is the text's key padding. A (B, 1, S, S) mask is an outer product of one validity vector (its
#:   video rows are that vector); its padded text rows are all False, where SDPA gives zeros (or, on some backends,
#:   NaN) and dit-sparse the attention over the valid keys: rows no valid token ever reads.
ATTENTION_MASKS = (None, "key_padding")


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module: its qualified name, the module, and its transformer block index."""

    name: str
    module: torch.nn.Module
    layer: int


@dataclass(frozen=True)
class TransformerAdapter:
    """How to sparsify one family of transformers.

    - `class_names`: the diffusers transformer classes it covers.
    - `attention_sites(transformer)`: the self-attention modules to hook (cross-attention stays untouched), numbered
      by block in execution order (dual-stream blocks first, then single-stream blocks).
    - `layout(transformer, args, kwargs)`: the video tokens of this forward call (`text_len` 0).
    - `timestep(args, kwargs)`: the denoising timestep of this call (a tensor), or None.
    - `text_position`: where the joint text sits in each self-attention sequence (`"prefix"`, `"suffix"`), or None
      when the self-attention sees video tokens only.
    - `attention_mask`: how the family passes the text padding, one of `ATTENTION_MASKS`.
    - `default_options`: per method name, option values this family uses when the user did not set them
      (`sparsify(pipe, "radial")` on HunyuanVideo uses `variant="hunyuan"`); a config object is taken as given.
    - `unsupported_methods`: per method name, why it does not apply to this family (raised by `sparsify`).
    - `skips_attention(kwargs)`: whether a self-attention module's call with these keyword arguments legitimately
      makes no attention call (LTX-2's spatio-temporal guidance passes the values through in its perturbed blocks);
      None: every call attends, and one that does not is an error (an attention backend that bypasses SDPA).
    """

    family: str
    class_names: tuple[str, ...]
    attention_sites: Callable[[torch.nn.Module], list[AttentionSite]]
    layout: Callable[[torch.nn.Module, tuple, dict], VideoLayout]
    timestep: Callable[[tuple, dict], Any]
    text_position: str | None = None
    attention_mask: str | None = None
    default_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    unsupported_methods: Mapping[str, str] = field(default_factory=dict)
    skips_attention: Callable[[dict], bool] | None = None

    def __post_init__(self):
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")
        if self.attention_mask not in ATTENTION_MASKS:
            raise ValueError(f"attention_mask must be one of {ATTENTION_MASKS}, got {self.attention_mask!r}")
        object.__setattr__(self, "default_options", MappingProxyType(dict(self.default_options)))
        object.__setattr__(self, "unsupported_methods", MappingProxyType(dict(self.unsupported_methods)))

    def matches(self, transformer: torch.nn.Module) -> bool:
        return type(transformer).__name__ in self.class_names


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _sites(*block_lists: tuple[str, str]) -> Callable[[torch.nn.Module], list[AttentionSite]]:
    """Sites `<blocks>.<i>.<attention>` for each (blocks, attention) name pair, layers numbered across the lists."""

    def attention_sites(transformer: torch.nn.Module) -> list[AttentionSite]:
        sites: list[AttentionSite] = []
        for blocks_name, attention_name in block_lists:
            for i, block in enumerate(getattr(transformer, blocks_name)):
                name = f"{blocks_name}.{i}.{attention_name}"
                sites.append(AttentionSite(name, getattr(block, attention_name), len(sites)))
        return sites

    return attention_sites


def _timestep_argument(position: int) -> Callable[[tuple, dict], Any]:
    def timestep(args: tuple, kwargs: dict):
        return _argument(args, kwargs, "timestep", position)

    return timestep


def _latents(family: str, args: tuple, kwargs: dict, order: str) -> torch.Tensor:
    hidden_states = _argument(args, kwargs, "hidden_states", 0)  # 5-D latents, axes named by `order`
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        raise ValueError(
            f"{family} transformer called without 5-D hidden_states ({order}); got "
            f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}"
        )
    return hidden_states


def _filled(model: str, hidden_states: torch.Tensor, layout: VideoLayout, source: str) -> VideoLayout:
    """`layout`, once the packed latents' (B, N, C) N tokens are checked to fill its grid exactly; `source` names
    where the grid came from, for the error."""
    if hidden_states.shape[1] != layout.video_len:
        raise ValueError(
            f"{model} hidden_states have {hidden_states.shape[1]} tokens, but {source} make {layout.video_len}"
        )
    return layout


def _patched(sizes: tuple[int, int, int], patch: tuple[int, int, int]) -> VideoLayout:
    """The token grid of latents of (frames, height, width) `sizes` cut into (t, h, w) `patch`es, floored as the
    transformers' own patch embedding and RoPE do."""
    return VideoLayout(*(size // p for size, p in zip(sizes, patch)))


# ---- Wan 2.1 / 2.2 ----------------------------------------------------------------------------------------------
def _wan_layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    _, _, frames, height, width = _latents("Wan", args, kwargs, "B, C, F, H, W").shape
    return _patched((frames, height, width), tuple(transformer.config.patch_size))


WAN = TransformerAdapter(
    family="wan",
    # WanTransformer3DModel serves Wan 2.1 T2V/I2V and both Wan 2.2 experts (transformer, transformer_2). The Wan
    # architecture's derivatives with the same blocks and latents: ChronoEdit (image editing through video frames)
    # and SkyReels-V2 (T2V, I2V, diffusion forcing; its asynchronous mode's block-causal attention mask is refused
    # as any mask is where the adapter expects none), and Wan-Animate (its latents carry the reference frame first
    # and the pose in extra channels, on the same grid; the face adapters' cross-attention to the motion features
    # lies outside `blocks` and stays dense).
    class_names=("WanTransformer3DModel", "ChronoEditTransformer3DModel", "SkyReelsV2Transformer3DModel",
                 "WanAnimateTransformer3DModel"),
    attention_sites=_sites(("blocks", "attn1")),
    layout=_wan_layout,
    timestep=_timestep_argument(1),
)

WAN_VACE = TransformerAdapter(
    family="wan_vace",
    class_names=("WanVACETransformer3DModel",),
    # The VACE blocks run first, each over the control tokens (padded to the video's token count, so on the video's
    # grid); then the main blocks over the video.
    attention_sites=_sites(("vace_blocks", "attn1"), ("blocks", "attn1")),
    layout=_wan_layout,
    timestep=_timestep_argument(1),
)


# ---- HunyuanVideo, HunyuanVideo 1.5 -----------------------------------------------------------------------------
def _hunyuan_layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    _, _, frames, height, width = _latents("HunyuanVideo", args, kwargs, "B, C, F, H, W").shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    return _patched((frames, height, width), (p_t, p, p))


HUNYUAN_VIDEO = TransformerAdapter(
    family="hunyuan_video",
    # HunyuanVideoPipeline and HunyuanVideoImageToVideoPipeline (both image conditions: latent concat, token replace).
    class_names=("HunyuanVideoTransformer3DModel",),
    # Dual-stream blocks: video and text projected apart, attended jointly; single-stream: one joint sequence.
    attention_sites=_sites(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
    layout=_hunyuan_layout,
    timestep=_timestep_argument(1),
    text_position="suffix",
    attention_mask="key_padding",  # (B, 1, 1, S): the prompt's padding
    default_options={"radial": {"variant": "hunyuan"}},
)

HUNYUAN_VIDEO_15 = TransformerAdapter(
    family="hunyuan_video_15",
    class_names=("HunyuanVideo15Transformer3DModel",),
    attention_sites=_sites(("transformer_blocks", "attn")),
    layout=_hunyuan_layout,
    timestep=_timestep_argument(1),
    text_position="suffix",  # [valid image, ByT5, LLM tokens; their padding] after the video
    attention_mask="key_padding",  # (B, 1, S, S), the outer product of the token validity
    default_options={"radial": {"variant": "hunyuan"}},
)


# ---- CogVideoX 2B / 5B / 1.5 ------------------------------------------------------------------------------------
def _cogvideox_layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    _, frames, _, height, width = _latents("CogVideoX", args, kwargs, "B, F, C, H, W").shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t or 1  # p_t: None (1.0) or 2 (1.5)
    return _patched((frames, height, width), (p_t, p, p))


COGVIDEOX = TransformerAdapter(
    family="cogvideox",
    # CogVideoX 2B/5B and 1.5, T2V and I2V: the processor calls F.scaled_dot_product_attention directly; CFG batches
    # both branches into one call.
    class_names=("CogVideoXTransformer3DModel",),
    attention_sites=_sites(("transformer_blocks", "attn1")),
    layout=_cogvideox_layout,
    timestep=_timestep_argument(2),
    text_position="prefix",  # all max_text_seq_length tokens, padding attended as in the original model
)


# ---- FLUX.1 (and Kontext), FLUX.2 ---------------------------------------------------------------------------------
def _image_ids_layout(family: str, position: int) -> Callable[[torch.nn.Module, tuple, dict], VideoLayout]:
    """The image tokens as `frames` x height x width from `img_ids` (argument `position`): (N, 3) = (frame, row,
    column) per token for FLUX.1, (N, 4) = (frame, row, column, layer) for FLUX.2, whose layer axis is 0.

    FLUX packs its latents (B, N, C), so the grid is only in the position ids: one frame for a text-to-image call,
    two for Kontext with a reference image of the output's size (its ids carry frame 1). Reads the ids on the host
    (one small copy per forward).
    """

    def layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
        hidden_states = _argument(args, kwargs, "hidden_states", 0)  # (B, N, C) packed latents
        img_ids = _argument(args, kwargs, "img_ids", position)
        if not isinstance(img_ids, torch.Tensor) or img_ids.dim() not in (2, 3) or img_ids.shape[-1] not in (3, 4):
            raise ValueError(
                f"{family} transformer called without img_ids (N, 3) or (N, 4); got "
                f"{getattr(img_ids, 'shape', type(img_ids).__name__)}"
            )
        ids = (img_ids[0] if img_ids.dim() == 3 else img_ids).detach().to("cpu", torch.int64)
        layered = ids.shape[-1] == 4 and bool((ids[:, 3] != 0).any())
        ids = ids[:, :3]
        frames, height, width = (int(ids[:, axis].max()) + 1 for axis in range(3))
        layout = VideoLayout(frames, height, width)
        grid = torch.stack(
            torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij"), dim=-1
        ).reshape(-1, 3)
        if layered or ids.shape != grid.shape or not torch.equal(ids, grid):
            raise ValueError(
                f"{family} img_ids ({tuple(img_ids.shape)}) do not form a frames x height x width grid in raster order "
                f"with one token each (reference images: FLUX.1 Kontext's of another size than the output, or "
                f"FLUX.2's, placed at frames 10, 20, ...); dit-sparse needs the image tokens on one {frames} x "
                f"{height} x {width} grid"
            )
        return _filled(family, hidden_states, layout, f"img_ids {tuple(img_ids.shape)}")

    return layout


_NO_RADIAL_ON_IMAGES = {
    "radial": "radial attention decays with the distance between frames, and an image is one frame (its mask would "
    "be dense); use 'random' or 'dense' (spatial methods such as 'neighborhood' fit images)",
}

FLUX = TransformerAdapter(
    family="flux",
    # FluxPipeline, FluxImg2ImgPipeline, FluxKontextPipeline (reference image of the output's size), ...
    class_names=("FluxTransformer2DModel",),
    attention_sites=_sites(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
    layout=_image_ids_layout("FLUX", 4),
    timestep=_timestep_argument(3),
    text_position="prefix",
    unsupported_methods=_NO_RADIAL_ON_IMAGES,
)

FLUX2 = TransformerAdapter(
    family="flux2",
    # Flux2Pipeline and Flux2KleinPipeline, text to image. Their reference images (image editing) are tokens of other
    # sizes after the image's, at frames 10, 20, ...: no grid, refused by the layout with a clear error.
    class_names=("Flux2Transformer2DModel",),
    attention_sites=_sites(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
    layout=_image_ids_layout("FLUX.2", 3),
    timestep=_timestep_argument(2),
    text_position="prefix",
    unsupported_methods=_NO_RADIAL_ON_IMAGES,
)


# ---- Qwen-Image ---------------------------------------------------------------------------------------------------
def _qwen_image_layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    """The image tokens as the one (frames, height, width) shape of `img_shapes` (the same for every sample)."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)  # (B, N, C) packed latents
    img_shapes = _argument(args, kwargs, "img_shapes", 4)
    try:  # a list of [(frames, height, width), ...] per sample, or (the ControlNet pipelines) of one shape per sample
        shapes = {tuple(tuple(int(size) for size in shape) for shape in
                        ([sample] if all(isinstance(size, int) for size in sample) else sample))
                  for sample in img_shapes}
    except (TypeError, ValueError):
        raise ValueError(f"Qwen-Image transformer called without img_shapes (a list of [(frames, height, width)] per "
                         f"sample); got {img_shapes!r}") from None
    sample = next(iter(shapes)) if len(shapes) == 1 else ()  # every sample's shapes, when they agree
    if len(sample) != 1 or len(sample[0]) != 3:
        raise ValueError(
            f"Qwen-Image img_shapes {img_shapes!r} name more than one image per sample (the edit pipelines' reference "
            "images, or layers) or differ between samples; dit-sparse needs the image tokens on one grid"
        )
    return _filled("Qwen-Image", hidden_states, VideoLayout(*sample[0]), f"img_shapes {img_shapes!r}")


QWEN_IMAGE = TransformerAdapter(
    family="qwen_image",
    # QwenImagePipeline, its Img2Img, Inpaint and ControlNet variants (one image per sample); the joint
    # attention mask the processor builds from the prompt's padding is a key-padding mask over text and image.
    class_names=("QwenImageTransformer2DModel",),
    attention_sites=_sites(("transformer_blocks", "attn")),
    layout=_qwen_image_layout,
    timestep=_timestep_argument(3),
    text_position="prefix",
    attention_mask="key_padding",
    unsupported_methods=_NO_RADIAL_ON_IMAGES,
)


# ---- LTX-Video, LTX-2 ---------------------------------------------------------------------------------------------
def _grid_arguments_layout(model: str, first: int, supported: str, conditioning: str):
    """The layout of a transformer whose packed latents (B, N, C) come with int `num_frames`, `height`, `width`
    arguments (positions `first`, +1, +2): the token grid, which the N tokens must fill exactly."""

    def layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
        hidden_states = _argument(args, kwargs, "hidden_states", 0)  # (B, N, C) packed latents
        names = ("num_frames", "height", "width")
        sizes = tuple(_argument(args, kwargs, name, first + i) for i, name in enumerate(names))
        if any(not isinstance(size, int) for size in sizes):
            raise ValueError(
                f"{model} transformer called without int num_frames, height and width (got {sizes}); dit-sparse "
                f"supports {supported}, not video_coords conditioning ({conditioning}), whose extra tokens do not "
                "form a grid"
            )
        return _filled(model, hidden_states, VideoLayout(*sizes), f"num_frames x height x width {sizes}")

    return layout


LTX_VIDEO = TransformerAdapter(
    family="ltx_video",
    class_names=("LTXVideoTransformer3DModel",),
    attention_sites=_sites(("transformer_blocks", "attn1")),  # attn2 is cross-attention to the text
    layout=_grid_arguments_layout("LTX-Video", 4, "LTXPipeline and LTXImageToVideoPipeline", "LTXConditionPipeline"),
    timestep=_timestep_argument(2),
)


def _stg_perturbed(kwargs: dict) -> bool:
    """LTX-2's spatio-temporal guidance: in its perturbed blocks a call whose batch is all perturbed returns the
    values without attending (`all_perturbed`, a bool or a 0-d tensor)."""
    return kwargs.get("perturbation_mask") is not None and bool(kwargs.get("all_perturbed"))


LTX2_VIDEO = TransformerAdapter(
    family="ltx2_video",
    # LTX-2 (2.0 to 2.5), audio and video in one transformer: each block's video self-attention is sparsified; the
    # audio's own self-attention (1-D, short), the text and the audio-video cross-attentions stay dense.
    class_names=("LTX2VideoTransformer3DModel",),
    attention_sites=_sites(("transformer_blocks", "attn1")),
    layout=_grid_arguments_layout(
        "LTX-2", 10, "LTX2Pipeline and LTX2ImageToVideoPipeline", "LTX2ConditionPipeline and its keyframe tokens"
    ),
    timestep=_timestep_argument(4),  # (B,) or per video token (B, N): image-to-video's conditioned frames are at 0
    skips_attention=_stg_perturbed,
)


# ---- Mochi --------------------------------------------------------------------------------------------------------
def _mochi_layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    _, _, frames, height, width = _latents("Mochi", args, kwargs, "B, C, F, H, W").shape
    p = transformer.config.patch_size
    return _patched((frames, height, width), (1, p, p))


MOCHI = TransformerAdapter(
    family="mochi",
    class_names=("MochiTransformer3DModel",),
    # Its processor attends one batch element at a time over [video; that prompt's valid tokens] (no padding).
    attention_sites=_sites(("transformer_blocks", "attn1")),
    layout=_mochi_layout,
    timestep=_timestep_argument(2),
    text_position="suffix",
)

#: Registry of adapters, searched in order.
ADAPTERS: list[TransformerAdapter] = [
    WAN, WAN_VACE, HUNYUAN_VIDEO, HUNYUAN_VIDEO_15, COGVIDEOX, FLUX, FLUX2, QWEN_IMAGE, LTX_VIDEO, LTX2_VIDEO,
    MOCHI,
]


def find_adapter(transformer: torch.nn.Module) -> TransformerAdapter | None:
    for adapter in ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    return None


def supported_classes() -> list[str]:
    return sorted(name for adapter in ADAPTERS for name in adapter.class_names)


def transformers_of(obj: Any, *, require_adapter: bool = True) -> list[torch.nn.Module]:
    """The transformer(s) of a pipeline, a transformer, or a list of them (Wan 2.2's two experts); a transformer
    wrapped by `torch.compile` stands for the module it wraps (the hooks go there, and dynamo's guards see them).

    `require_adapter=True`: a pipeline's modules that have an adapter, and a ValueError naming the class where a
    transformer (or every module of a pipeline) has none. `require_adapter=False` (what removal walks): every module
    of a pipeline, a transformer as given, no error. An empty list is a ValueError with `require_adapter`, else [].
    TypeError for anything else."""
    if isinstance(obj, (list, tuple)):
        found = [t for item in obj for t in transformers_of(item, require_adapter=require_adapter)]
        if require_adapter and not found:
            raise ValueError(f"got an empty {type(obj).__name__} {obj!r}: pass a pipeline, a transformer or a "
                             "non-empty list of transformers")
        return found
    if isinstance(obj, torch.nn.Module):
        obj = unwrap_module(obj)
        if require_adapter and find_adapter(obj) is None:
            raise ValueError(
                f"no dit-sparse adapter for transformer class {type(obj).__name__!r}; supported: {supported_classes()}"
            )
        return [obj]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        modules = [unwrap_module(m) for m in components.values() if isinstance(m, torch.nn.Module)]
        found = [m for m in modules if find_adapter(m) is not None]
        if not found and require_adapter:
            classes = sorted({type(m).__name__ for m in modules})
            raise ValueError(
                f"no dit-sparse adapter for pipeline {type(obj).__name__!r} (its modules: {classes}); "
                f"supported transformer classes: {supported_classes()}"
            )
        return found if require_adapter else modules
    raise TypeError(
        f"sparsify takes a diffusers pipeline, a transformer or a list of transformers, got {type(obj).__name__}"
    )
