"""QLoRA: LoRALinear over an NF4 base (torchao NF4Tensor), checked against torchao's to_nf4 and torchtune's
quantized LoRALinear; stock checkpoints in every layout the project reads load strict into quantized models."""

import copy
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("torchao")
from torchao.dtypes.nf4tensor import to_nf4

from lora_ckpt import (
    LoRALinear,
    adapter_state_dict,
    inject_lora,
    load_checkpoint,
    nf4,
    stock_state_dict,
)
from lora_ckpt.demo import MetaTransformer, build_meta_model
from lora_ckpt.errors import MissingDependencyError, QuantizationError, QuantizedMergeError
from lora_ckpt.keys import KEY_DIALECTS
from lora_ckpt.nf4 import NF4Linear, is_nf4, quantize_nf4

ROOT = Path(__file__).resolve().parent.parent
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
META_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
# the smallest Llama shapes NF4 blocks (every projection a multiple of 64 * 256 elements), GQA kept
META_PARAMS = {"dim": 256, "n_layers": 1, "head_dim": 64, "hidden_dim": 512, "n_heads": 4, "n_kv_heads": 2,
               "norm_eps": 1e-5, "vocab_size": 64, "rope_theta": 10000.0}
TOKENS = torch.arange(16).reshape(2, 8) % 64
NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def assert_same_nf4(a, b):
    assert is_nf4(a) and is_nf4(b)
    assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    assert (a.block_size, a.scaler_block_size, a.n_blocks) == (b.block_size, b.scaler_block_size, b.n_blocks)
    for name in NF4_PARTS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


