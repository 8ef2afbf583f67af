"""FSDP2-sharded LoRA models: stock checkpoints in, adapters out.

A model is *sharded* when its parameters are DTensors (after ``torch.distributed.fsdp.fully_shard``).
The bridge then works rank by rank, with no collective until the adapter is gathered:

- :func:`load_sharded` (what ``load_checkpoint`` does for a sharded model): each rank maps the
  checkpoint's keys to the model's through the same dialect table as a single process
  (:data:`lora_ckpt.keys.KEY_DIALECTS`), reads only the rows it owns from the memory-mapped files,
  and drops each file's pages once its slices are copied (per-rank peak ≈ its shard + one file).
  Fresh adapters are drawn on the full shape (:func:`lora_ckpt.layer.draw_lora_A`), so the result
  equals a single-process load bit for bit, on any number of ranks.
- :func:`model_state_dict` maps a stock state dict to the model's keys, for torch's own
  ``set_model_state_dict(..., StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))``.
- :func:`full_adapter_tensors` gathers only the adapter parameters (never the base);
  :func:`distribute_adapter` puts an adapter's rows into a sharded model; :func:`on_rank0` runs
  a step (a write) once and gives every rank its outcome. The top-level
  :func:`lora_ckpt.save_adapter` and :func:`lora_ckpt.apply_adapter` use them for a sharded model.

Collectives run on the default process group and use its timeout (``init_process_group(timeout=)``).
Bad input is found from the files alone, before any collective, so every rank raises the same
typed error and none waits for another.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import (
    AmbiguousKeyError,
    IncompleteAdapterError,
    KeyMismatchError,
    LoraCkptError,
    ShapeMismatchError,
    quote_list,
)
from .io import (
    PathLike,
    checkpoint_files,
    load_tensors,
    read_safetensors_header,
    release_file_pages,
    tensor_index,
)
from .keys import ADAPTER_PARAMS, ALIASES
from .layer import LoRALinear, draw_lora_A
from .nf4 import NF4Linear
from .shards import local_region, nf4_local, read_local, slice_local, target_device, wrap_local

__all__ = ["KeyPlan", "any_rank", "distribute_adapter", "full_adapter_tensors", "is_sharded", "load_sharded",
           "map_keys", "model_state_dict", "on_rank0"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: every (dialect suffix, our LoRALinear parameter) pair, in the dialect table's order
_SUFFIXES = [(theirs, ours) for ours, all_theirs in ALIASES.items() for theirs in all_theirs]


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard``, tensor parallel)."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist: skip the import
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {f"{n}." if n else "": m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@dataclass
class KeyPlan:
    """How a checkpoint's keys meet a model's: ``source[model_key] = checkpoint_key``, the model's keys
    the checkpoint lacks (``missing``), its keys the model lacks (``unexpected``), and the LoRA
    layers (by prefix) that get a fresh adapter because only their base arrived."""

    source: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)


def map_keys(model: nn.Module, keys: Iterable[str]) -> KeyPlan:
    """Map checkpoint keys (stock ``weight``/``bias``, PEFT, torchtune, mistral-finetune, loralib, LLMBook
    dialects) to ``model``'s state-dict keys, exactly as ``LoRALinear`` renames them when loading.

    Raises:
        AmbiguousKeyError: two checkpoint keys carry the same parameter of one layer.
        IncompleteAdapterError: a layer's ``lora_A`` arrives without its ``lora_B`` (or the reverse).
    """
    layers = _lora_layers(model)
    plan = KeyPlan()
    for key in keys:
        target, layer = key, ""
        for theirs, ours in _SUFFIXES:
            prefix = key[: -len(theirs)]
            if key.endswith(theirs) and (prefix == "" or prefix.endswith(".")) and prefix in layers:
                target, layer = prefix + ours, prefix
                break
        if target in plan.source:
            raise AmbiguousKeyError(
                f"{layer[:-1]}: keys {quote_list([plan.source[target], key])} all carry {target[len(layer):]}; "
                "expected one; the checkpoint mixes two layouts (remove one of them)", key=key)
        plan.source[target] = key
    model_keys = list(model.state_dict().keys())
    known = set(model_keys)
    for prefix in layers:
        has = [p for p in ADAPTER_PARAMS if prefix + p in plan.source]
        if len(has) == 1:
            absent = next(p for p in ADAPTER_PARAMS if p != has[0])
            raise IncompleteAdapterError(
                f"{prefix[:-1]}: checkpoint has {has[0].split('.')[0]} but not {absent.split('.')[0]}; expected both "
                "or neither; the adapter file is incomplete (re-export it, or drop both keys to start the adapter "
                "fresh)", key=prefix + absent)
        if not has and prefix + "linear.weight" in plan.source:
            plan.fresh.append(prefix)
    fresh = {p + a for p in plan.fresh for a in ADAPTER_PARAMS}
    plan.missing = [k for k in model_keys if k not in plan.source and k not in fresh]
    plan.unexpected = [v for k, v in plan.source.items() if k not in known]
    for k in [k for k in plan.source if k not in known]:
        del plan.source[k]
    return plan


def _check_shapes(model_state: Mapping[str, Any], plan: KeyPlan, shapes: Mapping[str, tuple[int, ...]]) -> None:
    for mkey, ckey in plan.source.items():
        want, got = tuple(model_state[mkey].shape), tuple(shapes[ckey])
        if want == got:
            continue
        leaf = next((p for p in ADAPTER_PARAMS if mkey.endswith(p)), None)
        if leaf is not None and len(got) == 2:
            found_r, want_r = (got[0], want[0]) if leaf == "lora_A.weight" else (got[1], want[1])
            cause = (f"the adapter has rank {found_r}, this layer rank {want_r}; build the layer with r={found_r}"
                     if found_r != want_r else "the adapter was trained for another model")
        else:
            cause = "the checkpoint is of another model (or another layer was wrapped)"
        raise ShapeMismatchError(f"{mkey}: checkpoint shape {got}, expected {want}; {cause}",
                                 key=mkey, expected=want, found=got)


def _raise_mismatch(source: PathLike, model: nn.Module, missing: list[str], unexpected: list[str]) -> None:
    raise KeyMismatchError.for_load(source, type(model).__name__, missing=missing, unexpected=unexpected)


def _file_keys(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(m.shape) for k, m in tensor_index(path).items()}


def load_sharded(model: nn.Module, source: PathLike, *, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load a stock checkpoint into a sharded (DTensor) LoRA model; every rank reads only its rows.

    Call it on every rank, after ``inject_lora`` and ``fully_shard`` (the model may be on ``meta``:
    the loaded shards become its parameters). Tensors are cast to the model's dtypes (FSDP2 fixes
    them at ``fully_shard``: build the model in the dtype you train in). No collective is involved.
    Fresh adapters come from each layer's seed and name (``inject_lora(seed=...)``), drawn on the
    full shape. A rank's rows are read with ``preadv`` of exactly their bytes where they are one
    byte range (FSDP2's dim-0 shards), else sliced from the memory map. An NF4 weight (``NF4Linear``)
    is read whole and quantized whole, and the rank keeps its chunk (:func:`lora_ckpt.shards.nf4_local`).

    Args:
        model: the sharded model (parameters are DTensors; unsharded ones are loaded whole).
        source: a ``.safetensors``/``.pt``/``.bin`` file, or a directory (shard index or one file).
        strict: raise if the checkpoint misses a key of the model or has one it does not know.

    Returns:
        ``(missing, unexpected)`` keys (``load_checkpoint`` returns them as its ``LoadResult``).

    Raises:
        KeyMismatchError, ShapeMismatchError, IncompleteAdapterError, AmbiguousKeyError: as a single
            process raises them, on every rank.
        CheckpointFormatError, UnsafeCheckpointError, CheckpointNotFoundError: unreadable source.

    Example:
        >>> with torch.device("meta"):
        ...     model = LlamaForCausalLM(config)
        >>> inject_lora(model, targets=["q_proj", "v_proj"], r=8, alpha=16)
        >>> for layer in model.model.layers:
        ...     fully_shard(layer)
        >>> fully_shard(model)
        >>> load_checkpoint(model, "llama/")   # dispatches here
    """
    files = checkpoint_files(source)
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        for k, shape in _file_keys(path).items():
            where[k], shapes[k] = path, shape
    plan = map_keys(model, where)
    state = model.state_dict()
    _check_shapes(state, plan, shapes)
    if strict and (plan.missing or plan.unexpected):
        _raise_mismatch(source, model, plan.missing, plan.unexpected)
    layers = _lora_layers(model)
    nf4 = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    loaded: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for mkey, ckey in plan.source.items():
        by_file.setdefault(where[ckey], []).append(mkey)
    for path in files:  # one file mapped at a time; a tensor's pages leave RSS once its rows are copied
        wanted = by_file.get(path, [])
        if not wanted:
            continue
        header = read_safetensors_header(path) if path.suffix == ".safetensors" else None
        tensors = None
        for mkey in wanted:
            if mkey in nf4:  # NF4 quantizes the full tensor, then keeps this rank's chunk
                tensors = tensors if tensors is not None else load_tensors(path)
                loaded[mkey] = wrap_local(nf4_local(tensors[plan.source[mkey]], nf4[mkey], key=mkey), nf4[mkey])
                continue
            like = state[mkey]
            local = read_local(header, plan.source[mkey], like) if header is not None else None
            if local is None:  # a pickle, or not one byte range per rank: slice the memory map
                tensors = tensors if tensors is not None else load_tensors(path)
                t = tensors[plan.source[mkey]]
                local = slice_local(t, like)
                release_file_pages([t])  # the mapped pages this rank touched leave its RSS at once
            loaded[mkey] = wrap_local(local, like)
        del tensors
    for prefix in plan.fresh:
        layer = layers[prefix]
        a_like, b_like = state[prefix + "lora_A.weight"], state[prefix + "lora_B.weight"]
        full_a = draw_lora_A(layer.r, layer.in_features, name=layer.lora_name or prefix[:-1], seed=layer.lora_seed,
                             dtype=a_like.dtype)
        loaded[prefix + "lora_A.weight"] = wrap_local(slice_local(full_a, a_like), a_like)
        b_shape, _ = local_region(b_like)
        zeros = torch.zeros(b_shape, dtype=b_like.dtype, device=target_device(b_like))
        loaded[prefix + "lora_B.weight"] = wrap_local(zeros, b_like)
    assign = any(t.device.type == "meta" for t in state.values())
    model.load_state_dict(loaded, strict=False, assign=assign)
    logger.debug("loaded %d sharded tensors from %s (%d fresh adapters)", len(loaded), source, len(plan.fresh))
    return plan.missing, plan.unexpected


