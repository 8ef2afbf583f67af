"""Between a model in memory and adapter files on disk, in any layout.

- :func:`save_adapter`: a model holding LoRA layers (or an :class:`~lora_ckpt.adapter.Adapter`)
  -> adapter files in any registered layout, read back and verified before they appear.
- :func:`apply_adapter`: adapter files (a path in any layout, ``hf://``), an ``Adapter`` or an
  adapter state dict -> into a model: unwrapped targets are wrapped with the adapter's rank and
  scale, wrapped ones are checked and loaded. Nothing is ever applied silently wrong or not at all.
- :func:`adapter_from_model`: the canonical ``Adapter`` of a model's LoRA layers.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .adapter import Adapter, AdapterMeta, ModuleLoRA, alpha_for
from .checkpoint import PEFT_PREFIX
from .distributed import any_rank, distribute_adapter, full_adapter_tensors, is_sharded, on_rank0
from .dtypes import DtypeLike
from .errors import (
    AdapterMismatchError,
    MergedLayerError,
    MetaTensorError,
    OutputExistsError,
    ShapeMismatchError,
    UnsupportedAdapterError,
    UsageError,
    quote_list,
)
from .families import ModelConfig, model_config_from_dict
from .inject import lora_class_for, lora_modules, mark_only_lora_trainable
from .io import PathLike
from .keys import split_key
from .layer import LoRALinear
from .shards import slice_local

__all__ = ["adapter_from_model", "apply_adapter", "save_adapter"]

logger = logging.getLogger(__name__)

#: PEFT's in-memory adapter name segment (``lora_A.default.weight``), dropped from state-dict keys
_PEFT_NAME = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)\.default\b")
_A_LEAVES = ("lora_A.weight", "lora_a.weight", "lora_A", "lora_a", "A.weight", "lora_down.weight")
_B_LEAVES = ("lora_B.weight", "lora_b.weight", "lora_B", "lora_b", "B.weight", "lora_up.weight")


# ----------------------------------------------------------------------- model -> files
def adapter_from_model(model: nn.Module, *, base_model: str | None = None) -> Adapter:
    """The canonical adapter of every LoRA layer of ``model`` (module names as in the model,
    tensors detached on the CPU, each module's own scale). On a sharded (FSDP2) model, call it on
    every rank: each adapter is gathered (never the base) and every rank gets the full adapter.

    Raises:
        AdapterMismatchError: the model has no LoRA layer.
        MergedLayerError: a layer is merged (its adapter is inside the weight).
        MetaTensorError: an adapter is still on ``meta`` (the model was never loaded).
    """
    layers = lora_modules(model)
    if not layers:
        raise AdapterMismatchError(f"{type(model).__name__} has no LoRA layers; expected a model prepared with "
                                   "lora_ckpt.inject_lora or lora_ckpt.apply_adapter", modules=[])
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise MergedLayerError(f"LoRA layer(s) {quote_list(merged)} are merged, so their adapter is inside the base "
                               "weight; call unmerge() on them before saving the adapter")
    on_meta = [n for n, m in layers.items() if m.lora_A.weight.device.type == "meta"]
    if on_meta:
        raise MetaTensorError(f"adapter(s) of {quote_list(on_meta)} are on the meta device; load the model "
                              "(lora_ckpt.load_checkpoint) before saving its adapter", names=on_meta)
    if is_sharded(model):  # every rank gathers each adapter (a collective per tensor, in model order)
        full = full_adapter_tensors(model, rank0_only=False)
        factors = {n: (full[f"{n}.lora_A.weight"], full[f"{n}.lora_B.weight"]) for n in layers}
    else:
        factors = {n: (_cpu(m.lora_A.weight), _cpu(m.lora_B.weight)) for n, m in layers.items()}
    modules = {n: ModuleLoRA(A=factors[n][0], B=factors[n][1], scale=m.scaling, fan_in_fan_out=m.fan_in_fan_out)
               for n, m in layers.items()}
    config = getattr(model, "config", None)
    model_config = _model_config(model)
    name_or_path = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    meta = AdapterMeta(base_model=base_model or (str(name_or_path) if name_or_path else None),
                       family=model_config.family.name if model_config and model_config.family else None,
                       source_layout="model", model_config=model_config,
                       task_type="CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None)
    return Adapter(modules=modules, meta=meta)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def save_adapter(model_or_adapter: nn.Module | Adapter, out: PathLike, *, layout: str = "peft",
                 base_model: str | None = None, base_config: PathLike | ModelConfig | None = None,
                 dtype: DtypeLike | None = None, force: bool = False, allow_lossy: bool = False) -> Adapter:
    """Write the adapter of a model (its LoRA layers), or an ``Adapter``, as directory ``out`` in any
    registered layout, verified as ``convert`` verifies: the files are read back and every module's
    update compared with the model's before ``out`` appears.

    Args:
        model_or_adapter: an ``nn.Module`` holding LoRA layers, or a canonical ``Adapter``.
        out: the output directory (written atomically).
        layout: ``peft`` (default), ``native``, ``torchtune``, ``mistral``, ``mlx``, ``litgpt``, ...
        base_model: ``base_model_name_or_path`` to record (default: the model config's ``name_or_path``).
        base_config: the base model's ``config.json`` for layouts that need head counts (default:
            the model's own transformers config).
        dtype: cast the tensors, a torch dtype or its name (``"bf16"``; default: as trained).
        force: replace an existing ``out``.
        allow_lossy: drop what the layout cannot hold instead of failing.

    Returns:
        The adapter as written (ranks padded, scales folded where the layout required it).

    On a sharded (FSDP2) model, call it on every rank: an existing ``out`` is refused on every rank
    before any collective, only the adapter parameters are gathered, rank 0 writes and verifies,
    and every rank returns rank 0's result or raises rank 0's error.

    Raises:
        AdapterMismatchError, MergedLayerError, MetaTensorError: the model holds no saveable adapter.
        OutputExistsError: ``out`` exists and not ``force``.
        LossyConversionError: the layout cannot hold part of the adapter and not ``allow_lossy``.
        VerificationError: the written files do not reproduce the adapter (nothing is written).

    Example:
        >>> lora_ckpt.save_adapter(model, "out/", layout="peft")   # loads in PeftModel.from_pretrained
    """
    if isinstance(model_or_adapter, Adapter):
        adapter = model_or_adapter
        if base_model:  # also in a kept original config (a PEFT source's is rewritten as it was)
            config = {**adapter.meta.config, "base_model_name_or_path": base_model} if adapter.meta.config else {}
            adapter = replace(adapter, meta=replace(adapter.meta, base_model=base_model, config=config))
    elif is_sharded(model_or_adapter):  # every rank: refuse before any collective, gather, rank 0 writes
        if Path(out).exists() and not force:
            raise OutputExistsError(f"{Path(out).absolute()}: exists; pass --force (force=True) to replace it",
                                    path=Path(out).absolute())
        adapter = adapter_from_model(model_or_adapter, base_model=base_model)
        return on_rank0(lambda: _write(adapter, out, layout=layout, base_config=base_config, dtype=dtype,
                                       force=force, allow_lossy=allow_lossy))
    else:
        adapter = adapter_from_model(model_or_adapter, base_model=base_model)
    return _write(adapter, out, layout=layout, base_config=base_config, dtype=dtype, force=force,
                  allow_lossy=allow_lossy)


def _write(adapter: Adapter, out: PathLike, *, layout: str, base_config: PathLike | ModelConfig | None,
           dtype: DtypeLike | None, force: bool, allow_lossy: bool) -> Adapter:
    from .conversion import one_thread, write_verified

    with one_thread():
        written, report = write_verified(adapter, out, to=layout, base_config=base_config or adapter.meta.model_config,
                                         dtype=dtype, force=force, allow_lossy=allow_lossy)
    if report is not None:
        logger.info("%s: %s adapter written and verified (%s)", os.fspath(out), layout, report.summary())
    return written


# ----------------------------------------------------------------------- files -> model
def apply_adapter(model: nn.Module, source: PathLike | Adapter | Mapping[str, torch.Tensor], *, strict: bool = True,
                  layout: str | None = None, base_config: PathLike | ModelConfig | None = None,
                  alpha: float | None = None) -> list[str]:
    """Put an adapter into ``model``, in place: modules it covers that are not LoRA layers yet are
    wrapped (``inject_lora``'s layers, with the adapter's rank and scale, on the base weight's
    device and dtype); LoRA layers already there are checked (rank, scale, shape) and loaded.
    Afterwards only adapters train, as after ``inject_lora``. Load the base checkpoint first.
    On a sharded (FSDP2) model, call it on every rank: the checks are the same, then each rank
    copies only its rows; the targets must already be LoRA layers (inject before ``fully_shard``).

    Args:
        model: the model, with its base weights loaded.
        source: an adapter directory or file in any layout, an ``hf://ORG/NAME[@REV][/SUBDIR]`` URI,
            an :class:`~lora_ckpt.adapter.Adapter`, or an adapter state dict (PEFT's saved or
            in-memory keys: ``base_model.model.`` prefixes and ``.default.`` accepted; its modules
            must already be LoRA layers, since a state dict carries no scale).
        strict: refuse adapter modules with no target in the model, and rank or scale disagreements
            with wrapped layers. With ``strict=False`` they are skipped, zero-padded or folded
            (exact) with a warning each.
        layout: the source's layout when detection cannot tell (loralib vs trainers...).
        base_config: the base model's ``config.json`` (q/k permutations of torchtune/mistral files).
        alpha: the alpha for layouts that do not record it (loralib).

    Returns:
        The names of the modules the adapter was applied to, in model order.

    Raises:
        AdapterMismatchError: a module with no target, a rank/scale disagreement (strict), or an
            adapter that would change nothing.
        UnsupportedAdapterError: DoRA, LoRA biases, embedding LoRA or full tensors
            (``modules_to_save``), which lora-ckpt's layers do not hold (merge such adapters instead).
        ShapeMismatchError: an adapter module of another shape than its target.
        MetaTensorError: a target's base weight is still on ``meta``.
        UsageError: a target of a sharded model is not a LoRA layer yet.

    Example:
        >>> lora_ckpt.apply_adapter(model, "hf://my-org/llama-lora")   # continue from someone's adapter
    """
    adapter = _resolve(model, source, layout=layout, base_config=base_config, alpha=alpha)
    _refuse_unsupported(adapter, strict=strict)
    layers = lora_modules(model)
    names = {n for n, _ in model.named_modules()}
    absent = sorted(n for n in adapter.modules if n not in names)
    if absent:
        msg = (f"adapter module(s) {quote_list(absent)} have no target in {type(model).__name__} (its modules are "
               f"named like {quote_list(_examples(model), 3)}); expected an adapter for this model")
        if strict:
            raise AdapterMismatchError(msg + "; or pass strict=False to skip them", modules=absent)
        logger.warning("apply_adapter: %s; skipped", msg)
    plan: dict[str, ModuleLoRA] = {}
    problems: list[str] = []
    for name in (n for n, _ in model.named_modules() if n in adapter.modules):
        m = adapter.modules[name]
        plan[name] = _fit(name, m, layers.get(name), model.get_submodule(name), strict=strict, problems=problems)
    if problems:
        raise AdapterMismatchError(f"adapter disagrees with the LoRA layers of {type(model).__name__}: "
                                   f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}; inject with the "
                                   "adapter's rank and alpha, or pass strict=False to pad ranks and fold scales "
                                   "(exact)", modules=sorted(problems))
    sharded = is_sharded(model)
    unwrapped = [name for name in plan if name not in layers]
    if sharded and unwrapped:
        raise UsageError(f"{quote_list(unwrapped)} of the sharded {type(model).__name__} are not LoRA layers, and a "
                         "module cannot be wrapped after fully_shard; inject_lora (with the adapter's rank and alpha) "
                         "before fully_shard, then apply the adapter")
    changed = [name for name, m in plan.items() if name not in layers or not _holds(layers[name], m)]
    if sharded and any_rank(bool(changed)) and not changed:  # this rank's rows hold it, another's do not
        changed = list(plan)
    if not changed:
        raise AdapterMismatchError(
            f"applying this adapter to {type(model).__name__} would change nothing: "
            + (f"its {len(plan)} module(s) are already loaded with exactly these values" if plan else
               "none of its modules has a target") + "; nothing to do", modules=sorted(plan) or absent)
    if sharded:  # each rank copies its rows; no collective
        distribute_adapter(model, {f"{name}.{leaf}": t for name, m in plan.items()
                                   for leaf, t in (("lora_A.weight", m.A), ("lora_B.weight", m.B))})
        logger.info("apply_adapter: %d module(s) applied to the sharded model", len(plan))
        return list(plan)
    wrapped = False
    for name, m in plan.items():
        layer = layers.get(name)
        if layer is None:
            layer = _wrap(model, name, m)
            wrapped = True
        with torch.no_grad():
            layer.lora_A.weight.copy_(m.A)
            layer.lora_B.weight.copy_(m.B)
    if wrapped:
        mark_only_lora_trainable(model)
    logger.info("apply_adapter: %d module(s) applied, %d of them newly wrapped", len(plan),
                sum(n not in layers for n in plan))
    return list(plan)


def _resolve(model: nn.Module, source: PathLike | Adapter | Mapping[str, torch.Tensor], *, layout: str | None,
             base_config: PathLike | ModelConfig | None, alpha: float | None) -> Adapter:
    if isinstance(source, Adapter):
        return source
    if isinstance(source, Mapping):
        return _from_state_dict(model, source)
    from .hub import fetch_model_config, resolve_source
    from .layouts import load_adapter

    path: PathLike = resolve_source(str(source), layout=layout) if str(source).startswith("hf://") else source
    if base_config is None:
        base_config = _model_config(model)
    return load_adapter(path, layout=layout, base_config=base_config, alpha=alpha,
                        resolve_base_config=fetch_model_config)


def _model_config(model: nn.Module) -> ModelConfig | None:
    """The head counts and family of a transformers model's own config (None for other modules: only
    layouts with a q/k permutation need them, and they then say so)."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    raw = to_dict() if callable(to_dict) else None
    try:
        return model_config_from_dict(raw, source=f"{type(model).__name__}.config") if isinstance(raw, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


def _from_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Adapter:
    """An adapter state dict (PEFT saved or in-memory keys, lora-ckpt keys, torchtune keys) for LoRA
    layers already in the model: their scales are the layers' (a state dict has none)."""
    layers = lora_modules(model)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for key, t in state.items():
        k = _PEFT_NAME.sub(r".\1", key.removeprefix(PEFT_PREFIX))
        split = split_key(k)
        if split is None or split[1] not in _A_LEAVES + _B_LEAVES:
            other.append(key)
            continue
        parts.setdefault(split[0], {})["A" if split[1] in _A_LEAVES else "B"] = t
    if other:
        raise UnsupportedAdapterError(
            f"state dict keys {quote_list(other)} are not LoRA A/B factors; expected only adapter tensors "
            "(DoRA magnitudes, LoRA biases and full tensors are not held by lora-ckpt's layers)")
    half = sorted(n for n, p in parts.items() if len(p) != 2)
    unwrapped = sorted(n for n in parts if n not in layers)
    if half or unwrapped:
        raise AdapterMismatchError(
            (f"modules {quote_list(half)} have only one of lora_A/lora_B; " if half else "")
            + (f"modules {quote_list(unwrapped)} are not LoRA layers of {type(model).__name__}, and a state dict "
               "carries no scale; inject_lora them first (with the adapter's r and alpha), or pass the adapter's "
               "directory" if unwrapped else "expected both factors of every module"), modules=half + unwrapped)
    return Adapter(modules={n: ModuleLoRA(A=p["A"], B=p["B"], scale=layers[n].scaling) for n, p in parts.items()},
                   meta=AdapterMeta(source_layout="state dict"))


def _refuse_unsupported(adapter: Adapter, *, strict: bool) -> None:
    kinds = {"DoRA magnitudes": [n for n, m in adapter.modules.items() if m.magnitude is not None],
             "LoRA biases": [n for n, m in adapter.modules.items() if m.bias is not None],
             "embedding LoRA": [n for n, m in adapter.modules.items() if m.kind == "embedding"]}
    found = {k: v for k, v in kinds.items() if v}
    if found:
        raise UnsupportedAdapterError(
            f"the adapter has {'; '.join(f'{k} ({quote_list(v, 3)})' for k, v in found.items())}, which "
            "lora-ckpt's LoRA layers do not hold; merge it into the base instead "
            "(lora_ckpt.merge_checkpoint / lora-ckpt merge), or use PEFT", layout=adapter.meta.source_layout)
    if adapter.extra:
        msg = (f"the adapter carries full tensors ({quote_list(adapter.extra, 3)}: modules_to_save or resized "
               "embeddings) that apply_adapter does not load")
        if strict:
            raise UnsupportedAdapterError(msg + "; merge it instead (lora-ckpt merge), or pass strict=False to "
                                          "apply only its LoRA modules", layout=adapter.meta.source_layout)
        logger.warning("apply_adapter: %s; skipped", msg)


def _fit(name: str, m: ModuleLoRA, layer: LoRALinear | None, module: nn.Module, *, strict: bool,
         problems: list[str]) -> ModuleLoRA:
    """``m`` as the target will hold it (padded / folded for a wrapped layer when not strict)."""
    target = layer.linear if layer is not None else module
    cls = type(layer) if layer is not None else lora_class_for(module)
    if cls is None:
        raise UnsupportedAdapterError(f"{name}: the adapter targets a {type(module).__name__}, which lora-ckpt "
                                      "cannot wrap (it wraps nn.Linear and transformers Conv1D)")
    if target.weight.device.type == "meta":
        raise MetaTensorError(f"{name}: the base weight is on the meta device; load the base checkpoint "
                              "(lora_ckpt.load_checkpoint) first, then apply the adapter", names=[name])
    in_f, out_f = cls.base_features(target)
    if (m.A.shape[1], m.B.shape[0]) != (in_f, out_f):
        raise ShapeMismatchError(
            f"{name}: the adapter is for a {m.A.shape[1]} -> {m.B.shape[0]} layer, the model's is {in_f} -> {out_f}; "
            "the adapter was trained for another model", key=name, expected=(out_f, in_f),
            found=(m.B.shape[0], m.A.shape[1]))
    if layer is None:
        return m
    same_scale = math.isclose(m.scale, layer.scaling, rel_tol=1e-9)
    if m.rank == layer.r and same_scale:
        return m
    what = (f"{name}: rank {m.rank} vs the layer's {layer.r}" if m.rank != layer.r else
            f"{name}: scale {m.scale:g} vs the layer's {layer.scaling:g}")
    if strict or m.rank > layer.r:
        problems.append(what + (" (larger: cannot be padded)" if m.rank > layer.r else ""))
        return m
    logger.warning("apply_adapter: %s; padded / folded into B (exact up to float32 rounding)", what)
    return m.rescaled(layer.scaling).padded(layer.r)


def _holds(layer: LoRALinear, m: ModuleLoRA) -> bool:
    """Whether the layer already holds ``m`` (on a sharded layer: this rank's rows of it)."""
    pairs = ((layer.lora_A.weight, m.A), (layer.lora_B.weight, m.B))
    if is_sharded(layer):
        return all(bool(torch.equal(p.to_local(), slice_local(t, p))) for p, t in pairs)  # type: ignore[attr-defined]
    return all(bool(torch.equal(p, t.to(p.device, p.dtype))) for p, t in pairs)


def _wrap(model: nn.Module, name: str, m: ModuleLoRA) -> LoRALinear:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = getattr(parent, child)
    cls = lora_class_for(base)
    assert cls is not None  # checked in _fit
    layer = cls.from_linear(base, r=m.rank, alpha=alpha_for(m.scale, m.rank))
    setattr(parent, child, layer)
    return layer


def _examples(model: nn.Module) -> list[str]:
    return [n for n, mod in model.named_modules() if isinstance(mod, LoRALinear) or lora_class_for(mod) is not None]
