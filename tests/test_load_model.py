"""The meta recipe on real transformers models: init_empty_weights + inject_lora + load_checkpoint
leaves nothing on meta, keeps tied embeddings tied, accepts an index JSON, refuses adapters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_ckpt import LoRALinear, init_empty_weights, inject_lora, load_checkpoint
from lora_ckpt.errors import KeyMismatchError, MetaTensorError, NotACheckpointError, StateDictError
from peers import FIX, INPUT_IDS, load_hf


def _config(tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=tied)


def _stock(tied: bool, tmp_path, **save_kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tied)).eval()
    model.save_pretrained(tmp_path / "stock", **save_kw)
    return model, tmp_path / "stock"


def _empty(tied: bool):
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(_config(tied))
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(INPUT_IDS % 64).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", ["q_proj", "lm_head"]])
def test_meta_recipe_on_a_real_llama(tmp_path, tied, targets):
    stock, path = _stock(tied, tmp_path)
    model = _empty(tied)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type != "meta" for b in model.buffers())  # rotary inv_freq is real
    inject_lora(model, targets=targets, r=4, alpha=8)
    assert load_checkpoint(model, path) == ([], [])  # strict, nothing missing or unexpected
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert torch.equal(_logits(model), _logits(stock))  # adapters start as exact no-ops
    head = model.lm_head.linear.weight if isinstance(model.lm_head, LoRALinear) else model.lm_head.weight
    assert (head is model.model.embed_tokens.weight) == tied
    if isinstance(model.lm_head, LoRALinear):
        assert model.lm_head.lora_A.weight.device.type == "cpu" and model.lm_head.lora_A.weight.abs().sum() > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_stock_export_of_an_adapted_tied_head_is_refused(tmp_path):
    from lora_ckpt import stock_state_dict

    _, path = _stock(True, tmp_path)
    model = _empty(True)
    inject_lora(model, targets=["q_proj", "lm_head"], r=2, alpha=4)
    load_checkpoint(model, path)
    assert set(stock_state_dict(model)) >= {"lm_head.weight"}  # B is zero: nothing to merge yet
    with torch.no_grad():
        model.lm_head.lora_B.weight.fill_(0.1)
    with pytest.raises(StateDictError, match="tie_word_embeddings=False"):
        stock_state_dict(model)


def test_torch_meta_device_names_the_buffers_and_the_fix(tmp_path):
    from transformers import LlamaForCausalLM

    _, path = _stock(False, tmp_path)
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(False))
    inject_lora(model, targets=["q_proj"], r=2, alpha=4)
    with pytest.raises(MetaTensorError, match=r"rotary_emb\.inv_freq.*init_empty_weights\(\)") as e:
        load_checkpoint(model, path)
    assert e.value.names == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]


def test_parameters_missing_on_a_meta_model_are_an_error_even_non_strict(tmp_path):
    stock, _ = _stock(False, tmp_path)
    state = {k: v for k, v in stock.state_dict().items() if k != "model.norm.weight"}
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(KeyMismatchError, match=r"model\.norm\.weight"):
        load_checkpoint(_empty(False), tmp_path / "partial.safetensors")
    model = _empty(False)
    with pytest.raises(MetaTensorError, match=r"'model\.norm\.weight' \(not in the checkpoint\)") as e:
        load_checkpoint(model, tmp_path / "partial.safetensors", strict=False)
    assert e.value.names == ["model.norm.weight"]


def test_index_json_path_and_sharded_directory(tmp_path):
    stock, path = _stock(True, tmp_path, max_shard_size="20KB")
    index = path / "model.safetensors.index.json"
    assert index.is_file() and len(list(path.glob("model-*.safetensors"))) > 1
    for source in (index, path):
        model = _empty(True)
        inject_lora(model, targets=["k_proj"], r=2, alpha=4)
        assert load_checkpoint(model, source) == ([], [])
        assert torch.equal(_logits(model), _logits(stock))


def test_tied_checkpoint_with_both_keys_equal_loads_and_differing_is_refused(tmp_path):
    stock, _ = _stock(True, tmp_path)
    state = stock.state_dict()  # torch's state dict holds both tied keys, one tensor
    assert "lm_head.weight" in state
    save_file({k: v.clone() for k, v in state.items()}, tmp_path / "both.safetensors")
    model = _empty(True)
    assert load_checkpoint(model, tmp_path / "both.safetensors") == ([], [])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = {k: v.clone() for k, v in state.items()}
    state["lm_head.weight"] += 1
    save_file(state, tmp_path / "differ.safetensors")
    with pytest.raises(StateDictError, match="tie_word_embeddings=False"):
        load_checkpoint(_empty(True), tmp_path / "differ.safetensors")
    real = load_hf("llama")  # a real (not meta) tied-or-not model loads in place too
    assert load_checkpoint(real, FIX / "hf" / "llama" / "model.safetensors") == ([], [])


def test_gpt2_stock_checkpoint_loads_strict_into_an_empty_conv1d_lora_model():
    from transformers import AutoConfig, GPT2LMHeadModel

    with init_empty_weights():
        model = GPT2LMHeadModel(AutoConfig.from_pretrained(FIX / "hf" / "gpt2")).eval()
    inject_lora(model, targets=["c_attn", "c_fc"], r=2, alpha=4)
    assert load_checkpoint(model, FIX / "hf" / "gpt2") == ([], [])  # no lm_head.weight in the file: tied
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(model(INPUT_IDS).logits, load_hf("gpt2")(INPUT_IDS).logits)


@pytest.mark.parametrize("adapter, layout", [("peft/llama-lora", "peft"), ("torchtune/llama-lora/epoch_0", "torchtune"),
                                             ("peft/llama-modules-to-save", "peft")])
def test_an_adapter_path_says_use_apply_adapter(adapter, layout):
    path = FIX / adapter
    with pytest.raises(NotACheckpointError, match=rf"this is a {layout} adapter.*apply_adapter") as e:
        load_checkpoint(load_hf("llama"), path)
    assert e.value.layout == layout
    weight = next(p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".pt"))
    with pytest.raises(NotACheckpointError, match="apply_adapter"):
        load_checkpoint(load_hf("llama"), weight)
