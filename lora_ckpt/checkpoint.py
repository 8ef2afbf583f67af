"""Load a stock checkpoint (file, sharded directory or its index, torch pickle) into a model,
LoRA-wrapped or not, and leave nothing on ``meta`` silently."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .bnb import bnb_4bit_weights, from_bnb_state_dict
from .errors import (
    CheckpointNotFoundError,
    KeyMismatchError,
    LoraCkptError,
    MetaTensorError,
    NotACheckpointError,
    StateDictError,
    quote_list,
)
from .io import PathLike, checkpoint_files, load_tensors
from .keys import split_key
from .nf4 import releasing_file_pages

__all__ = ["LoadResult", "load_checkpoint", "read_checkpoint"]

logger = logging.getLogger(__name__)

#: PEFT's prefix of every key it saves
PEFT_PREFIX = "base_model.model."


class LoadResult(NamedTuple):
    """Keys of the model the checkpoint lacked, and keys of the checkpoint the model lacks."""

    missing: list[str]
    unexpected: list[str]


def read_checkpoint(source: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a stock checkpoint: a ``.safetensors`` file (memory-mapped, zero-copy), a
    directory with a shard index or one weight file, a shard index (``*.index.json``) itself, or a
    ``.pt``/``.bin`` pickle loaded with ``weights_only=True`` onto the CPU.

    Raises:
        NotACheckpointError: ``source`` is a LoRA adapter (PEFT, torchtune, ...), not a model.
        CheckpointFormatError, UnsafeCheckpointError, CheckpointNotFoundError: unreadable source.
    """
    try:
        files = checkpoint_files(source)
    except CheckpointNotFoundError:
        _refuse_adapter(source, None)  # a directory with an adapter but no model weight file
        raise
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_tensors(path))
    _refuse_adapter(source, tensors)
    return tensors


def load_checkpoint(model: nn.Module, source: PathLike, *, strict: bool = True) -> LoadResult:
    """Load a stock checkpoint into ``model``.

    LoRA-wrapped layers accept the stock ``weight``/``bias`` keys (and other LoRA dialects),
    so a strict load works unchanged. A model with parameters on ``meta`` (built under
    :func:`~lora_ckpt.empty.init_empty_weights`) is loaded with ``assign=True``: the checkpoint's
    memory-mapped tensors become the parameters, so no random initialisation is paid and peak
    memory stays near the checkpoint size. Afterwards nothing is on ``meta``, or an error says
    what is. Tied parameters (``tie_word_embeddings``) load as transformers loads them: a
    checkpoint holding one of the tied keys fills all of them, the tie is kept (one
    ``Parameter``), and the absent key is not "missing".
    A sharded model (FSDP2, DTensor parameters) is loaded rank by rank: see
    :func:`lora_ckpt.distributed.load_sharded`.
    Layers with an NF4 base (``quantize_base=True``) quantize their weights tensor by tensor as they
    load and release the file pages they read, so peak memory is the quantized model plus one chunk.
    A bitsandbytes 4-bit checkpoint (``Linear4bit`` keys) is read through
    :func:`lora_ckpt.bnb.from_bnb_state_dict` into such a model (every 4-bit code kept, the block
    scales re-encoded: less than one NF4 code step).

    Args:
        model: the model to load into.
        source: a ``.safetensors``/``.pt``/``.bin``/``.pth`` file, a shard index
            (``model.safetensors.index.json``), or a directory.
        strict: raise if the checkpoint misses a key of the model or has one it does not know.

    Returns:
        ``LoadResult(missing, unexpected)``, as ``nn.Module.load_state_dict`` returns.

    Raises:
        KeyMismatchError: ``strict`` and the keys differ.
        MetaTensorError: parameters or buffers are still on ``meta`` after the load.
        NotACheckpointError: ``source`` is an adapter; use :func:`lora_ckpt.apply_adapter`.
        StateDictError: tied parameters whose checkpoint tensors differ.
        ShapeMismatchError, IncompleteAdapterError: a tensor does not fit its parameter.
        CheckpointFormatError, UnsafeCheckpointError, CheckpointNotFoundError: unreadable source.

    Example:
        >>> with lora_ckpt.init_empty_weights():
        ...     model = MyModel(cfg)
        >>> inject_lora(model, targets=["q_proj", "v_proj"], r=8, alpha=16)
        >>> load_checkpoint(model, "llama/")   # strict=True, adapters start as no-ops
    """
    from .distributed import is_sharded, load_sharded

    if is_sharded(model):  # FSDP2 (DTensor parameters): each rank reads only the rows it owns
        return LoadResult(*load_sharded(model, source, strict=strict))
    state = read_checkpoint(source)
    if bnb_4bit_weights(state):  # a bitsandbytes 4-bit checkpoint: its weights become NF4Tensors, one at a time
        state = from_bnb_state_dict(state)
    assign = any(p.device.type == "meta" for p in model.parameters())
    ties = _tie_groups(model)
    with releasing_file_pages():  # NF4 layers quantize these fresh file-backed tensors and drop their pages
        result = model.load_state_dict(state, strict=False, assign=assign)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if ties:
        missing = _load_ties(model, ties, state, missing, assign=assign, source=source)
    if strict and (missing or unexpected):
        raise KeyMismatchError.for_load(source, type(model).__name__, missing=missing, unexpected=unexpected)
    _refuse_meta(model, source, missing)
    logger.debug("loaded %d tensors from %s (assign=%s)", len(state), source, assign)
    return LoadResult(missing, unexpected)


