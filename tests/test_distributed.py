"""FSDP2-sharded LoRA models on 2 real processes (gloo on 127.0.0.1): stock checkpoints in, adapters out.

One ``torch.distributed.run --nproc-per-node 2`` launch runs every check of ``tests/dist_worker.py``
(process start-up dominates); the tests below read what each rank recorded, and check what the
sharded run wrote against the real peers (PEFT) in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dist_worker as W  # tests/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stock_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(W.llama_config()).eval()


def _write_sharded(state: dict, out: Path) -> None:
    """An HF-style 2-shard checkpoint with its index (keys split in model order)."""
    out.mkdir()
    keys = list(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, out / name)
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Inputs, one 2-process launch, and each rank's results."""
    from transformers import LlamaForCausalLM

    from lora_ckpt import convert

    work = tmp_path_factory.mktemp("dist")
    state = _stock_model().state_dict()
    _write_sharded(state, work / "stock")
    torch.manual_seed(0)
    nf4_state = LlamaForCausalLM(W.nf4_config()).state_dict()
    save_file({k: v.contiguous() for k, v in nf4_state.items()}, work / "nf4_stock.safetensors")
    save_file({k: v.contiguous() for k, v in state.items() if k != "model.norm.weight"},
              work / "missing_key.safetensors")
    # a real PEFT adapter, converted by lora-ckpt to DCP: a sharded run dcp.load()s it
    peft_dir = _peft_adapter(work)
    convert(peft_dir, work / "peft_as_dcp", to="dcp")
    torch.save(_peft_tensors_as_model_keys(peft_dir), work / "peft_as_dcp_expected.pt")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(ROOT / "tests" / "dist_worker.py"), str(work)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    return work, ranks


def _peft_adapter(work: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_stock_model(), LoraConfig(r=W.R, lora_alpha=W.ALPHA, target_modules=W.TARGETS))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(work / "peft_in")
    return work / "peft_in"


def _peft_tensors_as_model_keys(peft_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    return {k.removeprefix("base_model.model."): v for k, v in tensors.items()}


def _assert_check(ranks, name):
    for r, res in enumerate(ranks):
        assert name in res, f"rank {r} did not record {name}"
        assert res[name]["ok"], f"rank {r}: {res[name]['detail']}"


@pytest.mark.parametrize("name", ["sharded_load", "adapters_world_size", "adamw_step", "distribute_adapter",
                                  "set_model_state_dict", "dcp_load", "nf4_load"])
def test_sharded_run_equals_single_process(run, name):
    """sharded load == single-process (every parameter bitwise, logits); 1- vs 2-rank adapters; one AdamW
    step under FSDP2 == the same step in one process (<= 1e-6); apply_adapter rows; the
    set_model_state_dict helper; a --to dcp adapter dcp.load()ed by the sharded model; NF4 bases (q/v) loaded
    sharded == one process's quantized load (full NF4 tensors, this rank's chunk's bytes, logits, LoRA grads)."""
    _assert_check(run[1], name)


def test_sharded_save_adapter_loads_in_peft_with_equal_logits(run):
    from peft import PeftModel

    work, ranks = run
    _assert_check(ranks, "save_adapter")
    model = PeftModel.from_pretrained(_stock_model(), work / "sharded_peft").eval()
    with torch.no_grad():
        out = model(W.TOKENS).logits
    ref = torch.load(work / "stepped_logits.pt", weights_only=True)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-6


def test_bad_input_raises_the_single_process_error_on_every_rank(run):
    work, ranks = run
    _assert_check(ranks, "missing_key")  # KeyMismatchError with the same missing keys, both ranks
    _assert_check(ranks, "save_exists")  # OutputExistsError on every rank, before any collective
    _assert_check(ranks, "dcp_broken")
    from lora_ckpt import load_adapter
    from lora_ckpt.errors import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError) as e:
        load_adapter(work / "broken_dcp", alpha=W.ALPHA)
    assert all(r["dcp_broken"]["detail"] == type(e.value).__name__ for r in ranks)


def test_dcp_of_a_sharded_run_converts_to_save_adapters_bytes(run, tmp_path):
    from lora_ckpt import convert

    work, _ = run
    convert(work / "sharded_dcp", tmp_path / "peft", to="peft", alpha=W.ALPHA)
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == \
        (work / "sharded_peft" / "adapter_model.safetensors").read_bytes()
