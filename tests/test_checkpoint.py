"""Stock checkpoints into LoRA-injected real models: transformers Llama (GQA) and a Meta-style module."""

import zipfile

import pytest
import torch
from safetensors.torch import save_file

from lora_ckpt import (
    LoRALinear,
    adapter_state_dict,
    inject_lora,
    load_checkpoint,
    read_checkpoint,
    stock_state_dict,
)
from lora_ckpt.demo import MetaTransformer, build_meta_model
from lora_ckpt.errors import (
    AmbiguousCheckpointError,
    CheckpointFormatError,
    KeyMismatchError,
    TargetNotFoundError,
    UnsafeCheckpointError,
)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
META_PARAMS = {"dim": 32, "n_layers": 2, "head_dim": 8, "hidden_dim": 64, "n_heads": 4, "n_kv_heads": 2,
               "norm_eps": 1e-5, "vocab_size": 64, "rope_theta": 10000.0}


def tiny_llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


TOKENS = torch.arange(24).reshape(2, 12) % 64


@pytest.fixture
def llama_ckpt(tmp_path):
    model = tiny_llama()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


def test_llama_stock_checkpoint_loads_strict_with_identical_logits(llama_ckpt):
    stock, path = llama_ckpt
    model = tiny_llama(seed=1)
    wrapped = inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8)
    assert len(wrapped) == 2 * 7
    res = load_checkpoint(model, path, strict=True)
    assert res.missing == [] and res.unexpected == []
    assert torch.equal(logits(model, TOKENS), logits(stock, TOKENS))


def test_one_step_moves_only_adapters_and_changes_output(llama_ckpt):
    stock, path = llama_ckpt
    model = tiny_llama(seed=1)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8)
    load_checkpoint(model, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(TOKENS, labels=TOKENS)
    out.loss.backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in changed)
    model.eval()
    assert not torch.allclose(logits(model, TOKENS), logits(stock, TOKENS))


def test_strict_still_fails_for_a_missing_non_lora_key(llama_ckpt, tmp_path):
    stock, _ = llama_ckpt
    sd = {k: v for k, v in stock.state_dict().items() if k != "model.norm.weight"}
    path = tmp_path / "partial.safetensors"
    save_file(sd, path)
    model = tiny_llama(seed=1)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8)
    with pytest.raises(KeyMismatchError) as e:
        load_checkpoint(model, path, strict=True)
    assert e.value.missing == ["model.norm.weight"]
    # and torch's own strict path agrees: only that key, no adapter key hidden or added
    model2 = tiny_llama(seed=1)
    inject_lora(model2, targets=ALL_LINEAR, r=4, alpha=8)
    with pytest.raises(RuntimeError, match=r"model\.norm\.weight"):
        model2.load_state_dict(sd, strict=True)
    # a missing layer *inside* a LoRA module is not hidden either
    sd2 = {k: v for k, v in stock.state_dict().items() if k != "model.layers.0.self_attn.q_proj.weight"}
    res = tiny_and_inject().load_state_dict(sd2, strict=False)
    assert set(res.missing_keys) == {f"model.layers.0.self_attn.q_proj.{k}"
                                     for k in ("linear.weight", "lora_A.weight", "lora_B.weight")}


def tiny_and_inject():
    m = tiny_llama(seed=1)
    inject_lora(m, targets=ALL_LINEAR, r=4, alpha=8)
    return m


def test_invariant_base_into_lora_model_non_strict(llama_ckpt):
    stock, _ = llama_ckpt
    model = tiny_and_inject()
    res = model.load_state_dict(stock.state_dict(), strict=False)
    adapter_keys = set(adapter_state_dict(model))
    assert res.unexpected_keys == []
    assert set(res.missing_keys) <= adapter_keys


def test_stock_export_loads_into_plain_model_with_same_outputs(llama_ckpt):
    stock, path = llama_ckpt
    model = tiny_and_inject()
    load_checkpoint(model, path)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    plain = tiny_llama(seed=7)
    plain.load_state_dict(stock_state_dict(model), strict=True)
    assert list(stock_state_dict(model)) == list(plain.state_dict())
    torch.testing.assert_close(logits(plain, TOKENS), logits(model, TOKENS), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(plain, TOKENS), logits(stock, TOKENS))


