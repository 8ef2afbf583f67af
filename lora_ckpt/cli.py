"""``lora-ckpt``: one entry point, one subcommand per job. Thin: argument parsing, output, exit codes.

Exit codes: 0 ok, 1 refused input, 2 usage, 3 verification found a difference, 4 hub failure.
Torch is imported only by the subcommands that need it: ``--help`` and ``inspect`` of a
safetensors file start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import LoraCkptError

__all__ = ["main"]

EPILOG = """\
examples:
  lora-ckpt inspect adapter_model.safetensors
  lora-ckpt inspect llama-3-8b/ --json
  lora-ckpt demo fixtures/demo

exit codes: 0 ok, 1 refused input, 2 usage error, 3 verification found a difference, 4 hub failure
"""

Handler = Callable[[argparse.Namespace], int]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .report import format_report, inspect_checkpoint

    rep = inspect_checkpoint(args.src)
    print(json.dumps(rep.to_json(), indent=2) if args.json else format_report(rep))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print(run_demo(args.fixture))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-ckpt", description="The exact, verified bridge for LoRA checkpoints.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="what a checkpoint holds (tensors, dtypes, LoRA modules)",
                       description="Summarise a checkpoint file or directory: tensor count, dtypes, "
                                   "parameters and LoRA modules, from safetensors headers only.",
                       epilog="example: lora-ckpt inspect adapter_model.safetensors --json")
    p.add_argument("src", help="a .safetensors/.pt/.bin file or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("demo", help="stock checkpoint -> LoRA model (strict), one training step",
                       description="Load the shipped stock checkpoint strict=True into a LoRA-injected "
                                   "model, check outputs match, take one training step.",
                       epilog="example: lora-ckpt demo fixtures/demo")
    p.add_argument("fixture", nargs="?", default="fixtures/demo", help="directory with params.json and "
                   "consolidated.safetensors (default: fixtures/demo)")
    p.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
                        stream=sys.stderr)
    if args.quiet:
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.handler(args)
    except LoraCkptError as e:
        if args.debug:
            raise
        print(f"lora-ckpt {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lora-ckpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
