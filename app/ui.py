"""The Gradio app (`dit-sparse app`): one prompt rendered dense and sparse from the same seed, side by side.

Layout only: every step is a library function the CLI uses too. The settings are checked by `render.make_job` (through
`make_config`: a bad value is its ValueError, shown in the page); the model is checked by `models.check_model` and
loaded by `models.load_pipeline` (the tiny trained model, the random one with a visible note while it is absent); the
videos are rendered, timed and cached by `runner.render_cached` (the dense one, `runner.BASELINE`, is diffusers'
own attention with no dit-sparse hooks: the reference, as in `dit-sparse eval`); fidelity is `eval.metrics` (PSNR,
SSIM on the lossless frames); the mask is `patterns.build_mask` at the sparse render's layout, drawn by `plot_mask`.

- The method's options are built from its config dataclass (`CONFIGS[method]`): ints and floats as numbers, bools
  as checkboxes, fields with `metadata["choices"]` as dropdowns, everything else (tuples, optional values) as text
  parsed by `render.parse_option_value` ("7,24,48"; empty: the method's default). A new method appears unchanged.
- The dense video is cached on disk per (model, prompt, seed, frames, size, steps, guidance, device, dtype), so
  switching methods renders only the sparse one; a cached video keeps the seconds measured when it was rendered.
  Each render that is not cached follows an untimed warm-up call (`warmup_steps`), as in `dit-sparse eval`.
- One job at a time (`queue(default_concurrency_limit=1)`, the render event in one concurrency group): one
  pipeline on one device. For N GPUs run N apps, one per GPU (`--device cuda:i --port P+i`), behind a load balancer.
- The mask: static methods (`dense`, `radial`, `random`, `neighborhood`) use one mask in every sparse layer and step,
  `vdit` one per layer; dynamic methods (`draft`, `reorder`) estimate theirs from q and k in every call, so no single
  mask stands for the render and none is drawn (a note says so).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import threading

import gradio as gr

from dit_sparse.eval import metrics, render, runner
from dit_sparse.eval.suites import tiny_suite
from dit_sparse.layout import VideoLayout
from dit_sparse.patterns import CONFIGS, build_mask, is_per_layer, is_static, make_config
from dit_sparse.pipelines import models
from dit_sparse.plot import plot_mask
from dit_sparse.video import write_mp4

# ---- defaults: the demo's (render.DEFAULT_*, render.DEMO_PROMPT): the tiny trained model's size and steps.
DEFAULT_METHOD = render.DEFAULT_METHOD
BLOCK_SIZE = render.DEMO_BLOCK_SIZE  # the app's default for every method with a `block_size` option
EXAMPLES = 6  # example prompts: the first captions of the `tiny` suite (the tiny model's vocabulary)
OPTION_PREFIX = "option_"  # API parameter names of the method options: option_<field> (a method may have a `seed`)
GENERAL_INPUTS = ("prompt", "model", "method", "frames", "height", "width", "steps", "seed", "guidance", "layer",
                  "head", "cache")  # fmt: skip


# ---- method options from the config dataclasses ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OptionField:
    """One option name across the methods: how it is edited (`kind`), its choices, and which methods have it."""

    name: str
    kind: str  # "choice", "bool", "int", "float" or "text"
    choices: tuple = ()
    methods: tuple[str, ...] = ()


def _kind(field: dataclasses.Field) -> str:
    if field.metadata.get("choices"):
        return "choice"
    type_name = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return type_name if type_name in ("bool", "int", "float") else "text"


def option_fields() -> list[OptionField]:
    """Every option of every method in `CONFIGS`, one entry per name (a name whose kind differs between methods is
    edited as text)."""
    fields: dict[str, OptionField] = {}
    for method, config_cls in CONFIGS.items():
        for field in dataclasses.fields(config_cls):
            kind, choices = _kind(field), tuple(field.metadata.get("choices", ()))
            known = fields.get(field.name)
            if known is not None and (known.kind, known.choices) != (kind, choices):
                kind, choices = "text", ()
            methods = (known.methods if known else ()) + (method,)
            fields[field.name] = OptionField(field.name, kind, choices, methods)
    return list(fields.values())


def default_value(method: str, option: OptionField):
    """What the option's input shows for `method`: the config's default (block size: the app's), text as text."""
    field = {f.name: f for f in dataclasses.fields(CONFIGS[method])}[option.name]
    value = field.default if field.default is not dataclasses.MISSING else None
    if option.name == "block_size" and option.kind == "int":
        value = BLOCK_SIZE
    if option.kind != "text":
        return value
    if value is None:
        return ""
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def option_help(config_cls, name: str) -> str | None:
    """The line documenting `name` in the config's docstring (or a parent's): "- `name`: what it does"."""
    for cls in config_cls.__mro__:
        match = re.search(rf"^\s*- [^:\n]*`{name}`[^:\n]*:\s*(.+)$", cls.__doc__ or "", re.MULTILINE)
        if match:
            return match.group(1).strip()
    return None


def option_values(method: str, given: dict) -> dict:
    """The options of `method` from the inputs' values (`given`: name -> value); an empty text keeps the default."""
    options = {}
    for option in option_fields():
        if method not in option.methods or option.name not in given:
            continue
        value = given[option.name]
        if option.kind == "text":
            value = (value or "").strip()
            if not value:
                continue
            value = render.parse_option_value(value)
        elif value is None:
            continue
        options[option.name] = value
    return options


def _option_input(option: OptionField, method: str):
    config_cls = CONFIGS[option.methods[0]]
    common = dict(label=option.name, info=option_help(config_cls, option.name), visible=method in option.methods,
                  elem_id=f"option-{option.name}")  # fmt: skip
    # Hidden inputs start at the default their methods share (an API call for another method passes them as they
    # are); where the defaults differ (`tile`: vdit's is None), at "" / None: each method's own default.
    defaults = {repr(default_value(name, option)) for name in option.methods}
    if method in option.methods:
        value = default_value(method, option)
    elif len(defaults) == 1:
        value = default_value(option.methods[0], option)
    else:
        value = "" if option.kind == "text" else None
    if option.kind == "choice":
        return gr.Dropdown(choices=list(option.choices), value=value, **common)
    if option.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if option.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if option.kind == "int" else None, **common)
    return gr.Textbox(value=value, placeholder="default" if value == "" else None, **common)