# ------------------------------------------------------------------------- adapters
def is_adapter_state(keys: Mapping[str, object] | list[str]) -> bool:
    """Whether every key is an adapter tensor of some layout (or carries PEFT's prefix): no
    model checkpoint looks like that."""
    names = list(keys)
    return bool(names) and all(k.startswith(PEFT_PREFIX) or split_key(k) is not None for k in names)


def _refuse_adapter(source: PathLike, tensors: Mapping[str, torch.Tensor] | None) -> None:
    if tensors is not None and not is_adapter_state(tensors):
        return
    from .layouts import detect_layout

    try:
        layout: str | None = detect_layout(source).layout.name
    except LoraCkptError:
        if tensors is None:
            return
        layout = None
    what = f"a {layout} adapter" if layout else "an adapter (only LoRA tensors)"
    raise NotACheckpointError(
        f"{source}: this is {what}, not a model checkpoint; load the base model first, then "
        f"lora_ckpt.apply_adapter(model, {str(source)!r})", path=Path(source), layout=layout)


# ----------------------------------------------------------------------------- ties
def _tie_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters that are one ``Parameter`` (tied), in model order; groups of two or more."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _load_ties(model: nn.Module, ties: list[list[str]], state: Mapping[str, torch.Tensor], missing: list[str], *,
               assign: bool, source: PathLike) -> list[str]:
    """Give every tied name the tensor loaded for one of its group, re-tie them (``assign`` made
    separate Parameters), and return ``missing`` without the names so filled."""
    absent = set(missing)
    fill: dict[str, torch.Tensor] = {}
    for group in ties:
        loaded = [n for n in group if n not in absent]
        if not loaded:
            continue
        first = model.get_parameter(loaded[0])
        for other in loaded[1:]:
            a, b = state.get(loaded[0], first), state.get(other, model.get_parameter(other))
            if a is not b and not torch.equal(a.detach(), b.detach()):
                raise StateDictError(
                    f"{source}: {loaded[0]!r} and {other!r} are tied in {type(model).__name__} but differ in the "
                    "checkpoint; it is a checkpoint of an untied model: build the model with "
                    "tie_word_embeddings=False", key=other)
        for name in group:
            if name in absent:
                fill[name] = first.detach()
    if fill:
        # a LoRA layer whose base is filled here also gets its fresh adapter (its hook sees the base)
        second = model.load_state_dict(fill, strict=False, assign=assign)
        absent &= set(second.missing_keys)
    for group in ties:
        keep = model.get_parameter(group[0])
        for name in group[1:]:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent)
            if owner._parameters[leaf] is not keep:
                owner._parameters[leaf] = keep
    if fill:
        logger.debug("tied parameters filled from the checkpoint: %s", quote_list(fill))
    return [n for n in missing if n in absent]


# ----------------------------------------------------------------------------- meta
def _refuse_meta(model: nn.Module, source: PathLike, missing: list[str]) -> None:
    params = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    buffers = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if not params and not buffers:
        return
    fixes = []
    if params:
        not_in_file = [n for n in params if n in missing]
        fixes.append(f"parameter(s) {quote_list(params)}" + (" (not in the checkpoint)" if not_in_file else "")
                     + ": load a checkpoint that holds them, or initialise them yourself")
    if buffers:
        fixes.append(f"buffer(s) {quote_list(buffers)} (checkpoints do not hold non-persistent buffers such as "
                     "rotary inv_freq): build the model under lora_ckpt.init_empty_weights(), which keeps "
                     "buffers real, instead of torch.device('meta')")
    raise MetaTensorError(
        f"{source}: loaded, but {len(params) + len(buffers)} tensor(s) of {type(model).__name__} are still on the "
        f"meta device and the model cannot run: {'; '.join(fixes)}", names=params + buffers)
