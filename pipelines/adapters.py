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
    """`layout`, once the packed latents' (B, N, C) N tokens are checked to be its grid and extra tokens exactly;
    `source` names where the grid came from, for the error."""
    if hidden_states.shape[1] != layout.video_len + layout.extra_len:
        raise ValueError(f"{model} hidden_states have {hidden_states.shape[1]} tokens, but {source} make "
                         f"{layout.video_len + layout.extra_len}")
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
def _raster_grid(frames: int, height: int, width: int) -> torch.Tensor:
    """(frames * height * width, 3) int64 (frame, row, column) of each token of the grid, in raster order."""
    axes = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack(axes, dim=-1).reshape(-1, 3)


def _image_ids_layout(family: str, position: int) -> Callable[[torch.nn.Module, tuple, dict], VideoLayout]:
    """The image tokens as `frames` x height x width from `img_ids` (argument `position`): (N, 3) = (frame, row,
    column) per token for FLUX.1, (N, 4) = (frame, row, column, layer) for FLUX.2, whose layer axis is 0.

    FLUX packs its latents (B, N, C), so the grid is only in the position ids: one frame for a text-to-image call,
    two for Kontext with a reference image of the output's size (its ids carry frame 1). Reference images that do
    not continue the grid (FLUX.1 Kontext's of another size, FLUX.2's at frames 10, 20, ...) follow the image's
    frame-0 tokens: they are the layout's extra tokens (suffix), attended like joint text. Reads the ids on the host
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
        source = f"img_ids {tuple(img_ids.shape)}"
        if not layered and torch.equal(ids, _raster_grid(frames, height, width)):
            return _filled(family, hidden_states, VideoLayout(frames, height, width), source)
        image_len = int((ids[:, 0] == 0).cumprod(0).sum())  # the leading frame-0 tokens: the image itself
        height, width = (int(ids[:image_len, axis].max()) + 1 if image_len else 0 for axis in (1, 2))
        if layered or image_len == 0 or not torch.equal(ids[:image_len], _raster_grid(1, height, width)) or bool(
            (ids[image_len:, 0] == 0).any()
        ):
            raise ValueError(
                f"{family} {source} are not the image's tokens on one height x width grid at frame 0 in raster order "
                "followed by any reference images' at other frames, or are layered (a layer axis not 0); dit-sparse "
                "needs the image tokens on one grid"
            )
        extra_len = ids.shape[0] - image_len  # the reference images' tokens, after the image's
        return _filled(family, hidden_states, VideoLayout(1, height, width, extra_len=extra_len,
                                                          extra_position="suffix"), source)

    return layout


_NO_RADIAL_ON_IMAGES = {
    "radial": "radial attention decays with the distance between frames, and an image is one frame (its mask would "
    "be dense); use 'random' or 'dense' (spatial methods such as 'neighborhood' fit images)",
}

FLUX = TransformerAdapter(
    family="flux",
    # FluxPipeline, FluxImg2ImgPipeline, FluxKontextPipeline (a reference image of the output's size is a second
    # frame; of another size, extra tokens), ...
    class_names=("FluxTransformer2DModel",),
    attention_sites=_sites(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
    layout=_image_ids_layout("FLUX", 4),
    timestep=_timestep_argument(3),
    text_position="prefix",
    unsupported_methods=_NO_RADIAL_ON_IMAGES,
)

FLUX2 = TransformerAdapter(
    family="flux2",
    # Flux2Pipeline and Flux2KleinPipeline, text to image and image editing: the reference images' tokens follow the
    # image's, at frames 10, 20, ...: the layout's extra tokens, attended like joint text.
    class_names=("Flux2Transformer2DModel",),
    attention_sites=_sites(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
    layout=_image_ids_layout("FLUX.2", 3),
    timestep=_timestep_argument(2),
    text_position="prefix",
    unsupported_methods=_NO_RADIAL_ON_IMAGES,
)


# ---- Qwen-Image ---------------------------------------------------------------------------------------------------
def _qwen_image_layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
    """The image tokens as the first (frames, height, width) shape of `img_shapes` (the same for every sample); the
    tokens of the shapes after it (the edit pipelines' reference images) are extra tokens after the image's."""
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
    if not sample or any(len(shape) != 3 for shape in sample):
        raise ValueError(
            f"Qwen-Image img_shapes {img_shapes!r} differ between samples or are not (frames, height, width) "
            "shapes; dit-sparse needs every sample's image tokens on one grid"
        )
    extra_len = sum(frames * height * width for frames, height, width in sample[1:])
    layout = VideoLayout(*sample[0], extra_len=extra_len, extra_position="suffix" if extra_len else None)
    return _filled("Qwen-Image", hidden_states, layout, f"img_shapes {img_shapes!r}")


QWEN_IMAGE = TransformerAdapter(
    family="qwen_image",
    # QwenImagePipeline, its Img2Img, Inpaint and ControlNet variants (one image per sample), and the Edit
    # pipelines (their reference images: extra tokens after the image's, attended like joint text); the joint
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
def _grid_arguments_layout(model: str, first: int, supported: str, conditioning: str | None = None,
                           coords_layout: Callable[[torch.Tensor, torch.Tensor], VideoLayout] | None = None):
    """The layout of a transformer whose packed latents (B, N, C) come with int `num_frames`, `height`, `width`
    arguments (positions `first`, +1, +2): the token grid, which the N tokens must fill exactly. Without them,
    `coords_layout(hidden_states, video_coords)` reads the layout from the tokens' coordinates, where the family's
    conditioning pipeline passes those instead; a family without one refuses `conditioning`'s video_coords."""

    def layout(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> VideoLayout:
        hidden_states = _argument(args, kwargs, "hidden_states", 0)  # (B, N, C) packed latents
        names = ("num_frames", "height", "width")
        sizes = tuple(_argument(args, kwargs, name, first + i) for i, name in enumerate(names))
        video_coords = kwargs.get("video_coords")
        if coords_layout is not None and all(size is None for size in sizes) and video_coords is not None:
            return coords_layout(hidden_states, video_coords)
        if any(not isinstance(size, int) for size in sizes):
            if coords_layout is not None:
                raise ValueError(f"{model} transformer called with neither int num_frames, height and width (got "
                                 f"{sizes}) nor video_coords; dit-sparse supports {supported}")
            raise ValueError(
                f"{model} transformer called without int num_frames, height and width (got {sizes}); dit-sparse "
                f"supports {supported}, not video_coords conditioning ({conditioning}), whose extra tokens do not "
                "form a grid"
            )
        return _filled(model, hidden_states, VideoLayout(*sizes), f"num_frames x height x width {sizes}")

    return layout


def _ltx_coords_layout(hidden_states: torch.Tensor, video_coords: torch.Tensor) -> VideoLayout:
    """LTXConditionPipeline's layout from `video_coords` (B, 3, N), the (frame, row, column) coordinates of each
    token: its conditioning tokens (images or videos at frame_index > 0, coordinates from that frame on) come first,
    then the video's grid, whose frame coordinates start at 0. The grid is the run of tokens after the last fall of
    the frame coordinate, checked to be a frames x height x width raster; the tokens before it are extra (prefix).
    Reads the coordinates on the host (one small copy per forward)."""
    if not isinstance(video_coords, torch.Tensor) or video_coords.dim() != 3 or video_coords.shape[1] != 3:
        raise ValueError(f"LTX-Video video_coords must be (B, 3, N); got "
                         f"{getattr(video_coords, 'shape', type(video_coords).__name__)}")
    coords = video_coords[0].detach().to("cpu", torch.float64).T  # (N, 3): one sample's, as CFG repeats them
    falls = (coords[1:, 0] < coords[:-1, 0]).nonzero()
    start = int(falls[-1]) + 1 if len(falls) else 0  # the first grid token
    grid = coords[start:]
    values = [torch.unique(grid[:, axis]) for axis in range(3)]  # sorted: each axis's coordinates
    sizes = tuple(len(axis_values) for axis_values in values)
    raster = torch.stack(torch.meshgrid(*values, indexing="ij"), dim=-1).reshape(-1, 3)
    if raster.shape != grid.shape or not torch.equal(raster, grid):
        raise ValueError(
            f"LTX-Video video_coords {tuple(video_coords.shape)}: the tokens after the conditioning tokens (the last "
            f"{grid.shape[0]}) do not form a frames x height x width grid in raster order; dit-sparse needs the video "
            "tokens on one grid, after any conditioning tokens"
        )
    layout = VideoLayout(*sizes, extra_len=start, extra_position="prefix" if start else None)
    return _filled("LTX-Video", hidden_states, layout, f"video_coords {tuple(video_coords.shape)}")


LTX_VIDEO = TransformerAdapter(
    family="ltx_video",
    # LTXPipeline, LTXImageToVideoPipeline (num_frames, height, width) and LTXConditionPipeline (video_coords: its
    # conditioning tokens before the video's are extra tokens, attended like joint text).
    class_names=("LTXVideoTransformer3DModel",),
    attention_sites=_sites(("transformer_blocks", "attn1")),  # attn2 is cross-attention to the text
    layout=_grid_arguments_layout("LTX-Video", 4, "LTXPipeline, LTXImageToVideoPipeline and LTXConditionPipeline",
                                  coords_layout=_ltx_coords_layout),
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
