"""Model geometry: what conversions need from a base model's ``config.json`` / ``params.json``
(family, head counts, block and expert counts, projection shapes)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingConfigError
from ..io import PathLike, read_json
from .names import parse_layer
from .tables import FAMILIES, Family, family_for_model_type

__all__ = ["ModelConfig", "load_model_config", "model_config_from_dict"]


@dataclass(frozen=True)
class ModelConfig:
    """What conversions need from a base model's config: family and head geometry."""

    family: Family | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    raw: dict[str, Any]
    source: str = ""

    def expected_shape(self, hf_module: str) -> tuple[int, int] | None:
        """(out, in) of a Llama-style projection from the config, None when not known."""
        raw, leaf = self.raw, hf_module.rsplit(".", 1)[-1]
        inter = raw.get("intermediate_size") or raw.get("hidden_dim")
        if ".experts." in hf_module and raw.get("moe_intermediate_size"):  # Qwen-MoE experts (Mixtral's: intermediate)
            inter = raw["moe_intermediate_size"]
        elif ".shared_expert." in hf_module:
            inter = raw.get("shared_expert_intermediate_size") or inter
        q, kv, h = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden_size
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        if inter:
            shapes.update({"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)})
        block = parse_layer(hf_module)
        if self.family is None or self.family.name == "gpt2" or block is None or block.prefix != "model.layers.":
            return None
        return shapes.get(leaf)

    def check_modules(self, modules: dict[str, Any], *, source: str) -> None:
        """Every adapted module exists in this model with these dimensions (else ConfigError)."""
        n_layers = self.n_layers
        problems = []
        for name, m in modules.items():
            block = parse_layer(name)
            if block and block.prefix == "model.layers." and n_layers is not None and block.number >= n_layers:
                problems.append(f"{name}: layer {block.number} but the model has {n_layers} layers")
                continue
            want = self.expected_shape(name)
            got = (m.B.shape[0], m.A.shape[1])
            if want is not None and m.kind == "linear" and not m.fan_in_fan_out and got != want:
                problems.append(f"{name}: adapter is {got[1]}->{got[0]}, the model's is {want[1]}->{want[0]}")
        if problems:
            raise ConfigError(
                f"{source}: adapter does not fit the base config {self.source or ''} ({'; '.join(problems[:3])}"
                f"{f' and {len(problems) - 3} more' if len(problems) > 3 else ''}); pass the config of the model "
                "this adapter was trained on", path=self.source or None)

    @property
    def n_layers(self) -> int | None:
        """Number of transformer blocks, if the config says (HF ``num_hidden_layers``, Meta ``n_layers``,
        GPT-2 ``n_layer``): the one place a raw config's block count is read."""
        n = self.raw.get("num_hidden_layers") or self.raw.get("n_layers") or self.raw.get("n_layer")
        return int(n) if n else None

    @property
    def n_experts(self) -> int | None:
        """Number of MoE experts per layer, if any."""
        moe: dict[str, Any] = self.raw["moe"] if isinstance(self.raw.get("moe"), dict) else {}
        n = self.raw.get("num_local_experts") or self.raw.get("num_experts") or moe.get("num_experts")
        return int(n) if n else None

    def heads(self, hf_module: str) -> tuple[int, int] | None:
        """(n, head_dim) for the q/k projection ``hf_module``, None for any other module."""
        leaf = hf_module.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            return self.n_heads, self.head_dim
        if leaf == "k_proj":
            return self.n_kv_heads, self.head_dim
        return None


def _positive(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = cfg.get(key) if cfg.get(key) is not None else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value <= 0:
        raise ValueError(key)
    return int(value)


def model_config_from_dict(cfg: dict[str, Any], *, source: str = "") -> ModelConfig:
    """Read an HF ``config.json`` or a Meta/Mistral ``params.json`` dict."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers (Gemma-3, Llama-4 ...)
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    try:
        if "n_heads" in cfg and "dim" in cfg:  # params.json
            n, dim = _positive(cfg, "n_heads"), _positive(cfg, "dim")
            family: Family | None = FAMILIES["mixtral" if cfg.get("moe") else "mistral"]
            return ModelConfig(family, n, _positive(cfg, "n_kv_heads", n), _positive(cfg, "head_dim", dim // n),
                               dim, cfg, source)
        model_type = cfg.get("model_type", "")
        family = family_for_model_type(model_type) if isinstance(model_type, str) else None
        if model_type == "gpt2":
            n, dim = _positive(cfg, "n_head"), _positive(cfg, "n_embd")
            return ModelConfig(family, n, n, _positive({"hd": dim // n}, "hd"), dim, cfg, source)
        n, hidden = _positive(cfg, "num_attention_heads"), _positive(cfg, "hidden_size")
        return ModelConfig(family, n, _positive(cfg, "num_key_value_heads", n), _positive(cfg, "head_dim", hidden // n),
                           hidden, cfg, source)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"{source or 'config'}: not a model config with head counts (missing or invalid {e}); expected an HF "
            "config.json (num_attention_heads, hidden_size) or a params.json (n_heads, dim) with positive "
            "integers", path=source or None) from e


def load_model_config(path: PathLike) -> ModelConfig:
    """Read a base model config: ``config.json``, ``params.json``, or a directory with one."""
    p = Path(path)
    if p.is_dir():
        for name in ("config.json", "params.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise MissingConfigError(f"{path}: no config.json or params.json in this directory")
    return model_config_from_dict(read_json(p, what="model config"), source=os.fspath(p))
