"""Put ``LoRALinear`` into a model, and take state dicts back out of it.

- :func:`inject_lora` wraps the targeted ``nn.Linear`` modules (PEFT's matching rule) and
  freezes everything else.
- :func:`adapter_state_dict` returns only the adapter tensors.
- :func:`stock_state_dict` returns the state dict a LoRA-unaware model expects: adapters
  merged into the weights, stock key names, no adapter keys. The model is not modified.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .errors import TargetNotFoundError, quote_list
from .keys import matches_target
from .layer import LoRALinear
from .nf4 import check_quantizable, dequantize, is_nf4

__all__ = ["adapter_state_dict", "inject_lora", "lora_modules", "matches_target", "stock_state_dict"]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(model: nn.Module, *, targets: str | Sequence[str], r: int, alpha: float,
                dropout: float = 0.0, use_rslora: bool = False, quantize_base: bool = False) -> list[str]:
    """Replace the targeted ``nn.Linear`` submodules of ``model`` with :class:`LoRALinear`, in place.

    Base weights are shared, not copied; on a ``meta`` model the adapters are ``meta`` too and
    materialise when a checkpoint is loaded with ``assign=True``. Every parameter except the
    adapters is frozen.

    Args:
        model: the model to modify.
        targets: a list of module names or name suffixes (``["q_proj", "v_proj"]``), or one
            regex that must match a full module name.
        r: adapter rank.
        alpha: adapter alpha (``scaling = alpha / r``).
        dropout: adapter dropout.
        use_rslora: ``scaling = alpha / sqrt(r)``.
        quantize_base: hold the wrapped layers' base weights in NF4 (QLoRA; ``pip install
            lora-ckpt[nf4]``). On a ``meta`` model nothing is quantized until a checkpoint is
            loaded, tensor by tensor.

    Returns:
        The names of the wrapped modules, in model order.

    Raises:
        TargetNotFoundError: a target (or the regex) matches no ``nn.Linear``.
        QuantizationError: ``quantize_base`` and NF4 cannot block a targeted weight (checked for all
            targets before any module is replaced).

    Example:
        >>> names = inject_lora(model, targets=["q_proj", "v_proj"], r=8, alpha=16)
    """
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _inside_lora(model, n)]
    chosen = [n for n in linears if matches_target(n, targets)]
    unmatched = ([targets] if not chosen else []) if isinstance(targets, str) else \
        [t for t in targets if not any(matches_target(n, [t]) for n in linears)]
    if unmatched or not chosen:
        raise TargetNotFoundError(
            f"target(s) {quote_list(unmatched or list(targets))} match no nn.Linear of "
            f"{type(model).__name__}; its Linear modules are {quote_list(linears, 8)}; use one of those "
            "names or a suffix of them", targets=list(unmatched or targets), candidates=linears)
    if quantize_base:
        for name in chosen:
            check_quantizable(model.get_submodule(name).weight.shape, key=f"{name}.weight")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = LoRALinear.from_linear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout,
                                         use_rslora=use_rslora, quantize_base=quantize_base)
        setattr(parent, child, wrapped)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return chosen


def _inside_lora(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), LoRALinear)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``model`` (``<module>.lora_A.weight``, ``<module>.lora_B.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        p = f"{name}." if name else ""
        out[p + "lora_A.weight"] = m.lora_A.weight.detach()
        out[p + "lora_B.weight"] = m.lora_B.weight.detach()
    return out


def stock_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The state dict of the same model without LoRA: adapters merged (float32 math, cast once
    to the weight's dtype), keys as a plain ``nn.Linear`` names them, in the plain model's
    order. ``model`` is not modified. An NF4 base is dequantized (one tensor at a time) first.

    Example:
        >>> plain_model.load_state_dict(stock_state_dict(lora_model))  # strict
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    skip: tuple[str, ...] = ()  # prefixes of LoRA layers already emitted
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if skip and prefix.startswith(skip):
            continue
        if isinstance(module, LoRALinear):
            w = module.linear.weight.detach()
            if is_nf4(w):  # an NF4 base: the adapter merges into the weight the model computes with
                w = dequantize(w, w.dtype)
            out[prefix + "weight"] = w if module.merged else (w.float() + module.delta_weight()).to(w.dtype)
            if module.linear.bias is not None:
                out[prefix + "bias"] = module.linear.bias.detach()
            skip += (prefix,)
        else:
            module._save_to_state_dict(out, prefix, keep_vars=False)
    return out
