"""Crash safety: SIGKILL a running `convert` (and `merge`) at seeded random moments; the output
path must then be absent, or complete and valid. Only hidden `.NAME.tmp-*` siblings may remain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_ckpt.conversion import verify

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


WORKER = r"""
import os, random, signal, sys, time, json
import lora_ckpt.conversion, lora_ckpt.layouts  # imported once; children are forked without re-importing
import lora_ckpt.merge
src, root, trials, seed, job = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def run(out):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if job == "convert":
                lora_ckpt.conversion.convert(src, out, to="torchtune", base_config=os.path.join(src, "config.json"))
            else:
                lora_ckpt.merge.merge_checkpoint(os.path.join(src, "base"), src, out, max_shard_size="8MB",
                                                 progress=False)
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid

t0 = time.monotonic()
os.waitpid(run(os.path.join(root, "full")), 0)
total = time.monotonic() - t0
rng = random.Random(seed)
for trial in range(trials):
    pid = run(os.path.join(root, f"out{trial}"))
    time.sleep(rng.uniform(0.0, total * 1.1))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(json.dumps({"total": total}))
"""


def test_sigkill_during_convert(big_adapter, tmp_path):
    trials = 12
    p = subprocess.run([sys.executable, "-c", WORKER, str(big_adapter), str(tmp_path), str(trials), "1234",
                        "convert"], capture_output=True, text=True, check=True)
    assert json.loads(p.stdout)["total"] > 0 and (tmp_path / "full").is_dir(), p.stderr[-2000:]
    full = sorted(os.listdir(tmp_path / "full"))
    outcomes = {"absent": 0, "complete": 0}
    for trial in range(trials):
        out = tmp_path / f"out{trial}"
        if out.exists():
            assert sorted(os.listdir(out)) == full, trial
            assert verify(out, big_adapter, base_config=big_adapter / "config.json").ok
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
    assert outcomes["absent"] > 0  # the kills did land mid-way
    allowed = {"full", *(f"out{t}" for t in range(trials))}
    assert all(q.name in allowed or q.name.startswith(".out") for q in tmp_path.iterdir())  # only hidden temps


@pytest.fixture(scope="module")
def base_and_adapter(big_adapter) -> Path:
    """The big adapter plus a matching random base model (sharded HF directory, ~40 MB fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = big_adapter / "base"
    if not base.exists():
        cfg = json.loads((big_adapter / "config.json").read_text())
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).save_pretrained(
            base, max_shard_size="10MB")
    return big_adapter


def _hashes(d: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_sigkill_during_merge(base_and_adapter, tmp_path):
    trials = 10
    p = subprocess.run([sys.executable, "-c", WORKER, str(base_and_adapter), str(tmp_path), str(trials), "99",
                        "merge"], capture_output=True, text=True, check=True)
    assert (tmp_path / "full").is_dir(), p.stderr[-2000:]
    full = _hashes(tmp_path / "full")
    assert "model.safetensors.index.json" in full and len(full) > 3
    absent = 0
    for trial in range(trials):
        out = tmp_path / f"out{trial}"
        if out.exists():
            assert _hashes(out) == full, trial  # complete: byte-identical to an uninterrupted merge
        else:
            absent += 1
    assert absent > 0
    allowed = {"full", *(f"out{t}" for t in range(trials))}
    assert all(q.name in allowed or q.name.startswith(".out") for q in tmp_path.iterdir())
