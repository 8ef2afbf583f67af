"""The 2-process half of tests/test_distributed.py: run by ``torch.distributed.run --nproc-per-node 2``.

Every check runs on every rank against a single-process reference computed in the same process,
and records ``{"ok": bool, "detail": str}`` under its name in ``<work>/rank<r>.json``; the pytest
side asserts on them. All checks share one launch (process start-up dominates the cost).
Collectives use the process group's timeout, so a rank that stops answering fails the run
instead of hanging it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8.0


def llama_config():
    from transformers import LlamaConfig

    # odd vocab: a dim-0 split that is not even (64 rows of 2 ranks would hide an offset bug)
    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=67, max_position_embeddings=64, tie_word_embeddings=False)


def empty_lora_model(seed: int = 0):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from lora_ckpt import inject_lora

    with init_empty_weights():
        model = LlamaForCausalLM(llama_config())
    inject_lora(model, targets=TARGETS, r=R, alpha=ALPHA, seed=seed)
    return model


def nf4_config():
    """NF4 blocks 64 elements under 256 scales: a q/v weight of 256x256 is 4 scaler groups (2 per rank)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=67, max_position_embeddings=64, tie_word_embeddings=False)


def empty_nf4_model():
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from lora_ckpt import inject_lora

    with init_empty_weights():
        model = LlamaForCausalLM(nf4_config())
    inject_lora(model, targets=["q_proj", "v_proj"], r=R, alpha=ALPHA, quantize_base=True)
    return model


def shard(model, mesh):
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def bitwise_diff(a: dict, b: dict) -> list[str]:
    bad = [k for k in a if k not in b or a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
           or not torch.equal(a[k].view(torch.uint8) if a[k].dtype != torch.bool else a[k],
                              b[k].view(torch.uint8) if b[k].dtype != torch.bool else b[k])]
    return bad + [k for k in b if k not in a]


TOKENS = torch.arange(48).reshape(4, 12) % 67

