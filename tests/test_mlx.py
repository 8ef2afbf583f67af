"""mlx-lm layout, against the REAL mlx-lm (mlx 0.32.4 CPU wheel, mlx-lm 0.32.2).

* our mlx output is loaded with mlx_lm's own ``load_adapters`` into mlx_lm's own Llama built from
  ``fixtures/hf/llama`` and must give PEFT's logits (``PeftModel.from_pretrained`` on the same base);
* adapters written by mlx_lm itself (``linear_to_lora_layers`` on the last block, as ``mlx_lm.lora``
  trains, both config schemas, LoRA and DoRA) convert to PEFT (``layers_to_transform``) and give
  mlx_lm's logits in PEFT;
* MoE ``switch_mlp`` factors: per-expert updates equal mlx_lm's own ``LoRASwitchLinear.fuse``, and
  mlx -> peft -> mlx reloads into mlx_lm with the same logits.
"""

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_ckpt.conversion import convert
from lora_ckpt.errors import ConfigError, ConversionError, UnsupportedAdapterError
from lora_ckpt.layouts import load_adapter
from lora_ckpt.layouts.mlx import placement
from lora_ckpt.report import inspect_source

mx = pytest.importorskip("mlx.core")
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama, mixtral  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402

FIX = Path(__file__).resolve().parent.parent / "fixtures"
LLAMA = FIX / "hf/llama"
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
TOL = 1e-4  # relative, max|out - ref| / max|ref|


