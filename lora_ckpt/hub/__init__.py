"""The Hugging Face Hub: ``hf://`` sources (:mod:`.uri`, no request), the client (:mod:`.client`:
errors, downloads, ``pull``, the base-config resolver), ``push`` (:mod:`.publish`) and its model card
(:mod:`.card`).

``push`` is imported on first use: it converts, so it imports torch, and ``inspect hf://...``
(which goes through :func:`resolve_source`) stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .client import MODEL, MODEL_CONFIGS, fetch_model_config, pull, resolve_source
from .uri import HubSource, is_hub_id, parse_hf_url

if TYPE_CHECKING:
    from .publish import push

__all__ = ["MODEL", "MODEL_CONFIGS", "HubSource", "fetch_model_config", "is_hub_id", "parse_hf_url", "pull", "push",
           "resolve_source"]


def __getattr__(name: str) -> Any:
    if name != "push":
        raise AttributeError(f"module 'lora_ckpt.hub' has no attribute {name!r}")
    value = importlib.import_module(".publish", __name__).push  # torch-free import of lora_ckpt.hub
    globals()["push"] = value
    return value