# ---- rendering ---------------------------------------------------------------------------------------------------
class Renderer:
    """The app's one pipeline (loaded on first use, replaced when another model is asked for) and its cache folder."""

    def __init__(self, device: str, dtype: str, cache_dir: str, warmup_steps: int, fps: float):
        self.device, self.dtype, self.cache_dir = device, dtype, os.path.abspath(cache_dir)
        self.warmup_steps, self.fps = warmup_steps, fps
        self.video_dir = os.path.join(self.cache_dir, "mp4")
        self._model, self._pipe = None, None
        self._lock = threading.Lock()

    def pipeline(self, model: str | None):
        if self._pipe is None or self._model != model:
            self._pipe, self._model = None, None  # free the old one first
            self._pipe = models.load_pipeline(model, self.device, self.dtype, progress_bar=True)
            self._model = model
        return self._pipe

    def mp4(self, job: render.RenderJob, frames) -> str:
        """The job's frames as an H.264 mp4 for the page (written once per video)."""
        os.makedirs(self.video_dir, exist_ok=True)
        name = runner.frames_file(job, self.device, self.dtype).removesuffix(".npy") + ".mp4"
        path = os.path.join(self.video_dir, name)
        return path if os.path.isfile(path) else write_mp4(frames, path, self.fps)

    def compare(self, prompt, model_name, method, settings: dict, options: dict, progress=None) -> dict:
        """Dense (cached) and `method` from the same seed: their mp4s, rows, and the fidelity of sparse to dense."""
        model = models.check_model(None if model_name in (None, "") else model_name.strip())
        label, note = models.resolve_model_label(model)
        job = render.make_job(prompt, {**settings, "method": method, "options": options}, label)
        dense_job = dataclasses.replace(job, method=runner.BASELINE, options={}, stack={})
        with self._lock:
            if progress is not None:
                progress(0, desc=f"loading {label}")
            pipe = self.pipeline(model)
            dense, dense_row, dense_cached = runner.render_cached(
                pipe, dense_job, self.device, self.dtype, self.cache_dir, self.warmup_steps)
            sparse, sparse_row, sparse_cached = runner.render_cached(
                pipe, job, self.device, self.dtype, self.cache_dir, self.warmup_steps)  # fmt: skip
        layers, heads = attention_shape(pipe)
        return {
            "job": job, "model_note": note, "layers": layers, "heads": heads, "dense_video": self.mp4(dense_job, dense),
            "sparse_video": self.mp4(job, sparse), "dense": dense_row, "sparse": sparse_row,
            "dense_cached": dense_cached, "sparse_cached": sparse_cached,
            "speedup": dense_row["seconds"] / sparse_row["seconds"], "psnr": metrics.psnr(dense, sparse),
            "ssim": metrics.ssim(dense, sparse),
        }  # fmt: skip


