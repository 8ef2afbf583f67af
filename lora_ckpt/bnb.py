"""bitsandbytes 4-bit state dicts (a ``Linear4bit`` model as transformers saves it) into NF4 models.

A bitsandbytes 4-bit weight is stored as the packed codes under ``<module>.weight`` (uint8, shape
``(numel / 2, 1)``) plus ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map`` and ``weight.quant_state.bitsandbytes__nf4``; such a state dict does not load
into anything but bitsandbytes. :func:`from_bnb_state_dict` turns each of those groups into one torchao
``NF4Tensor`` under ``<module>.weight``, so ``load_state_dict(strict=True)`` of the result works on a model
built with ``quantize_base=True`` (``inject_lora(..., quantize_base=True)``), and nothing dense but one
weight at a time is ever held.

The conversion is lossy, but less than one NF4 code step: bitsandbytes and torchao share the codebook,
the block size (64) and the nibble order, not the encoding of the block scales (bitsandbytes: uint8
dynamic-map codes with fp32 ``nested_absmax`` and an offset; torchao: int8 codes per group of 256 scales
with a factor and a mean). A dequantized bitsandbytes block is ``code value x scale`` with its largest
element exactly ``+-scale``, so torchao picks the same 4-bit codes again (every code, in the tests) and
only the scales are re-encoded: the dequantized weights move by at most about 1% of a block's absmax
(measured in ``tests/test_bnb.py``). Quantizing the *original* bf16 tensor with each library instead
gives codes that differ in about 0.75% of the packed bytes (formats.md 17), by one code step.

bitsandbytes is optional; it is needed only here (``pip install bitsandbytes``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from .errors import MissingDependencyError, QuantizationError, quote_list
from .nf4 import quantize_nf4

__all__ = ["BNB_STATE_SUFFIXES", "bnb_4bit_weights", "from_bnb_state_dict"]

logger = logging.getLogger(__name__)

#: what bitsandbytes' ``Params4bit`` adds after ``<module>.weight.`` in a saved state dict
BNB_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                      "quant_state.bitsandbytes__fp4")


def bnb_4bit_weights(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``state_dict`` that hold bitsandbytes 4-bit packed weights (those with a packed quant state)."""
    out = []
    for key in state_dict:
        for kind in ("nf4", "fp4"):
            suffix = f".quant_state.bitsandbytes__{kind}"
            if key.endswith(suffix) and key[:-len(suffix)] in state_dict:
                out.append(key[:-len(suffix)])
    return out


def from_bnb_state_dict(state_dict: Mapping[str, torch.Tensor], *, device: torch.device | str | None = None
                        ) -> dict[str, torch.Tensor]:
    """A new state dict in which every bitsandbytes NF4 weight (and its quant-state keys) is one torchao
    ``NF4Tensor`` under the weight's key, quantized in the dtype bitsandbytes recorded; other keys are kept.
    The input is not modified.

    Args:
        state_dict: a state dict with bitsandbytes 4-bit weights (``read_checkpoint`` of a directory that
            transformers saved from a ``load_in_4bit`` model, or a ``Linear4bit`` model's ``state_dict()``).
        device: where the NF4 tensors are computed and live (default: where the packed weight is).

    Returns:
        The converted state dict (same key order, the quant-state keys dropped).

    Raises:
        QuantizationError: an FP4 weight (bitsandbytes' other 4-bit type: not NF4, so not convertible
            losslessly enough), or a quant state without its packed weight, or a shape NF4 cannot block.
        MissingDependencyError: bitsandbytes is not installed.

    Example:
        >>> model = inject_lora(build_on_meta(), targets="all-linear", r=16, alpha=32, quantize_base=True)
        >>> model.load_state_dict(from_bnb_state_dict(read_checkpoint("llama-bnb-4bit/")), assign=True)
    """
    weights = bnb_4bit_weights(state_dict)
    orphans = [k for k in state_dict if any(k.endswith(".weight." + s) for s in BNB_STATE_SUFFIXES)
               and k.split(".weight.")[0] + ".weight" not in weights]
    if orphans:
        raise QuantizationError(
            f"bitsandbytes quant-state keys {quote_list(orphans)} have no packed quant state "
            "(weight.quant_state.bitsandbytes__nf4) or no packed weight; expected the complete set bitsandbytes "
            "saves; re-save the model", key=orphans[0])
    fp4 = [w for w in weights if w + ".quant_state.bitsandbytes__fp4" in state_dict]
    if fp4:
        raise QuantizationError(
            f"{quote_list(fp4)} are bitsandbytes FP4 weights; expected NF4 (bnb_4bit_quant_type='nf4'); "
            "dequantize them with bitsandbytes and load the dense weights instead", key=fp4[0])
    if not weights:
        return dict(state_dict)
    try:
        from bitsandbytes.functional import QuantState, dequantize_4bit
    except ImportError as e:
        raise MissingDependencyError(
            f"the state dict has {len(weights)} bitsandbytes 4-bit weight(s) ({quote_list(weights, 3)}); reading them "
            "needs bitsandbytes, which is not importable; install it with `pip install bitsandbytes`",
            package="bitsandbytes") from e
    drop = {w + "." + s for w in weights for s in BNB_STATE_SUFFIXES}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in drop:
            continue
        if key not in weights:
            out[key] = value
            continue
        target = torch.device(device) if device is not None else value.device
        parts = {s: state_dict[key + "." + s] for s in BNB_STATE_SUFFIXES if key + "." + s in state_dict}
        state = QuantState.from_dict(parts, device=target)
        dense = dequantize_4bit(value.to(target), state)  # (out, in), in the dtype bitsandbytes computes in
        out[key] = quantize_nf4(dense, key=key)
        logger.debug("%s: bitsandbytes NF4 %s -> torchao NF4", key, tuple(dense.shape))
        del dense
    return out