def tiny_llama(seed=0, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def nf4_weights(model):
    return {n: p for n, p in model.named_parameters() if is_nf4(p)}


# ----------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 256), (384, 128), (32768,)])
def test_quantize_nf4_bytes_equal_torchao_to_nf4(monkeypatch, dtype, shape):
    monkeypatch.setitem(nf4._CHUNK, "cpu", 4096)  # many chunks even on tiny tensors
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.02
    assert_same_nf4(quantize_nf4(w), to_nf4(w))
    assert_same_nf4(quantize_nf4(w.float(), dtype=dtype), to_nf4(w))  # cast first, then quantize


def test_nf4_linear_loads_a_plain_weight_as_to_nf4_of_it():
    src = nn.Linear(256, 64, dtype=torch.bfloat16)
    layer = NF4Linear(256, 64, dtype=torch.bfloat16)
    assert layer.load_state_dict(src.state_dict()).missing_keys == []
    assert_same_nf4(layer.weight, to_nf4(src.weight.detach()))
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    fp32 = {k: v.float() for k, v in src.state_dict().items()}  # an fp32 checkpoint, a bf16 layer
    layer.load_state_dict(fp32)
    assert_same_nf4(layer.weight, to_nf4(src.weight.detach()))
    assert torch.equal(layer.state_dict()["weight"], to_nf4(src.weight.detach()).to(torch.bfloat16))


# ---------------------------------------------------------------- torchtune parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_torchtune_quantized_lora_linear(dtype, bias):
    from torchtune.modules.peft import LoRALinear as TTLoRALinear

    torch.manual_seed(0)
    src = nn.Linear(256, 128, bias=bias, dtype=dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # torchtune's builders quantize in the default dtype
    try:
        tt = TTLoRALinear(256, 128, rank=8, alpha=16, use_bias=bias, quantize_base=True)
    finally:
        torch.set_default_dtype(default)
    ours = LoRALinear(256, 128, r=8, alpha=16, bias=bias, dtype=dtype, quantize_base=True)
    tt.load_state_dict({**src.state_dict()}, strict=False)  # NF4 copy_: re-quantizes, as its loader does
    ours.load_state_dict(src.state_dict())  # a stock Linear: fresh adapter
    assert_same_nf4(ours.linear.weight, tt.weight)
    x = torch.randn(3, 5, 256, dtype=dtype)
    with torch.no_grad():
        tt.lora_a.weight.copy_(ours.lora_A.weight)
        tt.lora_b.weight.zero_()
        if not bias:  # B = 0: the base outputs, bit for bit (torchtune adds a bias after the GEMM, we before)
            assert torch.equal(ours(x), tt(x))
        ours.lora_B.weight.normal_(0, 0.1)
        tt.lora_b.weight.copy_(ours.lora_B.weight)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xr), tt(xt)
    torch.testing.assert_close(yo, yt, **tol)
    g = torch.randn_like(yo)
    yo.backward(g)
    yt.backward(g)
    torch.testing.assert_close(xr.grad, xt.grad, **tol)
    torch.testing.assert_close(ours.lora_A.weight.grad, tt.lora_a.weight.grad, **tol)
    torch.testing.assert_close(ours.lora_B.weight.grad, tt.lora_b.weight.grad, **tol)


def test_grad_to_input_and_adapters_equals_the_dequantized_dense_layer():
    torch.manual_seed(0)
    q = LoRALinear(256, 128, r=4, alpha=8, dtype=torch.float32, quantize_base=True)
    nn.init.normal_(q.lora_B.weight, 0, 0.1)
    dense = LoRALinear(256, 128, r=4, alpha=8, dtype=torch.float32)
    dense.load_state_dict(q.state_dict())  # dequantized base, same adapter
    x = torch.randn(6, 256, requires_grad=True)
    xd = x.detach().clone().requires_grad_()
    q(x).square().sum().backward()
    dense(xd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.lora_A.weight.grad, dense.lora_A.weight.grad, rtol=1e-5, atol=1e-5)
    q.dropout = nn.Dropout(0.0)  # the general path (dropout module) gives the same
    q.train()
    q.lora_A.weight.grad = None
    q(xd.detach()).square().sum().backward()
    torch.testing.assert_close(q.lora_A.weight.grad, dense.lora_A.weight.grad, rtol=1e-5, atol=1e-5)


def test_autocast_runs_in_autocast_dtype_like_the_dense_layer():
    torch.manual_seed(0)
    q = LoRALinear(256, 128, r=4, alpha=8, dtype=torch.float32, quantize_base=True)
    nn.init.normal_(q.lora_B.weight, 0, 0.1)
    dense = LoRALinear(256, 128, r=4, alpha=8, dtype=torch.float32)
    dense.load_state_dict(q.state_dict())
    x = torch.randn(4, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yq, yd = q(x), dense(x)
    assert yq.dtype == yd.dtype == torch.bfloat16
    torch.testing.assert_close(yq, yd)
    base = NF4Linear.from_linear(nn.Linear(256, 64))
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = base(xr)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and xr.grad.dtype == torch.float32


# ------------------------------------------------------------- stock layouts, strict
def test_hf_safetensors_loads_strict_b0_outputs_equal_dequantized_stock(tmp_path):
    stock = tiny_llama()
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, tmp_path / "model.safetensors")
    model = tiny_llama(seed=1)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    load_checkpoint(model, tmp_path / "model.safetensors", strict=True)
    weights = nf4_weights(model)
    assert len(weights) == 7
    for name, w in weights.items():
        stock_name = name.replace(".linear.weight", ".weight")
        assert_same_nf4(w, to_nf4(stock.get_parameter(stock_name).detach()))
    dequantized = copy.deepcopy(stock)
    dequantized.load_state_dict(stock_state_dict(model))  # B = 0: the dequantized stock weights
    assert torch.equal(logits(model), logits(dequantized))


def test_sharded_hf_directory_and_init_empty_weights(tmp_path):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    stock = tiny_llama()
    stock.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    with init_empty_weights():
        model = LlamaForCausalLM(stock.config)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    assert all(w.device.type == "meta" for w in nf4_weights(model).values())
    load_checkpoint(model, tmp_path / "sharded", strict=True)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16, name
    eager = tiny_llama(seed=3)
    inject_lora(eager, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    load_checkpoint(eager, tmp_path / "sharded", strict=True)
    for name, w in model.named_parameters():  # (buffers differ: .to(bf16) casts the eager RoPE table)
        if is_nf4(w):
            assert_same_nf4(w, eager.get_parameter(name))
        elif "lora_A" not in name:
            assert torch.equal(w, eager.get_parameter(name)), name


def test_meta_names_on_meta_device_quantize_in_the_checkpoint_dtype(tmp_path):
    torch.manual_seed(0)
    ref = MetaTransformer(META_PARAMS)
    for p in ref.parameters():
        p.data = p.data.to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "consolidated.safetensors")
    model = build_meta_model(META_PARAMS)
    inject_lora(model, targets=META_TARGETS, r=4, alpha=8, quantize_base=True)
    load_checkpoint(model, tmp_path, strict=True)
    for name, w in nf4_weights(model).items():
        assert w.device.type == "cpu" and w.dtype == torch.bfloat16
        assert_same_nf4(w, to_nf4(ref.get_parameter(name.replace(".linear.weight", ".weight")).detach()))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert m.lora_A.weight.dtype == torch.bfloat16 and torch.count_nonzero(m.lora_B.weight) == 0
    plain = build_meta_model(META_PARAMS)
    plain.load_state_dict(stock_state_dict(model), assign=True)
    assert torch.equal(logits(model), logits(plain))


@pytest.mark.parametrize("dialect", [d for d in KEY_DIALECTS if "lora_A.weight" in d.keys], ids=lambda d: d.name)
def test_every_lora_key_dialect_loads_strict_into_a_quantized_layer(dialect):
    torch.manual_seed(0)
    bias = "linear.bias" in dialect.keys
    src = LoRALinear(256, 64, r=4, alpha=8, bias=bias, dtype=torch.bfloat16)
    nn.init.normal_(src.lora_B.weight, 0, 0.1)
    theirs = {dialect.keys[k]: v for k, v in src.state_dict().items()}
    q = LoRALinear(256, 64, r=4, alpha=8, bias=bias, dtype=torch.bfloat16, quantize_base=True)
    assert q.load_state_dict(theirs, strict=True).missing_keys == []
    assert_same_nf4(q.linear.weight, to_nf4(src.linear.weight.detach()))
    for k in ("lora_A.weight", "lora_B.weight"):
        assert torch.equal(q.state_dict()[k], src.state_dict()[k])


def test_torchtune_qlora_model_checkpoint_loads_strict():
    """A torchtune QLoRA model's own saved state dict (its reparametrize hook: NF4 -> bf16) into ours."""
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules.common_utils import reparametrize_as_dtype_state_dict_post_hook

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        tt = lora_llama2(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                         vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=256, max_seq_len=64,
                         intermediate_dim=512, lora_rank=4, lora_alpha=8, quantize_base=True)
    finally:
        torch.set_default_dtype(default)
    tt._register_state_dict_hook(partial(reparametrize_as_dtype_state_dict_post_hook, dtype=torch.bfloat16,
                                         offload_to_cpu=True))  # as its recipes do
    sd = tt.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values())
    ours = copy.deepcopy(tt)  # the same module tree, rebuilt as lora-ckpt QLoRA layers
    for m in list(ours.modules()):
        for child_name, child in list(m.named_children()):
            if type(child).__name__ == "LoRALinear":
                plain = nn.Linear(child.in_dim, child.out_dim, bias=child.use_bias, dtype=torch.bfloat16)
                setattr(m, child_name, LoRALinear.from_linear(plain, r=4, alpha=8, quantize_base=True))
    assert ours.load_state_dict(sd, strict=True).missing_keys == []
    for name, m in tt.named_modules():
        if type(m).__name__ == "LoRALinear":
            assert_same_nf4(ours.get_submodule(name).linear.weight, m.weight)
            assert torch.equal(ours.get_submodule(name).lora_A.weight, m.lora_a.weight)


