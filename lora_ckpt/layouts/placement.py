"""Placement for layouts whose consumer adapts a projection type in every block (torchtune,
LitGPT): writing fills the modules the adapter lacks with zero factors (a no-op for LoRA),
reading drops all-zero modules again."""

from __future__ import annotations

import logging
from dataclasses import replace

from ..adapter import Adapter, ModuleLoRA
from ..errors import ConversionError, MissingConfigError, quote_list
from ..families import ModelConfig, parse_layer

__all__ = ["drop_zero_modules", "fill_every_layer"]

logger = logging.getLogger(__name__)

# the MLP projections a consumer adapts together (split, or Phi-3's fused gate_up_proj)
MLP_GROUPS = (("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), ("mlp.gate_up_proj", "mlp.down_proj"))


def fill_every_layer(adapter: Adapter, cfg: ModelConfig | None, *, layout: str) -> Adapter:
    """Zero factors for every (layer, projection type) the adapter lacks, where the consumer adapts
    a type in all layers and the MLP projections together. Exact for LoRA (B = 0 adds nothing);
    refused for DoRA (a zero-update DoRA module still rescales rows).

    Raises:
        ConversionError: a DoRA adapter would need zero modules.
        MissingConfigError: a missing module's shape needs the base config.
    """
    import torch

    by_type: dict[tuple[str, str], set[int]] = {}
    for name in adapter.modules:
        block = parse_layer(name)
        if block:
            by_type.setdefault((block.prefix, block.rest), set()).add(block.number)
    if not by_type:
        return adapter
    for pre in {p for p, _ in by_type}:
        present = {t for p, t in by_type if p == pre and t.startswith("mlp.")}
        group = next((g for g in MLP_GROUPS if present and present <= set(g)), ())
        for t in group:
            by_type.setdefault((pre, t), set())
    n_layers = (cfg.n_layers if cfg else None) or max(i for layers in by_type.values() for i in layers) + 1
    missing = {f"{pre}{i}.{rest}": rest for (pre, rest), layers in by_type.items() for i in range(n_layers)
               if i not in layers}
    if not missing:
        return adapter
    if adapter.uses_dora:
        raise ConversionError(
            f"{layout} adapts every layer (and all MLP projections) but this DoRA adapter lacks "
            f"{quote_list(list(missing), 3)}; zeros are not a no-op for DoRA; convert to a layout that keeps "
            "placement (peft, native)")
    ref = next(iter(adapter.modules.values()))
    fill: dict[str, ModuleLoRA] = {}
    for name, rest in missing.items():
        like = next((m for n, m in adapter.modules.items() if n.endswith("." + rest)), None)
        shape = (like.B.shape[0], like.A.shape[1]) if like is not None else cfg.expected_shape(name) if cfg else None
        if shape is None:
            raise MissingConfigError(f"{layout} needs {name!r} written as zeros, and its shape needs the base "
                                     "config; pass --base-config")
        fill[name] = ModuleLoRA(A=torch.zeros(ref.rank, shape[1], dtype=ref.A.dtype),
                                B=torch.zeros(shape[0], ref.rank, dtype=ref.B.dtype), scale=ref.scale)
    logger.info("%s adapts every layer: %d module(s) written as zeros (a no-op)", layout, len(fill))
    return replace(adapter, modules={**adapter.modules, **fill})


def drop_zero_modules(adapter: Adapter) -> None:
    """Remove all-zero modules (a layout's placement filler) unless every module is zero."""
    zero = [n for n, m in adapter.modules.items() if m.magnitude is None and m.bias is None
            and not bool(m.A.any()) and not bool(m.B.any())]
    if zero and len(zero) < len(adapter.modules):
        for n in zero:
            del adapter.modules[n]
        adapter.meta.notes.append(f"{len(zero)} all-zero module(s) read as absent (placement fillers; a no-op)")
