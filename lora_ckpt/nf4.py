"""NF4 (QLoRA) base weights: :class:`NF4Linear`, a frozen Linear whose weight is a torchao ``NF4Tensor``.

The bytes are torchao's ``to_nf4(w, block_size=64, scaler_block_size=256)`` (torchtune's defaults), so a
lora-ckpt QLoRA model and a torchtune one quantize the same checkpoint to the same bytes.
:func:`quantize_nf4` computes them in chunks of rows, so quantizing a tensor needs the NF4 result plus one
chunk, not the several full-size temporaries of ``to_nf4``.

The state-dict hooks are the bridge: loading a plain bf16/fp16/fp32 ``weight`` quantizes it, tensor by
tensor, on the device the layer lives on (a ``meta`` layer loaded with ``assign=True``: on the
checkpoint's device, in the checkpoint's dtype, as torch's own ``assign`` does); saving dequantizes it back
to the weight's dtype, one tensor at a time, as torchtune's ``reparametrize_as_dtype_state_dict_post_hook``
does. Checkpoints written from a quantized model are therefore stock-shaped.

torchao is optional (``pip install lora-ckpt[nf4]``); it is imported on first use, and its absence is a
:class:`~lora_ckpt.errors.MissingDependencyError`.

GPU kernels (``lora_ckpt.nf4_kernels``, Triton) plug in at two places: :func:`dequantize` (every quantized
forward and backward) and the QLoRA forward's base product, which for up to ``DECODE_MAX_TOKENS`` tokens
accumulates ``x·Wᵀ`` with the fused decode kernel and never materialises ``W``. On CPU neither is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MissingDependencyError, QuantizationError
from .io import release_file_pages

__all__ = [
    "BLOCK_SIZE",
    "SCALER_BLOCK_SIZE",
    "NF4Linear",
    "check_quantizable",
    "dequantize",
    "dequantize_reference",
    "is_nf4",
    "qlora_linear",
    "quantize_nf4",
    "releasing_file_pages",
]

logger = logging.getLogger(__name__)

BLOCK_SIZE = 64  # elements per NF4 scale (torchtune's and bitsandbytes' default)
SCALER_BLOCK_SIZE = 256  # scales per int8 second-level scale group (torchtune's default)
_QUANTUM = BLOCK_SIZE * SCALER_BLOCK_SIZE  # a quantized tensor's numel must be a multiple of this
_CHUNK = {"cpu": 1 << 19, "other": 1 << 24}  # elements quantized at once (a multiple of BLOCK_SIZE)
# torchao's NF4Tensor has lived in torchao.dtypes.nf4tensor; in April 2026 it moved (a torchtune break).
_TORCHAO_MODULES = ("torchao.dtypes.nf4tensor", "torchao.quantization.nf4tensor", "torchao.quantization",
                    "torchao.dtypes")
_torchao_ns: SimpleNamespace | None = None
_release = contextvars.ContextVar("lora_ckpt_nf4_release_pages", default=False)
_kernel: Any = None  # lora_ckpt.nf4_kernels, imported on the first CUDA call (False: not importable)


def _torchao() -> SimpleNamespace:
    """torchao's NF4 pieces (``NF4Tensor``, ``to_nf4``, ``SubclassTensorArgs``), wherever this version keeps them."""
    global _torchao_ns
    if _torchao_ns is not None:
        return _torchao_ns
    cls = None
    for name in _TORCHAO_MODULES:
        try:
            cls = getattr(importlib.import_module(name), "NF4Tensor", None)
        except ImportError:
            continue
        if cls is not None:
            break
    if cls is None:
        raise MissingDependencyError(
            "quantize_base=True needs torchao's NF4Tensor, and torchao (>= 0.15) is not importable; install it "
            "with `pip install 'lora-ckpt[nf4]'` (or `pip install torchao`)", package="torchao", extra="nf4")
    home = importlib.import_module(cls.__module__)
    _torchao_ns = SimpleNamespace(NF4Tensor=cls, to_nf4=home.to_nf4,
                                  SubclassTensorArgs=getattr(home, "SubclassTensorArgs", None))
    return _torchao_ns


def is_nf4(t: Any) -> bool:
    """Whether ``t`` is a torchao ``NF4Tensor`` (never imports torchao: without it, nothing is one)."""
    if _torchao_ns is None:
        if "torchao" not in sys.modules or not isinstance(t, torch.Tensor):
            return False
        _torchao()
    assert _torchao_ns is not None
    return isinstance(t, _torchao_ns.NF4Tensor)


