"""lora-ckpt: the exact, verified bridge for LoRA checkpoints.

Public names are imported lazily, so ``import lora_ckpt`` (and the CLI's ``--help`` and
``inspect``) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Adapter": "adapter",
    "LoRALinear": "layer",
    "LoadResult": "checkpoint",
    "adapter_state_dict": "inject",
    "convert": "convert",
    "load_adapter": "layouts",
    "save_adapter": "layouts",
    "verify": "convert",
    "errors": None,
    "inject_lora": "inject",
    "inspect_checkpoint": "report",
    "load_checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint",
    "stock_state_dict": "inject",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from . import errors
    from .adapter import Adapter
    from .convert import convert, verify
    from .layouts import load_adapter, save_adapter
    from .checkpoint import LoadResult, load_checkpoint, read_checkpoint
    from .inject import adapter_state_dict, inject_lora, stock_state_dict
    from .layer import LoRALinear
    from .report import inspect_checkpoint


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lora_ckpt' has no attribute {name!r}")
    module = _EXPORTS[name]
    if module is None:
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