def main() -> None:
    work = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(1000 + rank)  # each rank's global RNG differs: results must not depend on it
    results: dict[str, dict] = {}

    def check(name, fn):
        try:
            ok, detail = fn()
        except Exception as e:  # recorded, not raised: the other checks still run
            ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        results[name] = {"ok": bool(ok), "detail": str(detail)}
        dist.barrier()

    from lora_ckpt import distributed as ld
    from lora_ckpt import load_checkpoint

    stock = work / "stock"
    single = empty_lora_model()
    load_checkpoint(single, stock)
    single_state = full_state(single)
    sharded = shard(empty_lora_model(), mesh)

    def sharded_load():
        res = load_checkpoint(sharded, stock)
        got = full_state(sharded)
        bad = bitwise_diff(got, single_state)
        local = sharded.model.embed_tokens.weight.to_local().shape[0]
        with torch.no_grad():
            ref = single(TOKENS).logits
            out = sharded(TOKENS).logits
        diff = (out - ref).abs().max().item()
        return (not bad and diff == 0.0 and not res.missing and not res.unexpected and local in (33, 34),
                f"not bit-identical: {bad[:5]}; logits diff {diff}; local embed rows {local}")

    check("sharded_load", sharded_load)

    def adapters_world_size():
        a1 = single.model.layers[1].self_attn.v_proj.lora_A.weight.detach()
        a2 = sharded.model.layers[1].self_attn.v_proj.lora_A.weight.full_tensor()
        other = empty_lora_model(seed=1)
        load_checkpoint(other, stock)
        a3 = other.model.layers[1].self_attn.v_proj.lora_A.weight.detach()
        return torch.equal(a1, a2) and not torch.equal(a1, a3), "1- and 2-rank lora_A differ (or the seed is ignored)"

    check("adapters_world_size", adapters_world_size)

    def adamw_step():
        opt1 = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2)
        opt2 = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=1e-2)
        single.train()
        sharded.train()
        single(TOKENS, labels=TOKENS).loss.backward()
        opt1.step()
        half = TOKENS.shape[0] // world
        mine = TOKENS[rank * half:(rank + 1) * half]
        sharded(mine, labels=mine).loss.backward()  # FSDP averages the two halves' gradients
        opt2.step()
        single.eval()
        sharded.eval()
        got, ref = full_state(sharded), full_state(single)
        worst = max((got[k].double() - ref[k].double()).abs().max().item() for k in ref if "lora_" in k)
        moved = max(ref[k].abs().max().item() for k in ref if "lora_B" in k)
        base_same = not bitwise_diff({k: v for k, v in got.items() if "lora_" not in k},
                                     {k: v for k, v in ref.items() if "lora_" not in k})
        if rank == 0:
            with torch.no_grad():
                torch.save(single(TOKENS).logits, work / "stepped_logits.pt")
        return (worst <= 1e-6 and moved > 0 and base_same,
                f"max |Δ| {worst:.3g} (lora_B max {moved:.3g}), base same {base_same}")

    check("adamw_step", adamw_step)

    def save_adapter_once():  # the top-level save_adapter, on every rank, == the single-process adapter
        import lora_ckpt
        from lora_ckpt.transfer import adapter_from_model

        out = work / "sharded_peft"
        written = lora_ckpt.save_adapter(sharded, out, layout="peft")
        files = sorted(p.name for p in out.iterdir())
        ref = adapter_from_model(single).modules
        worst = max(max((m.A.double() - ref[n].A.double()).abs().max().item(),
                        (m.B.double() - ref[n].B.double()).abs().max().item()) for n, m in written.modules.items())
        return ("adapter_model.safetensors" in files and sorted(written.modules) == sorted(ref) and worst <= 1e-6,
                f"files {files}; modules {len(written.modules)} vs {len(ref)}; max |Δ| vs one process {worst:.3g}")

    check("save_adapter", save_adapter_once)

    def save_exists():
        try:
            import lora_ckpt

            lora_ckpt.save_adapter(sharded, work / "sharded_peft", layout="peft")
        except Exception as e:
            return type(e).__name__ == "OutputExistsError", f"{type(e).__name__}: {e}"
        return False, "no error"

    check("save_exists", save_exists)

    def distribute():  # the top-level apply_adapter on the sharded model == on one process
        from lora_ckpt import apply_adapter

        fresh = shard(empty_lora_model(seed=5), mesh)
        load_checkpoint(fresh, stock)
        names = apply_adapter(fresh, work / "sharded_peft")
        one = empty_lora_model(seed=5)
        load_checkpoint(one, stock)
        apply_adapter(one, work / "sharded_peft")
        got, ref = full_state(fresh), full_state(one)
        bad = bitwise_diff(got, ref) + bitwise_diff({k: v for k, v in got.items() if "lora_" in k},
                                                    {k: v for k, v in full_state(sharded).items() if "lora_" in k})
        try:
            apply_adapter(fresh, work / "sharded_peft")
            again = "no error"
        except Exception as e:  # every rank: nothing would change
            again = type(e).__name__
        return (not bad and len(names) == 14 and again == "AdapterMismatchError",
                f"differ: {bad[:4]}; {len(names)} layers; applied twice: {again}")

    check("distribute_adapter", distribute)

    def set_model_state_dict_path():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from lora_ckpt import read_checkpoint

        model = empty_lora_model()
        model.to_empty(device="cpu")  # set_model_state_dict copies into real memory
        model.model.rotary_emb.inv_freq.copy_(single.model.rotary_emb.inv_freq)
        model = shard(model, mesh)
        full = ld.model_state_dict(model, read_checkpoint(stock)) if rank == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        bad = bitwise_diff(full_state(model), single_state)
        return not bad, f"differ: {bad[:4]}"

    check("set_model_state_dict", set_model_state_dict_path)

    def missing_key():
        errors = []
        for model in (empty_lora_model(), shard(empty_lora_model(), mesh)):
            try:
                load_checkpoint(model, work / "missing_key.safetensors")
                errors.append(None)
            except Exception as e:
                errors.append((type(e).__name__, getattr(e, "missing", None), getattr(e, "unexpected", None)))
        return errors[0] is not None and errors[0] == errors[1], f"single {errors[0]} vs sharded {errors[1]}"

    check("missing_key", missing_key)

    def dcp_save():
        import torch.distributed.checkpoint as dcp

        from lora_ckpt import adapter_state_dict

        dcp.save({"model": adapter_state_dict(sharded)}, checkpoint_id=str(work / "sharded_dcp"))
        if rank == 0:  # a copy with one shard file gone
            shutil.copytree(work / "sharded_dcp", work / "broken_dcp")
            os.remove(sorted((work / "broken_dcp").glob("*.distcp"))[-1])
        dist.barrier()
        try:
            from lora_ckpt import load_adapter

            load_adapter(work / "broken_dcp", alpha=ALPHA)
        except Exception as e:
            return True, type(e).__name__
        return False, "broken DCP dir loaded"

    check("dcp_broken", dcp_save)

    def dcp_in():
        import torch.distributed.checkpoint as dcp

        from lora_ckpt import adapter_state_dict

        if not (work / "peft_as_dcp").exists():
            return False, "no input"
        model = shard(empty_lora_model(seed=9), mesh)
        load_checkpoint(model, stock)
        dcp.load(adapter_state_dict(model), checkpoint_id=str(work / "peft_as_dcp"))
        got = full_adapter = ld.full_adapter_tensors(model, rank0_only=False)
        ref = torch.load(work / "peft_as_dcp_expected.pt", weights_only=True)
        bad = bitwise_diff(got, ref)
        return not bad and len(full_adapter) == 28, f"differ: {bad[:4]}"

    check("dcp_load", dcp_in)

    def nf4_load():  # NF4 bases under FSDP2: full-tensor quantization, this rank's chunk (torchtune's rule)
        from lora_ckpt.nf4 import NF4Linear, dequantize

        ref = empty_nf4_model()
        load_checkpoint(ref, work / "nf4_stock.safetensors")
        model = shard(empty_nf4_model(), mesh)
        res = load_checkpoint(model, work / "nf4_stock.safetensors")
        bad, n = [], 0
        for name, m in model.named_modules():
            if isinstance(m, NF4Linear):
                n += 1
                w = m.weight
                one = ref.get_submodule(name).weight
                if not (isinstance(w, DTensor) and type(w.to_local()).__name__ == "NF4Tensor"):
                    bad.append(f"{name}: {type(w).__name__} of {type(getattr(w, '_local_tensor', w)).__name__}")
                    continue
                ours, theirs = dequantize(w.full_tensor(), w.dtype), dequantize(one, one.dtype)
                if not torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)):
                    bad.append(f"{name}: dequantized full tensor differs")
                chunk = torch.chunk(one, world, dim=0)[rank]
                local = w.to_local()
                for attr in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
                    if not torch.equal(getattr(local, attr), getattr(chunk, attr)):
                        bad.append(f"{name}: local {attr} differs from the single-process chunk")
        tokens = TOKENS % 67
        with torch.no_grad():
            diff = (model(tokens).logits - ref(tokens).logits).abs().max().item()
        # backward through the all-gathered NF4 bases: same tokens on both ranks, so FSDP's mean is one process's
        ref(tokens, labels=tokens).loss.backward()
        model(tokens, labels=tokens).loss.backward()
        grads = [(p.grad.full_tensor() - ref.get_parameter(k).grad).abs().max().item()
                 for k, p in model.named_parameters() if "lora_" in k]
        return (not bad and n == 2 and diff == 0.0 and not res.missing and not res.unexpected and len(grads) == 4
                and max(grads) <= 1e-6,
                f"{n} NF4 layers; {bad[:4]}; logits diff {diff}; lora grad diffs {grads}; missing {res.missing[:3]}")

    check("nf4_load", nf4_load)

    (work / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
