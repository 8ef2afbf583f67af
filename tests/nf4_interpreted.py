"""The Triton NF4 kernels run by Triton's interpreter on CPU, checked against torchao.

Not collected by the main run (no ``test_`` prefix): ``tests/test_nf4_kernels.py`` runs this file in a
subprocess with ``TRITON_INTERPRET=1``, which must be set before the kernels are defined and must not
leak into other tests.
"""

import os

import pytest
import torch
from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4, to_nf4

from lora_ckpt import nf4_kernels as K

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_nf4_kernels.py"

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def kernels_only(monkeypatch):
    """Make torchao's own dequantization raise, so a passing check proves the kernel computed it."""
    ref = NF4Tensor.get_original_weight

    def forbidden(self):
        raise AssertionError("torchao's get_original_weight was called: the kernel path was not taken")

    monkeypatch.setattr(NF4Tensor, "get_original_weight", forbidden)
    return ref


def weight(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[torch.rand(shape, generator=gen) < 0.01] *= 30  # outliers: wide range of block scalers
    return w.to(dtype)


# (shape, block_size, scaler_block_size): torchao's defaults; odd sizes whose block count is not a multiple
# of the kernel's 128-block tile; a one-row weight; blocks straddling rows (in_features % 64 != 0);
# other block layouts (32/128, 128/8, one scaler group).
LAYOUTS = [
    ((64, 256), 64, 256),
    ((96, 96), 64, 16),
    ((1, 64 * 24), 64, 8),
    ((48, 80), 64, 4),
    ((64, 128), 32, 128),
    ((16, 512), 128, 8),
    ((8, 64), 64, 8),
]


@pytest.mark.parametrize("shape,bs,sbs", LAYOUTS)
@pytest.mark.parametrize("base", [BF16, FP16, FP32])
def test_dequantize_bit_identical(kernels_only, shape, bs, sbs, base):
    nf4 = to_nf4(weight(shape, base, seed=sum(shape) + bs), block_size=bs, scaler_block_size=sbs)
    for dtype in (BF16, FP16, FP32):
        ours = K.dequantize(nf4, dtype)
        ref = kernels_only(nf4).to(dtype)  # torchao's NF4Tensor.to(dtype) is get_original_weight().to(dtype)
        assert ours.dtype == dtype and ours.shape == nf4.shape
        assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8)), (shape, bs, sbs, base, dtype)


def test_dequantize_matches_nf4_to():
    nf4 = to_nf4(weight((32, 512), BF16, seed=7))
    for dtype in (BF16, FP16):
        assert torch.equal(K.dequantize(nf4, dtype).view(torch.int16), nf4.to(dtype).view(torch.int16))


