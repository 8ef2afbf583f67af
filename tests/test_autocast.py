"""LoRALinear under torch.autocast (what ``Trainer(bf16=True)`` does): forward and backward,
training and inference, against PEFT's LoRA Linear under the same autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_ckpt import LoRALinear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
AMP = [torch.bfloat16, torch.float16]


class _One(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _pair(device: str, *, bias: bool, dropout: float = 0.0, base_dtype=torch.float32, adapter_dtype=None):
    """Our layer and PEFT's on one shared random base, with the same random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(0)
    base = nn.Linear(48, 40, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) / 7)
    base = base.to(device, base_dtype)
    ours = LoRALinear.from_linear(copy.deepcopy(base), r=4, alpha=8, dropout=dropout)
    peft = get_peft_model(_One(copy.deepcopy(base)), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                  target_modules=["proj"]),
                          autocast_adapter_dtype=adapter_dtype is None)
    player = peft.base_model.model.proj
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            t = torch.randn(getattr(ours, name).weight.shape, generator=g).to(device)
            dt = adapter_dtype or torch.float32
            getattr(ours, name).weight.data = t.to(dt)
            getattr(player, name)["default"].weight.data = t.to(dt)
    return ours, peft, player


def _run(module, x, gy, amp, device, *, grad: bool, seed: int = 0):
    x = x.detach().clone().requires_grad_(grad)
    torch.manual_seed(seed)
    with torch.autocast(device, dtype=amp), torch.set_grad_enabled(grad):
        y = module(x)
    if grad:
        y.backward(gy.to(y.dtype))
    return y, x.grad


def _grads(layer_a, layer_b):
    return layer_a.weight.grad, layer_b.weight.grad


def _reference(ours: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The exact function in float64."""
    w = ours.linear.weight.double()
    y = x.double() @ w.T + ours.scaling * (x.double() @ ours.lora_A.weight.double().T) @ ours.lora_B.weight.double().T
    return y if ours.linear.bias is None else y + ours.linear.bias.double()


def _close_to_peft(ours_y, peft_y, ref, amp):
    """Same dtype; as close to the exact result as PEFT (both round to ``amp``), and close to PEFT."""
    assert ours_y.dtype == peft_y.dtype == amp
    err_ours = (ours_y.double() - ref).abs().max().item()
    err_peft = (peft_y.double() - ref).abs().max().item()
    eps = torch.finfo(amp).eps * ref.abs().max().item()
    assert err_ours <= 1.5 * err_peft + eps, (err_ours, err_peft)
    torch.testing.assert_close(ours_y.double(), peft_y.double(), rtol=0, atol=4 * eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
def test_frozen_base_under_autocast_matches_peft(device, amp, bias, grad):
    ours, peft, player = _pair(device, bias=bias)
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(1)).to(device)
    gy = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(2)).to(device)
    y, gx = _run(ours, x, gy, amp, device, grad=grad)
    py, pgx = _run(peft, x, gy, amp, device, grad=grad)
    _close_to_peft(y, py, _reference(ours, x), amp)
    if grad:
        assert gx.dtype == pgx.dtype == torch.float32
        eps = torch.finfo(amp).eps
        for g, pg in [(gx, pgx), *zip(_grads(ours.lora_A, ours.lora_B),
                                       _grads(player.lora_A["default"], player.lora_B["default"]), strict=True)]:
            assert g.dtype == pg.dtype == torch.float32
            torch.testing.assert_close(g, pg, rtol=0, atol=8 * eps * pg.abs().max().item())
        assert ours.linear.weight.grad is None


@pytest.mark.parametrize("amp", AMP)
def test_conv1d_under_autocast_matches_peft(amp):
    """transformers' Conv1D (weight (in, out)) wrapped by LoRAConv1D and by PEFT (fan_in_fan_out)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from lora_ckpt.conv1d import LoRAConv1D

    g = torch.Generator().manual_seed(0)
    conv = Conv1D(40, 48)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / 7)
        conv.bias.copy_(torch.randn(40, generator=g))
    ours = LoRAConv1D.from_conv1d(copy.deepcopy(conv), r=4, alpha=8)
    peft = get_peft_model(_One(copy.deepcopy(conv)), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                                  fan_in_fan_out=True))
    player = peft.base_model.model.proj
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            t = torch.randn(getattr(ours, name).weight.shape, generator=g)
            getattr(ours, name).weight.copy_(t)
            getattr(player, name)["default"].weight.copy_(t)
    x = torch.randn(2, 5, 48, generator=g)
    gy = torch.randn(2, 5, 40, generator=g)
    y, gx = _run(ours, x, gy, amp, "cpu", grad=True)
    py, pgx = _run(peft, x, gy, amp, "cpu", grad=True)
    ref = x.double() @ conv.weight.double() + conv.bias.double() + ours.scaling * (
        x.double() @ ours.lora_A.weight.double().T) @ ours.lora_B.weight.double().T
    _close_to_peft(y, py, ref, amp)
    torch.testing.assert_close(gx, pgx, rtol=0, atol=8 * torch.finfo(amp).eps * pgx.abs().max().item())


