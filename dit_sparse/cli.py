"""The `dit-sparse` command line (also `python -m dit_sparse`): argparse only.

- `render`: a batch of prompts to H.264 mp4s plus a `manifest.jsonl` row per video, resumable, on one or several
  processes (the render engine, `dit_sparse.eval.render`).
- `demo`: one prompt with the default model, dense then radial (same seed); prints seconds, density
  and the PSNR of radial against dense.
- `eval`: speed and fidelity of methods against the dense baseline over a prompt suite, with a report
  (`dit_sparse.eval`).
- `app`: a Gradio app, dense and sparse side by side with timings, fidelity and the mask (`dit_sparse.app`; the
  `app` extra).

Only the command given is built and imported: `dit-sparse --help` imports neither torch nor the model code.
Every input is checked before any model is loaded; a bad one is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

#: The commands and their one line of help; only the one given is built (`build_parser`), importing what it needs.
COMMANDS = {
    "render": "render prompts to mp4s (resumable)",
    "demo": "dense vs radial on the default model, with PSNR",
    "eval": "speed and fidelity of methods against the dense baseline, with a report",
    "app": "Gradio app: dense and sparse side by side, with timings",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised as ValueError so `main` reports every bad input the same way."""

    def error(self, message):
        raise ValueError(message)


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --fps and --threads: every command has them, with one meaning (`apply_run_settings`)."""
    from dit_sparse.eval.render import DEFAULT_FPS, DTYPES

    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="weights dtype (default: bfloat16 on cuda, float32 otherwise)"
    )
    parser.add_argument("--fps", type=float, default=DEFAULT_FPS, help=f"mp4 frame rate (default {DEFAULT_FPS})")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 gives steadier CPU timings)"
    )


def _add_render_arguments(render: argparse.ArgumentParser) -> None:
    from dit_sparse.pipelines import models
    from dit_sparse.patterns import CONFIGS
    from dit_sparse.eval import render as engine

    render.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    render.add_argument(
        "--prompts", metavar="FILE", help='a .txt (one prompt a line) or .jsonl ({"prompt": ..., overrides}) file'
    )
    render.add_argument("--model", default=None, help=models.MODEL_HELP)
    render.add_argument(
        "--method", default=engine.DEFAULT_METHOD,
        help=f"one of {', '.join(CONFIGS)} (default {engine.DEFAULT_METHOD})",
    )  # fmt: skip
    render.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a method option (repeatable; a,b,c is a tuple, e.g. window=3,4,4)",
    )  # fmt: skip
    render.add_argument("--dense-steps", type=int, default=None, help="first N denoising steps dense")
    render.add_argument("--dense-layers", type=int, default=None, help="first N transformer blocks dense")
    render.add_argument("--backend", default=None, help="kernel backend: auto, fa4, triton or reference")
    render.add_argument("--block-size", type=int, default=None, help="tokens per attention block")
    render.add_argument("--precision", default=None, help="sparse attention arithmetic: bf16, fp8 or int8")
    add_stack_arguments(render)
    render.add_argument(
        "--frames", type=int, default=engine.DEFAULT_FRAMES, help=f"4k+1 (default {engine.DEFAULT_FRAMES})"
    )
    render.add_argument(
        "--height", type=int, default=engine.DEFAULT_HEIGHT, help=f"multiple of 16 (default {engine.DEFAULT_HEIGHT})"
    )
    render.add_argument(
        "--width", type=int, default=engine.DEFAULT_WIDTH, help=f"multiple of 16 (default {engine.DEFAULT_WIDTH})"
    )
    render.add_argument(
        "--steps", type=int, default=engine.DEFAULT_STEPS, help=f"denoising steps (default {engine.DEFAULT_STEPS})"
    )
    render.add_argument(
        "--seed", type=int, default=engine.DEFAULT_SEED, help=f"noise seed (default {engine.DEFAULT_SEED})"
    )
    render.add_argument("--guidance", type=float, default=engine.DEFAULT_GUIDANCE, help="CFG scale")
    render.add_argument("--output-dir", default="renders", help="where mp4s and manifest.jsonl go (default renders/)")
    render.add_argument(
        "--num-processes", type=int, default=1, metavar="N",
        help="render on N processes, one GPU each (launches `accelerate launch --num_processes N`; default 1)",
    )  # fmt: skip
    render.set_defaults(run=engine.run_render)


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """--cache, --fp8, --compile: what `dit_sparse.optimize` stacks on the method (docs/stack.md)."""
    parser.add_argument(
        "--cache", default=None, metavar="NAME[:KEY=VALUE...]",
        help="a step cache: first_block, taylorseer, mag, faster, pab or cache-dit, options after colons "
             "(e.g. first_block:threshold=0.1)",
    )  # fmt: skip
    parser.add_argument("--fp8", action="store_true", help="torchao FP8 linear layers (a GPU with FP8)")
    parser.add_argument("--compile", choices=("regional", "full"), default=None, help="torch.compile the transformer")


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    from dit_sparse.eval import render as engine

    demo.add_argument("--output-dir", default="demo-out", help="where the two mp4s go (default demo-out/)")
    demo.set_defaults(run=engine.run_demo)


def _add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    from dit_sparse.eval.command import add_eval_arguments  # the eval subcommand lives with the eval suite

    add_eval_arguments(evaluate)


def _add_app_arguments(app: argparse.ArgumentParser) -> None:
    from dit_sparse.app.command import add_app_arguments  # the app subcommand lives with the app

    add_app_arguments(app)


_ARGUMENTS = {"render": _add_render_arguments, "demo": _add_demo_arguments, "eval": _add_eval_arguments,
              "app": _add_app_arguments}  # fmt: skip


def command_of(argv: list[str]) -> str | None:
    """The command `argv` names (its first word that is not an option), None when it names none."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """`dit-sparse`'s parser: every command named with its help, the arguments of `command` only (None: of none, as
    `dit-sparse --help` needs), so that parsing imports only that command's code."""
    parser = _Parser(prog="dit-sparse", description="Training-free sparse attention for diffusers video pipelines.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        subparser = commands.add_parser(name, help=help_text)
        if name == command:
            _add_common_arguments(subparser)
            _ARGUMENTS[name](subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `dit-sparse` command line; returns the exit status (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(command_of(argv)).parse_args(argv)
        args.argv = argv
        from dit_sparse.eval.render import apply_run_settings  # torch comes in only once the arguments parse

        apply_run_settings(args)
        return args.run(args)
    except ValueError as exc:
        print(f"dit-sparse: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever raised
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
