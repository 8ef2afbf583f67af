"""Model families as data: parameter-name maps HF <-> torchtune <-> Meta/Mistral <-> LitGPT,
fused and stacked-expert correspondences, and the RoPE row-order policy.

Each map is a table of key templates (``{}`` is a layer or expert index), written in the
direction HF -> other, the same way torchtune writes ``_FROM_HF``; the reverse direction is
the inverted table. ``tests/test_convert_roundtrip.py`` asserts every table is a bijection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..errors import ConversionError, MissingConfigError
from .names import IDENTITY, NameMap, Scheme

if TYPE_CHECKING:
    from .config import ModelConfig

__all__ = ["FAMILIES", "Family", "Fused", "family_for_model_type"]

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
_GEMMA2_TUNE = {**{k: v for k, v in _LLAMA_TUNE.items() if "post_attention_layernorm" not in k},
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.sa_scale.scale",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_norm.scale",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_scale.scale",
    "model.norm.weight": "norm.rms_norm.scale"}
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
# torchtitan (torchtitan/models/llama3/state_dict_adapter.py from_hf_map, 2026: QKVLinear's
# attention.qkv_linear.w{q,k,v}, lm_head); q/k rows interleaved (ComplexRoPE: its to_hf permutes them).
_LLAMA_TITAN = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.qkv_linear.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.qkv_linear.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.qkv_linear.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
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
_MIXTRAL_META = {**{k: v for k, v in _LLAMA_META.items() if ".mlp." not in k},
    "model.layers.{}.block_sparse_moe.gate.weight": "layers.{}.feed_forward.gate.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight": "layers.{}.feed_forward.experts.{}.w1.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w2.weight": "layers.{}.feed_forward.experts.{}.w2.weight",
    "model.layers.{}.block_sparse_moe.experts.{}.w3.weight": "layers.{}.feed_forward.experts.{}.w3.weight"}




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
        if min(len(self.hf), len(self.other)) != 1 or len(self.hf) == len(self.other):
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


_LLAMA_LITGPT_FUSED: tuple[Fused, ...] = (
    Fused(hf=("model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.k_proj",
              "model.layers.{}.self_attn.v_proj"),
          other=("transformer.h.{}.attn.qkv",), rows="qkv"),)
_PHI3_TUNE_FUSED: tuple[Fused, ...] = (
    Fused(hf=("model.layers.{}.self_attn.qkv_proj",),
          other=("layers.{}.attn.q_proj", "layers.{}.attn.k_proj", "layers.{}.attn.v_proj"), rows="qkv"),
    Fused(hf=("model.layers.{}.mlp.gate_up_proj",), other=("layers.{}.mlp.w1", "layers.{}.mlp.w3"), rows="equal"),
)
# mlx-lm stacks MoE experts into one SwitchLinear (``switch_mlp``): mlx template -> HF per-expert
# template (the expert index is the last "{}"); mlx_lm/models/{mixtral,qwen2_moe,qwen3_moe}.py sanitize().
_MIXTRAL_MLX_EXPERTS = {f"model.layers.{{}}.block_sparse_moe.switch_mlp.{mlx}":
                        f"model.layers.{{}}.block_sparse_moe.experts.{{}}.{hf}"
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
        return scheme in ("meta", "torchtitan") or (scheme == "torchtune" and self.torchtune_interleaved)


_LITGPT = {"litgpt": _LLAMA_LITGPT}
_LITGPT_FUSED: dict[str, tuple[Fused, ...]] = {"litgpt": _LLAMA_LITGPT_FUSED}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), {"torchtune": _LLAMA_TUNE, "meta": _LLAMA_META, "torchtitan": _LLAMA_TITAN, **_LITGPT},
           fused=_LITGPT_FUSED),
    Family("mistral", ("mistral",), {"torchtune": _LLAMA_TUNE, "meta": _LLAMA_META, **_LITGPT}, fused=_LITGPT_FUSED),
    Family("mixtral", ("mixtral",), {"meta": _MIXTRAL_META}, stacked_experts=_MIXTRAL_MLX_EXPERTS),
    Family("qwen2", ("qwen2",), {"torchtune": _QWEN2_TUNE, **_LITGPT}, torchtune_interleaved=False,
           fused=_LITGPT_FUSED),
    Family("qwen3", ("qwen3",), {"torchtune": _LLAMA_TUNE}, torchtune_interleaved=False),
    Family("qwen2_moe", ("qwen2_moe",), {}, stacked_experts=_QWEN_MOE_MLX_EXPERTS),
    Family("qwen3_moe", ("qwen3_moe",), {}, stacked_experts=_QWEN_MOE_MLX_EXPERTS),
    Family("phi3", ("phi3",), {"torchtune": _PHI3_TUNE}, torchtune_interleaved=False,
           fused={"torchtune": _PHI3_TUNE_FUSED}),
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
