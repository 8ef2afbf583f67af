"""mlx-lm: ``adapters.safetensors`` + ``adapter_config.json`` (formats.md §4).

HF module paths without a prefix; leaves ``lora_a`` (in, r), ``lora_b`` (r, out) — transposed
relative to PEFT — and DoRA ``m`` (out,). ``LoRAEmbedding`` uses the same leaves, (vocab, r) and
(r, dim), which are the transposes of PEFT's ``lora_embedding_A``/``B``. ``scale`` multiplies
directly (PEFT ``lora_alpha = scale·r``); one rank and one scale for the whole adapter. MoE
``switch_mlp`` factors are stacked per expert, (E, r, in) / (E, out, r) and *not* transposed:
they are read into per-expert modules for families with per-expert HF names
(``Family.stacked_experts``) and stacked back on write. No RoPE permutation.

Config, both schemas read (mlx-lm ``tuner/utils.py`` ``load_adapters``): current
``fine_tune_type`` (lora|dora|full), ``num_layers``, ``lora_parameters {rank, scale, dropout,
keys?}``; before mlx-examples PR #903 (2024-09-30) ``lora_layers`` and ``use_dora``. Written:
the current keys plus ``lora_layers``/``use_dora`` so older mlx-lm versions load it too (the
current loader ignores them).

Placement: mlx-lm adapts the ``keys`` (block-relative, or full names for top-level modules) of
the **last** ``num_layers`` blocks (-1: all). We write the exact ``keys`` and, for
``num_layers``, the trailing blocks the adapter covers; if it covers other blocks, -1 (mlx-lm
then also wraps blocks the file has no tensors for; their ``lora_b`` stays zero: a no-op).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from ..adapter import Adapter, ModuleLoRA
from ..errors import ConfigError, ConversionError, MissingConfigError, UnsupportedAdapterError, quote_list
from ..families import FAMILIES, Family, ModelConfig, NameMap, parse_layer
from ..fused import stack_experts, unstack_experts
from .base import Layout
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role, ScalePolicy

logger = logging.getLogger(__name__)

DEFAULT_SCALE = 20.0  # mlx-lm's LoRALinear default
DEFAULT_RANK = 8


class MlxLayout(Layout):
    name = "mlx"
    order = 70
    summary = "mlx-lm adapters.safetensors + adapter_config.json (factors transposed, scale used directly)"
    weight_files = ("adapters.safetensors",)
    config_file = "adapter_config.json"
    scheme = "hf"
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_a", "B": "lora_b", "magnitude": "m",
                                         "emb_A": "lora_a", "emb_B": "lora_b"}
    transposed = True
    features = frozenset({"dora", "embedding"})
    one_rank = True
    scale_policy = ScalePolicy.GLOBAL

    def detect(self, src: Source) -> Detection | None:
        cfg = src.config or {}
        keys = src.keys()
        if not keys or not all(self.split(k) for k in keys):
            return None
        if "lora_parameters" in cfg or "lora_layers" in cfg or "fine_tune_type" in cfg:
            return Detection(3, f"{src.config_path.name} with mlx-lm's lora_parameters beside {src.weights.name}")  # type: ignore[union-attr]
        return Detection(2, "lora_a / lora_b keys without a prefix (mlx-lm)")

    def unsupported(self, src: Source) -> str | None:
        if (src.config or {}).get("fine_tune_type") == "full":
            return "fine_tune_type 'full': mlx-lm full fine-tune weights, not an adapter; use them as a model"
        return None

    # ------------------------------------------------------------------ reading
    def modules_of(self, src: Source, name: str, parts: dict[Role, Any], family: Family | None,
                   ) -> dict[str, ModuleLoRA]:
        A, B = parts.get("A"), parts.get("B")
        if A is not None and B is not None and (A.dim() == 3 or B.dim() == 3):  # LoRASwitchLinear
            if "magnitude" in parts:
                raise UnsupportedAdapterError(f"{src.path}: {name}: DoRA on MoE experts (mlx-lm has none)",
                                              layout=self.name, path=str(src.path))

            return unstack_experts(family, name, A, B, layout=self.name)
        if "magnitude" in parts and ("emb_A" in parts or "emb_B" in parts):
            raise UnsupportedAdapterError(
                f"{src.path}: {name}: DoRA on an embedding (mlx-lm DoRAEmbedding: magnitude per vocabulary row); "
                "PEFT and the other layouts have no equivalent; merge it with mlx_lm.fuse instead",
                layout=self.name, path=str(src.path))
        return super().modules_of(src, name, parts, family)

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        cfg = src.config
        notes = adapter.meta.notes
        if cfg is None:
            if opts.alpha is None:
                raise MissingConfigError(
                    f"{src.weights}: no adapter_config.json beside this mlx-lm file, so the scale is unknown; put "
                    "the config beside it, or pass --alpha (scale = alpha / r)")
            for m in adapter.modules.values():
                m.scale = opts.alpha / m.rank
            return
        params = cfg.get("lora_parameters") or {}
        fine_tune_type = cfg.get("fine_tune_type") or ("dora" if cfg.get("use_dora") else "lora")
        ranks = adapter.ranks()
        rank = params.get("rank", DEFAULT_RANK)
        if set(ranks) - {rank}:
            raise ConfigError(f"{src.config_path}: lora_parameters.rank={rank} but the tensors have rank(s) "
                              f"{sorted(ranks)}; mlx-lm would refuse to load it; fix lora_parameters.rank",
                              path=src.config_path)
        if "scale" not in params:
            notes.append(f"lora_parameters has no scale: mlx-lm's default {DEFAULT_SCALE} used")
        if "alpha" in params:
            notes.append("lora_parameters.alpha is ignored: current mlx-lm multiplies by scale alone")
        scale = float(opts.alpha / rank if opts.alpha is not None else params.get("scale", DEFAULT_SCALE))
        for m in adapter.modules.values():
            m.scale = scale
        if fine_tune_type == "lora" and adapter.uses_dora:
            notes.append("DoRA magnitudes (m) present but fine_tune_type is lora: mlx-lm refuses the file; "
                         "kept as DoRA")
        if fine_tune_type == "dora" and not adapter.uses_dora:
            notes.append("fine_tune_type dora but no magnitudes (m) in the file: mlx-lm initialises them from the "
                         "base weights (a DoRA no-op only while lora_b is zero); read as plain LoRA")
        refused = num_layers_refused(adapter)
        if refused:
            notes.append(f"{refused}: mlx-lm would refuse it (it wraps only the last num_layers blocks)")
        adapter.meta.base_model = cfg.get("model") if isinstance(cfg.get("model"), str) else None

    # ------------------------------------------------------------------ writing
    def prepare(self, adapter: Adapter, opts: WriteOptions) -> Adapter:
        adapter = super().prepare(adapter, opts)
        plain = partial_dora(adapter)
        if plain:
            raise ConversionError(
                f"mlx-lm runs DoRA on every adapted module or none; DoRA on {len(adapter.modules) - len(plain)}, "
                f"plain LoRA on {quote_list(plain, 3)}; expected one kind; convert to peft or native instead")
        return adapter

    def tensors_for(self, adapter: Adapter, model_cfg: ModelConfig | None) -> dict[str, Any]:
        family = (model_cfg.family if model_cfg else None) or FAMILIES.get(adapter.meta.family or "")
        stacked, used = stack_experts(family, adapter.modules, n_experts=model_cfg.n_experts if model_cfg else None,
                                      layout=self.name)
        out = super().tensors_for(replace(adapter, modules={n: m for n, m in adapter.modules.items()
                                                             if n not in used}), model_cfg)
        for name, (A, B, _scale) in stacked.items():  # switch factors are not transposed
            out[self.key(name, "A")], out[self.key(name, "B")] = A.contiguous(), B.contiguous()
        return out

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        family = (opts.base_config.family if opts.base_config else None) or FAMILIES.get(adapter.meta.family or "")
        names = _switch_names(family, list(adapter.modules))
        total = opts.base_config.n_layers if opts.base_config else None
        num_layers, note = placement(blocks(adapter.modules), total)
        if note:
            logger.info("mlx num_layers: %s", note)
        keys = sorted({_relative(n) for n in names})
        rank = next(iter(adapter.ranks()), DEFAULT_RANK)
        scale = next(iter(adapter.scales()), DEFAULT_SCALE)
        cfg: dict[str, Any] = {
            "fine_tune_type": "dora" if adapter.uses_dora else "lora",
            "num_layers": num_layers,
            "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys},
            "lora_layers": num_layers,  # the pre-2024-09 schema, so older mlx-lm versions load it too
            "use_dora": adapter.uses_dora,
        }
        if adapter.meta.base_model:
            cfg["model"] = adapter.meta.base_model
        (out / self.config_file).write_text(json.dumps(cfg, indent=4))


def placement(blocks: set[int], total: int | None) -> tuple[int, str | None]:
    """mlx-lm ``num_layers`` for an adapter covering ``blocks`` of ``total`` (None: unknown).

    Returns:
        (num_layers, a note when it is not exact).
    """
    if not blocks:
        return 0, None
    if total is not None and blocks == set(range(total - len(blocks), total)):
        return len(blocks), None
    if total is None and blocks == set(range(max(blocks) + 1)):
        return -1, None
    where = "not the trailing blocks" if total is not None else "placement unknown without --base-config"
    return -1, (f"the adapter covers blocks {sorted(blocks)} ({where}): num_layers -1, so mlx-lm also wraps the "
                "other blocks, with lora_b zero (a no-op)")


def blocks(modules: dict[str, Any]) -> set[int]:
    """The block indices the modules adapt."""
    return {b.number for n in modules if (b := parse_layer(n))}


def partial_dora(adapter: Adapter) -> list[str]:
    """The plain-LoRA modules of an adapter with DoRA on only some modules (mlx-lm runs DoRA on every
    adapted module or none), else []."""
    plain = [n for n, m in adapter.modules.items() if m.magnitude is None]
    return plain if 0 < len(plain) < len(adapter.modules) else []


def num_layers_refused(adapter: Adapter) -> str | None:
    """Why mlx-lm refuses an mlx adapter's ``num_layers`` (it wraps only the last ``num_layers``
    blocks, and the file adapts an earlier one), else None."""
    if adapter.meta.source_layout != "mlx":
        return None
    cfg, model_cfg = adapter.meta.config or {}, adapter.meta.model_config
    given, total = cfg.get("num_layers", cfg.get("lora_layers")), model_cfg.n_layers if model_cfg else None
    adapted = blocks(adapter.modules)
    if isinstance(given, int) and given >= 0 and total and adapted and min(adapted) < total - given:
        return f"num_layers {given} but the file adapts block {min(adapted)} of {total}"
    return None


def _relative(name: str) -> str:
    block = parse_layer(name)
    return block.rest if block else name


def _switch_names(family: Family | None, names: list[str]) -> list[str]:
    """Module names as mlx-lm's model has them (per-expert modules -> their switch_mlp module)."""
    tables = [family.stacked_experts] if family else [f.stacked_experts for f in FAMILIES.values()]
    maps = [NameMap({expert: switch}) for t in tables for switch, expert in t.items()]
    return [next((s for nm in maps if (s := nm.to_other(n)) is not None), n) for n in names]
