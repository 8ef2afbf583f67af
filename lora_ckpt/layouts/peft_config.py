"""PEFT ``adapter_config.json`` translation, torch-free: the scale PEFT gives a module (its pattern
rules), the config lora-ckpt writes for an adapter (:func:`new_config`), and whether a source's own
config still describes an adapter (:func:`scales_fit`, :func:`targets_fit`, :func:`saves_fit`:
PEFT's target, layer and modules_to_save rules), so that it can be kept as its author wrote it.
:func:`lora_ckpt.layouts.peft.peft_config_for` puts these together."""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..adapter import Adapter, alpha_for
from ..errors import ConfigError, quote_list
from ..families import is_embedding, parse_layer
from ..keys import matches_target
from .source import WriteOptions

__all__ = ["REQUIRED_FIELDS", "TARGET_FIELDS", "TASK_HEADS", "TASK_TYPES", "TENSOR_FIELDS", "config_fits",
           "layer_subset", "module_scale", "new_config", "pattern_value", "peft_targets", "saved_tensors",
           "saves_fit", "scales_fit", "source_peft_config", "target_modules", "targets_fit", "task_type_for",
           "write_peft_config"]

logger = logging.getLogger(__name__)

def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key (in dict order) with
    ``re.match(rf"(.*\\.)?({key})$", name)`` wins."""
    if not isinstance(patterns, dict):
        raise ConfigError(f"rank_pattern/alpha_pattern must be an object, found {type(patterns).__name__}")
    for key, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", name)
        except re.error as e:
            raise ConfigError(f"pattern {key!r} is not a valid regular expression ({e}); PEFT would fail too") from e
        if hit:
            return value
    return default


def module_scale(cfg: dict[str, Any], name: str) -> tuple[int, float]:
    """(rank, scale) PEFT gives module ``name`` under config ``cfg``."""
    r = pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r", 8))
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
    if not _number(r) or int(r) != r or r <= 0 or not _number(alpha):
        raise ConfigError(f"{name}: r={r!r} and lora_alpha={alpha!r}; expected a positive integer rank and a "
                          "number; fix adapter_config.json")
    return int(r), alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def write_peft_config(cfg: dict[str, Any], path: Path) -> None:
    """As PEFT writes it: ``json.dumps(indent=2, sort_keys=True)``, no trailing newline."""
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


# ------------------------------------------------------------- config fidelity
#: fields that follow from the tensors: re-derived when the written tensors need it (ranks padded, scales folded)
TENSOR_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias",
                 "fan_in_fan_out")
#: fields that say where LoRA sits: re-derived only when the written modules no longer fit them
TARGET_FIELDS = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
#: filled in when the source config lacks the key (torchtune writes r, lora_alpha, target_modules, peft_type)
REQUIRED_FIELDS = ("peft_type", "task_type", "base_model_name_or_path")


def source_peft_config(adapter: Adapter) -> dict[str, Any] | None:
    """The PEFT config the adapter came with (PEFT's, torchtune's, or one native, loralib or LLMBook
    kept), or None."""
    cfg = adapter.meta.config
    return cfg if isinstance(cfg, dict) and cfg.get("peft_type") else None


def config_fits(cfg: dict[str, Any], adapter: Adapter) -> bool:
    """Whether ``cfg`` (an original PEFT config) still describes ``adapter`` exactly."""
    return scales_fit(cfg, adapter) and targets_fit(cfg, adapter) and saves_fit(cfg, adapter)


def scales_fit(cfg: dict[str, Any], adapter: Adapter) -> bool:
    """Ranks, scales, DoRA, LoRA bias and fan_in_fan_out of every module are what ``cfg`` gives."""
    if bool(cfg.get("use_dora")) != adapter.uses_dora or bool(cfg.get("lora_bias")) != adapter.uses_bias:
        return False
    try:
        return all(module_scale(cfg, n) == (m.rank, m.scale) and m.fan_in_fan_out == bool(cfg.get("fan_in_fan_out"))
                   for n, m in adapter.modules.items())
    except ConfigError:
        return False


def peft_targets(cfg: dict[str, Any], name: str) -> bool:
    """Whether PEFT puts LoRA on module ``name`` under ``cfg`` (its ``check_target_module_exists``:
    exclude_modules, modules_to_save, target_modules as a list or a full-match regex, and for a
    list layers_to_transform / layers_pattern)."""
    excl = cfg.get("exclude_modules")
    if excl and (re.fullmatch(excl, name) if isinstance(excl, str) else matches_target(name, excl)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg.get("modules_to_save") or []):
        return False
    targets = cfg.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return (targets.lower() == "all-linear" and not name.endswith("lm_head")) or matches_target(name, targets)
    if not matches_target(name, targets):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = cfg.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else patterns
    hit = (re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name) if not patterns
           else next((h for p in patterns if (h := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None))
    if hit is None:
        return False
    return int(hit["idx"]) == layers if isinstance(layers, int) else int(hit["idx"]) in layers


def targets_fit(cfg: dict[str, Any], adapter: Adapter) -> bool:
    """PEFT targets every module of ``adapter`` under ``cfg``, and no embedding a list names is gone
    (a layout that cannot hold embedding LoRA dropped it)."""
    if not all(peft_targets(cfg, n) for n in adapter.modules):
        return False
    targets = cfg.get("target_modules")
    return isinstance(targets, str) or not any(
        is_embedding(t) and not any(matches_target(n, [t]) for n in adapter.modules) for t in targets or [])


def saved_tensors(adapter: Adapter) -> list[str]:
    """The full tensors that modules_to_save accounts for (PEFT saves embedding bases on its own)."""
    return [k for k in adapter.extra if ".base_layer." not in k]


#: the heads PEFT adds to modules_to_save itself for a task type (PeftModelForSequenceClassification, ...)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _covered(key: str, entries: list[str] | tuple[str, ...]) -> bool:
    """A tensor key lies under a module whose name ends with an entry (PEFT's modules_to_save rule)."""
    return any(".".join(key.split(".")[:i]).endswith(e) for i in range(1, key.count(".") + 1) for e in entries)


def saves_fit(cfg: dict[str, Any], adapter: Adapter) -> bool:
    """Every full tensor lies under a module ``modules_to_save`` names, and the config names none
    (beyond the heads PEFT adds for the task) when there are none."""
    entries, saved = cfg.get("modules_to_save") or [], saved_tensors(adapter)
    if not saved:
        return set(entries) <= set(TASK_HEADS.get(cfg.get("task_type") or "", ()))
    return all(_covered(k, entries) for k in saved)


def _modules_to_save(adapter: Adapter, task_type: str) -> list[str]:
    """The modules holding the full tensors; a task's heads named as PEFT names them ("classifier"
    for ``classifier.dense.weight``: PEFT adds it for SEQ_CLS anyway, and one wrapper is what it saved)."""
    heads = TASK_HEADS.get(task_type, ())
    saved = saved_tensors(adapter)
    rest = {k.rsplit(".", 1)[0] for k in saved if not _covered(k, heads)}
    return [*heads, *sorted(rest)] if any(_covered(k, heads) for k in saved) else sorted(rest)


#: the head class of a transformers architecture -> PEFT's task_type
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def task_type_for(adapter: Adapter, opts: WriteOptions) -> str:
    """The adapter's task_type, else the base config's architecture's, else CAUSAL_LM."""
    if adapter.meta.task_type:
        return adapter.meta.task_type
    cfg = opts.base_config or adapter.meta.model_config
    archs = (cfg.raw.get("architectures") or []) if cfg is not None else []
    arch = archs[0] if archs and isinstance(archs[0], str) else ""
    return next((t for suffix, t in TASK_TYPES.items() if arch.endswith(suffix)), "CAUSAL_LM")


def new_config(adapter: Adapter, opts: WriteOptions) -> dict[str, Any]:
    """A PEFT config for ``adapter``: the most common rank/alpha globally, exact per-module
    ``rank_pattern``/``alpha_pattern`` (full module names) for the others. Keys newer PEFT
    versions added are written only when set, so older PEFT versions load it too."""
    mods = adapter.modules
    r = Counter(m.rank for m in mods.values()).most_common(1)[0][0] if mods else 8
    alphas = {n: alpha_for(m.scale, m.rank) for n, m in mods.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0] if mods else 8
    rank_pattern = {n: m.rank for n, m in mods.items() if m.rank != r}
    alpha_pattern = {n: a for n, a in alphas.items() if a != alpha}
    src_cfg = adapter.meta.config or {}
    layers = layer_subset(list(mods), opts)
    task_type = task_type_for(adapter, opts)
    cfg: dict[str, Any] = {
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": adapter.meta.base_model or src_cfg.get("base_model_name_or_path"),
        "bias": "none",
        "fan_in_fan_out": any(m.fan_in_fan_out for m in mods.values()),
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": "layers" if layers is not None else None,
        "layers_to_transform": layers,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": _modules_to_save(adapter, task_type) or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": (target_modules(list(mods), opts) if layers is None
                           else sorted({n.rsplit(".", 1)[-1] for n in mods})),
        "task_type": task_type,
        "use_rslora": False,
    }
    if adapter.uses_dora:
        cfg["use_dora"] = True
    if adapter.uses_bias:
        cfg["lora_bias"] = True
    for key in {**rank_pattern, **alpha_pattern}:  # each full-name pattern must select only its module
        if any(other != key and re.match(rf"(.*\.)?({key})$", other) for other in mods):
            raise ConfigError(f"cannot express the rank/alpha of {key!r} with a PEFT pattern that selects only it")
    return cfg


def layer_subset(names: list[str], opts: WriteOptions) -> list[int] | None:
    """The block indices, when every leaf type covers the same proper subset of the blocks (as
    mlx-lm's "last N layers" does), for PEFT's ``layers_to_transform``; else None."""
    by_leaf = _blocks_by_leaf(names)
    if by_leaf is None:
        return None
    covered = {frozenset(v) for v in by_leaf.values()}
    if len(covered) != 1 or len({rest.rsplit(".", 1)[-1] for rest in by_leaf}) != len(by_leaf):
        return None
    blocks = set(next(iter(covered)))
    n_layers = opts.base_config.n_layers if opts.base_config is not None else None
    if blocks == set(range(n_layers if n_layers is not None else max(blocks) + 1)):
        return None  # every block: target_modules alone says it
    return sorted(blocks)


def target_modules(names: list[str], opts: WriteOptions, *, relative: bool = False) -> list[str]:
    """Leaf names (``q_proj``; block-relative ``mlp.experts.gate_up_proj`` with ``relative``) when
    every leaf type covers every layer, else the full names: PEFT then wraps exactly the modules
    the file holds (no zero-B modules, no missing-key warnings)."""
    by_leaf = _blocks_by_leaf(names)
    if by_leaf is None or not names:
        return sorted(names)
    n_layers = opts.base_config.n_layers if opts.base_config is not None else None
    covered = {frozenset(v) for v in by_leaf.values()}
    leaves = sorted({rest.rsplit(".", 1)[-1] for rest in by_leaf})
    blocks = next(iter(covered))
    full_range = len(covered) == 1 and blocks == set(range(max(blocks) + 1))
    if (full_range and (n_layers is None or max(blocks) + 1 == n_layers)
            and len(leaves) == len(by_leaf)):
        if n_layers is None:
            logger.info("target_modules %s assumes the adapter covers every layer (pass --base-config to check)",
                        quote_list(leaves, 7))
        return sorted(by_leaf) if relative else leaves
    return sorted(names)


def _blocks_by_leaf(names: list[str]) -> dict[str, set[int]] | None:
    """Block-relative path -> the blocks holding it; None if a module is outside the blocks."""
    by_leaf: dict[str, set[int]] = {}
    for n in names:
        block = parse_layer(n)
        if block is None:
            return None
        by_leaf.setdefault(block.rest, set()).add(block.number)
    return by_leaf
