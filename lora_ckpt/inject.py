"""Put ``LoRALinear`` into a model, and take state dicts back out of it.

- :func:`inject_lora` wraps the targeted ``nn.Linear`` and transformers ``Conv1D`` modules
  (PEFT's matching rule, ``"all-linear"`` included) and freezes everything else.
- :func:`adapter_state_dict` returns only the adapter tensors.
- :func:`stock_state_dict` returns the state dict a LoRA-unaware model expects: adapters
  merged into the weights, stock key names, no adapter keys. The model is not modified.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter, OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .errors import (
    AlreadyWrappedError,
    QuantizationError,
    StateDictError,
    TargetNotFoundError,
    UnsupportedModuleError,
    quote_list,
)
from .keys import matches_target
from .layer import DEFAULT_SEED, LoRALinear
from .nf4 import check_quantizable

__all__ = ["Injected", "adapter_state_dict", "inject_lora", "lora_class_for", "lora_modules",
           "mark_only_lora_trainable", "matches_target", "stock_state_dict"]

logger = logging.getLogger(__name__)

#: PEFT's shorthand for every Linear / Conv1D but the output head
ALL_LINEAR = "all-linear"


class Injected(list[str]):
    """The names :func:`inject_lora` wrapped (a list, in model order), and in ``already_wrapped`` the
    matched modules that were LoRA layers before the call (left as they were)."""

    def __init__(self, wrapped: Sequence[str], already_wrapped: Sequence[str] = ()) -> None:
        super().__init__(wrapped)
        self.already_wrapped = list(already_wrapped)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` (``LoRAConv1D`` included) of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_class_for(module: nn.Module) -> type[LoRALinear] | None:
    """The LoRA layer class that wraps ``module``, or None if lora-ckpt cannot wrap it.

    ``nn.Linear`` (and subclasses) -> :class:`LoRALinear`; transformers' ``Conv1D`` ->
    :class:`~lora_ckpt.conv1d.LoRAConv1D`. This is the one place that decides.
    """
    if isinstance(module, LoRALinear):
        return None
    if isinstance(module, nn.Linear):
        return LoRALinear
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")  # a model with a Conv1D imported it
    if pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D):
        from .conv1d import LoRAConv1D

        return LoRAConv1D
    return None


def inject_lora(model: nn.Module, *, targets: str | Sequence[str], r: int, alpha: float,
                dropout: float = 0.0, use_rslora: bool = False, quantize_base: bool = False,
                seed: int = DEFAULT_SEED) -> Injected:
    """Replace the targeted ``nn.Linear`` / ``Conv1D`` submodules of ``model`` with LoRA layers, in place.

    Base weights are shared, not copied; on a ``meta`` model the adapters are ``meta`` too and
    materialise when a checkpoint is loaded with ``assign=True``. Every parameter except the
    adapters is frozen. A second call adds targets: modules it matches that are already LoRA
    layers (with the same ``r``, ``alpha``, ``use_rslora``) are left as they are and reported in
    ``already_wrapped``; nothing is ever wrapped twice.

    Args:
        model: the model to modify.
        targets: a list of module names or name suffixes (``["q_proj", "v_proj"]``), one regex that
            must match a full module name, or ``"all-linear"``: PEFT's rule, every ``nn.Linear`` and
            ``Conv1D`` except the output head of a transformers model (``get_output_embeddings()``).
        r: adapter rank.
        alpha: adapter alpha (``scaling = alpha / r``).
        dropout: adapter dropout.
        use_rslora: ``scaling = alpha / sqrt(r)``.
        quantize_base: hold the new layers' base weights in NF4 (QLoRA; ``pip install
            lora-ckpt[nf4]``). On a ``meta`` model nothing is quantized until a checkpoint is
            loaded, tensor by tensor.
        seed: fresh ``lora_A`` are drawn from ``seed`` and the module name alone
            (:func:`lora_ckpt.layer.draw_lora_A`): the same on 1 or N ranks, in any process.

    Returns:
        The names of the newly wrapped modules, in model order (an :class:`Injected` list).

    Raises:
        TargetNotFoundError: a target (or the regex) matches no module.
        UnsupportedModuleError: a target matches a module that is neither an ``nn.Linear`` nor a
            ``Conv1D`` (an ``nn.Embedding``, a whole attention block, ...).
        AlreadyWrappedError: every matched module is already wrapped, or some are wrapped with
            another ``r``/``alpha``/``use_rslora``.
        QuantizationError: ``quantize_base`` and NF4 cannot block a targeted weight, or it is a
            ``Conv1D`` (checked for all targets before any module is replaced).

    Example:
        >>> names = inject_lora(model, targets=["q_proj", "v_proj"], r=8, alpha=16)
        >>> inject_lora(model, targets=["k_proj"], r=8, alpha=16)   # adds k_proj
    """
    candidates = _candidates(model)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = _output_head(model)
        matched = [n for n, m in candidates.items() if n != head and (
            isinstance(m, LoRALinear) or lora_class_for(m) is not None)]
    else:
        _check_targets(model, candidates, targets)
        matched = [n for n in candidates if matches_target(n, targets)]
    unsupported = {n: type(candidates[n]).__name__ for n in matched
                   if not isinstance(candidates[n], LoRALinear) and lora_class_for(candidates[n]) is None}
    if unsupported:
        shown = ", ".join(f"{n!r} ({t})" for n, t in list(unsupported.items())[:5])
        more = f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else ""
        raise UnsupportedModuleError(
            f"targets {_show(targets)} match {shown}{more}, which lora-ckpt cannot wrap (it wraps nn.Linear and "
            "transformers Conv1D); name the Linear layers inside them instead, or drop those targets",
            modules=unsupported)
    wrapped = {n: m for n in matched if isinstance(m := candidates[n], LoRALinear)}
    before = list(wrapped)
    _check_already_wrapped(wrapped, targets, r=r, alpha=alpha, use_rslora=use_rslora,
                           new=len(matched) - len(before))
    new = [n for n in matched if n not in before]
    if quantize_base:
        for name in new:
            if lora_class_for(candidates[name]) is not LoRALinear:
                raise QuantizationError(
                    f"{name!r} is a {type(candidates[name]).__name__}: quantize_base=True wraps nn.Linear only; "
                    "expected Linear targets; leave it out of the targets", key=f"{name}.weight")
            weight = candidates[name].weight
            assert isinstance(weight, torch.Tensor)
            check_quantizable(weight.shape, key=f"{name}.weight")
    for name in new:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        cls = lora_class_for(base)
        assert cls is not None  # checked above
        setattr(parent, child, cls.from_linear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                                 quantize_base=quantize_base, name=name, seed=seed))
    mark_only_lora_trainable(model)
    if before:
        logger.info("inject_lora: %d matched module(s) already wrapped, left as they are: %s", len(before),
                    quote_list(before))
    return Injected(new, before)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` except the adapters (``lora_A``/``lora_B``) of its LoRA layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every named submodule that is not the root and not inside a LoRA layer."""
    out: dict[str, nn.Module] = {}
    inside: tuple[str, ...] = ()
    for name, m in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        out[name] = m
        if isinstance(m, LoRALinear):
            inside += (name + ".",)
    return out


