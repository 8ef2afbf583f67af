"""``lora-ckpt``: one entry point, one subcommand per job. Thin: argument parsing, output, exit codes.

Exit codes: 0 ok, 1 refused input, 2 usage, 3 verification found a difference, 4 hub failure.
Torch is imported only by the subcommands that need it: ``--help`` and ``inspect`` of a
safetensors file start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .check import TARGETS, check_source
from .errors import LoraCkptError
from .hub.client import pull, resolve_source
from .layouts import layout_names
from .report import format_report, inspect_source

if TYPE_CHECKING:
    import torch

__all__ = ["main"]

EPILOG = """\
examples:
  lora-ckpt inspect adapter_model.safetensors
  lora-ckpt convert peft_adapter/ --to torchtune -o epoch_0/ --base-config llama/config.json
  lora-ckpt verify epoch_0/ peft_adapter/
  lora-ckpt merge llama-3-8b/ adapter/ -o merged/
  lora-ckpt pull my-org/adapter -o adapter/ && lora-ckpt push adapter/ my-org/adapter-peft
  lora-ckpt check adapter/ --for vllm
  lora-ckpt demo fixtures/demo

exit codes: 0 ok, 1 refused input, 2 usage error, 3 verification found a difference, 4 hub failure;
  check: 0 the target will load it and compute the same function, 1 it will not (or SRC is unreadable)
"""

Handler = Callable[[argparse.Namespace], int]
#: the registry's layout names (lora_ckpt.layouts is torch-free: --help stays fast)
LAYOUT_NAMES = layout_names()


def _source(args: argparse.Namespace, value: str, *, layout: str | None = "from") -> str:
    """A local path for ``value``; ``hf://ORG/NAME[@REV][/SUBDIR]`` is downloaded first (only the
    files of ``--from``'s layout, any layout's, or with ``layout="model"`` a base model's)."""
    if value.startswith("hf://"):
        chosen = getattr(args, "from_", None) if layout == "from" else layout
        return str(resolve_source(value, layout=chosen, quiet=args.quiet))
    return value


def _base_config(args: argparse.Namespace) -> str | None:
    value = getattr(args, "base_config", None)
    return _source(args, value, layout=None) if value else None


def _cmd_inspect(args: argparse.Namespace) -> int:
    rep = inspect_source(_source(args, args.src), layout=args.from_, base_config=_base_config(args), alpha=args.alpha,
                         values=args.values)
    print(json.dumps(rep.to_json(), indent=2) if args.json else format_report(rep))
    return 0


