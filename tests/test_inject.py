"""inject_lora as PEFT users expect: "all-linear", transformers Conv1D (GPT-2), repeated calls,
and errors for modules a target matches but that cannot be wrapped. Against real PEFT/transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_ckpt import LoRALinear, inject_lora, stock_state_dict
from lora_ckpt.errors import AlreadyWrappedError, TargetNotFoundError, UnsupportedModuleError
from peers import INPUT_IDS, load_hf, rel_diff


def _peft_targeted(model, targets, **kw):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, **kw))
    return peft_model, sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                              if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_all_linear_wraps_what_peft_wraps(family):
    """Every Linear / Conv1D but the output head (tied or not), as PEFT's "all-linear"."""
    _, theirs = _peft_targeted(load_hf(family), "all-linear")
    model = load_hf(family)
    ours = inject_lora(model, targets="all-linear", r=2, alpha=4)
    assert sorted(ours) == theirs and "lm_head" not in ours and len(ours) > 0
    assert ours == [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def test_all_linear_on_a_plain_module_keeps_the_head():
    """PEFT excludes the output head only for a transformers model; so do we."""
    from peft import LoraConfig, get_peft_model

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    peft_model = get_peft_model(net(), LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
                    and hasattr(m, "base_layer"))
    assert sorted(inject_lora(net(), targets="ALL-LINEAR", r=2, alpha=2)) == theirs == ["0", "2"]


def test_gpt2_conv1d_matches_peft_fan_in_fan_out():
    """GPT-2's Conv1D layers: same logits as PEFT (fan_in_fan_out=True) with the same A and B, in
    fp32 and under bf16 autocast; merge gives the same logits; stock export loads into plain GPT-2."""
    targets = ["c_attn", "c_proj", "c_fc"]
    peft_model, theirs = _peft_targeted(load_hf("gpt2"), targets, fan_in_fan_out=True)
    model = load_hf("gpt2")
    names = inject_lora(model, targets=targets, r=2, alpha=4)
    assert sorted(names) == theirs
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in names:
            ours, peft = model.get_submodule(name), peft_model.base_model.model.get_submodule(name)
            assert ours.linear.weight.shape == (ours.in_features, ours.out_features)  # Conv1D's (in, out)
            for part in ("lora_A", "lora_B"):
                t = torch.randn(getattr(ours, part).weight.shape, generator=g) * 0.3
                getattr(ours, part).weight.copy_(t)
                getattr(peft, part)["default"].weight.copy_(t)
    model.eval(), peft_model.eval()
    with torch.no_grad():
        ref, got = peft_model(INPUT_IDS).logits, model(INPUT_IDS).logits
        assert rel_diff(got, ref) < 1e-5 and rel_diff(got, load_hf("gpt2")(INPUT_IDS).logits) > 1e-2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp, peft_amp = model(INPUT_IDS).logits, peft_model(INPUT_IDS).logits
        # bf16 rounding compounds over the network (PEFT's own run is 0.02-0.05 off fp32 here, by
        # seed); the layer-level parity is exact-to-rounding in test_autocast.py
        assert amp.dtype == torch.bfloat16 and rel_diff(amp, ref) < 0.2 and rel_diff(amp, peft_amp) < 0.2
        stock = stock_state_dict(model)
        plain = load_hf("gpt2")
        assert set(stock) == set(plain.state_dict())
        plain.load_state_dict(stock, strict=True)
        merged_peft = peft_model.merge_and_unload()
        for k, v in merged_peft.state_dict().items():
            torch.testing.assert_close(stock[k], v, rtol=0, atol=1e-6)
        assert rel_diff(plain(INPUT_IDS).logits, ref) < 1e-5
        for name in names:
            model.get_submodule(name).merge()
        assert rel_diff(model(INPUT_IDS).logits, ref) < 1e-5


def test_gpt2_stock_state_dict_loads_strict_into_the_wrapped_model():
    plain = load_hf("gpt2")
    model = copy.deepcopy(plain)
    inject_lora(model, targets=["c_attn"], r=2, alpha=4)
    result = model.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(model(INPUT_IDS).logits, plain(INPUT_IDS).logits)


def test_second_call_adds_targets_and_reports_the_wrapped_ones():
    model = load_hf("llama")
    first = inject_lora(model, targets=["q_proj", "v_proj"], r=2, alpha=4)
    a0 = model.get_submodule(first[0]).lora_A.weight.detach().clone()
    second = inject_lora(model, targets=["q_proj", "k_proj"], r=2, alpha=4)
    assert all(n.endswith("k_proj") for n in second) and len(second) == 2
    assert second.already_wrapped == [n for n in first if n.endswith("q_proj")]
    assert torch.equal(model.get_submodule(first[0]).lora_A.weight, a0)  # not re-initialised
    assert not isinstance(model.get_submodule(first[0]).linear, LoRALinear)  # never double-wrapped
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}.weight" for n in first + second for p in ("lora_A", "lora_B")}
    third = inject_lora(model, targets="all-linear", r=2, alpha=4)
    assert sorted(third.already_wrapped) == sorted(first + second) and len(third) == 2 * 4


def test_second_call_that_changes_nothing_or_disagrees_is_an_error():
    model = load_hf("llama")
    inject_lora(model, targets=["q_proj"], r=2, alpha=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AlreadyWrappedError, match="nothing to do") as e:
        inject_lora(model, targets=["q_proj"], r=2, alpha=4)
    assert e.value.modules == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(AlreadyWrappedError, match="r=2, alpha=4, asked r=8"):
        inject_lora(model, targets=["q_proj", "k_proj"], r=8, alpha=4)
    assert not any(isinstance(m, LoRALinear) for n, m in model.named_modules() if n.endswith("k_proj"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_targets_that_cannot_be_wrapped_are_named_with_their_type():
    model = load_hf("llama")
    with pytest.raises(UnsupportedModuleError, match=r"'model.embed_tokens' \(Embedding\)") as e:
        inject_lora(model, targets=["q_proj", "embed_tokens"], r=2, alpha=4)
    assert e.value.modules == {"model.embed_tokens": "Embedding"}
    with pytest.raises(UnsupportedModuleError, match="LlamaMLP"):
        inject_lora(model, targets=["mlp"], r=2, alpha=4)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing changed
    with pytest.raises(UnsupportedModuleError, match=r"\(Embedding\)"):
        inject_lora(load_hf("gpt2"), targets=["wte", "c_attn"], r=2, alpha=4)


def test_unmatched_targets_list_linear_and_conv1d_modules():
    with pytest.raises(TargetNotFoundError, match="Linear/Conv1D") as e:
        inject_lora(load_hf("gpt2"), targets=["q_proj"], r=2, alpha=4)
    assert "transformer.h.0.attn.c_attn" in e.value.candidates and e.value.targets == ["q_proj"]
