"""lora-ckpt: the exact, verified bridge for LoRA checkpoints.

Public names are imported lazily, so ``import lora_ckpt`` (and the CLI's ``--help`` and
``inspect``) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> submodule (None: the submodule itself)
    "Adapter": "adapter",
    "LoRALinear": "layer",
    "LoadResult": "checkpoint",
    "MergeResult": "merge",
    "adapter_state_dict": "inject",
    "apply_adapter": "transfer",
    "check_source": "check",
    "convert": "conversion",
    "errors": None,
    "hub": None,
    "init_empty_weights": "empty",
    "inject_lora": "inject",
    "inspect_checkpoint": "report",
    "inspect_source": "report",
    "load_adapter": "layouts",
    "load_checkpoint": "checkpoint",
    "merge_checkpoint": "merge",
    "read_checkpoint": "checkpoint",
    "save_adapter": "transfer",
    "stock_state_dict": "inject",
    "verify": "conversion",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from . import errors, hub
    from .adapter import Adapter
    from .conversion import convert, verify
    from .empty import init_empty_weights
    from .layouts import load_adapter
    from .checkpoint import LoadResult, load_checkpoint, read_checkpoint
    from .inject import adapter_state_dict, inject_lora, stock_state_dict
    from .layer import LoRALinear
    from .report import inspect_checkpoint, inspect_source
    from .transfer import apply_adapter, save_adapter


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
