"""torchtune's own PEFT export: the PEFT-keyed ``adapter_model.safetensors`` torchtune writes beside
``adapter_model.pt``, read and compared with the ``.pt`` (``check`` and ``inspect`` both ask this)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .adapter import Adapter
from .hub.client import fetch_model_config
from .layouts import load_adapter

if TYPE_CHECKING:
    from .conversion import VerifyReport

__all__ = ["torchtune_export"]


def torchtune_export(root: Path, ours: Adapter) -> tuple[Path, Adapter, VerifyReport] | None:
    """torchtune writes a PEFT-keyed copy (``adapter_model.safetensors``) beside ``adapter_model.pt``,
    and that copy is what PEFT-format consumers read; 0.6.1's is wrong for DoRA and Qwen. The copy
    (None if there is none), read, and how it compares with ``ours`` (read from adapter_model.pt).

    Raises:
        LoraCkptError: the copy cannot be read.
    """
    from .conversion import compare_adapters  # imports torch: only when there is an export to compare

    export = root / "adapter_model.safetensors"
    if not export.is_file():
        return None
    theirs = load_adapter(export, layout="peft", base_config=ours.meta.model_config,
                          resolve_base_config=fetch_model_config)
    return export, theirs, compare_adapters(ours, theirs)
