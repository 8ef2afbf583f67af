"""Writing a llama.cpp LoRA GGUF the way ``convert_lora_to_gguf.py`` does: the tensor list in the
converter's order (stacked MoE experts included) and its KV entries (gguf-py's own ``Metadata`` and
``GGUFWriter`` build them, so the ``general.*`` heuristics are llama.cpp's)."""

from __future__ import annotations

import ctypes
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..errors import UnsupportedAdapterError, quote_list
from ..families import ModelConfig
from ..io.gguf import KV, GgufValue
from .gguf_names import GgufNames

if TYPE_CHECKING:
    import torch

__all__ = ["GGML_TYPES", "Tensors", "gguf_kv", "gguf_tensors"]

#: torch dtype name -> ggml type written
GGML_TYPES = {"float32": 0, "float16": 1, "bfloat16": 30}
_BLK = re.compile(r"^blk\.(\d+)\.")

Tensors = list[tuple[str, tuple[int, ...], int, int, Any]]


def _peft_order(names: list[str], adapter: Adapter) -> list[str]:
    """Modules in the order the converter meets them: first key in sorted PEFT key order."""
    def first(n: str) -> str:
        return f"base_model.model.{n}." + ("lora_embedding_A" if adapter.modules[n].kind == "embedding"
                                           else "lora_A.weight")
    return sorted(names, key=first)


def _raw(t: torch.Tensor) -> Any:
    """A callable returning ``t``'s bytes (zero-copy view of a contiguous tensor)."""
    t = t.contiguous()
    return lambda: memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


def _entry(name: str, t: torch.Tensor) -> tuple[str, tuple[int, ...], int, int, Any]:
    return (name, tuple(t.shape), GGML_TYPES[str(t.dtype).removeprefix("torch.")], t.numel() * t.element_size(),
            _raw(t))


def gguf_tensors(adapter: Adapter, names: GgufNames, cfg: ModelConfig | None) -> Tensors:
    """(name, shape, ggml type, nbytes, data) of every tensor, in the converter's order: pairs as
    their modules come, a layer's stacked experts when its last expert comes (in the converter's
    projection order)."""
    import torch

    experts: dict[str, dict[int, str]] = {}  # stacked gguf tensor -> expert index -> module
    for n in adapter.modules:
        if (hit := names.expert(n)) is not None:
            experts.setdefault(hit[0], {})[hit[1]] = n
    layer_of = {mod: _BLK.match(g)[1] for g, d in experts.items() for mod in d.values()}  # type: ignore[index]
    order = _peft_order(list(adapter.modules), adapter)
    last = {layer_of[n]: n for n in order if n in layer_of}
    out: Tensors = []
    unnamed = []
    for n in order:
        m = adapter.modules[n]
        if n in layer_of:
            if last[layer_of[n]] == n:
                out += _stacked(adapter, names, experts, layer_of[n], cfg, torch)
            continue
        g = names.modules.to_other(n)
        if g is None:
            unnamed.append(n)
            continue
        A = m.A.T if m.kind == "embedding" else m.A  # llm_build_inp_embd takes token_embd's lora_a transposed
        out += [_entry(f"{g}.lora_a", A), _entry(f"{g}.lora_b", m.B)]
    if unnamed:
        raise UnsupportedAdapterError(
            f"{len(unnamed)} module(s) have no llama.cpp {names.arch} tensor name ({quote_list(unnamed, 3)}); "
            f"llama.cpp's {names.family} models have {quote_list(list(names.modules.table), 4)}", layout="gguf")
    return out


def _stacked(adapter: Adapter, names: GgufNames, experts: dict[str, dict[int, str]], layer: str,
             cfg: ModelConfig | None, torch: Any) -> Tensors:
    out: Tensors = []
    for w in names.expert_order:
        for g, d in experts.items():
            if _BLK.match(g)[1] != layer or not next(iter(d.values())).endswith("." + w):  # type: ignore[index]
                continue
            n_exp = cfg.n_experts if cfg and cfg.n_experts else max(d) + 1
            if sorted(d) != list(range(n_exp)):
                raise UnsupportedAdapterError(
                    f"{g}: LoRA on experts {sorted(d)} of {n_exp}; llama.cpp stacks every expert of a layer into one "
                    "tensor pair (the converter needs all of them); merge the adapter instead", layout="gguf")
            mods = [adapter.modules[d[e]] for e in range(n_exp)]
            r = max(m.rank for m in mods)
            mods = [m.padded(r) for m in mods]  # one rank per stacked tensor: zero padding is exact
            out += [_entry(f"{g}.lora_a", torch.stack([m.A for m in mods])),
                    _entry(f"{g}.lora_b", torch.stack([m.B for m in mods]))]
    return out


def _total_params(tensors: Tensors) -> int:
    """gguf-py's GGUFWriter.get_total_parameter_count()[0] for these tensors (Metadata's size heuristics)."""
    total, last_a = 0, None
    for name, shape, *_ in tensors:
        if name.endswith(".lora_a"):
            last_a = (name, shape)
            continue
        if name.endswith(".lora_b") and last_a is not None and last_a[0] == name[:-1] + "a":
            shape = (*shape[:-1], last_a[1][-1])
        size = 1
        for d in shape:
            size *= d
        total += size
    return -total if last_a is not None else total


def gguf_kv(adapter: Adapter, names: GgufNames, tensors: Tensors, *, alpha: float,
        base_config: ModelConfig | None) -> KV:
    """The KV entries convert_lora_to_gguf.py writes: general.architecture, general.type, adapter.type,
    gguf-py Metadata's general.* (from the adapter directory; a GGUF source's own kept), the FLOAT32
    alpha, alora_invocation_tokens, general.quantization_version."""
    import gguf

    quiet = logging.getLogger("gguf.gguf_writer")
    level, quiet.level = quiet.level, logging.WARNING  # its "for Little Endian only" note on every writer
    try:
        w = gguf.GGUFWriter(None, names.arch)
    finally:
        quiet.setLevel(level)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    cfg = adapter.meta.config or {}
    if adapter.meta.source_layout == "gguf":
        skip = {"general.architecture", "general.type", "general.quantization_version", "general.alignment"}
        kept: KV = {k: v for k, v in cfg.items() if k.startswith("general.") and k not in skip}
    else:
        src = Path(adapter.meta.source_path or ".")
        root = src if src.is_dir() else src.parent
        meta = gguf.Metadata.load(None, root, None, _total_params(tensors))
        if meta.name is None:
            meta.name = Path(base_config.source).parent.name if base_config and base_config.source else root.name
        meta.set_gguf_meta_model(w)
        kept = {}
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    tokens = cfg.get("alora_invocation_tokens")
    tokens = tokens.value if isinstance(tokens, GgufValue) else tokens
    if isinstance(tokens, list) and tokens:
        w.add_key_value(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, tokens, gguf.GGUFValueType.ARRAY,
                        gguf.GGUFValueType.UINT32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kv: KV = {}
    for key, v in w.kv_data[0].items():
        if key == gguf.Keys.Adapter.LORA_ALPHA:
            kv.update(kept)
        sub = v.sub_type if v.sub_type is not None else (gguf.GGUFValueType.get_type(v.value[0])
                                                         if v.type == gguf.GGUFValueType.ARRAY else None)
        kv[key] = GgufValue(v.value, int(v.type), None if sub is None else int(sub))
    return kv