def check_quantizable(shape: tuple[int, ...] | torch.Size, *, key: str | None = None) -> None:
    """Raise :class:`QuantizationError` unless NF4 can block a weight of ``shape``.

    torchao needs a 1-D or 2-D tensor whose element count divides into 256 groups of 64-element blocks.
    """
    numel = math.prod(shape)
    if len(shape) in (1, 2) and numel and numel % _QUANTUM == 0:
        return
    what = f"{key!r}: " if key else ""
    raise QuantizationError(
        f"{what}weight of shape {tuple(shape)} ({numel} elements) cannot be NF4-quantized: expected a 1-D or 2-D "
        f"tensor whose size is a multiple of {_QUANTUM} ({BLOCK_SIZE}-element blocks in groups of "
        f"{SCALER_BLOCK_SIZE}); leave this layer unquantized (exclude it from the targets)",
        key=key, shape=tuple(shape))


@contextlib.contextmanager
def releasing_file_pages() -> Iterator[None]:
    """While active, quantizing a memory-mapped (file-backed) tensor drops the pages it has read from this
    process's RSS as it goes (they stay in the page cache). Only for tensors fresh from a file and never
    written to: :func:`lora_ckpt.load_checkpoint` uses it for the tensors it opened itself."""
    token = _release.set(True)
    try:
        yield
    finally:
        _release.reset(token)


