"""Model <-> adapter files: save_adapter (any layout, verified; PEFT output loads in PeftModel with
no missing/unexpected keys and the same logits) and apply_adapter (any layout, hf://, Adapter,
state dicts), with strict errors. Against real PEFT and transformers."""

from __future__ import annotations

import json

import pytest
import torch

import lora_ckpt
from lora_ckpt import LoRALinear, apply_adapter, inject_lora, load_adapter, save_adapter
from lora_ckpt.errors import (
    AdapterMismatchError,
    ConfigError,
    MergedLayerError,
    OutputExistsError,
    ShapeMismatchError,
    UnsupportedAdapterError,
)
from lora_ckpt.layouts import LAYOUTS
from peers import ALL_LINEAR, FIX, INPUT_IDS, capture, hf_logits, load_hf, peft_logits, peft_set_state_dict, rel_diff

PEFT_LORA = FIX / "peft" / "llama-lora"


def _trained(family="llama", targets=ALL_LINEAR, seed=5, **kw):
    """A real fixture model injected with lora-ckpt, adapters drawn at random (as after training)."""
    model = load_hf(family)
    inject_lora(model, targets=targets, r=kw.pop("r", 4), alpha=kw.pop("alpha", 8), **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("family, targets", [("llama", ALL_LINEAR), ("gpt2", ["c_attn", "c_proj", "c_fc"]),
                                             ("gemma", "all-linear")])
def test_peft_output_loads_in_peft_with_no_key_problems_and_same_logits(tmp_path, family, targets):
    model = _trained(family, targets, use_rslora=True)
    written = save_adapter(model, tmp_path / "out", layout="peft")
    assert len(written.modules) == len(lora_ckpt.inject.lora_modules(model))
    logits, cap = peft_logits(family, tmp_path / "out")
    assert not cap.about_keys(), cap.messages
    missing, unexpected = peft_set_state_dict(family, tmp_path / "out")
    assert missing == [] and unexpected == []
    ours = hf_logits(model)
    assert rel_diff(logits, ours) < 1e-6 and rel_diff(ours, hf_logits(load_hf(family))) > 1e-2
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] == (family == "gpt2")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_round_trips_model_to_files_to_model(tmp_path, layout):
    """save_adapter in each registered layout, apply_adapter into a fresh model: the same logits."""
    targets = ["q_proj", "k_proj", "v_proj"] if layout == "litgpt" else ALL_LINEAR
    model = _trained("llama", targets)
    kw = {"alpha": 8.0} if layout == "loralib" else {}
    save_adapter(model, tmp_path / layout, layout=layout)
    fresh = load_hf("llama")
    applied = apply_adapter(fresh, tmp_path / layout, layout=layout, **kw)
    assert sorted(applied) == sorted(lora_ckpt.inject.lora_modules(model))
    assert rel_diff(hf_logits(fresh), hf_logits(model)) < 1e-5
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_save_adapter_refuses_existing_output_merged_layers_and_plain_models(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path / "out")
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError):
        save_adapter(model, tmp_path / "out")
    save_adapter(model, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before  # reproducible bytes
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(MergedLayerError, match="unmerge"):
        save_adapter(model, tmp_path / "merged")
    with pytest.raises(AdapterMismatchError, match="no LoRA layers"):
        save_adapter(load_hf("llama"), tmp_path / "plain")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "plain").exists()


def test_save_adapter_still_takes_an_adapter_and_records_the_base_model(tmp_path):
    adapter = load_adapter(PEFT_LORA)
    save_adapter(adapter, tmp_path / "tt", layout="torchtune", base_model="my-org/llama",
                 base_config=FIX / "hf" / "llama" / "config.json")
    assert lora_ckpt.verify(tmp_path / "tt", PEFT_LORA, base_config=FIX / "hf" / "llama" / "config.json").ok
    save_adapter(adapter, tmp_path / "p", base_model="my-org/llama")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "my-org/llama"


def test_apply_a_peft_directory_to_a_plain_model_matches_peft():
    model = load_hf("llama")
    applied = apply_adapter(model, PEFT_LORA)
    theirs, _ = peft_logits("llama", PEFT_LORA)
    assert rel_diff(hf_logits(model), theirs) < 1e-6
    assert len(applied) == len(load_adapter(PEFT_LORA).modules)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(AdapterMismatchError, match="would change nothing"):
        apply_adapter(model, PEFT_LORA)  # a second time: already there


def test_apply_a_gpt2_conv1d_adapter_matches_peft():
    model = load_hf("gpt2")
    applied = apply_adapter(model, FIX / "peft" / "gpt2-lora")
    assert all(type(model.get_submodule(n)).__name__ == "LoRAConv1D" for n in applied)
    theirs, _ = peft_logits("gpt2", FIX / "peft" / "gpt2-lora")
    assert rel_diff(hf_logits(model), theirs) < 1e-6


def test_apply_into_wrapped_layers_checks_scale_and_rank():
    theirs, _ = peft_logits("llama", PEFT_LORA)
    model = load_hf("llama")
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=16)  # the file's alpha is 8
    with pytest.raises(AdapterMismatchError, match="scale 2 vs the layer's 4") as e:
        apply_adapter(model, PEFT_LORA)
    assert e.value.modules and all(not m.lora_B.weight.any() for m in lora_ckpt.inject.lora_modules(model).values())
    apply_adapter(model, PEFT_LORA, strict=False)  # folded into B: the same function
    assert rel_diff(hf_logits(model), theirs) < 1e-6
    model = load_hf("llama")
    inject_lora(model, targets=ALL_LINEAR, r=8, alpha=16)  # same scale, larger rank
    with pytest.raises(AdapterMismatchError, match="rank 4 vs the layer's 8"):
        apply_adapter(model, PEFT_LORA)
    apply_adapter(model, PEFT_LORA, strict=False)  # zero-padded
    assert rel_diff(hf_logits(model), theirs) < 1e-6
    model = load_hf("llama")
    inject_lora(model, targets=ALL_LINEAR, r=2, alpha=4)
    with pytest.raises(AdapterMismatchError, match="cannot be padded"):
        apply_adapter(model, PEFT_LORA, strict=False)


