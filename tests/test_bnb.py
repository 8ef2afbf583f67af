"""bitsandbytes interop: a Linear4bit model's saved state dict (as transformers saves a pre-quantized model) into a
lora-ckpt QLoRA model, with the one-code-step loss measured; a PEFT adapter trained on a bnb-4bit base."""

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("torchao")
bnb = pytest.importorskip("bitsandbytes")

from lora_ckpt import inject_lora, load_checkpoint, read_checkpoint  # noqa: E402
from lora_ckpt.bnb import bnb_4bit_weights, from_bnb_state_dict  # noqa: E402
from lora_ckpt.errors import QuantizationError  # noqa: E402
from lora_ckpt.nf4 import is_nf4  # noqa: E402

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.arange(16).reshape(2, 8) % 64
NF4_MAX_GAP = 1.0 - 0.6962  # the widest gap between two neighbouring NF4 codes (scaled by the block absmax)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def to_bnb_4bit(model):
    """Swap the 7 projections for bitsandbytes Linear4bit (NF4, double quantization), as load_in_4bit does."""
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if name in ALL_LINEAR:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                setattr(mod, name, q.to("cpu"))  # .to() quantizes
    return model


@pytest.fixture(scope="module")
def bnb_ckpt(tmp_path_factory):
    model = to_bnb_4bit(tiny_llama())
    path = tmp_path_factory.mktemp("bnb") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


def unpack_codes(packed):
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1).to(torch.int16)


def test_bnb_state_dict_loads_strict_and_is_within_one_code_step(bnb_ckpt):
    bnb_model, path = bnb_ckpt
    sd = read_checkpoint(path)
    assert len(bnb_4bit_weights(sd)) == 7
    assert "model.layers.0.self_attn.q_proj.weight.nested_absmax" in sd
    model = tiny_llama(seed=1)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    load_checkpoint(model, path, strict=True)  # the bnb keys are converted on the way in
    equal = total = 0
    for name in ALL_LINEAR:
        module = f"model.layers.0.{'self_attn' if name in ALL_LINEAR[:4] else 'mlp'}.{name}"
        ours, ref = model.get_submodule(module), bnb_model.get_submodule(module)
        w = ours.linear.weight
        assert is_nf4(w) and w.dtype == torch.bfloat16
        codes_ours, codes_bnb = unpack_codes(w.quantized_data), unpack_codes(ref.weight.data)
        assert (codes_ours - codes_bnb).abs().max() <= 1  # never more than one code apart (in fact: equal)
        equal += int((codes_ours == codes_bnb).sum())
        total += codes_ours.numel()
        dense_bnb = bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state).float()
        block_max = dense_bnb.reshape(-1, 64).abs().amax(1, keepdim=True)
        err = (w.to(torch.float32) - dense_bnb).reshape(-1, 64).abs()
        assert bool((err <= NF4_MAX_GAP * block_max).all())  # within one code step
        assert bool((err <= 0.02 * block_max).all())  # measured: <= 1.1% (only the block scales are re-encoded)
    assert equal / total > 0.999  # measured: every code carries over
    with torch.no_grad():
        rel = (model(TOKENS).logits.float() - bnb_model(TOKENS).logits.float()).norm() / \
            bnb_model(TOKENS).logits.float().norm()
    assert rel < 0.05


def test_conversion_keeps_unquantized_keys_and_does_not_modify_the_input(bnb_ckpt):
    _, path = bnb_ckpt
    sd = read_checkpoint(path)
    keys = list(sd)
    out = from_bnb_state_dict(sd)
    assert list(sd) == keys and sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert not any(".weight." in k for k in out)
    assert out["lm_head.weight"] is sd["lm_head.weight"]
    assert out["model.layers.0.mlp.up_proj.weight"].shape == (512, 256)


def test_incomplete_or_fp4_bnb_state_is_a_typed_error(bnb_ckpt):
    _, path = bnb_ckpt
    sd = read_checkpoint(path)
    broken = {k: v for k, v in sd.items() if k != "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"}
    with pytest.raises(QuantizationError, match="up_proj"):
        from_bnb_state_dict(broken)
    fp4 = {(k.replace("bitsandbytes__nf4", "bitsandbytes__fp4") if "q_proj" in k else k): v for k, v in sd.items()}
    with pytest.raises(QuantizationError, match="FP4"):
        from_bnb_state_dict(fp4)


def test_peft_adapter_trained_on_a_bnb_base_applies_to_the_quantized_model(bnb_ckpt, tmp_path):
    """PEFT + bnb Linear4bit base: train two steps, save the adapter; into a lora-ckpt QLoRA model loaded from the
    same bnb checkpoint, with apply_adapter."""
    from peft import LoraConfig, get_peft_model

    from lora_ckpt import apply_adapter
    from lora_ckpt.io import load_tensors

    bnb_model, path = bnb_ckpt
    peft_model = get_peft_model(to_bnb_4bit(tiny_llama()), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR))
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        peft_model(TOKENS, labels=TOKENS).loss.backward()
        opt.step()
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = load_tensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())

    model = tiny_llama(seed=1)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    load_checkpoint(model, path, strict=True)
    applied = apply_adapter(model, tmp_path / "adapter")
    assert len(applied) == 7 and all(model.get_submodule(n).quantized for n in applied)
    for n in applied:
        ours = model.get_submodule(n).lora_B.weight
        assert torch.equal(ours, adapter[f"base_model.model.{n}.lora_B.weight"].to(ours.dtype))
    peft_model.eval()
    with torch.no_grad():
        ours, theirs = model(TOKENS).logits.float(), peft_model(TOKENS).logits.float()
        base = bnb_model(TOKENS).logits.float()
    assert (theirs - base).norm() > 0.01 * base.norm()  # the adapter changes the output
    assert (ours - theirs).norm() / theirs.norm() < 0.05  # and it does the same on our NF4 base
