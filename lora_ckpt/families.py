"""Model families as data: parameter-name maps HF <-> torchtune <-> Meta/Mistral, the RoPE
row-order policy, and head geometry read from ``config.json`` / ``params.json``.

Each map is a table of key templates (``{}`` is a layer or expert index), written in the
direction HF -> other, the same way torchtune writes ``_FROM_HF``; the reverse direction is
the inverted table. ``tests/test_families.py`` asserts every table is a bijection.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError, ConversionError, MissingConfigError
from .io import PathLike, read_json

__all__ = ["FAMILIES", "Family", "Fused", "ModelConfig", "NameMap", "Scheme", "family_for_model_type",
           "is_embedding", "load_model_config"]

Scheme = Literal["hf", "torchtune", "meta", "litgpt"]

#: leaf names of token-embedding modules (LoRA on them is an embedding LoRA, ΔW transposed)
EMBEDDING_LEAVES = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embed_in")


def is_embedding(module: str) -> bool:
    """Whether ``module`` (any naming scheme) is a token embedding."""
    return module.rsplit(".", 1)[-1] in EMBEDDING_LEAVES

_LLAMA_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}
_QWEN2_TUNE = {**_LLAMA_TUNE, **{
    f"model.layers.{{}}.self_attn.{p}_proj.bias": f"layers.{{}}.attn.{p}_proj.bias" for p in "qkv"}}
# torchtune's own _GEMMA2_FROM_HF (its norm names are as they are: copied, not "fixed")
_GEMMA2_TUNE = {**{k: v for k, v in _LLAMA_TUNE.items() if "post_attention_layernorm" not in k}, **{
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.sa_scale.scale",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_scale.scale",
    "model.norm.weight": "norm.rms_norm.scale",
}}
_LLAMA_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# LitGPT (litgpt/scripts/convert_hf_checkpoint.py weight_map for Llama-style models). q/k/v are
# one fused ``attn.qkv`` there: see _LLAMA_LITGPT_FUSED.
_LLAMA_LITGPT = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.layers.{}.self_attn.o_proj.weight": "transformer.h.{}.attn.proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "transformer.h.{}.mlp.fc_1.weight",
    "model.layers.{}.mlp.up_proj.weight": "transformer.h.{}.mlp.fc_2.weight",
    "model.layers.{}.mlp.down_proj.weight": "transformer.h.{}.mlp.proj.weight",
    "model.layers.{}.input_layernorm.weight": "transformer.h.{}.norm_1.weight",
    "model.layers.{}.post_attention_layernorm.weight": "transformer.h.{}.norm_2.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
# torchtune's _PHI3_MINI (torchtune/models/phi3/_convert_weights.py): the one-to-one part; the fused
# qkv_proj / gate_up_proj are _PHI3_TUNE_FUSED.
_PHI3_TUNE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.output_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.sa_norm.scale",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}
# Mixtral with per-expert Linear modules (transformers 4.x names; v5 fuses experts).
_MIXTRAL_META = {**{k: v for k, v in _LLAMA_META.items() if ".mlp." not in k}, **{
    "model.layers.{}.block_sparse_moe.gate.weight": "layers.{}.feed_forward.gate.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight": "layers.{}.feed_forward.experts.{}.w1.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w2.weight": "layers.{}.feed_forward.experts.{}.w2.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w3.weight": "layers.{}.feed_forward.experts.{}.w3.weight",
}}


class NameMap:
    """A bijective table of key templates, usable in both directions."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self._fwd = [(self._regex(k), v) for k, v in table.items()]
        self._rev = [(self._regex(v), k) for k, v in table.items()]

    @staticmethod
    def _regex(template: str) -> re.Pattern[str]:
        return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
        for regex, target in rules:
            m = regex.fullmatch(key)
            if m:
                return target.format(*m.groups())
        return None

    def to_other(self, hf_key: str) -> str | None:
        """HF key -> this scheme's key (None if the table has no such key)."""
        return self._apply(self._fwd, hf_key)

    def to_hf(self, key: str) -> str | None:
        """This scheme's key -> HF key (None if the table has no such key)."""
        return self._apply(self._rev, key)

    @cached_property
    def modules(self) -> NameMap:
        """The same map on module paths (the entries whose parameter is ``weight`` on both sides)."""
        return NameMap({k[: -len(".weight")]: v[: -len(".weight")] for k, v in self.table.items()
                        if k.endswith(".weight") and v.endswith(".weight")})