def model_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a stock or other-dialect state dict) under ``model``'s own keys, with fresh adapters
    for layers that got only their base: what torch's ``set_model_state_dict`` needs, since it walks
    the model's keys and never reaches ``LoRALinear``'s renaming.

    Raises:
        AmbiguousKeyError, IncompleteAdapterError, ShapeMismatchError: as :func:`load_sharded`.

    Example:
        >>> from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        >>> full = read_checkpoint("llama/") if dist.get_rank() == 0 else {}
        >>> set_model_state_dict(model, model_state_dict(model, full) if full else {},
        ...                      options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    """
    plan = map_keys(model, state)
    model_state = model.state_dict()
    _check_shapes(model_state, plan, {k: tuple(v.shape) for k, v in state.items()})
    out = {mkey: state[ckey] for mkey, ckey in plan.source.items()}
    layers = _lora_layers(model)
    for prefix in plan.fresh:
        layer, a_like = layers[prefix], model_state[prefix + "lora_A.weight"]
        out[prefix + "lora_A.weight"] = draw_lora_A(layer.r, layer.in_features, name=layer.lora_name or prefix[:-1],
                                                    seed=layer.lora_seed, dtype=a_like.dtype)
        out[prefix + "lora_B.weight"] = torch.zeros(tuple(model_state[prefix + "lora_B.weight"].shape),
                                                    dtype=a_like.dtype)
    return out


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_adapter_tensors(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The full (unsharded) adapter tensors of every LoRA layer, on the CPU, under the model's keys
    (``<module>.lora_A.weight``, ``<module>.lora_B.weight``). Base weights are never gathered.

    Call it on every rank of a sharded model (each DTensor is all-gathered, one at a time, in model
    order); with ``rank0_only`` the other ranks return ``{}`` and hold nothing. A model that is not
    sharded returns its adapter tensors directly.

    Example:
        >>> tensors = full_adapter_tensors(model)   # every rank; filled on rank 0
    """
    from torch.distributed.tensor import DTensor

    keep = _is_rank0() or not rank0_only
    out: dict[str, torch.Tensor] = {}
    for prefix, layer in _lora_layers(model).items():
        for leaf, p in (("lora_A.weight", layer.lora_A.weight), ("lora_B.weight", layer.lora_B.weight)):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if keep:
                out[prefix + leaf] = full.detach().cpu()
    return out


def distribute_adapter(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy full adapter tensors (model keys, as :func:`full_adapter_tensors` returns them) into
    ``model``'s LoRA layers, each rank taking only its rows of a sharded parameter. No collective.

    Returns:
        The names of the layers loaded.

    Raises:
        IncompleteAdapterError: a layer gets ``lora_A`` without ``lora_B`` (or the reverse).
        ShapeMismatchError: a tensor does not fit its parameter (rank, or another model).
        KeyMismatchError: a tensor names no LoRA layer of the model.
    """
    layers = _lora_layers(model)
    stray = [k for k in tensors if not any(k == p + a for p in layers for a in ADAPTER_PARAMS)]
    if stray:
        raise KeyMismatchError(f"adapter tensor(s) {quote_list(stray)} match no LoRA layer of {type(model).__name__} "
                               f"(its layers: {quote_list([p[:-1] for p in layers], 3)}); inject LoRA on those "
                               "modules first", missing=[], unexpected=stray)
    plan = map_keys(model, tensors)
    state = model.state_dict()
    _check_shapes(state, plan, {k: tuple(v.shape) for k, v in tensors.items()})
    done = []
    with torch.no_grad():
        for prefix, layer in layers.items():
            if prefix + "lora_A.weight" not in tensors:
                continue
            for leaf, p in (("lora_A.weight", layer.lora_A.weight), ("lora_B.weight", layer.lora_B.weight)):
                if p.device.type == "meta":
                    from .errors import UsageError

                    raise UsageError(f"{prefix}{leaf} is still on the meta device; load the base checkpoint "
                                     "(load_checkpoint) before distributing an adapter into the model")
                local = slice_local(tensors[prefix + leaf], p)
                (p.to_local() if hasattr(p, "to_local") else p).copy_(local)
            done.append(prefix[:-1])
    return done


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give every rank its outcome: its return value (broadcast, so
    keep it small: an adapter, not a model), or its error, re-raised on every rank (a
    :class:`~lora_ckpt.errors.LoraCkptError` with the same class, message and fields; anything else
    as a ``RuntimeError`` naming it). Call it on every rank. Outside a
    process group (or with one rank) it simply calls ``fn``.

    Raises:
        LoraCkptError: what ``fn`` raised on rank 0 (other errors: ``RuntimeError`` off rank 0).

    Example:
        >>> written = on_rank0(lambda: write_files(...))   # every rank; rank 0 writes
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # any failure reaches every rank (no rank waits on a broadcast that never comes)
            fields = dict(vars(e)) if isinstance(e, LoraCkptError) else {}  # typed errors' fields are plain data
            payload = [("error", (type(e).__module__, type(e).__qualname__, str(e), fields))]
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "ok":
        return value
    module, qualname, message, fields = value
    if dist.get_rank() == 0:  # pragma: no cover - rank 0 re-raised above
        raise RuntimeError(message)
    import importlib

    cls = getattr(importlib.import_module(module), qualname, None)
    try:
        raised = cls(message, **fields) if isinstance(cls, type) and issubclass(cls, LoraCkptError) else None
    except TypeError:
        raised = None
    raise raised if raised is not None else RuntimeError(f"rank 0: {qualname}: {message}")


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (one all-reduce; ``flag`` itself outside a process group),
    so that a per-rank finding (a shard that changes) gives every rank the same decision."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
