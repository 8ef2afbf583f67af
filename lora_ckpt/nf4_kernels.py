"""Triton kernels for torchao ``NF4Tensor`` weights: exact dequantization and a fused decode matmul.

A torchao NF4 weight of ``numel`` values stores, in flat row-major order:

- ``quantized_data``: ``numel // 2`` uint8, two 4-bit codes each (high nibble = the even element);
- ``quantized_scalers``: one int8 per quantization block of ``block_size`` values (64 by default);
- ``quantization_factor``: one factor per group of ``scaler_block_size`` blocks (256 by default);
- ``scaler_mean`` (a 0-d tensor) and ``nf4`` (the 16-entry codebook), both in the weight's dtype.

torchao's ``get_original_weight`` computes, with every op in the weight's dtype ``D`` (torch evaluates
each op in float32 and rounds the result to ``D``)::

    scaler = (q_scaler / factor) + mean          # two ops, each rounded to D
    value  = nf4[code] * scaler                  # rounded to D, then cast to the requested dtype

The kernels redo exactly that: float32 arithmetic, a correctly rounded division (``div_rn``), a rounding
to nearest-even to ``D`` after each op: bit-identical to ``NF4Tensor.to(dtype)``. The bfloat16 rounding is
done on the bits, since Triton's interpreter truncates in its cast (the GPU rounds): one answer on both.

Entry points: :func:`dequantize`, :func:`nf4_linear` (autograd: the input gradient dequantizes again,
nothing but the quantized weight is kept for backward) and :func:`nf4_lora_linear` (a whole QLoRA layer).
On CPU, or where Triton is not installed, they use torchao's own dequantization: the same results.
Measured on an H200: bench/RESULTS.md, section "qlora_gpu".
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torchao.dtypes.nf4tensor import NF4Tensor, linear_nf4

from .errors import UsageError

try:  # Triton ships with CUDA builds of PyTorch; CPU wheels have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["addmm_nf4_", "dequantize", "nf4_linear", "nf4_lora_linear", "triton_enabled"]

logger = logging.getLogger(__name__)

#: Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (this is how CI tests them).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: Up to this many tokens: the fused decode kernel; more: dequant + GEMM (1.6x / 3x faster at 32 / 64 on an H200).
DECODE_MAX_TOKENS = 16
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # dtype codes, constexprs of the kernels


def triton_enabled(device: torch.device | str) -> bool:
    """Whether the Triton kernels serve tensors on ``device``.

    Args:
        device: the device of the NF4 weight.

    Returns:
        True on CUDA when Triton is importable (and on any device under ``TRITON_INTERPRET=1``).
    """
    return triton is not None and (torch.device(device).type == "cuda" or _INTERPRET)


def _check_nf4(weight: Any) -> None:
    if not isinstance(weight, NF4Tensor):
        raise UsageError(f"expected a torchao NF4Tensor weight, found {type(weight).__name__}; quantize it with to_nf4")


def _kernel_ok(weight: Any, dtype: torch.dtype) -> bool:
    """The kernels cover contiguous weights with power-of-two blocks, all parts in one float dtype (torchao's
    own layout); anything else takes torchao's path. Reads the plain inner tensors where it can: each
    attribute of the NF4Tensor itself goes through its ``__torch_function__`` (microseconds per call)."""
    if triton is None or dtype not in _CODES:
        return False
    if weight.quantized_data.device.type != "cuda" and not _INTERPRET:
        return False
    base, bs = weight.nf4.dtype, weight.block_size
    return (
        base in _CODES
        and weight.quantization_factor.dtype == base
        and weight.scaler_mean.dtype == base
        and bs >= 2
        and bs & (bs - 1) == 0
        and weight.dtype == base
        and weight.is_contiguous()
    )


if triton is not None:

    @triton.jit
    def _round(x, CODE: tl.constexpr):
        """Round float32 ``x`` to dtype ``CODE``'s precision (nearest, ties to even); the result stays float32."""
        if CODE == 1:  # bfloat16: keep the top 16 bits, rounding on the bits (NaN passed through)
            bits = x.to(tl.int32, bitcast=True)
            nan = (bits & 0x7FFFFFFF) > 0x7F800000
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            return tl.where(nan, x, rounded.to(tl.float32, bitcast=True))
        elif CODE == 2:  # float16: the cast rounds to nearest-even on GPU and in the interpreter
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _block_scalers(qs_ptr, qf_ptr, mean_ptr, blk, mask, SCALER_BLOCK: tl.constexpr, BASE: tl.constexpr):
        """torchao's ``dequantize_scalers`` for the quantization blocks ``blk``, op by op in the base dtype."""
        q = tl.load(qs_ptr + blk, mask=mask, other=0).to(tl.float32)
        f = tl.where(mask, tl.load(qf_ptr + blk // SCALER_BLOCK, mask=mask).to(tl.float32), 1.0)
        mean = tl.load(mean_ptr).to(tl.float32)
        return _round(_round(tl.math.div_rn(q, f), BASE) + mean, BASE)

    @triton.jit
    def _dequant_kernel(
        qd_ptr, qs_ptr, qf_ptr, mean_ptr, lut_ptr, out_ptr, n_blocks,
        BLOCK_SIZE: tl.constexpr, SCALER_BLOCK: tl.constexpr, ROWS: tl.constexpr,
        BASE: tl.constexpr, OUT: tl.constexpr,
    ):  # fmt: skip
        """One program owns ``ROWS`` consecutive quantization blocks: ``ROWS * BLOCK_SIZE / 2`` bytes in,
        ``ROWS * BLOCK_SIZE`` values out. Tiles are (block, byte-in-block), so each block's scaler is computed
        once and broadcast along its row; the two nibbles are interleaved back with join + reshape, so the
        store is one contiguous, coalesced run."""
        HALF: tl.constexpr = BLOCK_SIZE // 2
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < n_blocks
        packed = tl.load(qd_ptr + rows[:, None] * HALF + tl.arange(0, HALF)[None, :], mask=rmask[:, None], other=0)
        scale = _block_scalers(qs_ptr, qf_ptr, mean_ptr, rows, rmask, SCALER_BLOCK, BASE)[:, None]
        hi = _round(tl.load(lut_ptr + (packed >> 4)).to(tl.float32) * scale, BASE)
        lo = _round(tl.load(lut_ptr + (packed & 15)).to(tl.float32) * scale, BASE)
        vals = tl.reshape(tl.join(hi, lo), (ROWS, BLOCK_SIZE))
        if OUT != BASE:  # e.g. a float32 weight read as bfloat16: torch's cast rounds to nearest-even
            vals = _round(vals, OUT)
        offs = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
        tl.store(out_ptr + offs, vals.to(out_ptr.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _decode_kernel(
        x_ptr, qd_ptr, qs_ptr, qf_ptr, mean_ptr, lut_ptr, y_ptr, T, N, K, HAS_ACC: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, SCALER_BLOCK: tl.constexpr, BASE: tl.constexpr, OUT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_K: tl.constexpr, DOT_F32: tl.constexpr,
    ):  # fmt: skip
        """``y[t0:t0+BLOCK_T, n0:n0+BLOCK_N] = x[t0:...] @ W[n0:n0+BLOCK_N].T``, ``W`` dequantized in registers.

        One program owns ``BLOCK_N`` output features for ``BLOCK_T`` (16, the smallest ``tl.dot`` tile)
        tokens; the token tiles of one feature tile are adjacent in launch order, so they share its weight
        bytes through L2. It walks ``K`` in steps of ``BLOCKS_K`` quantization blocks (``K % BLOCK_SIZE == 0``:
        a block never straddles two rows). The weight tile is loaded as (feature, block, byte), so each
        block's scaler is computed once. Instead of interleaving the two nibbles, ``x`` is split into its
        even and odd columns: high nibbles meet even columns, low nibbles odd ones, two ``tl.dot`` calls,
        float32 accumulation. The dequantized values are exactly ``dequantize``'s, so only the summation
        order differs from dequant + matmul.
        """
        HALF: tl.constexpr = BLOCK_SIZE // 2
        CK: tl.constexpr = BLOCKS_K * HALF  # byte columns (= pairs of weight columns) per step
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        nmask, tmask = n < N, t < T
        kb_per_row = K // BLOCK_SIZE
        j = tl.arange(0, BLOCKS_K)
        xc = tl.arange(0, 2 * CK)
        ymask = tmask[:, None] & nmask[None, :]
        yoffs = t[:, None] * N + n[None, :]
        if HAS_ACC:  # y += x @ W.T, one rounding at the end (as addmm_ with beta=1)
            acc = tl.load(y_ptr + yoffs, mask=ymask, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for kb0 in range(0, kb_per_row, BLOCKS_K):
            kmask = (kb0 + j) < kb_per_row
            blk = n.to(tl.int64)[:, None] * kb_per_row + (kb0 + j)[None, :]  # (BLOCK_N, BLOCKS_K)
            bmask = nmask[:, None] & kmask[None, :]
            scale = _block_scalers(qs_ptr, qf_ptr, mean_ptr, blk, bmask, SCALER_BLOCK, BASE)[:, :, None]
            byte = blk[:, :, None] * HALF + tl.arange(0, HALF)[None, None, :]
            packed = tl.load(qd_ptr + byte, mask=bmask[:, :, None], other=0)
            hi = _round(tl.load(lut_ptr + (packed >> 4)).to(tl.float32) * scale, BASE)
            lo = _round(tl.load(lut_ptr + (packed & 15)).to(tl.float32) * scale, BASE)
            hi = tl.reshape(hi, (BLOCK_N, CK))
            lo = tl.reshape(lo, (BLOCK_N, CK))
            if OUT != BASE:  # hi, lo are now exactly dequantize(W, x.dtype), tile by tile
                hi = _round(hi, OUT)
                lo = _round(lo, OUT)
            # this step's 2 * CK input columns: one contiguous load, split into even and odd in registers
            xmask = tmask[:, None] & ((kb0 + xc // BLOCK_SIZE) < kb_per_row)[None, :]
            xt = tl.load(x_ptr + t[:, None] * K + (kb0 * BLOCK_SIZE + xc)[None, :], mask=xmask, other=0.0)
            x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_T, CK, 2)))
            if DOT_F32:  # Triton 3.9's interpreter multiplies bfloat16 dots wrongly; float32 products are exact
                acc = tl.dot(x_even.to(tl.float32), tl.trans(hi), acc, input_precision="ieee")
                acc = tl.dot(x_odd.to(tl.float32), tl.trans(lo), acc, input_precision="ieee")
            else:
                wdt = x_ptr.dtype.element_ty
                acc = tl.dot(x_even, tl.trans(hi.to(wdt)), acc)
                acc = tl.dot(x_odd, tl.trans(lo.to(wdt)), acc)
        tl.store(y_ptr + yoffs, _round(acc, OUT).to(y_ptr.dtype.element_ty), mask=ymask)  # see _round


#: Launch shapes, from the sweeps of bench/qlora_gpu.py on an H200 (bench/RESULTS.md, "qlora_gpu").
#: Dequant: 32 blocks of 64 (4 KiB of bf16 out) per program, 4 warps: small programs, many per SM.
#: Decode: 64 features x 2 blocks of 64 columns per step (64 contiguous bytes per feature row per load),
#: 4 stages of loads in flight; wider feature tiles amortize the x loads over more weight bytes.
DEQUANT_ROWS, DEQUANT_WARPS = 32, 4
DECODE_BLOCK_N, DECODE_BLOCKS_K, DECODE_WARPS, DECODE_STAGES = 64, 2, 4, 4


def _dequant_triton(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=dtype, device=weight.quantized_data.device)
    rows = min(DEQUANT_ROWS, triton.next_power_of_2(weight.n_blocks))
    grid = (triton.cdiv(weight.n_blocks, rows),)
    _dequant_kernel[grid](
        weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
        weight.nf4, out, weight.n_blocks,
        BLOCK_SIZE=weight.block_size, SCALER_BLOCK=weight.scaler_block_size, ROWS=rows,
        BASE=_CODES[weight.nf4.dtype], OUT=_CODES[dtype], num_warps=DEQUANT_WARPS,
    )  # fmt: skip
    return out


def _decode_triton(x: torch.Tensor, weight: Any, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` (``acc + x @ weight.T`` in place when ``acc``, a contiguous (T, out), is given)."""
    n_out, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty((x2.shape[0], n_out), dtype=x.dtype, device=x.device) if acc is None else acc
    block_t = 16  # 64-token tiles gave wrong sums on an H200 with Triton 3.6 (bench/RESULTS.md); 16 is checked
    grid_t, grid_n = triton.cdiv(x2.shape[0], block_t), triton.cdiv(n_out, DECODE_BLOCK_N)
    _decode_kernel[(grid_t, grid_n)](
        x2, weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
        weight.nf4, y, x2.shape[0], n_out, k, acc is not None,
        BLOCK_SIZE=weight.block_size, SCALER_BLOCK=weight.scaler_block_size, BASE=_CODES[weight.nf4.dtype],
        OUT=_CODES[x.dtype], BLOCK_T=block_t, BLOCK_N=DECODE_BLOCK_N, BLOCKS_K=DECODE_BLOCKS_K, DOT_F32=_INTERPRET,
        num_warps=DECODE_WARPS, num_stages=DECODE_STAGES,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n_out)


def dequantize(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a torchao ``NF4Tensor``, bit-identical to ``weight.to(dtype)``.

    Args:
        weight: a torchao ``NF4Tensor``.
        dtype: the result's dtype (bfloat16, float16 or float32).

    Returns:
        A plain tensor of ``weight``'s shape and device. On CUDA (with Triton) one kernel launch;
        elsewhere torchao's ``weight.to(dtype)``.

    Raises:
        UsageError: ``weight`` is not an ``NF4Tensor``.

    Example:
        >>> w = to_nf4(torch.randn(256, 64, dtype=torch.bfloat16))
        >>> torch.equal(dequantize(w, torch.bfloat16), w.to(torch.bfloat16))
        True
    """
    _check_nf4(weight)
    if not _kernel_ok(weight, dtype):  # e.g. a transposed view, which torchao dequantizes its own way
        logger.debug("NF4 dequantize of %s to %s: torchao's path", weight, dtype)
        return weight.to(dtype)
    return _dequant_triton(weight, dtype)


def _use_decode(x: torch.Tensor, weight: Any) -> bool:
    """Few tokens, half-precision input, whole quantization blocks per weight row: the fused kernel."""
    return (
        x.numel() <= DECODE_MAX_TOKENS * x.shape[-1]
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.shape[1] % weight.block_size == 0
        and weight.block_size * DECODE_BLOCKS_K >= 32  # tl.dot needs K >= 16 per step
        and _kernel_ok(weight, x.dtype)
    )


class _NF4Linear(torch.autograd.Function):
    """``x @ W.T`` for a frozen NF4 ``W``: saves only the quantized weight, dequantizes again in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any) -> torch.Tensor:
        ctx.save_for_backward(weight)
        if _use_decode(x, weight):
            return _decode_triton(x, weight)
        return torch.nn.functional.linear(x, dequantize(weight, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (weight,) = ctx.saved_tensors
        gx = grad_out @ dequantize(weight, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return gx, None


def nf4_linear(x: torch.Tensor, weight: Any) -> torch.Tensor:
    """``x @ weight.T`` for a frozen torchao NF4 weight, with autograd to ``x``.

    Up to :data:`DECODE_MAX_TOKENS` tokens on CUDA, one fused kernel dequantizes the weight tile by tile
    inside the matmul (the full-precision weight is never materialized); more tokens dequantize with
    :func:`dequantize` and run a cuBLAS GEMM (the result then equals torchao's ``linear_nf4`` bit for bit).
    The backward computes ``grad @ dequantize(weight)``. On CPU, or without Triton: torchao's ``linear_nf4``.

    Args:
        x: input of shape ``(..., in_features)``.
        weight: a torchao ``NF4Tensor`` of shape ``(out_features, in_features)``.

    Returns:
        The output, shape ``(..., out_features)``, in ``x``'s dtype.

    Raises:
        UsageError: ``weight`` is not an ``NF4Tensor``.

    Example:
        >>> w = to_nf4(torch.randn(256, 64, dtype=torch.bfloat16))
        >>> nf4_linear(torch.randn(2, 64, dtype=torch.bfloat16), w).shape
        torch.Size([2, 256])
    """
    _check_nf4(weight)
    if not triton_enabled(weight.quantized_data.device):
        return linear_nf4(x, weight)
    return _NF4Linear.apply(x, weight)


def addmm_nf4_(out: torch.Tensor, x: torch.Tensor, weight: Any) -> torch.Tensor:
    """``out += x @ dequantize(weight).T`` in place, one rounding (as ``out.addmm_``); no autograd.

    The one call for a layer's frozen-NF4 product: up to :data:`DECODE_MAX_TOKENS` tokens on CUDA the fused
    decode kernel accumulates into ``out`` without materializing the weight; otherwise
    ``out.addmm_(x, dequantize(weight, x.dtype).t())``.

    Args:
        out: a contiguous ``(T, out_features)`` tensor in ``x``'s dtype.
        x: ``(T, in_features)``.
        weight: a torchao ``NF4Tensor`` of shape ``(out_features, in_features)``.

    Returns:
        ``out``.

    Raises:
        UsageError: ``weight`` is not an ``NF4Tensor``.
    """
    _check_nf4(weight)
    if out.is_contiguous() and _use_decode(x, weight):
        _decode_triton(x, weight, acc=out)
        return out
    return out.addmm_(x, dequantize(weight, x.dtype).t())


class _NF4LoRALinear(torch.autograd.Function):
    """``x @ W.T + s * (x @ A.T) @ B.T`` for a frozen NF4 ``W``, the GEMMs of ``layer._LoRAFunction``.

    The small product ``hs = s * x @ A.T`` (T, r) comes first, ``hs @ B.T`` seeds the output and the big
    matmul accumulates onto it (cuBLAS's beta=1 epilogue, or the decode kernel's accumulator), so no pass
    adds two (T, out) tensors. Backward likewise for the input gradient. Saved: ``x`` and ``hs``, as for
    the bf16 layer; the NF4 weight is dequantized again for the input gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Any, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        hs = torch.mm(x2, a.t()).mul_(s)
        out = addmm_nf4_(torch.mm(hs, b.t()), x2, weight)
        ctx.save_for_backward(x, weight, a, b, hs)
        ctx.s = s
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, None, Any, Any, None]:
        x, weight, a, b, hs = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        gh = torch.mm(g2, b).mul_(ctx.s)  # (T, r)
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(gh, a).addmm_(g2, dequantize(weight, gy.dtype)).view(x.shape)
        if ctx.needs_input_grad[2]:
            ga = torch.mm(gh.t(), x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[3]:
            gb = torch.mm(g2.t(), hs)
        return gx, None, ga, gb, None


def nf4_lora_linear(
    x: torch.Tensor, weight: Any, lora_a: torch.Tensor, lora_b: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """A QLoRA layer's output, ``x @ weight.T + scale * (x @ lora_a.T) @ lora_b.T``, with autograd.

    The same GEMMs as ``LoRALinear``'s frozen-base fast path, with the weight from :func:`dequantize`
    (and, for up to :data:`DECODE_MAX_TOKENS` tokens on CUDA, the fused decode kernel instead of the
    base GEMM). Gradients flow to ``x``, ``lora_a`` and ``lora_b``. On CPU or without Triton the weight
    comes from torchao's ``weight.to(dtype)``. No dropout: use it where the adapter's input is ``x``.

    Args:
        x: input of shape ``(..., in_features)``.
        weight: a torchao ``NF4Tensor`` of shape ``(out_features, in_features)``.
        lora_a: ``(r, in_features)``.
        lora_b: ``(out_features, r)``.
        scale: the adapter's scale (``alpha / r``).

    Returns:
        The output, shape ``(..., out_features)``, in ``x``'s dtype.

    Raises:
        UsageError: ``weight`` is not an ``NF4Tensor``.
    """
    _check_nf4(weight)
    return _NF4LoRALinear.apply(x, weight, lora_a, lora_b, scale)
