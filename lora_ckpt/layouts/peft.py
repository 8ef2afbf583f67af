"""HF PEFT: ``adapter_model.safetensors`` (or ``.bin``) + ``adapter_config.json``, exactly as
PEFT 0.21 writes them (formats.md §1)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from ..adapter import Adapter, alpha_for
from ..errors import ConfigError, LayoutError, MissingConfigError, quote_list
from ..experts import TRANSPOSED_MODEL_TYPES, ExpertLoRA, from_peft, peft_nesting, to_peft
from ..families import parse_layer
from ..keys import matches_target
from .base import Layout
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role

logger = logging.getLogger(__name__)

PEFT_LEAVES: dict[Role, str] = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
               "bias": "lora_B.bias", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}


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


class PeftLayout(Layout):
    name = "peft"
    order = 20
    summary = "HF PEFT adapter_model.safetensors/.bin + adapter_config.json"
    weight_files = ("adapter_model.safetensors", "adapter_model.bin")
    config_file = "adapter_config.json"
    prefix = "base_model.model."
    scheme = "hf"
    leaves: ClassVar[dict[Role, str]] = PEFT_LEAVES
    features = frozenset({"dora", "bias", "embedding", "extra", "fan_in_fan_out"})
    expert_form = "stacked"

    def detect(self, src: Source) -> Detection | None:
        cfg = src.config
        if (cfg is not None and src.config_path is not None and "peft_type" in cfg
                and src.weights.name in self.weight_files):
            return Detection(2, f"{src.config_path.name} with peft_type {cfg['peft_type']!r} beside {src.weights.name}")
        keys = src.keys()
        if keys and all(k.startswith(self.prefix) for k in keys) and any(self.split(k) for k in keys):
            return Detection(1, f"keys start with {self.prefix!r} and end in lora_A.weight/lora_B.weight")
        return None

    def unsupported(self, src: Source) -> str | None:
        cfg = src.config or {}
        if cfg.get("peft_type", "LORA") != "LORA":
            why = " (AdaLoRA's SVD form lora_E has no exact LoRA layout)" if cfg["peft_type"] == "ADALORA" else ""
            return f"peft_type {cfg['peft_type']!r} is not LoRA; lora-ckpt converts LoRA/DoRA adapters only{why}"
        if any(k.endswith(".lora_E") for k in src.index):
            return "has AdaLoRA lora_E tensors; lora-ckpt converts LoRA/DoRA adapters only"
        if cfg.get("enable_lora"):
            return "uses the legacy MergedLinear enable_lora (grouped factors); re-export it with a current PEFT"
        return None

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        cfg = src.config
        if cfg is None:
            if opts.alpha is None:
                raise MissingConfigError(
                    f"{src.weights}: no adapter_config.json beside this PEFT file, so the scale is unknown; "
                    "put the config beside it, or pass --alpha (scale = alpha / r)")
            cfg = {"r": None, "lora_alpha": opts.alpha}
        problems = []
        for name, m in adapter.modules.items():
            if cfg.get("r") is None:
                m.scale = opts.alpha / m.rank  # type: ignore[operator]
                continue
            r, m.scale = module_scale(cfg, name)
            if r != m.rank:
                problems.append(f"{name}: config r={r}, tensors rank {m.rank}")
            m.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        if problems:
            raise ConfigError(
                f"{src.config_path}: {len(problems)} module(s) disagree with the tensors ({'; '.join(problems[:3])}"
                f"{' and more' if len(problems) > 3 else ''}); PEFT would refuse to load this; fix r / rank_pattern",
                path=src.config_path)
        adapter.meta.base_model = cfg.get("base_model_name_or_path")
        adapter.meta.task_type = cfg.get("task_type")
        if adapter.uses_dora and not cfg.get("use_dora"):
            for m in adapter.modules.values():
                m.magnitude = None
            adapter.meta.notes.append(
                "DoRA magnitudes present but use_dora is false: PEFT and vLLM run this as plain LoRA, and so is it "
                "read here (torchtune 0.6.1 exports look like this: convert its adapter_model.pt instead)")
        if adapter.uses_bias and not cfg.get("lora_bias"):
            for m in adapter.modules.values():
                m.bias = None
            adapter.meta.notes.append("lora_B.bias present but lora_bias is false: PEFT ignores it, and so is it "
                                      "read here")
        if cfg.get("use_rslora"):
            adapter.meta.notes.append("rsLoRA (scale alpha/sqrt(r)): llama.cpp ignores use_rslora")

    # ------------------------------------------------------------------ experts
    def read_experts(self, src: Source, opts: ReadOptions) -> tuple[dict[str, ExpertLoRA], set[str]]:
        """``target_parameters`` LoRA (lora_ckpt.experts): ``<module>.[base_layer.]*lora_{A,B}.weight``,
        the nesting depth naming the parameter (PEFT nests in registration order, the first innermost)."""
        cfg = src.config or {}
        targets = cfg.get("target_parameters") or []
        if not targets:
            return {}, set()
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"{src.config_path}: target_parameters must be a list of parameter names, found "
                              f"{targets!r}", path=src.config_path)
        model_cfg = opts.base_config or self.implied_model_config(src)
        transposed = bool(model_cfg and model_cfg.raw.get("model_type") in TRANSPOSED_MODEL_TYPES)
        found: dict[str, dict[int, dict[str, Any]]] = {}  # module -> nesting depth -> leaf -> tensor
        for key, t in src.tensors.items():
            parsed = self.split(key)
            if parsed is None or parsed[1] not in ("A", "B"):
                continue
            module, depth = parsed[0], 0
            while module.endswith(".base_layer"):
                module, depth = module.removesuffix(".base_layer"), depth + 1
            if _targeted_params(module, targets):
                found.setdefault(module, {}).setdefault(depth, {})[parsed[1]] = (key, t)
        experts: dict[str, ExpertLoRA] = {}
        used: set[str] = set()
        for module, by_depth in found.items():
            nesting = peft_nesting(_targeted_params(module, targets))
            for param, nest in nesting.items():
                parts = by_depth.pop(nest.count("base_layer."), {})
                if "A" not in parts or "B" not in parts:
                    raise LayoutError(f"{src.path}: target_parameters {param!r} of {module!r} has no "
                                      f"{module}.{nest}lora_{'A' if 'A' not in parts else 'B'}.weight; expected both "
                                      "factors (PEFT would leave it unadapted or random); the file is incomplete",
                                      layout=self.name, path=str(src.path))
                name = f"{module}.{param}"
                r, scale = module_scale(cfg, name)
                (ka, A), (kb, B) = parts["A"], parts["B"]
                experts[name] = from_peft(A, B, r, name=name, scale=scale, transposed=transposed)
                used.update((ka, kb))
            if by_depth:
                raise LayoutError(f"{src.path}: {module!r} has LoRA factors nested {sorted(by_depth)} deep but "
                                  f"target_parameters names {len(nesting)} parameter(s) of it "
                                  f"({', '.join(nesting)}); fix target_parameters", layout=self.name,
                                  path=str(src.path))
        return experts, used

    def expert_tensors(self, experts: dict[str, ExpertLoRA]) -> dict[str, Any]:
        by_module: dict[str, list[str]] = {}
        for name in experts:
            module, _, param = name.rpartition(".")
            by_module.setdefault(module, []).append(param)
        out = {}
        for module, params in by_module.items():
            for param, nest in peft_nesting(params).items():
                A, B = to_peft(experts[f"{module}.{param}"])
                out[f"{self.prefix}{module}.{nest}lora_A.weight"] = A
                out[f"{self.prefix}{module}.{nest}lora_B.weight"] = B
        return out

    # ------------------------------------------------------------------ writing
    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        cfg = adapter.meta.config if adapter.meta.source_layout == "peft" else {}
        if not (cfg and config_fits(cfg, adapter) and experts_fit(cfg, adapter)):
            cfg = with_experts(new_config(adapter, opts), adapter, opts)
        write_peft_config(cfg, out / self.config_file)


def _targeted_params(module: str, targets: list[str]) -> list[str]:
    """The parameters of ``module`` that ``target_parameters`` selects (PEFT: the full name
    ``module.param`` equals an entry or ends with ``"." + entry``)."""
    out = []
    for t in targets:
        param = t.rpartition(".")[2]
        full = f"{module}.{param}"
        if param not in out and (full == t or full.endswith("." + t)):
            out.append(param)
    return out


def experts_fit(cfg: dict[str, Any], adapter: Adapter) -> bool:
    """Whether ``cfg``'s ``target_parameters``, ranks and alphas describe ``adapter.experts`` exactly."""
    targets = cfg.get("target_parameters") or []
    if not adapter.experts:
        return not targets
    for name, x in adapter.experts.items():
        module, _, param = name.rpartition(".")
        if param not in _targeted_params(module, targets) or module_scale(cfg, name) != (x.rank, x.scale):
            return False
    return True