def _output_head(model: nn.Module) -> str | None:
    """The name of a transformers model's output embedding (PEFT's "all-linear" exclusion)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _show(targets: str | Sequence[str]) -> str:
    return repr(targets) if isinstance(targets, str) else quote_list(targets)


def _check_targets(model: nn.Module, candidates: dict[str, nn.Module], targets: str | Sequence[str]) -> None:
    unmatched = ([targets] if not any(matches_target(n, targets) for n in candidates) else []) \
        if isinstance(targets, str) else [t for t in targets if not any(matches_target(n, [t]) for n in candidates)]
    if unmatched or not targets:
        linears = [n for n, m in candidates.items() if isinstance(m, LoRALinear) or lora_class_for(m) is not None]
        raise TargetNotFoundError(
            f"target(s) {quote_list(unmatched or list(targets))} match no module of {type(model).__name__}; its "
            f"Linear/Conv1D modules are {quote_list(linears, 8)}; use one of those names or a suffix of them, "
            "or 'all-linear'", targets=list(unmatched or targets), candidates=linears)


def _check_already_wrapped(wrapped: dict[str, LoRALinear], targets: str | Sequence[str], *, r: int, alpha: float,
                           use_rslora: bool, new: int) -> None:
    differ = [n for n, m in wrapped.items() if (m.r, m.alpha, m.use_rslora) != (r, float(alpha), use_rslora)]
    if differ:
        m = wrapped[differ[0]]
        raise AlreadyWrappedError(
            f"{quote_list(differ)} already wrapped with r={m.r}, alpha={m.alpha:g}"
            f"{', rslora' if m.use_rslora else ''}, asked r={r}, alpha={float(alpha):g}"
            f"{', rslora' if use_rslora else ''}; use the same settings, or leave those modules out of the targets",
            modules=differ)
    if wrapped and not new:
        raise AlreadyWrappedError(
            f"targets {_show(targets)} match only modules already wrapped ({quote_list(wrapped)}); nothing to do; "
            "name other modules to add them", modules=list(wrapped))


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

    Raises:
        StateDictError: a non-zero adapter on a tied weight (its merge would untie the tied keys).

    Example:
        >>> plain_model.load_state_dict(stock_state_dict(lora_model))  # strict
    """
    shared = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = [n for n, m in lora_modules(model).items() if shared[id(m.linear.weight)] > 1 and not m.merged
            and bool(m.lora_A.weight.any()) and bool(m.lora_B.weight.any())]
    if tied:
        raise StateDictError(
            f"LoRA layer(s) {quote_list(tied)} adapt a weight tied to another parameter (tied embeddings); a merged "
            "export would give the tied keys different values, which no tied model loads; build the model with "
            "tie_word_embeddings=False, or leave the tied head out of the targets", key=tied[0])
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    skip: tuple[str, ...] = ()  # prefixes of LoRA layers already emitted
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if skip and prefix.startswith(skip):
            continue
        if isinstance(module, LoRALinear):
            out[prefix + "weight"] = module.merged_weight()
            if module.linear.bias is not None:
                out[prefix + "bias"] = module.linear.bias.detach()
            skip += (prefix,)
        else:
            module._save_to_state_dict(out, prefix, keep_vars=False)
    return out
