"""HF PEFT: ``adapter_model.safetensors`` (or ``.bin``) + ``adapter_config.json``, exactly as
PEFT 0.21 writes them (formats.md §1). The config translation is :mod:`.peft_config`."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from ..adapter import Adapter, alpha_for
from ..errors import ConfigError, LayoutError, MissingConfigError
from ..experts import TRANSPOSED_MODEL_TYPES, ExpertLoRA, from_peft, peft_nesting, to_peft
from .base import Layout
from .peft_config import (
    REQUIRED_FIELDS,
    TARGET_FIELDS,
    TENSOR_FIELDS,
    config_fits,
    module_scale,
    new_config,
    pattern_value,
    saves_fit,
    scales_fit,
    source_peft_config,
    target_modules,
    targets_fit,
    write_peft_config,
)
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role

__all__ = ["PEFT_LEAVES", "PeftLayout", "config_fits", "experts_fit", "module_scale", "new_config", "pattern_value",
           "peft_config_for", "source_peft_config", "with_experts", "write_peft_config"]

logger = logging.getLogger(__name__)

PEFT_LEAVES: dict[Role, str] = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
               "bias": "lora_B.bias", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B"}


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
    keeps_peft_config = True
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
        write_peft_config(peft_config_for(adapter, opts, layout=self.name), out / self.config_file)


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


def peft_config_for(adapter: Adapter, opts: WriteOptions, *, layout: str, plain_scale: bool = False,
                    ) -> dict[str, Any]:
    """The adapter_config.json to write: the source's own config, as written, where it still
    describes ``adapter``; only the fields that no longer fit are re-derived (:func:`new_config`),
    each group with a note in ``adapter.meta.notes``; fields the source lacks are filled in.
    ``plain_scale``: the layout reads ``lora_alpha / r`` itself (torchtune), so no rsLoRA."""
    fresh = with_experts(new_config(adapter, opts), adapter, opts)
    orig = source_peft_config(adapter)
    if orig is None:
        return fresh
    cfg, redone = dict(orig), []
    experts_ok = experts_fit(orig, adapter)  # the experts' form (fused / per-expert) is as the source had it
    if not (experts_ok and scales_fit(orig, adapter)) or (plain_scale and orig.get("use_rslora")):
        for k in (*TENSOR_FIELDS, "target_parameters"):
            if k in fresh or k in cfg:
                cfg[k] = fresh.get(k, None if k == "target_parameters" else False)
        redone.append("r/lora_alpha/rank_pattern/alpha_pattern (ranks were padded or scales folded on the way)")
    if not (experts_ok and targets_fit(cfg, adapter)):
        for k in TARGET_FIELDS:
            if k in fresh or k in cfg:
                cfg[k] = fresh.get(k)
        redone.append("target_modules/layers_to_transform (they no longer select exactly the adapted modules)")
    if not saves_fit(cfg, adapter):
        cfg["modules_to_save"] = fresh["modules_to_save"]
        redone.append("modules_to_save (the full tensors kept are not the ones it names)")
    if cfg.get("bias", "none") != "none" and not adapter.extra:
        cfg["bias"] = "none"
        redone.append("bias (no base biases were kept)")
    for k in REQUIRED_FIELDS:
        if cfg.get(k) is None and fresh.get(k) is not None and k not in orig:
            cfg[k] = fresh[k]
    if redone:
        adapter.meta.notes.append(f"{layout} adapter_config.json: the source's config, but re-derived: "
                                  + "; ".join(redone))
    return cfg