IDENTITY = NameMap({})


@dataclass(frozen=True)
class Fused:
    """A many-to-one module correspondence (formats.md §13): one side has a fused projection
    whose output rows are the concatenation of the other side's projections, in order.

    Exactly one of ``hf`` / ``other`` has one template (the fused module); the other lists the
    parts in row order. ``rows`` says how the fused rows divide: ``"qkv"`` is
    (n_heads·head_dim, n_kv_heads·head_dim, n_kv_heads·head_dim), ``"equal"`` is equal blocks.
    """

    hf: tuple[str, ...]  # HF module templates ("{}" = layer index)
    other: tuple[str, ...]  # the scheme's module templates
    rows: Literal["qkv", "equal"]

    def __post_init__(self) -> None:
        if sorted((len(self.hf), len(self.other)))[0] != 1 or len(self.hf) == len(self.other):
            raise ValueError(f"a Fused entry needs one template on one side and several on the other: {self}")

    @property
    def fused_in_hf(self) -> bool:
        """Whether the HF side is the fused one (Phi-3 ``qkv_proj``) or the scheme's (LitGPT ``qkv``)."""
        return len(self.hf) == 1

    def sizes(self, cfg: ModelConfig | None, total: int) -> tuple[int, ...]:
        """Row counts of the parts of a fused module with ``total`` rows."""
        n = max(len(self.hf), len(self.other))
        if self.rows == "equal":
            if total % n:
                raise ConversionError(f"{total} rows do not split into {n} equal parts")
            return (total // n,) * n
        if cfg is None:
            raise MissingConfigError(
                "splitting a fused q/k/v projection needs the head counts; pass --base-config with the base "
                "model's config.json")
        sizes = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
        if total != sum(sizes):
            raise ConversionError(
                f"a fused q/k/v projection with {total} rows does not fit the base config's "
                f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv heads of size {cfg.head_dim} ({sum(sizes)} rows); "
                "pass the --base-config this adapter was trained on")
        return sizes


_LLAMA_LITGPT_FUSED = (Fused(hf=("model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.k_proj",
                                 "model.layers.{}.self_attn.v_proj"), other=("transformer.h.{}.attn.qkv",), rows="qkv"),)
_PHI3_TUNE_FUSED = (
    Fused(hf=("model.layers.{}.self_attn.qkv_proj",),
          other=("layers.{}.attn.q_proj", "layers.{}.attn.k_proj", "layers.{}.attn.v_proj"), rows="qkv"),
    Fused(hf=("model.layers.{}.mlp.gate_up_proj",), other=("layers.{}.mlp.w1", "layers.{}.mlp.w3"), rows="equal"),
)
# mlx-lm stacks MoE experts into one SwitchLinear (``switch_mlp``): mlx template -> HF per-expert
# template (the expert index is the last "{}"); mlx_lm/models/{mixtral,qwen2_moe,qwen3_moe}.py sanitize().
_MIXTRAL_MLX_EXPERTS = {f"model.layers.{{}}.block_sparse_moe.switch_mlp.{mlx}": f"model.layers.{{}}.block_sparse_moe.experts.{{}}.{hf}"
                        for mlx, hf in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))}
