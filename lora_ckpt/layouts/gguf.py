"""llama.cpp's LoRA GGUF: one ``.gguf`` file, byte for byte what ``convert_lora_to_gguf.py`` writes.

KV (:func:`lora_ckpt.families.gguf.adapter_kv`): architecture, ``general.type = "adapter"``, ``adapter.type
= "lora"``, gguf-py's ``general.*`` metadata, ``adapter.lora.alpha`` as FLOAT32 (FLOAT64 makes llama.cpp
abort). Tensors ``<gguf name>.lora_a`` (r, in) / ``.lora_b`` (out, r) in torch order, ``token_embd``'s
lora_a transposed, Llama q/k lora_b rows in Meta order, MoE experts stacked, F32 (or F16/BF16).
llama.cpp scales a pair by ``alpha / rank(lora_b)`` (1 if alpha is 0): per-module ranks are kept,
other scales (rsLoRA, ``alpha_pattern``) folded into lora_b; DoRA, biases and full tensors refused.

:func:`llamacpp_rules` is the one rule set ``convert --to gguf`` and ``check --for llama.cpp`` share.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..adapter import Adapter, AdapterMeta, ModuleLoRA, alpha_for
from ..errors import (
    AmbiguousCheckpointError,
    ConfigError,
    IncompleteAdapterError,
    LayoutError,
    MissingConfigError,
    UnsupportedAdapterError,
    quote_list,
)
from ..families import FAMILIES, ModelConfig, load_model_config
from ..families.gguf import GgufNames, adapter_kv, family_for_arch, gguf_names, total_parameters
from ..io import TensorMeta
from ..io.gguf import (
    FLOAT32,
    GGML_TYPES,
    KV,
    GgufFile,
    GgufValue,
    TensorEntry,
    is_gguf,
    load_gguf_tensors,
    read_gguf_header,
    tensor_entry,
    write_gguf,
)
from ..rope import interleaved_to_rotate_half, rotate_half_to_interleaved
from .base import Layout, ReadOptions, Source, WriteOptions
from .spec import Detection, Role, ScalePolicy

if TYPE_CHECKING:
    pass

__all__ = ["GgufLayout", "LlamaCppRules", "llamacpp_rules"]

logger = logging.getLogger(__name__)

_PAIR = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[ab])$")
Tensors = list[TensorEntry]


@dataclass
class LlamaCppRules:
    """What llama.cpp can apply of an adapter: ``refused`` parts (DoRA, biases, full tensors ...)
    with the modules or keys they concern, the one ``alpha`` written, and the modules whose scale
    is not ``alpha / rank`` (``folded`` into lora_b on conversion)."""

    refused: dict[str, list[str]] = field(default_factory=dict)
    alpha: float = 0.0
    folded: list[str] = field(default_factory=list)
    base_copies: list[str] = field(default_factory=list)  # PEFT's copies of base embeddings: not the adapter's


def llamacpp_rules(adapter: Adapter) -> LlamaCppRules:
    """The one rule set of ``convert --to gguf`` and ``check --for llama.cpp`` (what llama.cpp's
    loader applies: lora_a/lora_b pairs scaled by ``alpha / rank(lora_b)``)."""
    rules = LlamaCppRules()
    dora = [n for n, m in adapter.modules.items() if m.magnitude is not None]
    bias = [n for n, m in adapter.modules.items() if m.bias is not None]
    fifo = [n for n, m in adapter.modules.items() if m.fan_in_fan_out]
    rules.base_copies = [k for k in adapter.extra if ".base_layer." in k]
    full = [k for k in adapter.extra if ".base_layer." not in k]
    for what, names in (("DoRA magnitudes", dora), ("LoRA biases (lora_B.bias)", bias),
                        ("full tensors (modules_to_save)", full), ("fan_in_fan_out (Conv1D) modules", fifo)):
        if names:
            rules.refused[what] = names
    # alpha = the most common scale*rank (exact for PEFT's alpha/r); 0 when every scale is 1 (no alpha)
    products = {n: float(alpha_for(m.scale, m.rank)) for n, m in adapter.modules.items()}
    rules.alpha = Counter(products.values()).most_common(1)[0][0] if products else 0.0
    alpha32 = ctypes.c_float(rules.alpha).value
    rules.folded = [n for n, p in products.items() if abs(p - alpha32) > 1e-7 * max(abs(p), abs(alpha32))]
    return rules


@dataclass
class GgufSource(Source):
    """A ``.gguf`` file: its header parsed once; tensors memory-mapped on demand."""

    _header: GgufFile | None = field(default=None, repr=False)

    @property
    def header(self) -> GgufFile:
        if self._header is None:
            self._header = read_gguf_header(self.weights)
        return self._header

    @property
    def index(self) -> dict[str, TensorMeta]:
        return {n: TensorMeta(t.shape, t.dtype) for n, t in self.header.tensors.items()}

    @property
    def tensors(self) -> dict[str, Any]:
        if self.shapes_only:
            return self.index
        if self._tensors is None:
            self._tensors = load_gguf_tensors(self.header)
        return self._tensors


class GgufLayout(Layout):
    name = "gguf"
    summary = "llama.cpp LoRA adapter .gguf (convert_lora_to_gguf.py's output; Ollama ADAPTER, llama-cli --lora)"
    weight_files = ("adapter_model.gguf",)
    single_file = ".gguf"
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_a", "B": "lora_b"}
    features = frozenset({"embedding"})
    scale_policy = ScalePolicy.ALPHA_OVER_RANK

    def locate(self, path: Path) -> Source | None:
        if path.is_file():
            return GgufSource(path=path, root=path.parent, weights=path) if is_gguf(path) else None
        found = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(found) > 1:
            raise AmbiguousCheckpointError(f"{path}: {len(found)} .gguf files ({quote_list(f.name for f in found)}); "
                                           "pass the file itself", path=path, candidates=[f.name for f in found])
        return GgufSource(path=path, root=path, weights=found[0]) if found else None

    def weight_file_in(self, names: list[str]) -> str | None:  # the one *.gguf of a Hub folder
        return found[0] if len(found := [n for n in names if n.endswith(".gguf") and "/" not in n]) == 1 else None

    def detect(self, src: Source) -> Detection | None:
        h = src.header  # type: ignore[attr-defined]
        kind, lora = h.get("general.type"), h.get("adapter.type")
        if kind != "adapter" or lora != "lora":
            raise UnsupportedAdapterError(
                f"{src.weights}: a GGUF {kind or 'model'!s} (general.type {kind!r}, adapter.type {lora!r}), not a "
                "LoRA adapter; lora-ckpt reads llama.cpp LoRA adapters (general.type 'adapter', adapter.type 'lora')",
                layout=self.name, path=str(src.weights))
        arch = h.get("general.architecture")
        return Detection(3, f"GGUF with general.type 'adapter', adapter.type 'lora', architecture {arch!r}")

    def read(self, src: Source, opts: ReadOptions) -> Adapter:
        h: GgufFile = src.header  # type: ignore[attr-defined]
        self.detect(src)
        arch = h.get("general.architecture")
        if not isinstance(arch, str):
            raise ConfigError(f"{src.weights}: no general.architecture; llama.cpp cannot load it either",
                              path=src.weights)
        alpha_kv = h.kv.get("adapter.lora.alpha")
        notes = []
        if opts.alpha is not None:
            alpha = float(opts.alpha)
        elif alpha_kv is None or isinstance(alpha_kv.value, (str, list, bool)):
            found = alpha_kv.value if alpha_kv is not None else None
            raise MissingConfigError(f"{src.weights}: no numeric adapter.lora.alpha (found {found!r}); llama.cpp "
                                     "would apply scale 1; pass --alpha with the training alpha")
        else:
            alpha = float(alpha_kv.value)
            if alpha_kv.type != FLOAT32:
                notes.append(f"adapter.lora.alpha is stored as GGUF type {alpha_kv.type}, not FLOAT32: llama.cpp "
                             "aborts on load; convert --to gguf rewrites it as FLOAT32")
        pairs: dict[str, dict[str, Any]] = {}
        other = []
        for key, t in src.tensors.items():
            hit = _PAIR.match(key)
            if hit:
                pairs.setdefault(hit["base"], {})[hit["ab"]] = t
            else:
                other.append(key)
        if other:
            raise UnsupportedAdapterError(
                f"{src.weights}: {len(other)} tensor(s) are not lora_a/lora_b pairs ({quote_list(other, 3)}); "
                "lora-ckpt reads LoRA pairs only", layout=self.name, path=str(src.weights))
        if not pairs:
            raise LayoutError(f"{src.weights}: no lora_a/lora_b tensors; the adapter is empty", layout=self.name,
                              path=str(src.weights))
        cfg, base = _model_config(src, h, opts)
        family = family_for_arch(arch, experts=any(t.dim() == 3 for p in pairs.values() for t in p.values()))
        family = cfg.family.name if cfg and cfg.family else family
        names = gguf_names(family)
        if names.arch != arch:
            raise ConfigError(f"{src.weights}: architecture {arch!r} but the base config is {family!r} "
                              f"(llama.cpp architecture {names.arch!r}); pass the base model's own config",
                              path=src.weights)
        modules: dict[str, ModuleLoRA] = {}
        for tname, p in pairs.items():
            if "a" not in p or "b" not in p:
                have, miss = ("lora_a", "lora_b") if "a" in p else ("lora_b", "lora_a")
                raise IncompleteAdapterError(f"{src.weights}: {tname}.{have} has no {tname}.{miss}; expected both; "
                                             "the adapter file is incomplete", key=f"{tname}.{miss}")
            for name, mod in _modules(src, names, tname, p["a"], p["b"]).items():
                mod.scale = alpha / mod.B.shape[1] if alpha else 1.0
                modules[name] = mod
        adapter = Adapter(modules, meta=AdapterMeta(
            base_model=base, family=family, source_layout=self.name, source_path=str(src.path), model_config=cfg,
            config={k: [v.value, v.type, v.sub_type] for k, v in h.kv.items()}, notes=notes))  # JSON-able KV
        if names.permuted and not src.shapes_only:
            _permute(adapter, cfg, to_hf=True)
        if cfg is not None:
            cfg.check_modules(adapter.modules, source=str(src.path))
        adapter.check()
        return adapter

    def lossy_parts(self, adapter: Adapter) -> list[str]:
        return [f"{what} ({quote_list(names, 3)})" for what, names in llamacpp_rules(adapter).refused.items()]

    def drop_unsupported(self, adapter: Adapter, *, allow_lossy: bool) -> Adapter:
        """PEFT's copies of base embeddings (``*.base_layer.weight``) are not written (the converter
        skips them too); the rest as the lossy policy says."""
        copies = llamacpp_rules(adapter).base_copies
        if copies:
            logger.info("not written: %s (PEFT's copy of the base embedding; convert_lora_to_gguf.py skips it too)",
                        quote_list(copies, 2))
            adapter = replace(adapter, extra={k: v for k, v in adapter.extra.items() if k not in copies})
        return super().drop_unsupported(adapter, allow_lossy=allow_lossy)

    def prepare(self, adapter: Adapter, opts: WriteOptions) -> Adapter:
        adapter = self.expert_form_for(adapter, opts)  # fused (target_parameters) experts -> per-expert modules
        rules = llamacpp_rules(adapter)
        adapter = self.drop_unsupported(adapter, allow_lossy=opts.allow_lossy)
        dtype = opts.dtype
        if dtype is not None and str(dtype).removeprefix("torch.") not in GGML_TYPES:
            raise ConfigError(f"--dtype {dtype}: GGUF adapters are written as float32, float16 or bfloat16")
        adapter = adapter.cast(dtype)  # dtypes kept unless asked (the reference's default is --outtype f32)
        if any(str(t.dtype).removeprefix("torch.") not in GGML_TYPES for m in adapter.modules.values()
               for t in (m.A, m.B)):  # float64 ...: float32, as the converter does
            import torch

            adapter = adapter.cast(torch.float32)
        alpha = ctypes.c_float(rules.alpha).value
        if rules.folded:
            logger.info("llama.cpp scales by alpha/rank (alpha %g): %d module(s) with another scale (rsLoRA, "
                        "alpha_pattern) have it folded into lora_b (exact up to float32 rounding)", alpha,
                        len(rules.folded))
        mods = {n: (m.rescaled(alpha / m.rank if alpha else 1.0) if n in rules.folded else
                    replace(m, scale=alpha / m.rank if alpha else 1.0)) for n, m in adapter.modules.items()}
        return replace(adapter, modules=mods)

    def write(self, adapter: Adapter, out: Path, opts: WriteOptions) -> Adapter:
        adapter = self.expert_form_for(adapter, opts)
        alpha = ctypes.c_float(llamacpp_rules(adapter).alpha).value  # what prepare folds to
        adapter = self.prepare(adapter, opts)
        cfg = opts.base_config or adapter.meta.model_config
        family = cfg.family.name if cfg and cfg.family else adapter.meta.family
        if family is None or family not in FAMILIES:
            raise MissingConfigError("the GGUF architecture and tensor names come from the base model's family; "
                                     "pass --base-config with the base model's config.json")
        names = gguf_names(family)
        work = Adapter({n: replace(m) for n, m in adapter.modules.items()}, meta=adapter.meta)
        if names.permuted:
            _permute(work, cfg, to_hf=False)
        tensors = _tensors(work, names, cfg)
        if not out.is_file():  # a folder (push): the file inside it
            out.mkdir(parents=True, exist_ok=True)
            out = out / self.weight_files[0]
        write_gguf(out, _kv(adapter, names, tensors, alpha=alpha, base_config=cfg), tensors)
        return adapter


def _model_config(src: Source, h: GgufFile, opts: ReadOptions) -> tuple[ModelConfig | None, str | None]:
    """The base config (``--base-config``, else a local ``general.base_model.0.repo_url``) and that id."""
    url = h.get("general.base_model.0.repo_url")
    base = url.removeprefix("https://huggingface.co/") if isinstance(url, str) else None
    if opts.base_config is not None:
        return opts.base_config, base
    if base and (Path(base) / "config.json").is_file():
        return load_model_config(Path(base) / "config.json"), base
    return None, base


def _modules(src: Source, names: GgufNames, tname: str, a: Any, b: Any) -> dict[str, ModuleLoRA]:
    """The canonical module(s) of one lora_a/lora_b pair (a stacked expert tensor holds many)."""
    hf = names.modules.to_hf(tname)
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        mods = names.expert_modules(tname, a.shape[0])
        if mods is None:
            raise UnsupportedAdapterError(f"{src.weights}: stacked tensor {tname!r} is no {names.arch} expert tensor "
                                          "lora-ckpt can name", layout="gguf", path=str(src.weights))
        def expert(t: Any, e: int) -> Any:  # a view of one expert (its shape only when inspecting)
            return TensorMeta(t.shape[1:], t.dtype) if isinstance(t, TensorMeta) else t[e]
        return {name: ModuleLoRA(A=expert(a, e), B=expert(b, e), scale=1.0) for e, name in enumerate(mods)}
    if hf is None:
        raise UnsupportedAdapterError(
            f"{src.weights}: tensor {tname!r} names no {names.family} module lora-ckpt knows (expected names like "
            f"{quote_list(list(names.modules.table.values())[:3])})", layout="gguf", path=str(src.weights))
    if a.dim() != 2 or b.dim() != 2:
        raise UnsupportedAdapterError(f"{src.weights}: {tname} lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)}; "
                                      "expected 2-D factors", layout="gguf", path=str(src.weights))
    if tname == "token_embd.weight":  # llama.cpp's llm_build_inp_embd takes lora_a transposed
        return {hf: ModuleLoRA(A=a.T, B=b, scale=1.0, kind="embedding")}
    return {hf: ModuleLoRA(A=a, B=b, scale=1.0)}


def _permute(adapter: Adapter, cfg: ModelConfig | None, *, to_hf: bool) -> None:
    """The converter's Llama q/k row permutation of lora_b (LlamaModel.permute: heads = n_head for q,
    n_kv_head for k; head size from the rows)."""
    qk = [n for n in adapter.modules if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj")]
    if not qk:
        return
    if cfg is None:
        raise MissingConfigError(
            f"llama.cpp stores Llama q/k rows in Meta order and re-ordering them needs the head counts, which a GGUF "
            f"adapter does not record; modules {quote_list(qk, 2)}; pass --base-config with the base model's "
            "config.json")
    perm = interleaved_to_rotate_half if to_hf else rotate_half_to_interleaved
    for name in qk:
        m = adapter.modules[name]
        n = cfg.n_heads if name.endswith("q_proj") else cfg.n_kv_heads
        m.B = perm(m.B, n, m.B.shape[0] // n)


def _peft_order(names: list[str], adapter: Adapter) -> list[str]:
    """Modules in the order the converter meets them: first key in sorted PEFT key order."""
    def first(n: str) -> str:
        return f"base_model.model.{n}." + ("lora_embedding_A" if adapter.modules[n].kind == "embedding"
                                           else "lora_A.weight")
    return sorted(names, key=first)


def _tensors(adapter: Adapter, names: GgufNames, cfg: ModelConfig | None) -> Tensors:
    """(name, shape, ggml type, nbytes, data) of every tensor, in the converter's order: pairs as
    their modules come, a layer's stacked experts when its last expert comes (in the converter's
    projection order)."""
    import torch

    experts: dict[str, dict[int, str]] = {}  # stacked gguf tensor -> expert index -> module
    for n in adapter.modules:
        if (hit := names.expert(n)) is not None:
            experts.setdefault(hit[0], {})[hit[1]] = n
    layer_of = {mod: names.block(g) for g, d in experts.items() for mod in d.values()}
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
        out += [tensor_entry(f"{g}.lora_a", A), tensor_entry(f"{g}.lora_b", m.B)]
    if unnamed:
        raise UnsupportedAdapterError(
            f"{len(unnamed)} module(s) have no llama.cpp {names.arch} tensor name ({quote_list(unnamed, 3)}); "
            f"llama.cpp's {names.family} models have {quote_list(list(names.modules.table), 4)}", layout="gguf")
    return out


def _stacked(adapter: Adapter, names: GgufNames, experts: dict[str, dict[int, str]], layer: int | None,
             cfg: ModelConfig | None, torch: Any) -> Tensors:
    out: Tensors = []
    for w in names.expert_order:
        for g, d in experts.items():
            if names.block(g) != layer or not next(iter(d.values())).endswith("." + w):
                continue
            n_exp = cfg.n_experts if cfg and cfg.n_experts else max(d) + 1
            if sorted(d) != list(range(n_exp)):
                raise UnsupportedAdapterError(
                    f"{g}: LoRA on experts {sorted(d)} of {n_exp}; llama.cpp stacks every expert of a layer into one "
                    "tensor pair (the converter needs all of them); merge the adapter instead", layout="gguf")
            mods = [adapter.modules[d[e]] for e in range(n_exp)]
            r = max(m.rank for m in mods)
            mods = [m.padded(r) for m in mods]  # one rank per stacked tensor: zero padding is exact
            out += [tensor_entry(f"{g}.lora_a", torch.stack([m.A for m in mods])),
                    tensor_entry(f"{g}.lora_b", torch.stack([m.B for m in mods]))]
    return out


def _kv(adapter: Adapter, names: GgufNames, tensors: Tensors, *, alpha: float, base_config: ModelConfig | None) -> KV:
    """The converter's KV (:func:`lora_ckpt.families.gguf.adapter_kv`): metadata from the source directory
    (the name of the base config's folder when gguf-py finds none), a GGUF source's own kept."""
    cfg = adapter.meta.config or {}
    src = Path(adapter.meta.source_path or ".")
    root = src if src.is_dir() else src.parent
    if adapter.meta.source_layout == "gguf":  # its KV as read: [value, type, sub_type]
        skip = {"general.architecture", "general.type", "general.quantization_version", "general.alignment"}
        kept: KV | None = {k: GgufValue(*v) for k, v in cfg.items() if k.startswith("general.") and k not in skip}
        tokens = (cfg.get("adapter.alora.invocation_tokens") or [None])[0]
    else:
        kept, tokens = None, cfg.get("alora_invocation_tokens")
    fallback = Path(base_config.source).parent.name if base_config and base_config.source else root.name
    return adapter_kv(arch=names.arch, alpha=alpha, card_dir=root, fallback_name=fallback, kept=kept,
                      total_params=total_parameters((n, shape) for n, shape, *_ in tensors),
                      alora_tokens=tokens if isinstance(tokens, list) else None)