def _dtype(name: str | None) -> torch.dtype | None:  # torch imported lazily: --help and inspect stay torch-free
    """``--dtype``: the one dtype parser (bf16, fp16, fp32, the long names)."""
    from .dtypes import parse_dtype  # imports torch once a dtype is given

    return parse_dtype(name)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .conversion import convert  # imports torch: --help and inspect stay torch-free

    res = convert(_source(args, args.src), args.output, to=args.to, from_=args.from_,
                  base_config=_base_config(args), alpha=args.alpha, dtype=_dtype(args.dtype), force=args.force,
                  allow_lossy=args.allow_lossy, verify_output=not args.no_verify, experts=args.experts)
    print(f"converted {res.modules} module(s): {res.source_layout} -> {res.target_layout} at {res.output}")
    for note in res.notes:
        print(f"note: {note}")
    if res.verification is not None:
        print(f"verified: {res.verification.summary()}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .conversion import verify  # imports torch: --help and inspect stay torch-free

    rep = verify(_source(args, args.a), _source(args, args.b), base_config=_base_config(args), alpha=args.alpha,
                 tolerance=args.tolerance)
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
    else:
        print(("OK: " if rep.ok else "DIFFERENT: ") + rep.summary())
    return 0 if rep.ok else 3


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_checkpoint  # imports torch: --help and inspect stay torch-free

    res = merge_checkpoint(_source(args, args.base, layout="model"), _source(args, args.adapter), args.output,
                           dtype=_dtype(args.dtype), max_shard_size=args.max_shard_size, to=args.to,
                           base_config=_base_config(args), alpha=args.alpha, force=args.force,
                           untie=args.untie, progress=not args.quiet)
    print(res.summary())
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    path = pull(args.repo, args.output, revision=args.revision, layout=args.layout, force=args.force,
                quiet=args.quiet)
    print(f"pulled {args.repo} to {path}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub.publish import push  # imports torch: --help and inspect stay torch-free

    res = push(_source(args, args.src), args.repo, to=args.to, private=args.private, branch=args.branch,
               commit_message=args.commit_message, base_config=_base_config(args), base_model=args.base_model,
               alpha=args.alpha, from_=args.from_, quiet=args.quiet)
    print(res)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    rep = check_source(_source(args, args.src), target=args.for_, layout=args.from_, base_config=_base_config(args),
                       alpha=args.alpha)
    print(json.dumps(rep.to_json(), indent=2) if args.json else rep.format())
    return 0 if rep.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # imports torch: --help and inspect stay torch-free

    print(run_demo(args.fixture))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-ckpt", description="The exact, verified bridge for LoRA checkpoints.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"lora-ckpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, source: bool = True) -> None:
        if source:
            p.add_argument("--from", dest="from_", metavar="LAYOUT", choices=LAYOUT_NAMES,
                           help="source layout (default: detected): " + ", ".join(LAYOUT_NAMES))
        p.add_argument("--base-config", metavar="CONFIG", help="base model config.json / params.json (head "
                       "counts and family; needed for torchtune/mistral q/k rows)")
        p.add_argument("--alpha", type=float, help="LoRA alpha for layouts that do not record it (loralib)")

    p = sub.add_parser("inspect", help="what a checkpoint or adapter holds",
                       description="Detect an adapter's layout (and say why) and report its modules, ranks, scales, "
                                   "dtypes and warnings; for a stock checkpoint, tensors, dtypes and parameters. "
                                   "Reads safetensors headers only.",
                       epilog="examples:\n  lora-ckpt inspect adapter_model.safetensors\n"
                              "  lora-ckpt inspect epoch_0/ --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a file or directory (or hf://ORG/NAME[@REV][/SUBDIR])")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--values", action="store_true", help="scan tensor values for NaN/Inf whatever the file size "
                   "(default: files up to 16 MB)")
    common(p)
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("convert", help="convert an adapter between layouts, exactly, and verify it",
                       description="Read SRC in any layout, write it in --to, read the output back and compare "
                                   "every module's update with the source (exit 3 if they differ).",
                       epilog="examples:\n  lora-ckpt convert peft_adapter/ --to torchtune -o epoch_0/ "
                              "--base-config llama/config.json\n  lora-ckpt convert epoch_0/ --to peft -o out/\n"
                              "  lora-ckpt convert lora_state_dict.pt --from loralib --alpha 16 --to peft -o out/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="adapter directory or file (or hf://...)")
    p.add_argument("--to", required=True, choices=LAYOUT_NAMES, help="target layout: " + ", ".join(LAYOUT_NAMES))
    p.add_argument("-o", "--output", required=True, help="output directory, or a .gguf file for --to gguf "
                   "(written atomically)")
    common(p)
    p.add_argument("--dtype", help="cast tensors: bf16, fp16, fp32 (or bfloat16, ...; default: keep the source's)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--allow-lossy", action="store_true", help="drop what the target cannot hold (named in a warning)")
    p.add_argument("--no-verify", action="store_true", help="skip reading the output back")
    p.add_argument("--experts", choices=("keep", "fused", "per-expert"), default="keep",
                   help="MoE expert LoRA in peft/native: as read (default), fused (target_parameters on "
                        "transformers-5 3-D experts) or per-expert (experts.{e}.gate_proj ... modules)")
    p.set_defaults(handler=_cmd_convert)

    p = sub.add_parser("verify", help="do two adapters compute the same update?",
                       description="Compare scale*B@A (DoRA- and fan_in_fan_out-aware) of every module of A and B, "
                                   "in any layouts. Exit 0 only if all agree within the tolerance and cover the same "
                                   "modules; 3 otherwise.",
                       epilog="example: lora-ckpt verify epoch_0/ peft_adapter/ --base-config llama/config.json")
    p.add_argument("a")
    p.add_argument("b")
    common(p, source=False)
    p.add_argument("--tolerance", type=float, help="max relative difference (default 1e-5; 1e-2 for 16-bit)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_verify)

    p = sub.add_parser("merge", help="fold an adapter into a (sharded) base checkpoint, streaming",
                       description="Stream the base checkpoint tensor by tensor, add each module's update in float32, "
                                   "write sharded safetensors with an index, copy the non-weight files.",
                       epilog="example: lora-ckpt merge llama-3-8b/ adapter/ -o merged/ --max-shard-size 5GB")
    p.add_argument("base", help="HF model directory, .safetensors file, or hf://...")
    p.add_argument("adapter", help="adapter in any layout (or hf://...)")
    p.add_argument("-o", "--output", required=True)
    common(p)
    p.add_argument("--dtype", help="output dtype: bf16, fp16, fp32 (or bfloat16, ...; default: the base's)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--to", default="hf", choices=["hf", "torchtune", "meta"], help="key layout of the output")
    p.add_argument("--untie", action="store_true", help="untie lm_head from embed_tokens when the adapter "
                   "touches one of them")
    p.add_argument("--force", action="store_true")
    p.set_defaults(handler=_cmd_merge)

    p = sub.add_parser("pull", help="download an adapter from the Hugging Face Hub",
                       epilog="example: lora-ckpt pull my-org/my-adapter -o adapter/ --revision v1")
    p.add_argument("repo", help="ORG/NAME (or hf://ORG/NAME[@REV][/SUBDIR])")
    p.add_argument("-o", "--output", help="copy the files here (default: print the cache path)")
    p.add_argument("--revision")
    p.add_argument("--layout", choices=LAYOUT_NAMES, help="download only this layout's files")
    p.add_argument("--force", action="store_true")
    p.set_defaults(handler=_cmd_pull)

    p = sub.add_parser("push", help="convert (if needed) and upload an adapter with a model card",
                       epilog="example: lora-ckpt push epoch_0/ my-org/llama-lora --base-model meta-llama/Llama-3.1-8B")
    p.add_argument("src")
    p.add_argument("repo")
    p.add_argument("--to", default="peft", choices=LAYOUT_NAMES, help="layout to upload (default peft)")
    common(p)
    p.add_argument("--base-model", help="base model id for the config and card (default: from the adapter)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--branch")
    p.add_argument("--commit-message")
    p.set_defaults(handler=_cmd_push)

    p = sub.add_parser("check", help="will vLLM / llama.cpp / PEFT / torchtune / mlx-lm load it and compute the same?",
                       description="Check an adapter (any layout) against what a consumer loads and computes: refused "
                                   "files and, worse, files that load and silently compute something else (DoRA read "
                                   "as LoRA, ignored rsLoRA or rank/alpha patterns, dropped modules, wrong prefixes). "
                                   "Each problem comes with what to change. Exit 0 only when the target will load it "
                                   "and compute the same function; 1 otherwise.",
                       epilog="examples:\n  lora-ckpt check adapter/ --for vllm\n"
                              "  lora-ckpt check epoch_0/ --for llama.cpp --base-config llama/config.json --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="adapter directory or file (or hf://...)")
    p.add_argument("--for", dest="for_", required=True, choices=list(TARGETS),
                   help="the consumer")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_check)

    p = sub.add_parser("demo", help="stock checkpoint -> LoRA model (strict), one training step",
                       description="Load the shipped stock checkpoint strict=True into a LoRA-injected "
                                   "model, check outputs match, take one training step.",
                       epilog="example: lora-ckpt demo fixtures/demo")
    p.add_argument("fixture", nargs="?", default="fixtures/demo", help="directory with params.json and "
                   "consolidated.safetensors (default: fixtures/demo)")
    p.set_defaults(handler=_cmd_demo)
    for p in sub.choices.values():  # the global options after the subcommand too (SUPPRESS: unset keeps the global)
        g = p.add_argument_group("global options")
        g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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
    # torch warns at import when numpy is absent; lora-ckpt never needs numpy
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except BrokenPipeError:  # `lora-ckpt inspect ... | head`: the reader is gone; exit quietly, as git does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
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