@pytest.mark.parametrize("amp", AMP)
def test_dropout_training_under_autocast_matches_peft(amp):
    """Active dropout takes the general path; with the same RNG state both draw the same mask."""
    ours, peft, _ = _pair("cpu", bias=True, dropout=0.25)
    ours.train(), peft.train()
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    y, gx = _run(ours, x, gy, amp, "cpu", grad=True, seed=7)
    py, pgx = _run(peft, x, gy, amp, "cpu", grad=True, seed=7)
    eps = torch.finfo(amp).eps
    torch.testing.assert_close(y.double(), py.double(), rtol=0, atol=4 * eps * py.abs().max().item())
    torch.testing.assert_close(gx, pgx, rtol=0, atol=8 * eps * pgx.abs().max().item())


@pytest.mark.parametrize("amp", AMP)
def test_training_base_under_autocast(amp):
    """A base that trains (general path) gets a float32 gradient, as a plain Linear under autocast."""
    ours, _, _ = _pair("cpu", bias=True)
    ours.linear.requires_grad_(True)
    plain = copy.deepcopy(ours.linear)
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours.lora_B.weight.zero_()
    with torch.autocast("cpu", dtype=amp):
        y, py = ours(x), plain(x)
    assert y.dtype == py.dtype == amp
    assert torch.equal(y, py)  # a zero adapter adds exactly nothing
    y.float().sum().backward()
    py.float().sum().backward()
    assert ours.linear.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.linear.weight.grad, plain.weight.grad)


@pytest.mark.parametrize("amp", AMP)
def test_low_precision_base_with_float32_adapters(amp):
    """PEFT's default on a bf16/fp16 model: the base in ``amp``, the adapters in float32."""
    ours, peft, _ = _pair("cpu", bias=False, base_dtype=amp, adapter_dtype=torch.float32)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(1))
    gy = torch.randn(4, 40, generator=torch.Generator().manual_seed(2))
    y, _ = _run(ours, x, gy, amp, "cpu", grad=True)
    py, _ = _run(peft, x, gy, amp, "cpu", grad=True)
    _close_to_peft(y, py, _reference(ours, x), amp)
    assert ours.lora_A.weight.grad.dtype == torch.float32


def test_autocast_off_keeps_the_exact_fast_path():
    """Without autocast the output is the fast path's, bit for bit, and autocast in another
    device type does not affect it."""
    ours, _, _ = _pair("cpu", bias=True)
    x = torch.randn(3, 48)
    y = ours(x)
    with torch.autocast("cpu", enabled=False):
        assert torch.equal(ours(x), y)
    if torch.cuda.is_available():
        with torch.autocast("cuda", dtype=torch.float16):
            assert torch.equal(ours(x), y)
    assert y.dtype == torch.float32
