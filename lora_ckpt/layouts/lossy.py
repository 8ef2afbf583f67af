"""The lossy policy: what a layout cannot hold (by its :data:`~.spec.Feature` set), refused unless
the user allows dropping it."""

from __future__ import annotations

import logging
from dataclasses import replace

from ..adapter import Adapter
from ..errors import LossyConversionError, quote_list
from .spec import Feature

__all__ = ["drop_unsupported", "lossy_parts"]

logger = logging.getLogger(__name__)


def lossy_parts(adapter: Adapter, features: frozenset[Feature]) -> list[str]:
    """What a layout with ``features`` cannot hold of ``adapter``, as readable items."""
    out = []
    if adapter.uses_dora and "dora" not in features:
        out.append("DoRA magnitudes")
    if adapter.uses_bias and "bias" not in features:
        out.append("LoRA biases (lora_B.bias)")
    if any(m.kind == "embedding" for m in adapter.modules.values()) and "embedding" not in features:
        out.append("embedding LoRA (" + ", ".join(n for n, m in adapter.modules.items() if m.kind == "embedding") + ")")
    if adapter.extra and "extra" not in features:
        out.append("full tensors (modules_to_save / saved embeddings: " + quote_list(adapter.extra, 3) + ")")
    if any(m.fan_in_fan_out for m in adapter.modules.values()) and "fan_in_fan_out" not in features:
        out.append("the fan_in_fan_out (Conv1D) flag of " + quote_list(
            [n for n, m in adapter.modules.items() if m.fan_in_fan_out], 3)
            + " (the factors are kept; a consumer whose model stores these weights (in, out) must set it itself)")
    return out


def drop_unsupported(adapter: Adapter, features: frozenset[Feature], *, layout: str, allow_lossy: bool) -> Adapter:
    """``adapter`` without what ``layout`` (with ``features``) cannot hold.

    Raises:
        LossyConversionError: something would be dropped and not ``allow_lossy``.
    """
    lossy = lossy_parts(adapter, features)
    if not lossy:
        return adapter
    if not allow_lossy:
        raise LossyConversionError(
            f"{layout} cannot hold {'; '.join(lossy)}; expected an adapter without them; convert to "
            "another layout, or pass --allow-lossy to drop them", dropped=lossy)
    logger.warning("dropping what %s cannot hold: %s", layout, "; ".join(lossy))
    mods = {}
    for n, m in adapter.modules.items():
        if m.kind == "embedding" and "embedding" not in features:
            continue
        mods[n] = replace(m, magnitude=m.magnitude if "dora" in features else None,
                          bias=m.bias if "bias" in features else None,
                          fan_in_fan_out=m.fan_in_fan_out and "fan_in_fan_out" in features)
    return replace(adapter, modules=mods, extra=adapter.extra if "extra" in features else {})
