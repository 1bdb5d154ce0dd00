"""`dit-sparse app`: the Gradio app (`dit_sparse.app.ui`), dense and sparse side by side. Needs the `app` extra."""

from __future__ import annotations

import argparse
import tempfile

from dit_sparse.eval.render import check_output_dir
from dit_sparse.eval.runner import DEFAULT_WARMUP_STEPS
from dit_sparse.pipelines.models import MODEL_HELP, check_model

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_app_arguments(app: argparse.ArgumentParser) -> None:
    """Add the `app` command's own arguments to its parser (`dit_sparse.cli` adds --device, --dtype, --fps,
    --threads)."""
    app.add_argument("--model", default=None, help=f"the model box's initial value: {MODEL_HELP}")
    app.add_argument("--host", default=DEFAULT_HOST, help=f"address to serve on (default {DEFAULT_HOST}; 0.0.0.0: all)")
    app.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    app.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    app.add_argument(
        "--cache-dir", default=None,
        help="rendered videos (the dense ones reused across methods) and their manifest (default: a new temp folder)",
    )  # fmt: skip
    app.add_argument(
        "--warmup-steps", type=int, default=DEFAULT_WARMUP_STEPS,
        help=f"steps of the untimed warm-up before each timed render (default {DEFAULT_WARMUP_STEPS}; 0: none)",
    )  # fmt: skip
    app.set_defaults(run=run_app)


def run_app(args: argparse.Namespace) -> int:
    check_model(args.model)
    if args.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {args.warmup_steps}")
    if not 0 < args.port < 65536:
        raise ValueError(f"port must be in 1..65535, got {args.port}")
    try:
        from dit_sparse.app.ui import build_app, launch
    except ImportError as exc:
        raise ValueError(f"the app needs gradio: pip install 'dit-sparse[app]' ({exc})") from exc
    cache_dir = check_output_dir(args.cache_dir or tempfile.mkdtemp(prefix="dit-sparse-app-"), "--cache-dir")
    demo = build_app(model=args.model, device=args.device, dtype=args.dtype, cache_dir=cache_dir,
                     warmup_steps=args.warmup_steps, fps=args.fps)  # fmt: skip
    print(f"dit-sparse app: http://{args.host}:{args.port} (videos cached in {cache_dir})", flush=True)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0
