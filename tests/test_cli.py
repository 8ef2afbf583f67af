"""The CLI: fast start without torch, readable inspect, one-line errors with exit codes."""

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from lora_ckpt.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "lora_ckpt", *args], capture_output=True, text=True)


def test_help_and_inspect_do_not_import_torch(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(2, 3), "x.lora_B.weight": torch.zeros(4, 2)}, path)
    code = ("import sys; from lora_ckpt.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    for args in (["--help"], ["inspect", str(path)], ["inspect", str(path), "--json"]):
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


def test_inspect_table_and_json(tmp_path, capsys):
    path = tmp_path / "adapter.safetensors"
    save_file({"m.q.lora_A.weight": torch.zeros(4, 8), "m.q.lora_B.weight": torch.zeros(16, 4),
               "m.norm.weight": torch.zeros(8, dtype=torch.bfloat16)}, path, metadata={"format": "pt"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tensors     3" in out and "lora        1 module(s), ranks 4" in out and "m.norq" not in out
    assert main(["inspect", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["tensors"] == 3 and rep["parameters"] == 4 * 8 + 16 * 4 + 8
    assert rep["lora_modules"][0]["module"] == "m.q" and rep["lora_modules"][0]["rank"] == 4
    assert rep["dtypes"] == {"float32": 2, "bfloat16": 1}


def test_errors_are_one_line_with_exit_code(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    p = run("inspect", str(bad))
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and "not valid UTF-8 JSON" in p.stderr
    p = run("--debug", "inspect", str(bad))
    assert p.returncode == 1 and "Traceback" in p.stderr
    p = run("inspect", str(tmp_path / "missing.safetensors"))
    assert p.returncode == 1 and "no such file" in p.stderr
    assert run("no-such-command").returncode == 2


def test_version():
    import lora_ckpt

    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"lora-ckpt {lora_ckpt.__version__}"