_QWEN_MOE_MLX_EXPERTS = {f"model.layers.{{}}.mlp.switch_mlp.{p}": f"model.layers.{{}}.mlp.experts.{{}}.{p}"
                         for p in ("gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class Family:
    """One model family: its name maps and whether torchtune keeps q/k interleaved for it."""

    name: str
    model_types: tuple[str, ...]
    maps: dict[str, dict[str, str]] = field(default_factory=dict)  # scheme -> HF->scheme table
    torchtune_interleaved: bool = True  # torchtune permutes Llama/Mistral/Gemma q/k; never Qwen
    rope: bool = True  # has q/k projections with rotary embeddings
    module_prefixes: tuple[str, ...] = ("model.", "lm_head")  # how the HF *ForCausalLM class names modules
    fused: dict[str, tuple[Fused, ...]] = field(default_factory=dict)  # scheme -> many-to-one modules
    stacked_experts: dict[str, str] = field(default_factory=dict)  # mlx switch_mlp template -> HF expert template

    def names(self, scheme: Scheme) -> NameMap:
        if scheme == "hf":
            return IDENTITY
        if scheme not in self.maps:
            raise ConversionError(f"model family {self.name!r} has no {scheme} parameter names; "
                                  f"known: {', '.join(['hf', *self.maps])}")
        return _name_map(self.name, scheme)

    def interleaved(self, scheme: Scheme) -> bool:
        """Whether q/k rows are interleaved (Meta order) in this naming scheme's checkpoints."""
        if not self.rope or scheme == "hf":
            return False
        return scheme == "meta" or (scheme == "torchtune" and self.torchtune_interleaved)


_LITGPT = {"litgpt": _LLAMA_LITGPT}
_LITGPT_FUSED = {"litgpt": _LLAMA_LITGPT_FUSED}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), {"torchtune": _LLAMA_TUNE, "meta": _LLAMA_META, **_LITGPT}, fused=_LITGPT_FUSED),
    Family("mistral", ("mistral",), {"torchtune": _LLAMA_TUNE, "meta": _LLAMA_META, **_LITGPT}, fused=_LITGPT_FUSED),
    Family("mixtral", ("mixtral",), {"meta": _MIXTRAL_META}, stacked_experts=_MIXTRAL_MLX_EXPERTS),
    Family("qwen2", ("qwen2",), {"torchtune": _QWEN2_TUNE, **_LITGPT}, torchtune_interleaved=False,
           fused=_LITGPT_FUSED),
    Family("qwen3", ("qwen3",), {"torchtune": _LLAMA_TUNE}, torchtune_interleaved=False),
    Family("qwen2_moe", ("qwen2_moe",), {}, stacked_experts=_QWEN_MOE_MLX_EXPERTS),
    Family("qwen3_moe", ("qwen3_moe",), {}, stacked_experts=_QWEN_MOE_MLX_EXPERTS),
    Family("phi3", ("phi3",), {"torchtune": _PHI3_TUNE}, torchtune_interleaved=False, fused={"torchtune": _PHI3_TUNE_FUSED}),
    Family("gemma", ("gemma",), {"torchtune": {k: v for k, v in _LLAMA_TUNE.items() if k != "lm_head.weight"}}),
    Family("gemma2", ("gemma2",), {"torchtune": {k: v for k, v in _GEMMA2_TUNE.items() if k != "lm_head.weight"}}),
    Family("gemma3", ("gemma3", "gemma3_text"), {}),
    Family("gpt2", ("gpt2",), {}, rope=False, module_prefixes=("transformer.", "lm_head")),
)}

_MAPS: dict[tuple[str, str], NameMap] = {}


def _name_map(family: str, scheme: str) -> NameMap:
    if (family, scheme) not in _MAPS:
        _MAPS[(family, scheme)] = NameMap(FAMILIES[family].maps[scheme])
    return _MAPS[(family, scheme)]


def family_for_model_type(model_type: str) -> Family | None:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return None


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
        if ".experts." in hf_module:  # Qwen-MoE experts are narrower than the dense MLP
            inter = raw.get("moe_intermediate_size") or inter
        q, kv, h = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.hidden_size
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        if inter:
            shapes.update({"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)})
        if self.family is None or self.family.name == "gpt2" or not re.match(r"^model\.layers\.\d+\.", hf_module):
            return None
        return shapes.get(leaf)

    def check_modules(self, modules: dict[str, Any], *, source: str) -> None:
        """Every adapted module exists in this model with these dimensions (else ConfigError)."""
        n_layers = self.raw.get("num_hidden_layers") or self.raw.get("n_layers")
        problems = []
        for name, m in modules.items():
            layer = re.match(r"^model\.layers\.(\d+)\.", name)
            if layer and n_layers is not None and int(layer[1]) >= int(n_layers):
                problems.append(f"{name}: layer {layer[1]} but the model has {n_layers} layers")
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
        """Number of transformer blocks, if the config says."""
        n = self.raw.get("num_hidden_layers") or self.raw.get("n_layers") or self.raw.get("n_layer")
        return int(n) if n else None

    @property
    def n_experts(self) -> int | None:
        """Number of MoE experts per layer, if any."""
        moe = self.raw.get("moe") if isinstance(self.raw.get("moe"), dict) else {}
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
            family = FAMILIES["mixtral" if cfg.get("moe") else "mistral"]
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