def test_sharded_directory(tmp_path):
    stock = tiny_llama()
    stock.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = tiny_and_inject()
    load_checkpoint(model, tmp_path / "sharded", strict=True)
    assert torch.equal(logits(model, TOKENS), logits(stock, TOKENS))


def test_meta_style_module_meta_device_assign(tmp_path):
    torch.manual_seed(0)
    ref = MetaTransformer(META_PARAMS)
    for p in ref.parameters():
        p.data = p.data.to(torch.bfloat16)  # parameters only: the RoPE table stays complex
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "consolidated.safetensors")
    model = build_meta_model(META_PARAMS)
    inject_lora(model, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"], r=4, alpha=8)
    load_checkpoint(model, tmp_path, strict=True)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16, name
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert torch.count_nonzero(m.lora_A.weight) > 0 and torch.count_nonzero(m.lora_B.weight) == 0
    tokens = torch.arange(16).reshape(2, 8)
    assert torch.equal(logits(model, tokens), logits(ref, tokens))


def _fake_cuda_pickle(path, tensors):
    """A torch.save zip whose storages claim 'cuda:0', as a checkpoint saved on a GPU has."""
    torch.save(tensors, path)
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # BINUNICODE, pickle protocol 2
    assert cpu in entries[pkl]
    entries[pkl] = entries[pkl].replace(cpu, cuda)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)


def test_cuda_saved_pickle_loads_on_cpu(tmp_path, llama_ckpt):
    stock, _ = llama_ckpt
    path = tmp_path / "pytorch_model.bin"
    _fake_cuda_pickle(path, stock.state_dict())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.load(path, weights_only=True)  # what a naive loader does
    model = tiny_and_inject()
    load_checkpoint(model, tmp_path, strict=True)
    assert torch.equal(logits(model, TOKENS), logits(stock, TOKENS))


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_code_executing_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_directory_with_two_candidates_is_ambiguous(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "one.safetensors")
    save_file({"a": torch.zeros(1)}, tmp_path / "two.safetensors")
    with pytest.raises(AmbiguousCheckpointError) as e:
        read_checkpoint(tmp_path)
    assert e.value.candidates == ["one.safetensors", "two.safetensors"]


def test_truncated_safetensors_is_a_format_error(tmp_path, llama_ckpt):
    _, path = llama_ckpt
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        read_checkpoint(bad)


def test_mmap_tensors_are_copy_on_write(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(8, dtype=torch.float32)}, path)
    before = path.read_bytes()
    t = read_checkpoint(path)["w"]
    t.add_(1)
    assert path.read_bytes() == before and t[0].item() == 1.0


def test_target_matching_nothing_lists_the_linears():
    with pytest.raises(TargetNotFoundError) as e:
        inject_lora(tiny_llama(), targets=["q_proj", "wq"], r=2, alpha=2)
    assert e.value.targets == ["wq"] and "model.layers.0.self_attn.q_proj" in e.value.candidates
    with pytest.raises(TargetNotFoundError):
        inject_lora(tiny_llama(), targets=r"nothing\.here", r=2, alpha=2)


def test_regex_and_suffix_targets_follow_peft():
    m = tiny_llama()
    names = inject_lora(m, targets=r".*layers\.1\.self_attn\.(q|v)_proj", r=2, alpha=2)
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    m = tiny_llama()
    names = inject_lora(m, targets=["self_attn.q_proj"], r=2, alpha=2)
    assert len(names) == 2
    assert all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)


def test_peft_matches_the_same_modules():
    from peft import LoraConfig, get_peft_model

    for targets in (["q_proj", "self_attn.v_proj"], r".*\.(gate|up)_proj"):
        peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=2, target_modules=targets))
        theirs = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                        if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
        assert sorted(inject_lora(tiny_llama(), targets=targets, r=2, alpha=2)) == theirs
