"""torch.distributed.checkpoint directories in and out, single process: a torchtune distributed
recipe's DCP save, a torchtitan LoRA run's, lora-ckpt's own ``--to dcp``; ``inspect`` without torch;
hostile and incomplete directories. (The sharded save/load side is in test_distributed.py.)"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from lora_ckpt import convert, load_adapter
from lora_ckpt.cli import main
from lora_ckpt.errors import CheckpointNotFoundError, MissingConfigError, UnsafeCheckpointError
from peers import (
    EXACT,
    hf_config,
    hf_config_path,
    make_peft_adapter,
    make_tt_adapter,
    peft_logits,
    rel_diff,
    tt_logits,
)

CFG = str(hf_config_path("llama"))


def _save(state, path, **writer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is disabled ... single process"
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), **writer), no_dist=True)


def test_torchtune_distributed_recipe_dcp_to_peft(tmp_path):
    """torchtune 0.6.1 CheckpointClient._save_checkpoint_async + DistributedCheckpointer.save_checkpoint:
    {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **TrainingProgress.state_dict()}
    into dist_epoch_{N}/ with FileSystemWriter(single_file_per_rank=False)."""
    model, _ = make_tt_adapter("llama", tmp_path / "epoch_0", seed=11)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    model(torch.arange(8)[None]).sum().backward()
    opt.step()  # optimizer state exists (lr 0: the adapter is unchanged)
    ckpt = tmp_path / "dist_epoch_0"
    _save({"model": model.state_dict(), "optimizer": opt.state_dict(), "seed": 0, "epochs_run": 1,
           "total_epochs": 1, "max_steps_per_epoch": None, "dataloader": {}}, ckpt, single_file_per_rank=False)
    res = convert(ckpt, tmp_path / "peft", to="peft", base_config=CFG, alpha=8)
    assert res.source_layout == "dcp" and res.verification.ok
    out, _ = peft_logits("llama", tmp_path / "peft")
    assert rel_diff(out, tt_logits(model)) <= EXACT
    # the rest of the checkpoint (base weights, optimizer, progress) is reported, never read
    assert any("other model tensor" in n and "'optimizer'" in n for n in res.notes)


def _titan_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """torchtitan's Llama3StateDictAdapter._reverse_permute (from_hf: HF rotate-half -> its interleaved rows)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


_TITAN = {"self_attn.q_proj": "attention.qkv_linear.wq", "self_attn.k_proj": "attention.qkv_linear.wk",
          "self_attn.v_proj": "attention.qkv_linear.wv", "self_attn.o_proj": "attention.wo",
          "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
_LEGACY = {**_TITAN, "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
           "self_attn.v_proj": "attention.wv"}


def _titan_run(peft_dir, names):
    """The state torchtitan's CheckpointManager saves for a LoRA run (ModelWrapper flattens the model keys
    to top level; optimizer/lr_scheduler/dataloader/train_state beside them), built from a PEFT adapter
    with torchtitan's names (components/lora.py: lora_a/lora_b) and its q/k row order."""
    cfg = hf_config("llama")
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    state = {}
    for key, t in load_file(peft_dir / "adapter_model.safetensors").items():
        layer, rest = key.removeprefix("base_model.model.model.layers.").split(".", 1)
        module, leaf = rest.rsplit(".lora_", 1)
        proj = module.rsplit(".", 1)[-1]
        if leaf.startswith("B") and proj in heads:
            t = _titan_permute(t, heads[proj])
        state[f"layers.{layer}.{names[module]}.lora_{leaf[0].lower()}.weight"] = t.clone()
        state[f"layers.{layer}.{names[module]}.weight"] = torch.randn(t.shape[0] if leaf.startswith("B") else 4, 4)
    return {**state, "tok_embeddings.weight": torch.randn(8, 4), "optimizer": {"state": {"x": torch.zeros(3)}},
            "lr_scheduler": {"last_epoch": 3}, "train_state": {"step": 3}}


@pytest.mark.parametrize("names", [_TITAN, _LEGACY], ids=["qkv_linear", "legacy"])
def test_torchtitan_lora_run_to_peft(tmp_path, names):
    ref = make_peft_adapter("llama", tmp_path / "src", seed=4)
    _save(_titan_run(tmp_path / "src", names), tmp_path / "step-3")
    with pytest.raises(MissingConfigError):  # no alpha in a torchtitan checkpoint
        load_adapter(tmp_path / "step-3", base_config=CFG)
    with pytest.raises(MissingConfigError):  # q/k rows need the head counts
        convert(tmp_path / "step-3", tmp_path / "x", to="peft", alpha=8)
    convert(tmp_path / "step-3", tmp_path / "peft", to="peft", base_config=CFG, alpha=8)
    out, _ = peft_logits("llama", tmp_path / "peft")
    assert rel_diff(out, ref) <= EXACT
    ours, theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "src" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_to_dcp_round_trip_is_byte_identical_and_inspect_needs_no_torch(tmp_path):
    make_peft_adapter("llama", tmp_path / "src", seed=2)
    assert main(["-q", "convert", str(tmp_path / "src"), "--to", "dcp", "-o", str(tmp_path / "d")]) == 0
    assert main(["-q", "convert", str(tmp_path / "d"), "--to", "peft", "-o", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "src" / "adapter_model.safetensors").read_bytes()
    code = ("import sys; from lora_ckpt.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "inspect", str(tmp_path / "d")], check=False, capture_output=True,
                       text=True)
    assert p.returncode == 0 and "dcp" in p.stdout and "14" in p.stdout, p.stderr


def test_missing_shard_and_hostile_metadata_are_typed_errors(tmp_path, capsys):
    make_peft_adapter("llama", tmp_path / "src", seed=2)
    convert(tmp_path / "src", tmp_path / "d", to="dcp")
    os.remove(next((tmp_path / "d").glob("*.distcp")))
    with pytest.raises(CheckpointNotFoundError):
        load_adapter(tmp_path / "d")
    assert main(["convert", str(tmp_path / "d"), "--to", "peft", "-o", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists() and "Traceback" not in capsys.readouterr().err

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "h").mkdir()
    (tmp_path / "h" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UnsafeCheckpointError):
        load_adapter(tmp_path / "h")
    assert not (tmp_path / "pwned").exists()