# ---------------------------------------------------------- training, saving, export
def test_training_step_moves_only_adapters_and_round_trips(tmp_path):
    stock = tiny_llama()
    model = tiny_llama(seed=1)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    model.load_state_dict(stock.state_dict(), strict=True)
    before = {n: p.detach().clone() if not is_nf4(p) else p for n, p in model.named_parameters()}
    frozen_nf4 = {n: p.quantized_data.clone() for n, p in nf4_weights(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(not is_nf4(p) for p in trainable) and len(trainable) == 14
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(2):  # B = 0 at the first step, so A moves from the second
        opt.zero_grad()
        model(TOKENS, labels=TOKENS).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if is_nf4(p):
            assert torch.equal(p.quantized_data, frozen_nf4[n]) and p.grad is None, n
        elif p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    # state dict: original-dtype dense bases, plain tensors only; into a fresh quantized model
    sd = model.state_dict()
    assert all(type(v) is torch.Tensor and v.dtype == torch.bfloat16 for v in sd.values())
    again = tiny_llama(seed=2)
    inject_lora(again, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    again.load_state_dict(sd, strict=True)
    for n, p in nf4_weights(model).items():
        q = again.get_parameter(n)
        assert torch.equal(q.quantized_data, p.quantized_data), n  # the same 4-bit codes
        # re-quantizing a dequantized weight re-derives the int8 block scales: within one scale step
        torch.testing.assert_close(q.to(torch.float32), p.to(torch.float32), rtol=0, atol=2e-3)
    assert all(torch.equal(v, adapter_state_dict(again)[k]) for k, v in adapter_state_dict(model).items())


def test_stock_export_loads_into_plain_model_with_same_outputs():
    stock = tiny_llama(dtype=torch.float32)
    model = tiny_llama(seed=1, dtype=torch.float32)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    model.load_state_dict(stock.state_dict())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    plain = tiny_llama(seed=7, dtype=torch.float32)
    plain.load_state_dict(stock_state_dict(model), strict=True)
    torch.testing.assert_close(logits(plain), logits(model), rtol=1e-4, atol=1e-4)
    assert all(type(v) is torch.Tensor for v in stock_state_dict(model).values())


def test_module_to_moves_but_never_dequantizes_the_base():
    layer = LoRALinear(256, 64, r=4, alpha=8, dtype=torch.bfloat16, quantize_base=True)
    codes = layer.linear.weight.quantized_data.clone()
    layer.to(torch.float32)
    assert is_nf4(layer.linear.weight) and layer.linear.weight.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == torch.float32 and layer.linear.bias.dtype == torch.float32
    layer.to("cpu")
    assert torch.equal(layer.linear.weight.quantized_data, codes)
    copy.deepcopy(layer)(torch.randn(2, 256))


# -------------------------------------------------------------------------- bad input
def test_a_size_nf4_cannot_block_is_a_typed_error():
    with pytest.raises(QuantizationError) as e:
        LoRALinear(100, 30, r=2, alpha=4, quantize_base=True)
    assert e.value.shape == (30, 100) and isinstance(e.value, ValueError)
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 10))
    with pytest.raises(QuantizationError, match=r"'1\.weight'"):
        inject_lora(model, targets=["0", "1"], r=2, alpha=4, quantize_base=True)
    assert all(type(m) is nn.Linear for m in model)  # nothing replaced
    with pytest.raises(QuantizationError):
        quantize_nf4(torch.zeros(64, 256, dtype=torch.uint8))


def test_merge_of_a_quantized_layer_is_refused():
    layer = LoRALinear(256, 64, r=4, alpha=8, quantize_base=True)
    codes = layer.linear.weight.quantized_data.clone()
    with pytest.raises(QuantizedMergeError, match="stock_state_dict"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.linear.weight.quantized_data, codes)


def test_missing_torchao_is_a_typed_error_and_plain_lora_still_works():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torchao' or name.startswith('torchao.'):\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from lora_ckpt import LoRALinear\n"
        "from lora_ckpt.errors import MissingDependencyError\n"
        "LoRALinear(256, 64, r=2, alpha=4)(__import__('torch').zeros(1, 256))\n"
        "try:\n"
        "    LoRALinear(256, 64, r=2, alpha=4, quantize_base=True)\n"
        "except MissingDependencyError as e:\n"
        "    print('TYPED', e.package, e.extra, isinstance(e, ImportError))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TYPED torchao nf4 True" in out.stdout
    assert MissingDependencyError.__mro__[1].__name__ == "LoraCkptError"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_dispatch_equals_torchao_to_dtype(monkeypatch, dtype):
    monkeypatch.setitem(nf4._CHUNK, "cpu", 4096)  # several chunks
    w4 = quantize_nf4(torch.randn(384, 128, generator=torch.Generator().manual_seed(2)).to(dtype))
    for out in (dtype, torch.float32, torch.bfloat16):
        assert torch.equal(nf4.dequantize(w4, out), w4.to(out))
    plain = torch.ones(3, dtype=dtype)
    assert nf4.dequantize(plain, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_value_gets_torchao_code(dtype):
    """Every finite value in [-1, 1] a scaled element can take, in blocks led by 1.0 (absmax 1: the value
    is its own scaled value); all-zero padding blocks (0/0) too."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    vals = every[every.abs() <= 1]
    blocks = -(-vals.numel() // 63)
    body = torch.zeros(blocks * 63, dtype=dtype)
    body[:vals.numel()] = vals
    t = torch.cat([torch.ones(blocks, 1, dtype=dtype), body.view(blocks, 63)], 1).reshape(-1)
    t = torch.cat([t, torch.zeros(-t.numel() % (64 * 256), dtype=dtype)])
    assert_same_nf4(quantize_nf4(t), to_nf4(t))


def test_save_adapter_and_apply_adapter_work_unchanged_on_a_quantized_model(tmp_path):
    from lora_ckpt import apply_adapter, save_adapter

    stock = tiny_llama()
    model = tiny_llama(seed=1)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    model.load_state_dict(stock.state_dict())
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.normal_(0, 0.05)
    save_adapter(model, tmp_path / "peft", layout="peft")
    again = tiny_llama(seed=2)
    inject_lora(again, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    again.load_state_dict(stock.state_dict())
    apply_adapter(again, tmp_path / "peft")
    assert all(torch.equal(v, adapter_state_dict(again)[k]) for k, v in adapter_state_dict(model).items())
    assert torch.equal(logits(again), logits(model))


def test_torch_pickle_checkpoint_loads_strict_into_a_quantized_model(tmp_path):
    stock = tiny_llama()
    torch.save(stock.state_dict(), tmp_path / "pytorch_model.bin")  # memory-mapped by load_checkpoint
    model = tiny_llama(seed=1)
    inject_lora(model, targets=ALL_LINEAR, r=4, alpha=8, quantize_base=True)
    load_checkpoint(model, tmp_path, strict=True)
    for name, w in nf4_weights(model).items():
        assert_same_nf4(w, to_nf4(stock.get_parameter(name.replace(".linear.weight", ".weight")).detach()))
    key = "model.layers.0.mlp.up_proj.weight"  # the file's pages were released, never changed
    assert torch.equal(stock.state_dict()[key], torch.load(tmp_path / "pytorch_model.bin", weights_only=True)[key])