@pytest.fixture
def fused_only(monkeypatch, kernels_only):
    """The decode kernel for up to 64 tokens (several 16-token tiles), with no dequantization at all."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the weight was dequantized: the fused decode kernel was not taken")

    monkeypatch.setattr(K, "DECODE_MAX_TOKENS", 64)
    monkeypatch.setattr(K, "dequantize", forbidden)
    return kernels_only


@pytest.mark.parametrize("tokens", [1, 5, 16, 40])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_decode_kernel_matches_dequant_matmul(fused_only, tokens, dtype):
    nf4 = to_nf4(weight((80, 320), dtype, seed=tokens), scaler_block_size=16)
    lead = (2, tokens // 2) if tokens == 16 else (tokens,)  # a 3-D input once
    x = torch.randn(*lead, 320, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = K.nf4_linear(x, nf4)
    ref = x.double() @ fused_only(nf4).double().t()
    assert y.shape == (*x.shape[:-1], 80) and y.dtype == dtype
    assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3  # one rounding of the output


@pytest.mark.parametrize("blocks_k", [1, 4])
def test_decode_kernel_tile_widths(fused_only, monkeypatch, blocks_k):
    """K steps that do not divide the row (10 blocks in steps of 4) and single-block steps."""
    monkeypatch.setattr(K, "DECODE_BLOCKS_K", blocks_k)
    nf4 = to_nf4(weight((96, 640), BF16, seed=blocks_k), scaler_block_size=16)
    x = torch.randn(3, 640, dtype=BF16)
    ref = x.double() @ fused_only(nf4).double().t()
    assert ((K.nf4_linear(x, nf4).double() - ref).norm() / ref.norm()).item() < 4e-3


@pytest.mark.parametrize("tokens", [3, 20])
def test_addmm_nf4_accumulates_in_place(fused_only, tokens):
    nf4 = to_nf4(weight((64, 128), BF16, seed=5), scaler_block_size=16)
    x = torch.randn(tokens, 128, dtype=BF16)
    out = torch.randn(tokens, 64, dtype=BF16)
    ref = out.double() + x.double() @ fused_only(nf4).double().t()
    res = K.addmm_nf4_(out, x, nf4)
    assert res is out
    assert ((out.double() - ref).norm() / ref.norm()).item() < 4e-3


def test_training_path_bit_identical_to_linear_nf4():
    nf4 = to_nf4(weight((48, 128), BF16, seed=3), scaler_block_size=16)
    x = torch.randn(70, 128, dtype=BF16, requires_grad=True)  # > 64 tokens: dequant kernel + matmul
    g = torch.randn(70, 48, dtype=BF16)
    ours = K.nf4_linear(x, nf4)
    (gx,) = torch.autograd.grad(ours, x, g)
    ref = linear_nf4(x, nf4)
    (gref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(ours, ref) and torch.equal(gx, gref)


@pytest.mark.parametrize("tokens", [4, 70])
def test_lora_linear_decode_and_training(tokens):
    nf4 = to_nf4(weight((64, 128), BF16, seed=tokens), scaler_block_size=16)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 128, generator=gen).to(BF16).requires_grad_()
    a = (torch.randn(8, 128, generator=gen) * 0.1).to(BF16).requires_grad_()
    b = (torch.randn(64, 8, generator=gen) * 0.1).to(BF16).requires_grad_()
    g = torch.randn(tokens, 64, generator=gen).to(BF16)
    y = K.nf4_lora_linear(x, nf4, a, b, scale=2.0)
    grads = torch.autograd.grad(y, (x, a, b), g)
    ref_in = [t.detach().double().requires_grad_() for t in (x, a, b)]
    xd, ad, bd = ref_in
    ref = xd @ nf4.to(BF16).double().t() + 2.0 * (xd @ ad.t()) @ bd.t()
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    for ours, want in zip(grads, ref_grads, strict=True):
        assert ((ours.double() - want).norm() / want.norm()).item() < 1e-2


def test_kernels_serve_cpu_under_interpreter():
    assert K.triton_enabled("cpu")


@pytest.mark.parametrize("tokens", [4, 40])
def test_quantized_lora_layer_takes_the_kernels_and_equals_the_cpu_path(monkeypatch, tokens):
    """LoRALinear(quantize_base=True) dispatches as on CUDA (the interpreter serves CPU tensors like CUDA
    ones): up to DECODE_MAX_TOKENS tokens the forward is the fused addmm_nf4_ (no dequantization), more
    tokens the dequant kernel; the backward dequantizes with the kernel. Against the plain CPU path of
    the same layer: gradients bit-identical; the output bit-identical through the dequant kernel, within
    one rounding through the fused one."""
    from lora_ckpt import nf4
    from lora_ckpt.layer import LoRALinear

    torch.manual_seed(tokens)
    layer = LoRALinear(256, 64, r=8, alpha=16.0, dtype=BF16, quantize_base=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(tokens, 256, dtype=BF16)
    g = torch.randn(tokens, 64, dtype=BF16)

    def run():
        xi = x.clone().requires_grad_()
        y = layer(xi)
        return y, torch.autograd.grad(y, (xi, layer.lora_A.weight, layer.lora_B.weight), g)

    calls = {"addmm_nf4_": 0, "dequantize": 0}
    for name in calls:
        fn = getattr(K, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(K, name, counted)
    y, grads = run()
    assert calls == {"addmm_nf4_": 1, "dequantize": 1 if tokens <= K.DECODE_MAX_TOKENS else 2}, calls
    with monkeypatch.context() as m:
        m.setattr(nf4, "_kernels", lambda device: None)  # the CPU path, as without the interpreter
        y_cpu, grads_cpu = run()
    assert calls["addmm_nf4_"] == 1
    for ours, ref in zip(grads, grads_cpu, strict=True):
        assert torch.equal(ours, ref)
    if tokens > K.DECODE_MAX_TOKENS:
        assert torch.equal(y, y_cpu)
    else:
        assert not torch.equal(y, torch.zeros_like(y))
        assert ((y.double() - y_cpu.double()).norm() / y_cpu.double().norm()).item() < 4e-3