def with_experts(cfg: dict[str, Any], adapter: Adapter, opts: WriteOptions) -> dict[str, Any]:
    """``cfg`` (from :func:`new_config`) with ``target_parameters`` and exact per-parameter rank/alpha
    patterns for ``adapter.experts`` (block-relative names when every block has them, else full names)."""
    if not adapter.experts:
        return cfg
    cfg = dict(cfg, rank_pattern=dict(cfg["rank_pattern"]), alpha_pattern=dict(cfg["alpha_pattern"]))
    if not adapter.modules:  # the global r/alpha come from the experts
        ranks = Counter(x.rank for x in adapter.experts.values())
        cfg["r"] = ranks.most_common(1)[0][0]
        cfg["lora_alpha"] = Counter(alpha_for(x.scale, x.rank) for x in adapter.experts.values()).most_common(1)[0][0]
        cfg["target_modules"] = []  # as PEFT 0.21.2 writes an experts-only config
    for name, x in adapter.experts.items():
        if x.rank != cfg["r"]:
            cfg["rank_pattern"][name] = x.rank
        if alpha_for(x.scale, x.rank) != cfg["lora_alpha"]:
            cfg["alpha_pattern"][name] = alpha_for(x.scale, x.rank)
    cfg["target_parameters"] = target_modules(list(adapter.experts), opts, relative=True)
    return cfg


