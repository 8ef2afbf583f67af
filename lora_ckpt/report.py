"""``inspect``: what a checkpoint or adapter holds, from headers only (no torch import, no
tensor data) — except the torchtune export check, which compares values."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .adapter import Adapter
from .check import misnamed_modules
from .errors import LoraCkptError, MissingConfigError, UnknownLayoutError, quote_list
from .families import ModelConfig, load_model_config
from .hub.client import fetch_model_config
from .io import (
    DTYPES,
    VALUE_SCAN_LIMIT,
    PathLike,
    checkpoint_files,
    load_pickle,
    nonfinite_tensors,
    read_safetensors_header,
)
from .keys import LEAF_ROLES, TRANSPOSED_LEAVES, split_key
from .layouts import detect_layout, load_adapter, read_detected
from .tt_export import torchtune_export

__all__ = ["AdapterReport", "CheckpointReport", "format_report", "inspect_checkpoint", "inspect_source"]


@dataclass
class ModuleReport:
    """The adapter tensors found for one module."""

    module: str
    leaves: dict[str, list[int]] = field(default_factory=dict)  # leaf -> shape

    @property
    def rank(self) -> int | None:
        for leaf, shape in self.leaves.items():
            if LEAF_ROLES.get(leaf) == "A" and len(shape) >= 2:  # (r, in); (E, r, in) stacked; mlx (in, r)
                return shape[-2] if len(shape) == 3 else shape[-1] if leaf in TRANSPOSED_LEAVES else shape[0]
        return None


@dataclass
class CheckpointReport:
    """What ``inspect`` reports for a checkpoint."""

    source: str
    files: list[str]
    tensors: int
    parameters: int
    nbytes: int
    dtypes: dict[str, int]
    metadata: dict[str, str]
    lora_modules: list[ModuleReport]
    other_tensors: list[tuple[str, str, list[int]]]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for m, rep in zip(d["lora_modules"], self.lora_modules, strict=False):
            m["rank"] = rep.rank
        return d


def inspect_checkpoint(source: PathLike) -> CheckpointReport:
    """Summarise a checkpoint: tensor count, dtypes, parameters and the LoRA modules it holds.

    Safetensors files are read from their headers only; pickles need torch (loaded with
    ``weights_only=True``).
    """
    files = checkpoint_files(source)
    entries: list[tuple[str, str, list[int], int]] = []  # name, dtype, shape, nbytes
    metadata: dict[str, str] = {}
    for path in files:
        if path.suffix == ".safetensors":
            header = read_safetensors_header(path)
            metadata.update(header.metadata)
            entries += [(t.name, t.dtype, list(t.shape), t.nbytes) for t in header.tensors.values()]
        else:
            for name, t in load_pickle(path).items():
                entries.append((name, str(t.dtype).removeprefix("torch."), list(t.shape),
                                t.numel() * t.element_size()))
    modules: dict[str, ModuleReport] = {}
    others = []
    params = 0
    for name, dtype, shape, _nbytes in sorted(entries):
        n = 1
        for d in shape:
            n *= d
        params += n
        parsed = split_key(name)
        if parsed:
            modules.setdefault(parsed[0], ModuleReport(parsed[0])).leaves[parsed[1]] = shape
        else:
            others.append((name, dtype, shape))
    return CheckpointReport(
        source=os.fspath(source), files=[str(Path(f)) for f in files], tensors=len(entries), parameters=params,
        nbytes=sum(e[3] for e in entries), dtypes=dict(Counter(_dtype_name(e[1]) for e in entries)),
        metadata=metadata, lora_modules=list(modules.values()), other_tensors=others)


def _dtype_name(dtype: str) -> str:
    return DTYPES[dtype][1] if dtype in DTYPES else dtype


def format_report(rep: CheckpointReport | AdapterReport, *, limit: int = 20) -> str:
    """A readable text table of a report."""
    if isinstance(rep, AdapterReport):
        return _format_adapter(rep, limit)
    lines = [f"source      {rep.source}",
             f"files       {len(rep.files)}" + (f" ({Path(rep.files[0]).name})" if len(rep.files) == 1 else ""),
             f"tensors     {rep.tensors}",
             f"parameters  {rep.parameters:,} ({_human(rep.nbytes)})",
             "dtypes      " + ", ".join(f"{k} x{v}" for k, v in sorted(rep.dtypes.items()))]
    if rep.metadata:
        lines.append("metadata    " + ", ".join(f"{k}={v}" for k, v in sorted(rep.metadata.items())))
    lines.append(f"lora        {len(rep.lora_modules)} module(s)"
                 + (", ranks " + ", ".join(str(r) for r in sorted({m.rank for m in rep.lora_modules
                                                                     if m.rank is not None}))
                    if rep.lora_modules else ""))
    if rep.lora_modules:
        rows = [("module", "rank", "tensors")] + [
            (m.module, str(m.rank if m.rank is not None else "-"),
             ", ".join(f"{leaf} {tuple(s)}" for leaf, s in m.leaves.items())) for m in rep.lora_modules[:limit]]
        lines += ["", *_table(rows)]
        if len(rep.lora_modules) > limit:
            lines.append(f"... and {len(rep.lora_modules) - limit} more module(s) (--json lists all)")
    if rep.other_tensors:
        rows = [("tensor", "dtype", "shape")] + [(n, _dtype_name(d), str(tuple(s)))
                                                 for n, d, s in rep.other_tensors[:limit]]
        lines += ["", *_table(rows)]
        if len(rep.other_tensors) > limit:
            lines.append(f"... and {len(rep.other_tensors) - limit} more tensor(s) (--json lists all)")
    return "\n".join(lines)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


@dataclass
class AdapterReport:
    """What ``inspect`` reports for an adapter."""

    source: str
    layout: str
    reason: str
    family: str | None
    base_model: str | None
    modules: list[dict[str, Any]]
    ranks: dict[int, int]
    scales: dict[float, int]
    dtypes: dict[str, int]
    parameters: int
    dora: bool
    lora_bias: bool
    extra: list[str]
    warnings: list[str]
    experts: list[dict[str, Any]] = field(default_factory=list)  # fused MoE expert LoRA, one per 3-D parameter

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def inspect_source(source: PathLike, *, layout: str | None = None, base_config: PathLike | None = None,
                   alpha: float | None = None, values: bool = False) -> AdapterReport | CheckpointReport:
    """Report an adapter (layout detected, and why) or, if no adapter layout matches, a stock checkpoint.

    NaN/Inf values are looked for in safetensors files up to 16 MB (any size with ``values``),
    without torch."""
    try:
        det = detect_layout(source, layout=layout)
    except UnknownLayoutError:
        if layout is not None:
            raise
        return inspect_checkpoint(source)
    det.source.shapes_only = True
    cfg = load_model_config(base_config) if base_config else None
    warnings: list[str] = []
    try:
        adapter = read_detected(det, base_config=cfg, alpha=alpha)
    except MissingConfigError as e:  # e.g. loralib without --alpha: report shapes, say what is missing
        try:
            adapter = read_detected(det, base_config=cfg, alpha=1.0)
        except MissingConfigError:  # not (only) the scale: head counts, a family's names ...
            raise e from None
        warnings.append(f"scale unknown ({e}); scales below assume alpha=1")
    warnings += adapter.meta.notes
    warnings += _prefix_warnings(adapter)
    w = det.source.weights
    if w.suffix == ".safetensors" and (values or w.stat().st_size <= VALUE_SCAN_LIMIT):
        bad = nonfinite_tensors(w)
        if bad:
            warnings.append(f"{len(bad)} tensor(s) hold NaN/Inf: {quote_list(bad, 3)}; the adapter computes NaN/Inf "
                            "where they are used (convert keeps them bit-for-bit)")
    if adapter.extra:
        warnings.append(f"full tensors {quote_list(adapter.extra, 3)} (modules_to_save / saved embeddings): vLLM "
                        "and llama.cpp refuse them; `lora-ckpt convert --to peft --allow-lossy` drops them")
    if adapter.uses_dora:
        warnings.append("DoRA magnitudes: vLLM and llama.cpp do not support DoRA (merge it instead)")
    if (det.layout.name == "torchtune" and det.source.path.is_dir()
            and (det.source.root / "adapter_model.safetensors").is_file()):
        warnings += _torchtune_export_check(det.source.root, cfg)
    mods = []
    for name, m in sorted(adapter.modules.items()):
        mods.append({"module": name, "kind": m.kind, "rank": m.rank, "scale": m.scale,
                     "in": m.A.shape[1], "out": m.B.shape[0], "dora": m.magnitude is not None,
                     "bias": m.bias is not None, "dtype": str(m.A.dtype).removeprefix("torch.")})
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for m in adapter.modules.values()
                     for t in (m.A, m.B, m.magnitude, m.bias) if t is not None)
    dtypes.update(str(t.dtype).removeprefix("torch.") for x in adapter.experts.values() for t in (x.A, x.B))
    experts = [{"parameter": name, "experts": x.num_experts, "rank": x.rank, "scale": x.scale,
                "in": x.in_features, "out": x.out_features, "shape": list(x.param_shape),
                "projections": _PROJECTIONS.get(name.rsplit(".", 1)[-1], [name.rsplit(".", 1)[-1]]),
                "dtype": str(x.A.dtype).removeprefix("torch.")} for name, x in sorted(adapter.experts.items())]
    return AdapterReport(
        source=str(source), layout=det.layout.name, reason=det.reason, family=adapter.meta.family,
        base_model=adapter.meta.base_model, modules=mods, ranks=dict(adapter.ranks()),
        scales=dict(adapter.scales()), dtypes=dict(dtypes), parameters=adapter.num_parameters(),
        dora=adapter.uses_dora, lora_bias=adapter.uses_bias, extra=sorted(adapter.extra), warnings=warnings,
        experts=experts)


#: what each fused expert parameter computes (transformers 5: gate_up_proj rows [0, I) gate, [I, 2I) up)
_PROJECTIONS = {"gate_up_proj": ["gate_proj", "up_proj"], "down_proj": ["down_proj"]}


def _prefix_warnings(adapter: Adapter) -> list[str]:
    """Modules named differently from how the declared base model class names them are skipped
    silently by PEFT, vLLM and transformers (e.g. a VLM's ``language_model.`` prefix)."""
    found = misnamed_modules(adapter)
    if not found or not found[0] or adapter.meta.model_config is None:
        return []
    cfg = adapter.meta.model_config
    arch = (cfg.raw.get("architectures") or [cfg.family.name if cfg.family else "the base model"])[0]
    return [(f"module(s) {quote_list(found[0], 3)} do not start with {found[1]} as {arch} names its "
            "modules: PEFT, vLLM and transformers skip them silently and serve the base model; fix the prefix")]


def _torchtune_export_check(root: Path, cfg: ModelConfig | None) -> list[str]:
    """torchtune writes a PEFT-keyed copy beside adapter_model.pt; 0.6.1's is wrong for DoRA and Qwen."""
    try:
        found = torchtune_export(root, load_adapter(root, layout="torchtune", base_config=cfg,
                                                    resolve_base_config=fetch_model_config))
    except LoraCkptError as e:
        return [f"could not check adapter_model.safetensors against adapter_model.pt: {e}"]
    if found is None or found[2].ok:
        return []
    return [(f"adapter_model.safetensors (PEFT keys) disagrees with adapter_model.pt: {found[2].summary()} — torchtune "
            "0.6.1's PEFT export bug (DoRA magnitudes/use_dora, Qwen permutation); PEFT and vLLM would compute "
            "the wrong function; use `lora-ckpt convert DIR --to peft -o OUT`")]


def _format_adapter(rep: AdapterReport, limit: int) -> str:
    fmt_scales = ", ".join(f"{s:g} x{n}" for s, n in sorted(rep.scales.items()))
    lines = [f"source      {rep.source}",
             f"layout      {rep.layout} ({rep.reason})",
             f"family      {rep.family or 'unknown (pass --base-config)'}"
             + (f"; base model {rep.base_model}" if rep.base_model else ""),
             f"modules     {len(rep.modules)}" + (" (DoRA)" if rep.dora else "")
             + (" (lora bias)" if rep.lora_bias else ""),
             "ranks       " + ", ".join(f"{r} x{n}" for r, n in sorted(rep.ranks.items())),
             f"scales      {fmt_scales}",
             "dtypes      " + ", ".join(f"{k} x{v}" for k, v in sorted(rep.dtypes.items())),
             f"parameters  {rep.parameters:,}"]
    if rep.extra:
        lines.append(f"full        {', '.join(rep.extra)}")
    rows = [("module", "rank", "scale", "in -> out", "extras")] + [
        (m["module"], str(m["rank"]), f"{m['scale']:g}", f"{m['in']} -> {m['out']}",
         ",".join(x for x in ("dora" if m["dora"] else "", "bias" if m["bias"] else "",
                              "embedding" if m["kind"] == "embedding" else "") if x))
        for m in rep.modules[:limit]]
    if rep.modules:
        lines += ["", *_table(rows)]
    if len(rep.modules) > limit:
        lines.append(f"... and {len(rep.modules) - limit} more module(s) (--json lists all)")
    if rep.experts:
        lines += ["", f"MoE experts: {len(rep.experts)} fused parameter(s) (PEFT target_parameters), per expert "
                  "A_e = lora_A[e*r:(e+1)*r], B_e = lora_B[:, e::E]"]
        lines += _table([("parameter", "E", "rank/expert", "scale", "in -> out", "projections"), *[
            (x["parameter"], str(x["experts"]), str(x["rank"]), f"{x['scale']:g}", f"{x['in']} -> {x['out']}",
             "+".join(x["projections"])) for x in rep.experts[:limit]]])
        if len(rep.experts) > limit:
            lines.append(f"... and {len(rep.experts) - limit} more expert parameter(s) (--json lists all)")
    lines += [f"warning: {w}" for w in rep.warnings]
    return "\n".join(lines)