def attention_shape(pipe) -> tuple[int, int | None]:
    """How many self-attention layers dit-sparse hooks in `pipe`, and their heads (None where the module does not say):
    the layers and heads the mask view may show."""
    from dit_sparse.pipelines.adapters import find_adapter, transformers_of

    sites = [site for module in transformers_of(pipe) for site in find_adapter(module).attention_sites(module)]
    layers = max((site.layer for site in sites), default=-1) + 1
    return layers, getattr(sites[0].module, "heads", None) if sites else None


def mask_view(state: dict | None, layer, head):
    """The block-mask figure of the sparse render's method for `layer` and `head`, and a note (Markdown)."""
    if not state:
        return None, "Generate to see the mask."
    if state.get("layout") is None or state.get("config") is None:
        return None, "No mask: the render recorded no layout."
    try:
        layer, head = int(layer or 0), int(head or 0)
        if layer < 0 or head < 0:
            raise ValueError(f"layer and head must be >= 0, got layer={layer}, head={head}")
        for name, value, count in (("layer", layer, state.get("layers")), ("head", head, state.get("heads"))):
            if count is not None and value >= count:
                raise ValueError(f"{name} must be in 0..{count - 1} (the model has {count} self-attention {name}s), "
                                 f"got {value}")
        config = make_config(state["method"], **state["config"])
        layout = VideoLayout(*state["layout"])
        if not (is_static(config) or is_per_layer(config)):
            return None, (f"No mask drawn: `{config.method}` estimates its mask from q and k in every attention call "
                          "(per layer, head and refresh), so no single mask stands for the render.")  # fmt: skip
        mask = build_mask(layout, config, layer=layer)
        figure = plot_mask(mask, layout, head=head)
    except ValueError as exc:
        return None, f"No mask: {exc}"
    notes = [f"`{config.method}` at {layout.frames} x {layout.height} x {layout.width} tokens, layer {layer}, head "
             f"{head}" + ("" if is_per_layer(config) else " (the same mask in every sparse layer and head)") + "."]
    if layer < config.dense_layers:
        notes.append(f"Layer {layer} runs dense (`dense_layers={config.dense_layers}`); this is the sparse layers' "
                     "mask.")
    if config.dense_steps:
        notes.append(f"The first {config.dense_steps} step(s) run dense (`dense_steps`).")
    return figure, " ".join(notes)


def _seconds(row: dict, cached: bool) -> str:
    when = f", cached from {row['rendered_at']}" if cached else ""
    per_step = f" ({row['seconds_per_step']:.3f} s/step)" if row.get("seconds_per_step") else ""
    return f"{row['seconds']:.2f} s{per_step}{when}"