def rel(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def mlx_llama():
    cfg = json.loads((LLAMA / "config.json").read_text())
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.load_weights(list(model.sanitize(mx.load(str(LLAMA / "model.safetensors"))).items()))
    return model


def mlx_logits(model, ids=INPUT_IDS):
    return torch.from_numpy(np.array(model(mx.array(ids.numpy()))))


_HF = {}


def peft_logits(adapter_dir):
    """PEFT's logits for ``adapter_dir`` on fixtures/hf/llama, and the warnings PEFT gave."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if "base" not in _HF:
        _HF["base"] = AutoModelForCausalLM.from_pretrained(LLAMA).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(_HF["base"]), adapter_dir).eval()
    with torch.no_grad():
        return model(INPUT_IDS).logits, [str(w.message) for w in caught]


@pytest.mark.parametrize("fixture", ["llama-lora", "llama-dora", "llama-embedding"])
def test_real_mlx_lm_loads_our_output_with_peft_logits(tmp_path, fixture):
    res = convert(FIX / "peft" / fixture, tmp_path / "mlx", to="mlx", base_config=LLAMA / "config.json",
                  allow_lossy=True)  # llama-embedding: PEFT's unchanged copy of the base embedding is dropped
    assert res.verification.ok
    cfg = json.loads((tmp_path / "mlx/adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == ("dora" if fixture == "llama-dora" else "lora") and cfg["num_layers"] == 2
    assert cfg["lora_parameters"]["scale"] == 2.0 and cfg["lora_parameters"]["rank"] == 4
    model = mlx_llama()
    load_adapters(model, str(tmp_path / "mlx"))  # mlx_lm checks every name and shape
    ref, _ = peft_logits(FIX / "peft" / fixture)
    assert rel(mlx_logits(model), ref) <= TOL


def _mlx_trained(tmp_path, *, dora, schema, scale=3.0, num_layers=1):
    """An adapter as mlx_lm.lora writes it: freeze, wrap the last blocks, 'train' (random B, m)."""
    mx.random.seed(7)
    model = mlx_llama()
    model.freeze()
    linear_to_lora_layers(model, num_layers, {"rank": 4, "scale": scale, "dropout": 0.0}, use_dora=dora)
    params = dict(tree_flatten(model.trainable_parameters()))
    new = {k: (mx.random.normal(v.shape) * 0.2 if k.endswith("lora_b") else
               v * mx.random.uniform(0.75, 1.25, v.shape) if k.endswith(".m") else v) for k, v in params.items()}
    model.load_weights(list(new.items()), strict=False)
    out = tmp_path / "mlx"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), new)
    args = {"model": "fixtures/hf/llama", "train": True, "batch_size": 4, "iters": 10, "learning_rate": 1e-5}
    if schema == "current":
        args.update(fine_tune_type="dora" if dora else "lora", num_layers=num_layers,
                    lora_parameters={"rank": 4, "scale": scale, "dropout": 0.0})
    else:  # before mlx-examples PR #903
        args.update(lora_layers=num_layers, use_dora=dora, lora_parameters={"rank": 4, "scale": scale, "dropout": 0.0})
    (out / "adapter_config.json").write_text(json.dumps(args, indent=4))
    return out, mlx_logits(model)


@pytest.mark.parametrize("dora, schema", [(False, "current"), (True, "current"), (False, "2024")])
def test_real_mlx_lm_adapter_to_peft_uses_layers_to_transform(tmp_path, dora, schema):
    src, mlx_out = _mlx_trained(tmp_path, dora=dora, schema=schema)
    res = convert(src, tmp_path / "peft", to="peft", base_config=LLAMA / "config.json")
    assert res.source_layout == "mlx" and res.verification.ok and res.modules == 7
    cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1] and cfg["layers_pattern"] == "layers"
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    assert cfg["lora_alpha"] == 12 and cfg["r"] == 4 and bool(cfg.get("use_dora")) == dora  # alpha = scale * r
    out, caught = peft_logits(tmp_path / "peft")
    assert not [w for w in caught if "missing" in w.lower()], caught
    assert rel(out, mlx_out) <= TOL
    # and back: num_layers is the trailing block count again
    convert(tmp_path / "peft", tmp_path / "mlx2", to="mlx", base_config=LLAMA / "config.json")
    back = json.loads((tmp_path / "mlx2/adapter_config.json").read_text())
    assert back["num_layers"] == 1 and back["lora_parameters"]["scale"] == 3.0


def test_placement_rules():
    assert placement({2, 3}, 4) == (2, None)
    assert placement({0, 1, 2, 3}, 4) == (4, None)
    assert placement({0, 1}, None) == (-1, None)
    n, note = placement({1, 2}, 4)
    assert n == -1 and "not the trailing blocks" in note
    n, note = placement({3}, None)
    assert n == -1 and "--base-config" in note
    assert placement(set(), 4) == (0, None)


def test_config_checks_and_notes(tmp_path):
    src, _ = _mlx_trained(tmp_path, dora=False, schema="current")
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_parameters"]["alpha"] = 16
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    ad = load_adapter(src)
    assert ad.scales() == {3.0: 7} and any("alpha is ignored" in n for n in ad.meta.notes)
    cfg["lora_parameters"]["rank"] = 8
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="rank=8"):
        load_adapter(src)
    cfg["fine_tune_type"] = "full"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match="full"):
        load_adapter(src)


def test_dora_on_some_modules_only_is_refused(tmp_path):
    ad = load_adapter(FIX / "peft/llama-dora")
    ad.modules["model.layers.0.self_attn.q_proj"].magnitude = None
    from lora_ckpt.layouts import save_adapter

    with pytest.raises(ConversionError, match="DoRA on every adapted module or none"):
        save_adapter(ad, tmp_path / "o", layout="mlx", base_config=LLAMA / "config.json")


# ------------------------------------------------------------------------------ MoE
MIXTRAL = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
           "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _mlx_moe(tmp_path):
    mx.random.seed(3)
    model = mixtral.Model(mixtral.ModelArgs.from_dict(MIXTRAL))
    base = dict(tree_flatten(model.parameters()))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 2, "scale": 2.0, "dropout": 0.0})
    params = dict(tree_flatten(model.trainable_parameters()))
    new = {k: mx.random.normal(v.shape) * 0.2 if k.endswith("lora_b") else v for k, v in params.items()}
    model.load_weights(list(new.items()), strict=False)
    src = tmp_path / "moe"
    src.mkdir()
    mx.save_safetensors(str(src / "adapters.safetensors"), new)
    (src / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 2, "scale": 2.0, "dropout": 0.0}}))
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL))
    return model, base, src


def test_switch_mlp_experts_match_mlx_fuse_and_round_trip(tmp_path):
    model, base, src = _mlx_moe(tmp_path)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = mlx_logits(model, ids)
    ad = load_adapter(src, base_config=tmp_path / "config.json")
    assert "model.layers.1.block_sparse_moe.experts.3.w1" in ad.modules  # gate_proj -> w1, per expert
    assert "model.layers.1.block_sparse_moe.gate" in ad.modules  # mlx-lm adapts the router too
    switch = model.model.layers[1].block_sparse_moe.switch_mlp.gate_proj
    delta = np.array(switch.fuse().weight) - np.array(switch.linear.weight)  # mlx_lm's own merge
    for e in range(4):
        ours = ad.modules[f"model.layers.1.block_sparse_moe.experts.{e}.w1"].delta().numpy()
        assert np.abs(ours - delta[e]).max() <= 1e-5 * np.abs(delta[e]).max()
    res = convert(src, tmp_path / "peft", to="peft", base_config=tmp_path / "config.json")
    assert res.verification.ok
    convert(tmp_path / "peft", tmp_path / "mlx2", to="mlx", base_config=tmp_path / "config.json")
    fresh = mixtral.Model(mixtral.ModelArgs.from_dict(MIXTRAL))
    fresh.load_weights(list(base.items()))
    load_adapters(fresh, str(tmp_path / "mlx2"))
    assert rel(mlx_logits(fresh, ids), ref) <= TOL
    rep = inspect_source(src, base_config=tmp_path / "config.json")  # shapes only
    assert rep.layout == "mlx" and rep.ranks[2] == len(ad.modules)


def test_older_2d_switch_lora_a_is_read(tmp_path):
    _, _, src = _mlx_moe(tmp_path)
    from safetensors.torch import load_file, save_file

    t = load_file(src / "adapters.safetensors")
    key = "model.layers.0.block_sparse_moe.switch_mlp.up_proj.lora_a"
    E, r, d = t[key].shape
    t[key] = t[key].reshape(E * r, d)  # mlx-examples 2024: lora_a (r·E, in)
    (tmp_path / "old").mkdir()
    save_file(t, tmp_path / "old/adapters.safetensors")
    (tmp_path / "old/adapter_config.json").write_text((src / "adapter_config.json").read_text())
    a = load_adapter(src, base_config=tmp_path / "config.json")
    b = load_adapter(tmp_path / "old", base_config=tmp_path / "config.json")
    name = "model.layers.0.block_sparse_moe.experts.2.w3"
    assert torch.equal(a.modules[name].delta(), b.modules[name].delta())


def test_switch_factors_refused_for_family_without_per_expert_names(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "a").mkdir()
    save_file({"model.layers.0.mlp.switch_mlp.gate_proj.lora_a": torch.zeros(4, 2, 64),
               "model.layers.0.mlp.switch_mlp.gate_proj.lora_b": torch.zeros(4, 128, 2)},
              tmp_path / "a/adapters.safetensors")
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 2, "scale": 2.0}}))
    with pytest.raises(UnsupportedAdapterError, match="per-expert module names"):
        load_adapter(tmp_path / "a", base_config=FIX / "hf/qwen2/config.json")
