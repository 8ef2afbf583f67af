"""Load a stock checkpoint (file, sharded directory, torch pickle) into a model, LoRA-wrapped or not."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from .errors import KeyMismatchError, quote_list
from .io import PathLike, checkpoint_files, load_tensors

__all__ = ["LoadResult", "load_checkpoint", "read_checkpoint"]

logger = logging.getLogger(__name__)


class LoadResult(NamedTuple):
    """Keys of the model the checkpoint lacked, and keys of the checkpoint the model lacks."""

    missing: list[str]
    unexpected: list[str]


def read_checkpoint(source: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a stock checkpoint: a ``.safetensors`` file (memory-mapped, zero-copy), a
    directory with a shard index or one weight file, or a ``.pt``/``.bin`` pickle loaded with
    ``weights_only=True`` onto the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(source):
        tensors.update(load_tensors(path))
    return tensors


def load_checkpoint(model: nn.Module, source: PathLike, *, strict: bool = True) -> LoadResult:
    """Load a stock checkpoint into ``model``.

    LoRA-wrapped layers accept the stock ``weight``/``bias`` keys (and other LoRA dialects),
    so a strict load works unchanged. A model built on the ``meta`` device is loaded with
    ``assign=True``: the checkpoint's memory-mapped tensors become the parameters, so no random
    initialisation is paid and peak memory stays near the checkpoint size.

    Args:
        model: the model to load into.
        source: a ``.safetensors``/``.pt``/``.bin``/``.pth`` file, or a directory.
        strict: raise if the checkpoint misses a key of the model or has one it does not know.

    Returns:
        ``LoadResult(missing, unexpected)``, as ``nn.Module.load_state_dict`` returns.

    Raises:
        KeyMismatchError: ``strict`` and the keys differ.
        ShapeMismatchError, IncompleteAdapterError: a tensor does not fit its parameter.
        CheckpointFormatError, UnsafeCheckpointError, CheckpointNotFoundError: unreadable source.

    Example:
        >>> with torch.device("meta"):
        ...     model = MyModel(cfg)
        >>> inject_lora(model, targets=["q_proj", "v_proj"], r=8, alpha=16)
        >>> load_checkpoint(model, "llama/")   # strict=True, adapters start as no-ops
    """
    state = read_checkpoint(source)
    assign = any(p.device.type == "meta" for p in model.parameters())
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) of the model: {quote_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {quote_list(unexpected)}")
        raise KeyMismatchError(
            f"{source}: checkpoint does not fit {type(model).__name__}: {'; '.join(parts)}; check that it is "
            "this model's checkpoint, or pass strict=False", missing=missing, unexpected=unexpected)
    logger.debug("loaded %d tensors from %s (assign=%s)", len(state), source, assign)
    return LoadResult(missing, unexpected)

