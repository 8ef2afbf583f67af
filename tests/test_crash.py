"""Crash safety: SIGKILL a running `convert` (and `merge`) at seeded random moments; the output
path must then be absent, or complete and valid. Only hidden `.NAME.tmp-*` siblings may remain."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_ckpt.convert import verify

LAYERS, HIDDEN, INTER, R = 6, 512, 1408, 64


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    """A ~20 MB PEFT adapter and its base config: big enough that a conversion takes a while."""
    d = tmp_path_factory.mktemp("crash") / "peft"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN // 4, HIDDEN),
              "self_attn.v_proj": (HIDDEN // 4, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    t = {}
    for i in range(LAYERS):
        for mod, (out, inn) in shapes.items():
            p = f"base_model.model.model.layers.{i}.{mod}"
            t[f"{p}.lora_A.weight"] = torch.randn(R, inn, generator=g)
            t[f"{p}.lora_B.weight"] = torch.randn(out, R, generator=g)
    save_file(t, d / "adapter_model.safetensors", metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}))
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000}))
    return d


def _cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "lora_ckpt", "-q", "convert", str(src), "--to", "torchtune", "-o", str(out),
            "--base-config", str(src / "config.json")]


def _startup() -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import lora_ckpt.convert"], check=True)
    return time.monotonic() - t0


def test_sigkill_during_convert(big_adapter, tmp_path):
    t0 = time.monotonic()
    subprocess.run(_cmd(big_adapter, tmp_path / "full"), check=True, capture_output=True)
    total = time.monotonic() - t0
    start = _startup()  # kill after the imports, while files are being written
    rng = random.Random(1234)
    outcomes = {"absent": 0, "complete": 0}
    for trial in range(12):
        out = tmp_path / f"out{trial}"
        proc = subprocess.Popen(_cmd(big_adapter, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.8 * start, max(total * 1.05, start + 0.1)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "full")), trial
            assert verify(out, big_adapter, base_config=big_adapter / "config.json").ok
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"out{trial}")]
        assert leftovers in ([], [f"out{trial}"])
    assert outcomes["absent"] > 0  # the kills did land mid-way
