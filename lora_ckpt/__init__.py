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

if TYPE_CHECKING:  # pragma: no cover  (`import x as x`: explicit re-exports for type checkers)
    from . import errors as errors
    from . import hub as hub
    from .adapter import Adapter as Adapter
    from .check import check_source as check_source
    from .checkpoint import LoadResult as LoadResult
    from .checkpoint import load_checkpoint as load_checkpoint
    from .checkpoint import read_checkpoint as read_checkpoint
    from .conversion import convert as convert
    from .conversion import verify as verify
    from .empty import init_empty_weights as init_empty_weights
    from .inject import adapter_state_dict as adapter_state_dict
    from .inject import inject_lora as inject_lora
    from .inject import stock_state_dict as stock_state_dict
    from .layer import LoRALinear as LoRALinear
    from .layouts import load_adapter as load_adapter
    from .merge import MergeResult as MergeResult
    from .merge import merge_checkpoint as merge_checkpoint
    from .report import inspect_checkpoint as inspect_checkpoint
    from .report import inspect_source as inspect_source
    from .transfer import apply_adapter as apply_adapter
    from .transfer import save_adapter as save_adapter


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
