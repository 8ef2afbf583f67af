"""llama.cpp's GGUF tensor names for LoRA modules, per base architecture.

The HF module templates of a family come from the families table (:mod:`.tables`:
the HF side of its name maps, its fused entries and its stacked MoE experts; a generic decoder
list for families without maps); their GGUF names come from gguf-py's own ``TensorNameMap`` for
the architecture llama.cpp uses, so the names are llama.cpp's, never re-typed here. What the
reference converter (``convert_lora_to_gguf.py`` with ``conversion/``) does beyond naming is
data here too: which architectures get the Llama q/k row permutation, and in which order the
stacked expert tensors of a layer are written; and the KV entries it writes (:func:`adapter_kv`,
built by gguf-py's own ``GGUFWriter`` and ``Metadata``).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import LayoutError, UnsupportedAdapterError
from ..io.gguf import KV, GgufValue
from .names import NameMap, parse_layer, template_regex
from .tables import FAMILIES

__all__ = ["ARCHES", "GgufNames", "adapter_kv", "family_for_arch", "gguf_names", "total_parameters"]

#: lora-ckpt family -> llama.cpp architecture (``general.architecture``), as conversion/ registers
#: the HF classes: Mistral and Mixtral convert as ``llama`` (conversion/llama.py LlamaModel)
ARCHES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
    "phi3": "phi3",
}
#: the family read for a GGUF without a base config (per architecture; ``llama`` with experts reads as mixtral)
_DEFAULT_FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                   "qwen3moe": "qwen3_moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}
#: architectures whose q/k rows the converter permutes to Meta order (LlamaModel.undo_permute)
PERMUTED = frozenset({"llama"})
#: the order the converter writes one layer's stacked experts (conversion/llama.py, conversion/qwen.py)
_EXPERT_ORDER = {"mixtral": ("w1", "w2", "w3"), "qwen2_moe": ("down_proj", "gate_proj", "up_proj"),
                 "qwen3_moe": ("down_proj", "gate_proj", "up_proj")}
# HF module templates of a Llama-style *ForCausalLM, for families whose table has no name map
_DECODER = ("model.embed_tokens", "lm_head", *(f"model.layers.{{}}.self_attn.{p}_proj" for p in "qkvo"),
            *(f"model.layers.{{}}.mlp.{p}_proj" for p in ("gate", "up", "down")), "model.layers.{}.mlp.gate",
            *(f"model.layers.{{}}.mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down")),
            "model.layers.{}.mlp.shared_expert_gate")
_EXPERT = re.compile(r"\.experts\.\{\}\.")  # the expert index of a per-expert template


@dataclass(frozen=True)
class GgufNames:
    """One family's GGUF names: ``modules`` maps HF module templates to GGUF base tensor names
    (``model.layers.{}.self_attn.q_proj`` -> ``blk.{}.attn_q.weight``); ``experts`` maps a
    per-expert HF template (layer, expert) to its stacked GGUF tensor (``blk.{}.ffn_gate_exps.weight``)."""

    family: str
    arch: str
    modules: NameMap
    experts: dict[str, str]
    expert_order: tuple[str, ...]

    @property
    def permuted(self) -> bool:
        return self.arch in PERMUTED

    def expert(self, hf_module: str) -> tuple[str, int] | None:
        """(stacked GGUF tensor, expert index) of a per-expert HF module, else None."""
        for hf, g in self.experts.items():
            m = template_regex(hf).fullmatch(hf_module)
            if m:
                return g.format(m[1]), int(m[2])
        return None

    def expert_modules(self, tensor: str, n: int) -> list[str] | None:
        """The per-expert HF modules 0..n-1 a stacked GGUF tensor holds, else None."""
        for hf, g in self.experts.items():
            m = template_regex(g).fullmatch(tensor)
            if m:
                return [hf.replace("{}", m[1], 1).replace("{}", str(e)) for e in range(n)]
        return None

    @staticmethod
    def block(tensor: str) -> int | None:
        """The block index of a GGUF tensor name (``blk.3.attn_q.weight`` -> 3)."""
        layer = parse_layer(tensor, containers=("blk",))
        return layer.number if layer else None


def _templates(family: str) -> list[str]:
    fam = FAMILIES[family]
    out: list[str] = [k[: -len(".weight")] for table in fam.maps.values() for k in table if k.endswith(".weight")]
    out += [t for entries in fam.fused.values() for fe in entries if fe.fused_in_hf for t in fe.hf]
    if not fam.maps:
        out += _DECODER
    return [t for t in dict.fromkeys(out) if "norm" not in t.rsplit(".", 1)[-1]]  # norms are never LoRA targets


@cache
def gguf_names(family: str) -> GgufNames:
    """The GGUF names of ``family`` (a key of :data:`lora_ckpt.families.FAMILIES`).

    Raises:
        UnsupportedAdapterError: lora-ckpt does not know llama.cpp's architecture for the family.
        LayoutError: the ``gguf`` package (``pip install 'lora-ckpt[gguf]'``) is missing.
    """
    if family not in ARCHES:
        raise UnsupportedAdapterError(
            f"lora-ckpt does not know llama.cpp's GGUF architecture for model family {family!r}; expected one of "
            f"{', '.join(sorted(ARCHES))}; merge the adapter instead", layout="gguf")
    try:
        import gguf
    except ImportError as e:
        raise LayoutError("the gguf layout needs llama.cpp's gguf package; pip install 'lora-ckpt[gguf]'",
                          layout="gguf") from e
    arch_name = ARCHES[family]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    tmap = gguf.TensorNameMap(arch, 1)

    def name(template: str) -> str | None:
        got = tmap.get_name(template.replace("{}", "0"))
        return got.replace("blk.0.", "blk.{}.") + ".weight" if got else None

    modules = {t: n for t in _templates(family) if not _EXPERT.search(t) and (n := name(t))}
    experts = {t: n for t in FAMILIES[family].stacked_experts.values() if (n := name(_EXPERT.sub(".experts.", t)))}
    order = tuple(w for w in _EXPERT_ORDER.get(family, ()) if any(t.endswith("." + w) for t in experts))
    return GgufNames(family, arch_name, NameMap(modules), experts, order)


def family_for_arch(arch: str, *, experts: bool = False) -> str:
    """The family to read a GGUF of architecture ``arch`` as, without a base config.

    Raises:
        UnsupportedAdapterError: an architecture lora-ckpt cannot name.
    """
    if arch not in _DEFAULT_FAMILY:
        raise UnsupportedAdapterError(
            f"GGUF architecture {arch!r} is not one lora-ckpt can name; expected one of "
            f"{', '.join(sorted(_DEFAULT_FAMILY))}", layout="gguf")
    return "mixtral" if arch == "llama" and experts else _DEFAULT_FAMILY[arch]


def total_parameters(tensors: Iterable[tuple[str, tuple[int, ...]]]) -> int:
    """gguf-py's ``GGUFWriter.get_total_parameter_count()[0]`` for (name, shape) in file order (negative
    for LoRA: the base weights' size, which gguf-py's ``Metadata`` uses for its size heuristics)."""
    total, last_a = 0, None
    for name, shape in tensors:
        if name.endswith(".lora_a"):
            last_a = (name, shape)
            continue
        if name.endswith(".lora_b") and last_a is not None and last_a[0] == name[:-1] + "a":
            shape = (*shape[:-1], last_a[1][-1])
        total += math.prod(shape)
    return -total if last_a is not None else total


def adapter_kv(*, arch: str, alpha: float, card_dir: str | os.PathLike[str] | None, fallback_name: str,
               total_params: int, kept: KV | None = None, alora_tokens: list[int] | None = None) -> KV:
    """The KV entries ``convert_lora_to_gguf.py`` writes, built by gguf-py's own ``GGUFWriter`` and
    ``Metadata``: general.architecture, general.type, adapter.type, the ``general.*`` metadata
    gguf-py derives from ``card_dir`` (its README model card and name; ``kept`` instead when given),
    adapter.lora.alpha as FLOAT32, adapter.alora.invocation_tokens, general.quantization_version.

    Raises:
        ImportError: the ``gguf`` package is missing.
    """
    import gguf  # the optional dependency (lora-ckpt[gguf]): imported only when a GGUF is written

    quiet = logging.getLogger("gguf.gguf_writer")
    level, quiet.level = quiet.level, logging.WARNING  # its "for Little Endian only" note on every writer
    try:
        w = gguf.GGUFWriter(None, arch)
    finally:
        quiet.setLevel(level)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if kept is None:
        meta = gguf.Metadata.load(None, None if card_dir is None else Path(card_dir), None, total_params)
        meta.name = meta.name if meta.name is not None else fallback_name
        meta.set_gguf_meta_model(w)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if alora_tokens:
        w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, alora_tokens, gguf.GGUFValueType.ARRAY,
                        gguf.GGUFValueType.UINT32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kv: KV = {}
    for key, v in w.kv_data[0].items():
        if key == gguf.Keys.Adapter.LORA_ALPHA and kept:
            kv.update(kept)
        sub = v.sub_type if v.sub_type is not None else (gguf.GGUFValueType.get_type(v.value[0])
                                                         if v.type == gguf.GGUFValueType.ARRAY else None)
        kv[key] = GgufValue(v.value, int(v.type), None if sub is None else int(sub))
    return kv