@torch.no_grad()
def quantize_nf4(tensor: torch.Tensor, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, key: str | None = None) -> torch.Tensor:
    """torchao's ``to_nf4(tensor.to(device, dtype))`` byte for byte, computed in chunks of blocks.

    Args:
        tensor: a 1-D or 2-D floating tensor (any device, possibly memory-mapped).
        dtype: the dtype to quantize in and to dequantize to (default: the tensor's).
        device: where the NF4 tensor lives (default: the tensor's).
        key: the state-dict key, for error messages.

    Returns:
        An ``NF4Tensor`` (block size 64, scaler block size 256).

    Raises:
        QuantizationError: the shape cannot be blocked, or the tensor is not floating point.
        MissingDependencyError: torchao is not installed.

    Example:
        >>> w4 = quantize_nf4(linear.weight, dtype=torch.bfloat16, device="cuda")
    """
    ao = _torchao()
    check_quantizable(tensor.shape, key=key)
    if not tensor.is_floating_point():
        raise QuantizationError(
            f"{key or 'tensor'}: dtype {tensor.dtype} cannot be NF4-quantized: expected a float weight (bf16, fp16, "
            "fp32); a packed 4-bit checkpoint (bitsandbytes) must be read with lora_ckpt.bnb.from_bnb_state_dict",
            key=key, shape=tuple(tensor.shape))
    dtype = dtype or tensor.dtype
    device = torch.device(device) if device is not None else tensor.device
    if device.type == "meta" or tensor.device.type == "meta" or ao.SubclassTensorArgs is None:
        return ao.to_nf4(tensor.to(device=device, dtype=dtype).contiguous(), BLOCK_SIZE, SCALER_BLOCK_SIZE)
    release = _release.get() and tensor.device.type == "cpu"
    flat = tensor.reshape(-1)
    numel, n_blocks = flat.numel(), flat.numel() // BLOCK_SIZE
    chunk = _CHUNK["cpu" if device.type == "cpu" else "other"]
    lut = torch.tensor(_NF4_VALUES, device=device, dtype=dtype)
    absmax = torch.empty(n_blocks, device=device, dtype=dtype)
    codes = torch.empty(numel // 2, device=device, dtype=torch.uint8)
    for start in range(0, numel, chunk):  # torchao's convert_to_norm_float_weight, one chunk of blocks at a time
        stop = min(start + chunk, numel)
        src = flat[start:stop]
        part = src.to(device=device, dtype=dtype).view(-1, BLOCK_SIZE)
        scale = part.abs().max(dim=1).values
        absmax[start // BLOCK_SIZE:stop // BLOCK_SIZE] = scale
        idx = _nearest_codes((part / scale.unsqueeze(-1)).flatten(), lut, ao)
        codes[start // 2:stop // 2] = idx[::2] << 4 | idx[1::2]
        del part, idx
        if release:
            _release_pages(src)
    # torchao's double_quantize_scalers, on the (numel / 64) block scales
    mean = absmax.mean()
    centred = (absmax - mean).view(-1, SCALER_BLOCK_SIZE)
    factor = 256 / (2 * centred.abs().max(dim=1).values)
    scalers = (centred * factor.unsqueeze(-1)).round().clamp(-128, 127).flatten().to(torch.int8)
    meta = ao.SubclassTensorArgs(tensor.shape, _contiguous_strides(tensor.shape), 0, dtype, device, False)
    return ao.NF4Tensor(meta, BLOCK_SIZE, n_blocks, SCALER_BLOCK_SIZE, scalers, factor.contiguous(), mean, codes, lut)


def _nearest_codes(scaled: torch.Tensor, lut: torch.Tensor, ao: SimpleNamespace) -> torch.Tensor:
    """torchao's ``quantize_tensor_nearest`` (the code of the nearest NF4 value, ties to the lower code).

    It is a pure function of each element's value, so for 16-bit dtypes it is evaluated once, by torchao
    itself, on all 65536 bit patterns (per dtype and device); then each element is a table lookup by its
    bits. float32 runs torchao's search directly."""
    if scaled.dtype not in (torch.bfloat16, torch.float16):
        return ao.NF4Tensor.quantize_tensor_nearest(scaled, lut).to(torch.uint8)
    key = (scaled.dtype, scaled.device)
    table = _code_tables.get(key)
    if table is None:
        every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32, device=scaled.device).to(torch.int16)
        table = ao.NF4Tensor.quantize_tensor_nearest(every.view(scaled.dtype), lut).to(torch.uint8)
        _code_tables[key] = table
    bits = scaled.view(torch.int16).to(torch.int32) + (1 << 15)  # the pattern's index in `every`
    return table.index_select(0, bits)


_code_tables: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

_NF4_VALUES = [-1.0000, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0000,
               0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0000]  # torchao's (and QLoRA's) codebook


def _contiguous_strides(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    return (shape[1], 1) if len(shape) == 2 else (1,)


def _release_pages(t: torch.Tensor) -> None:
    release_file_pages([t])


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``dtype`` tensor an NF4 weight stands for: the one dispatch point of every quantized forward
    and backward. On CUDA it uses ``lora_ckpt.nf4_kernels.dequantize(weight, dtype)`` when that module
    exists (the Triton kernel, bit-identical to torchao); otherwise :func:`dequantize_reference`. Plain
    tensors are cast."""
    if not is_nf4(weight):
        return weight.to(dtype)
    kernels = _kernels(weight.device)
    return kernels.dequantize(weight, dtype) if kernels else dequantize_reference(weight, dtype)


def _kernels(device: torch.device) -> Any:
    """``lora_ckpt.nf4_kernels`` when its Triton kernels serve ``device`` (CUDA, or any device under
    ``TRITON_INTERPRET=1``), else None: then the CPU path, unchanged (the module is not even imported)."""
    global _kernel
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    if _kernel is None:
        try:
            _kernel = importlib.import_module(".nf4_kernels", __package__)
        except ImportError:  # torchao or triton absent
            _kernel = False
    return _kernel if _kernel and _kernel.triton_enabled(device) else None


@torch.no_grad()
def dequantize_reference(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torchao's ``NF4Tensor.to(dtype)`` bit for bit (the same products in the NF4 tensor's dtype, then one
    cast), computed in chunks of blocks with int32 code indices instead of torchao's int64 ones, so the only
    full-size allocation is the result."""
    if not weight.is_contiguous() or weight.device.type == "meta":
        return weight.to(dtype)
    w4: Any = weight  # an NF4Tensor: its inner tensors are plain attributes
    # torchao's own scale dequantization: (n_blocks,) in the weight's dtype
    scales = w4.dequantize_scalers(w4.quantized_scalers, w4.quantization_factor, w4.scaler_block_size)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    flat, codes, block = out.view(-1), w4.quantized_data, w4.block_size
    chunk = _CHUNK["cpu" if weight.device.type == "cpu" else "other"]
    for start in range(0, flat.numel(), chunk):
        stop = min(start + chunk, flat.numel())
        packed = codes[start // 2:stop // 2]
        idx = torch.stack((packed >> 4, packed & 0xF), dim=-1).view(-1).to(torch.int32)
        vals = w4.nf4.index_select(0, idx).view(-1, block) * scales[start // block:stop // block].unsqueeze(-1)
        flat[start:stop] = vals.view(-1)
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _NF4LinearFunction(torch.autograd.Function):
    """``x·deq(W)ᵀ + b`` that saves only the NF4 weight and dequantizes again for the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize(weight, dtype), bias)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        gx = gy @ dequantize(weight, gy.dtype) if ctx.needs_input_grad[0] else None
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb


class _QLoRAFunction(torch.autograd.Function):
    """``layer.py``'s fused LoRA function over an NF4 base: the dense weight exists only inside one GEMM
    (forward) and is dequantized again for the input gradient, never saved."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])
        hs = torch.mm(x2, a.t()).mul_(s)
        out = torch.mm(hs, b.t()) if bias is None else torch.addmm(bias, hs, b.t())
        kernels = _kernels(weight.device) if is_nf4(weight) else None
        if kernels:  # out += x·deq(W)ᵀ; up to DECODE_MAX_TOKENS tokens without materialising deq(W)
            kernels.addmm_nf4_(out, x2, weight)
        else:
            out.addmm_(x2, dequantize(weight, x.dtype).t())
        ctx.save_for_backward(x, weight, a, b, hs)
        ctx.s = s
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, weight, a, b, hs = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        gh = torch.mm(g2, b).mul_(ctx.s)
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(gh, a).addmm_(g2, dequantize(weight, gy.dtype)).view(x.shape)
        if ctx.needs_input_grad[3]:
            ga = torch.mm(gh.t(), x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[4]:
            gb = torch.mm(g2.t(), hs)
        return gx, None, None, ga, gb, None


def qlora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                 b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``x·deq(W)ᵀ + bias + scaling·(x·Aᵀ)·Bᵀ`` for a frozen NF4 ``weight``; ``x``, ``a``, ``b`` share one dtype."""
    return _QLoRAFunction.apply(x, weight, bias, a, b, scaling)


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is an NF4Tensor; keys and shapes are ``nn.Linear``'s (``weight``, ``bias``).

    ``load_state_dict`` takes a plain float ``weight`` (quantized on the way in) or an NF4Tensor;
    ``state_dict()`` gives the weight dequantized to its dtype. ``model.to(dtype)`` casts the bias but not
    the quantized weight (it keeps the dtype it dequantizes to); ``model.to(device)`` moves it.

    Args:
        in_features: input size.
        out_features: output size.
        bias: whether the layer has a bias.
        device: where the weight lives.
        dtype: the dtype the weight is quantized in and dequantized to.

    Raises:
        QuantizationError: NF4 cannot block a weight of this size.
        MissingDependencyError: torchao is not installed.

    Example:
        >>> layer = NF4Linear.from_linear(nn.Linear(256, 64, dtype=torch.bfloat16))
        >>> layer.load_state_dict(nn.Linear(256, 64, dtype=torch.bfloat16).state_dict())
        <All keys matched successfully>
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_quantizable((out_features, in_features))
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(linear)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NF4Linear:
        """Quantize an ``nn.Linear``'s weight (the bias is shared, not copied); same device and dtype."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear)
        return self

    def _setup(self, linear: nn.Linear) -> None:
        check_quantizable(linear.weight.shape)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(quantize_nf4(linear.weight.detach()), requires_grad=False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.weight.dtype}, nf4")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4LinearFunction.apply(x, self.weight, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as a dense tensor of its dtype."""
        return dequantize(self.weight.detach(), self.weight.dtype)

    # ------------------------------------------------------------------- state dicts
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantized_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "weight"
        t = state_dict.get(key)
        assign = bool(local_metadata.get("assign_to_params_buffers"))
        if isinstance(t, torch.Tensor) and not is_nf4(t.to_local() if hasattr(t, "to_local") else t) \
                and t.shape == self.weight.shape and (assign or not self.weight.is_meta):
            # state_dict is load_state_dict's own copy: replacing the entry never touches the caller's dict
            if assign:
                state_dict[key] = quantize_nf4(t, key=key)
            else:
                state_dict[key] = quantize_nf4(t, dtype=self.weight.dtype, device=self.weight.device, key=key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn: Any, recurse: bool = True) -> NF4Linear:
        """Device moves apply to the NF4 weight; dtype casts do not (they would dequantize it)."""
        weight = self._parameters["weight"]
        assert weight is not None
        target = fn(torch.empty(0, device=weight.device, dtype=weight.dtype)).device
        self._parameters["weight"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            if target != weight.device:
                moved = (quantize_nf4(torch.zeros(weight.shape, dtype=weight.dtype, device=target))
                         if weight.is_meta else weight.detach().to(target))
                weight = nn.Parameter(moved, requires_grad=False)
            self._parameters["weight"] = weight
        return self