def test_apply_adds_layers_next_to_existing_ones():
    theirs, _ = peft_logits("llama", PEFT_LORA)
    model = load_hf("llama")
    inject_lora(model, targets=["q_proj"], r=4, alpha=8)  # the rest gets wrapped by apply_adapter
    apply_adapter(model, PEFT_LORA)
    assert rel_diff(hf_logits(model), theirs) < 1e-6


def test_adapter_for_another_model_and_unsupported_content_are_refused():
    model = load_hf("llama")
    with pytest.raises(AdapterMismatchError, match="have no target in LlamaForCausalLM") as e:
        apply_adapter(model, FIX / "peft" / "gpt2-lora")
    assert "transformer.h.0.attn.c_attn" in e.value.modules
    with pytest.raises(UnsupportedAdapterError, match=r"DoRA magnitudes.*merge"):
        apply_adapter(model, FIX / "peft" / "llama-dora")
    with pytest.raises(UnsupportedAdapterError, match="LoRA biases"):
        apply_adapter(model, FIX / "peft" / "llama-lora-bias")
    with pytest.raises(UnsupportedAdapterError, match="embedding LoRA"):
        apply_adapter(model, FIX / "peft" / "llama-embedding")
    with pytest.raises(UnsupportedAdapterError, match="full tensors"):
        apply_adapter(model, FIX / "peft" / "llama-modules-to-save")
    assert not lora_ckpt.inject.lora_modules(model)  # nothing half-applied
    from transformers import LlamaConfig, LlamaForCausalLM

    narrow = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(ConfigError, match="adapter does not fit the base config"):
        apply_adapter(narrow, PEFT_LORA)  # the reader checks the model's own config
    with pytest.raises(ShapeMismatchError, match="64 -> 64 layer, the model's is 32 -> 32; the adapter was trained"):
        apply_adapter(narrow, load_adapter(PEFT_LORA))
    applied = apply_adapter(model, FIX / "peft" / "llama-modules-to-save", strict=False)
    assert applied


def test_apply_a_torchtune_epoch_and_an_adapter_object():
    tt = FIX / "torchtune" / "llama-lora" / "epoch_0"
    ref = load_hf("llama")
    adapter = load_adapter(tt, base_config=FIX / "hf" / "llama" / "config.json")
    apply_adapter(ref, adapter)
    model = load_hf("llama")
    apply_adapter(model, tt)  # head counts from the model's own config
    assert torch.equal(hf_logits(model), hf_logits(ref))


def test_apply_state_dicts_with_peft_prefixes_and_default_names():
    from peft import PeftModel, get_peft_model_state_dict

    theirs, _ = peft_logits("llama", PEFT_LORA)
    with capture():
        peft_model = PeftModel.from_pretrained(load_hf("llama"), str(PEFT_LORA))
    saved = get_peft_model_state_dict(peft_model)  # base_model.model. prefix
    in_memory = {k: v for k, v in peft_model.state_dict().items() if ".lora_" in k}  # .default. names
    assert any(".lora_A.default.weight" in k for k in in_memory)
    for state in (saved, in_memory):
        model = load_hf("llama")
        inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8)
        assert len(apply_adapter(model, state)) == len(state) // 2
        assert rel_diff(hf_logits(model), theirs) < 1e-6
    with pytest.raises(AdapterMismatchError, match="carries no scale"):
        apply_adapter(load_hf("llama"), saved)
    with pytest.raises(UnsupportedAdapterError, match="not LoRA A/B"):
        apply_adapter(model, {**saved, "base_model.model.model.norm.weight": torch.ones(64)})


def test_a_peft_models_own_state_dict_loads_strict_into_an_injected_model():
    """PEFT's in-memory keys (``base_layer.weight``, ``lora_A.default.weight``) are a dialect of LoRALinear."""
    from peft import PeftModel

    with capture():
        peft_model = PeftModel.from_pretrained(load_hf("llama"), str(PEFT_LORA)).eval()
    model = load_hf("llama")
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8)
    result = model.load_state_dict(peft_model.base_model.model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert rel_diff(hf_logits(model), hf_logits(peft_model)) < 1e-6


def test_apply_before_loading_the_base_is_refused():
    with lora_ckpt.init_empty_weights():
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(FIX / "hf" / "llama"))
    with pytest.raises(lora_ckpt.errors.MetaTensorError, match="load the base checkpoint"):
        apply_adapter(model, PEFT_LORA)


def test_apply_from_the_hub(hub):
    repo = "tester/apply-" + __import__("uuid").uuid4().hex[:8]
    hub.add_files(repo, {p.name: p.read_bytes() for p in PEFT_LORA.iterdir() if p.is_file()})
    model = load_hf("llama")
    apply_adapter(model, f"hf://{repo}")
    theirs, _ = peft_logits("llama", PEFT_LORA)
    assert rel_diff(hf_logits(model), theirs) < 1e-6
    assert INPUT_IDS.shape[0] == 2
