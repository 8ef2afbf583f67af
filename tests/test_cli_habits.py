"""CLI habits: a closed stdout is a quiet exit (as git and hf do), the global options work after the
subcommand too, and every dtype taken accepts the short forms people type (one parser)."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import peers as P
from lora_ckpt.cli import build_parser, main
from lora_ckpt.conversion import convert
from lora_ckpt.dtypes import DTYPE_ALIASES, parse_dtype
from lora_ckpt.errors import UsageError
from lora_ckpt.merge import merge_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

PEFT_LORA = P.FIX / "peft" / "llama-lora"
LLAMA = P.FIX / "hf" / "llama"
ENV = {**os.environ, "PYTHONPATH": str(P.ROOT), "OMP_NUM_THREADS": "1"}


def test_closed_stdout_is_a_quiet_exit():
    """The reader of stdout is gone before lora-ckpt writes (what `| head` does to a long listing)."""
    proc = subprocess.Popen([sys.executable, "-m", "lora_ckpt", "inspect", str(PEFT_LORA)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, cwd=P.ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, as git exits
    assert err == ""


@pytest.mark.parametrize("argv", [["-q", "inspect", "X"], ["inspect", "X", "-q"], ["inspect", "-q", "X"],
                                  ["inspect", "X", "--quiet"]])
def test_global_options_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.verbose is False and args.debug is False


def test_global_options_after_the_subcommand_take_effect(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    with pytest.raises(Exception) as e:
        main(["inspect", missing, "--debug"])  # --debug after the subcommand: the traceback is raised
    assert "missing" in str(e.value)
    assert main(["inspect", missing, "-v"]) == 1  # without --debug: one line, non-zero
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("name,want", [("bf16", torch.bfloat16), ("BF16", torch.bfloat16), ("fp16", torch.float16),
                                       ("fp32", torch.float32), ("bfloat16", torch.bfloat16),
                                       ("torch.float16", torch.float16), ("float32", torch.float32),
                                       ("half", torch.float16), (torch.bfloat16, torch.bfloat16), (None, None)])
def test_parse_dtype_short_and_long_names(name, want):
    assert parse_dtype(name) == want


@pytest.mark.parametrize("name", ["int8", "bool", "b16", "", "float33"])
def test_parse_dtype_refuses_what_is_not_a_float_dtype(name):
    with pytest.raises(UsageError, match="bf16, fp16, fp32"):
        parse_dtype(name)


def test_every_alias_names_a_torch_dtype():
    assert all(isinstance(getattr(torch, v), torch.dtype) for v in DTYPE_ALIASES.values())


def test_cli_convert_and_merge_take_short_dtypes(tmp_path, capsys):
    assert main(["-q", "convert", str(PEFT_LORA), "--to", "peft", "-o", str(tmp_path / "c"), "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "c" / "adapter_model.safetensors").values()} == {torch.bfloat16}
    assert main(["merge", str(LLAMA), str(PEFT_LORA), "-o", str(tmp_path / "m"), "--dtype", "fp16", "-q"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.float16}
    assert main(["convert", str(PEFT_LORA), "--to", "peft", "-o", str(tmp_path / "x"), "--dtype", "int8"]) == 2
    assert "bf16, fp16, fp32" in capsys.readouterr().err


def test_library_calls_take_short_dtypes(tmp_path):
    convert(PEFT_LORA, tmp_path / "c", to="native", dtype="fp16")
    assert {t.dtype for t in load_file(tmp_path / "c" / "lora_adapter.safetensors").values()} == {torch.float16}
    merge_checkpoint(LLAMA, PEFT_LORA, tmp_path / "m", dtype="bf16", progress=False)
    assert {t.dtype for t in load_file(tmp_path / "m" / "model.safetensors").values()} == {torch.bfloat16}