def summary(result: dict, device: str) -> str:
    """The Markdown under the videos: settings, timings, density, fidelity and notes."""
    job, dense, sparse = result["job"], result["dense"], result["sparse"]
    tokens = render.wan_video_tokens(job.frames, job.height, job.width)
    psnr = "identical" if math.isinf(result["psnr"]) else f"{result['psnr']:.2f} dB"
    lines = [
        f"**{job.method}** against **dense** (diffusers' own attention, no dit-sparse), model `{job.model}`, "
        f"{job.frames} frames at {job.width}x{job.height} px ({tokens} video tokens), {job.steps} steps, seed "
        f"{job.seed}, {device}.",
        "",
        f"- dense: {_seconds(dense, result['dense_cached'])}",
        f"- {job.method}: {_seconds(sparse, result['sparse_cached'])}, density {sparse['density']:.3f}",
        f"- speedup {result['speedup']:.2f}x; PSNR {psnr}, SSIM {result['ssim']:.4f} against dense",
        f"- options: `{', '.join(f'{k}={v}' for k, v in (sparse['config'] or job.options).items())}`",
    ]
    if result["model_note"]:
        lines += ["", f"> {result['model_note']}"]
    if not device.startswith("cuda"):
        lines += ["", "> CPU: attention runs on the PyTorch reference path, so the timings show the machinery, not "
                      "dit-sparse's GPU speed (see benchmarks/results)."]  # fmt: skip
    return "\n".join(lines)


