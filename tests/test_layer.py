"""LoRALinear: math, init, merge, and the state-dict bridge (dialects, errors, meta + assign)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_ckpt import LoRALinear
from lora_ckpt.errors import (
    AmbiguousKeyError,
    IncompleteAdapterError,
    MergedLayerError,
    ShapeMismatchError,
)
from lora_ckpt.keys import KEY_DIALECTS


def _randomize(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    return layer


@settings(max_examples=40, deadline=None)
@given(in_f=st.integers(1, 48), out_f=st.integers(1, 48), r=st.integers(1, 8), bias=st.booleans(),
       rslora=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       lead=st.lists(st.integers(1, 4), min_size=0, max_size=2))
def test_forward_matches_definition(in_f, out_f, r, bias, rslora, dtype, lead):
    layer = _randomize(LoRALinear(in_f, out_f, r, alpha=2 * r + 1, bias=bias, use_rslora=rslora, dtype=dtype))
    x = torch.randn(*lead, in_f).to(dtype)
    s = (2 * r + 1) / (math.sqrt(r) if rslora else r)
    assert layer.scaling == pytest.approx(s)
    ref = layer.linear(x).float() + s * (x.float() @ layer.lora_A.weight.float().T) @ layer.lora_B.weight.float().T
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(layer(x).float(), ref, rtol=tol, atol=tol * (1 + ref.abs().max().item()))


@settings(max_examples=30, deadline=None)
@given(in_f=st.integers(1, 32), out_f=st.integers(1, 32), r=st.integers(1, 6), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_stock_layer_loads_strict_and_is_exact(in_f, out_f, r, bias, dtype):
    stock = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = LoRALinear(in_f, out_f, r, alpha=8, bias=bias, dtype=dtype)
    result = layer.load_state_dict(stock.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.linear.weight, stock.weight)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0  # never both zero: it must still train
    x = torch.randn(3, in_f).to(dtype)
    assert torch.equal(layer(x), stock(x))


@settings(max_examples=25, deadline=None)
@given(in_f=st.integers(1, 32), out_f=st.integers(1, 32), r=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_state_dict_round_trip_is_exact(in_f, out_f, r, dtype):
    src = _randomize(LoRALinear(in_f, out_f, r, alpha=4, dtype=dtype), seed=3)
    dst = LoRALinear(in_f, out_f, r, alpha=4, dtype=dtype)
    dst.load_state_dict(src.state_dict(), strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_from_linear_shares_the_weight():
    lin = nn.Linear(8, 4)
    layer = LoRALinear.from_linear(lin, r=2, alpha=4)
    assert layer.linear is lin and layer.linear.weight.data_ptr() == lin.weight.data_ptr()
    assert not lin.weight.requires_grad and layer.lora_A.weight.requires_grad


def _fast(y: torch.Tensor) -> bool:
    """The output came from LoRALinear's hand-written autograd Function, not autograd over aten ops."""
    return isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fast-path", "general-path"])
