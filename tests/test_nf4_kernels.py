"""lora_ckpt.nf4_kernels: the CPU fallback in process, the Triton kernels under Triton's interpreter.

The kernel checks live in ``tests/nf4_interpreted.py`` and run in a subprocess with ``TRITON_INTERPRET=1``:
the variable must be set before the kernels are defined, and must not reach the other tests.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchao.dtypes import nf4tensor as torchao_nf4

from lora_ckpt import nf4_kernels as K
from lora_ckpt.errors import UsageError
from lora_ckpt.layer import LoRALinear

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16


def _nf4(shape=(64, 256), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torchao_nf4.to_nf4((torch.randn(shape, generator=gen) * 0.02).to(BF16), scaler_block_size=16)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="in-process checks of the plain CPU path")
def test_kernels_chosen_only_on_cuda():
    assert not K.triton_enabled("cpu")
    assert not K.triton_enabled(torch.device("cpu"))
    assert K.triton_enabled("cuda") == (K.triton is not None)


def test_cpu_fallback_is_torchao():
    nf4 = _nf4()
    for dtype in (BF16, torch.float16, torch.float32):
        assert torch.equal(K.dequantize(nf4, dtype), nf4.to(dtype))
    x = torch.randn(3, 256, dtype=BF16, requires_grad=True)
    g = torch.randn(3, 64, dtype=BF16)
    ours, ref = K.nf4_linear(x, nf4), torchao_nf4.linear_nf4(x, nf4)
    assert torch.equal(ours, ref)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_nf4_lora_linear_equals_lora_layer_on_dequantized_weight():
    """Same GEMMs as LoRALinear's frozen-base path: bit-identical output and gradients."""
    nf4 = _nf4((48, 128), seed=1)
    layer = LoRALinear(128, 48, r=4, alpha=8.0, bias=False, dtype=BF16)
    with torch.no_grad():
        layer.linear.weight.copy_(nf4.to(BF16))
        layer.lora_B.weight.normal_()
    layer.linear.weight.requires_grad_(False)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(2, 5, 128, dtype=BF16, requires_grad=True)
    g = torch.randn(2, 5, 48, dtype=BF16)
    ours = K.nf4_lora_linear(x, nf4, a, b, scale=layer.scaling)
    ref = layer(x)
    assert torch.equal(ours, ref)
    for p, q in zip(torch.autograd.grad(ours, (x, a, b), g), torch.autograd.grad(ref, (x, a, b), g), strict=True):
        assert torch.equal(p, q)


def test_rejects_plain_tensor():
    with pytest.raises(UsageError, match="NF4Tensor"):
        K.dequantize(torch.zeros(4, 64), BF16)
    with pytest.raises(UsageError, match="NF4Tensor"):
        K.nf4_linear(torch.zeros(1, 64), torch.zeros(4, 64))


@pytest.mark.skipif(K.triton is None, reason="triton is not installed")
def test_kernels_under_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--noconftest", "-p", "no:cacheprovider",
           "-W", "error::RuntimeWarning", str(ROOT / "tests" / "nf4_interpreted.py")]  # fmt: skip
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