# ---- the page ----------------------------------------------------------------------------------------------------
def build_app(
    model: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str = "app-cache",
    warmup_steps: int = runner.DEFAULT_WARMUP_STEPS,
    fps: float = render.DEFAULT_FPS,
) -> gr.Blocks:
    """The app's Blocks (queued: one render at a time); `model` is the model box's initial value (None: tiny)."""
    renderer = Renderer(device, dtype, cache_dir, warmup_steps, fps)
    options = option_fields()
    examples = [p.prompt for p in tiny_suite().prompts[:EXAMPLES]]

    with gr.Blocks(title="dit-sparse: dense vs sparse attention") as demo:
        gr.Markdown("## dit-sparse: dense and sparse attention side by side\nOne prompt, one seed: diffusers' "
                    "own attention (dense) and a dit-sparse method, with timings, fidelity and the block mask.")
        mask_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=340):
                prompt = gr.Textbox(label="prompt", value=render.DEMO_PROMPT, lines=2, elem_id="prompt")
                gr.Examples(examples=[[p] for p in examples], inputs=[prompt], label="tiny-model captions")
                with gr.Row():
                    model_box = gr.Textbox(label="model", value=model or models.TINY, elem_id="model", min_width=120,
                                           info="tiny, tiny-random, a diffusers folder or a hub id")
                    method = gr.Dropdown(choices=list(CONFIGS), value=DEFAULT_METHOD, label="method", elem_id="method",
                                         info="dit-sparse's attention for the sparse video", min_width=120)
                with gr.Row():
                    frames = gr.Number(value=render.DEFAULT_FRAMES, precision=0, label="frames", info="4k+1",
                                       min_width=70, elem_id="frames")
                    height = gr.Number(value=render.DEFAULT_HEIGHT, precision=0, label="height", info="x16 px",
                                       min_width=70, elem_id="height")
                    width = gr.Number(value=render.DEFAULT_WIDTH, precision=0, label="width", info="x16 px",
                                      min_width=70, elem_id="width")
                with gr.Row():
                    steps = gr.Number(value=render.DEFAULT_STEPS, precision=0, label="steps", min_width=70,
                                      elem_id="steps")
                    seed = gr.Number(value=render.DEFAULT_SEED, precision=0, label="seed", min_width=70, elem_id="seed")
                    guidance = gr.Number(value=render.DEFAULT_GUIDANCE, label="guidance", min_width=70,
                                         elem_id="guidance")
                cache_box = gr.Textbox(label="step cache", value="", elem_id="cache", placeholder="none",
                                       info="stacked on the method: first_block, taylorseer, pab, cache-dit; "
                                            "options after colons (first_block:threshold=0.1)")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("method options", open=True):
                    option_inputs = [_option_input(option, DEFAULT_METHOD) for option in options]
            with gr.Column(scale=2):
                with gr.Row():
                    dense_video = gr.Video(label="dense", autoplay=True, loop=True, elem_id="dense-video")
                    sparse_video = gr.Video(label="sparse", autoplay=True, loop=True, elem_id="sparse-video")
                with gr.Row():
                    dense_seconds = gr.Number(label="dense s", interactive=False)
                    sparse_seconds = gr.Number(label="sparse s", interactive=False)
                    speedup = gr.Number(label="speedup", interactive=False, elem_id="speedup")
                    density = gr.Number(label="density", interactive=False)
                    psnr = gr.Number(label="PSNR dB", interactive=False, elem_id="psnr")
                    ssim = gr.Number(label="SSIM", interactive=False)
                report = gr.Markdown("Press **Generate**.", elem_id="summary")
                with gr.Row():
                    mask_plot = gr.Plot(label="block mask", scale=3)
                    with gr.Column(scale=1, min_width=160):
                        layer = gr.Number(value=0, precision=0, minimum=0, label="mask layer", elem_id="layer")
                        head = gr.Number(value=0, precision=0, minimum=0, label="mask head", elem_id="head")
                        mask_note = gr.Markdown()

        def show_method(name):
            return [gr.update(visible=name in o.methods, **({"value": default_value(name, o)} if name in o.methods
                                                              else {})) for o in options]  # fmt: skip

        def generate(*args):
            values = GENERATE_SIGNATURE.bind(*args).arguments
            progress = values.pop("progress")
            given = {name.removeprefix(OPTION_PREFIX): value for name, value in values.items()
                     if name.startswith(OPTION_PREFIX)}  # fmt: skip
            settings = {name: values[name] for name in ("frames", "height", "width", "steps", "seed", "guidance")}
            settings["stack"] = {"cache": (values["cache"] or "").strip() or None}
            try:
                result = renderer.compare(values["prompt"], values["model"], values["method"], settings,
                                          option_values(values["method"], given), progress)  # fmt: skip
            except Exception as exc:  # a bad setting, a model that fails to load, a failed render: shown, app serves on
                message = " ".join(str(exc).split()) or type(exc).__name__
                raise gr.Error(message, duration=None, print_exception=False) from exc
            state = {"method": values["method"], "config": result["sparse"]["config"],
                     "layout": result["sparse"]["layout"], "layers": result["layers"], "heads": result["heads"]}
            figure, note = mask_view(state, values["layer"], values["head"])
            psnr_value = None if math.isinf(result["psnr"]) else round(result["psnr"], 3)
            return (result["dense_video"], result["sparse_video"], round(result["dense"]["seconds"], 3),
                    round(result["sparse"]["seconds"], 3), round(result["speedup"], 3),
                    round(result["sparse"]["density"], 4), psnr_value, round(result["ssim"], 5),
                    summary(result, device), figure, note, state)  # fmt: skip

        # The handler's signature names the API parameters (`option_<field>` for the method options) and places
        # gradio's progress tracker, which follows the pipeline's tqdm bar.
        GENERATE_SIGNATURE = inspect.Signature(
            [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in GENERAL_INPUTS]
            + [inspect.Parameter(OPTION_PREFIX + o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for o in options]
            + [inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=gr.Progress(track_tqdm=True))]
        )  # fmt: skip
        generate.__signature__ = GENERATE_SIGNATURE

        method.change(show_method, inputs=[method], outputs=option_inputs, api_visibility="private")
        generate_button.click(
            generate,
            inputs=[prompt, model_box, method, frames, height, width, steps, seed, guidance, layer, head, cache_box,
                    *option_inputs],
            outputs=[dense_video, sparse_video, dense_seconds, sparse_seconds, speedup, density, psnr, ssim, report,
                     mask_plot, mask_note, mask_state],
            api_name="generate",
            concurrency_id="render",
        )  # fmt: skip
        for box in (layer, head):
            box.change(mask_view, inputs=[mask_state, layer, head], outputs=[mask_plot, mask_note],
                       api_visibility="private")  # fmt: skip
    demo.queue(default_concurrency_limit=1)
    demo.dit_sparse_cache_dir = renderer.cache_dir  # launch() must allow serving the mp4s from there
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False):
    """Serve `demo` (blocks until interrupted); errors show in the page."""
    demo.launch(server_name=host, server_port=port, share=share, show_error=True,
                allowed_paths=[demo.dit_sparse_cache_dir])  # fmt: skip