def write_peft_config(cfg: dict[str, Any], path: Path) -> None:
    """As PEFT writes it: ``json.dumps(indent=2, sort_keys=True)``, no trailing newline."""
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def config_fits(cfg: dict[str, Any], adapter: Adapter) -> bool:
    """Whether ``cfg`` (an original PEFT config) still describes ``adapter`` exactly."""
    if bool(cfg.get("use_dora")) != adapter.uses_dora or bool(cfg.get("lora_bias")) != adapter.uses_bias:
        return False
    targets = cfg.get("target_modules")
    for name, m in adapter.modules.items():
        if module_scale(cfg, name) != (m.rank, m.scale) or m.fan_in_fan_out != bool(cfg.get("fan_in_fan_out")):
            return False
        if targets is not None and targets != "all-linear" and not matches_target(name, targets):
            return False
    return set(cfg.get("modules_to_save") or []) == set(_modules_to_save(adapter))


def _modules_to_save(adapter: Adapter) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in adapter.extra if ".base_layer." not in k})


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
        "modules_to_save": _modules_to_save(adapter) or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": (target_modules(list(mods), opts) if layers is None
                           else sorted({n.rsplit(".", 1)[-1] for n in mods})),
        "task_type": adapter.meta.task_type or "CAUSAL_LM",
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