def test_gradients_reach_only_the_adapter_and_the_input(dropout):
    layer = LoRALinear(8, 4, 2, alpha=4, dropout=dropout)  # training mode: dropout forces the general path
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    assert _fast(y) == (dropout == 0.0)
    y.sum().backward()
    assert layer.linear.weight.grad is None and layer.linear.bias.grad is None
    # B starts at zero, so dL/dA = s·Bᵀ·(dL/dy)ᵀ·x is an all-zero tensor; it must still be computed
    assert layer.lora_A.weight.grad is not None and torch.count_nonzero(layer.lora_A.weight.grad) == 0
    assert layer.lora_B.weight.grad is not None and torch.count_nonzero(layer.lora_B.weight.grad) > 0
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "no-x-grad"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_fast_path_backward_passes_gradcheck(bias, x_grad):
    """The fast path's hand-written backward against finite differences in float64: input, A and
    B gradients, random non-zero B, a 3-D input (the reshapes), with and without bias."""
    layer = _randomize(LoRALinear(5, 4, 3, alpha=5, bias=bias, dtype=torch.float64), seed=7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=g).requires_grad_(x_grad)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    assert torch.count_nonzero(b) == b.numel()

    def f(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = torch.func.functional_call(layer, {"lora_A.weight": a, "lora_B.weight": b}, (x,))
        assert _fast(y)  # the frozen float64 base takes the fast path
        return y

    assert torch.autograd.gradcheck(f, (x, a, b), eps=1e-6, atol=1e-8, rtol=1e-6)
    layer.linear.weight.requires_grad_(True)  # control: a trainable base takes the general path
    assert not _fast(layer(x))


@pytest.mark.parametrize("dialect", [d.name for d in KEY_DIALECTS if "lora_A.weight" in d.keys])
def test_every_dialect_loads_the_same_tensors(dialect):
    src = _randomize(LoRALinear(6, 5, 3, alpha=6, bias="linear.bias" in dict(
        next(d for d in KEY_DIALECTS if d.name == dialect).keys)))
    keys = next(d for d in KEY_DIALECTS if d.name == dialect).keys
    sd = {keys[k]: v for k, v in src.state_dict().items() if k in keys}
    dst = LoRALinear(6, 5, 3, alpha=6, bias="linear.bias" in keys)
    assert not dst.load_state_dict(sd, strict=True).missing_keys
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_half_an_adapter_is_an_error():
    src = LoRALinear(4, 4, 2, alpha=2)
    sd = src.state_dict()
    del sd["lora_B.weight"]
    with pytest.raises(IncompleteAdapterError, match="lora_A but not lora_B"):
        LoRALinear(4, 4, 2, alpha=2).load_state_dict(sd)


def test_rank_mismatch_names_key_shapes_and_cause():
    sd = LoRALinear(4, 6, 3, alpha=2).state_dict()
    with pytest.raises(ShapeMismatchError) as e:
        LoRALinear(4, 6, 2, alpha=2).load_state_dict(sd)
    assert e.value.key == "lora_A.weight" and e.value.expected == (2, 4) and e.value.found == (3, 4)
    assert "rank 3" in str(e.value) and isinstance(e.value, ValueError)


def test_base_shape_mismatch_blames_the_checkpoint():
    with pytest.raises(ShapeMismatchError, match="another model"):
        LoRALinear(4, 6, 2, alpha=2).load_state_dict(nn.Linear(5, 6).state_dict())


def test_two_dialects_for_one_parameter_are_refused():
    sd = nn.Linear(4, 4).state_dict()
    sd["linear.weight"] = sd["weight"].clone()
    with pytest.raises(AmbiguousKeyError):
        LoRALinear(4, 4, 2, alpha=2).load_state_dict(sd)


def test_meta_assign_materialises_adapters_on_the_weights_dtype():
    stock = nn.Linear(16, 8, dtype=torch.bfloat16)
    with torch.device("meta"):
        layer = LoRALinear(16, 8, 4, alpha=8)
    layer.load_state_dict(stock.state_dict(), strict=True, assign=True)
    for p in layer.parameters():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16
    assert torch.count_nonzero(layer.lora_A.weight) > 0 and torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), stock(x))
    assert layer.lora_A.weight.requires_grad and not layer.linear.weight.requires_grad


def test_merge_unmerge_and_eval_never_merges():
    layer = _randomize(LoRALinear(8, 8, 2, alpha=4))
    x = torch.randn(3, 8)
    y = layer(x)
    layer.eval()
    assert not layer.merged and torch.equal(layer(x), y)
    w0 = layer.linear.weight.clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.linear.weight, layer.linear.bias))
    with pytest.raises(MergedLayerError):
        layer.merge()
    with pytest.raises(MergedLayerError, match="unmerge"):
        layer.state_dict()
    layer.unmerge()
    torch.testing.assert_close(layer.linear.weight, w0, rtol=0, atol=1e-6)
    with pytest.raises(MergedLayerError):
        layer.unmerge()


def test_invalid_rank():
    with pytest.raises(ValueError, match="positive"):
        LoRALinear(4, 4, 0, alpha=1)
