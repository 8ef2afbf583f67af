"""``inspect``: what a checkpoint holds, read from safetensors headers only (no torch import)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import DTYPES, PathLike, checkpoint_files, read_safetensors_header
from .keys import split_key

__all__ = ["CheckpointReport", "inspect_checkpoint"]


@dataclass
class ModuleReport:
    """The adapter tensors found for one module."""

    module: str
    leaves: dict[str, list[int]] = field(default_factory=dict)  # leaf -> shape

    @property
    def rank(self) -> int | None:
        for leaf, shape in self.leaves.items():
            if leaf in ("lora_A.weight", "lora_a.weight", "lora_A", "A.weight", "lora_down.weight",
                        "lora_embedding_A") and len(shape) >= 2:
                return shape[-2] if len(shape) == 3 else shape[0]
            if leaf == "lora_a" and len(shape) >= 2:  # mlx: (in, r)
                return shape[-1]
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
        for m, rep in zip(d["lora_modules"], self.lora_modules):
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
            from .files import load_pickle

            for name, t in load_pickle(path).items():
                entries.append((name, str(t.dtype).removeprefix("torch."), list(t.shape),
                                t.numel() * t.element_size()))
    modules: dict[str, ModuleReport] = {}
    others = []
    params = 0
    for name, dtype, shape, nbytes in sorted(entries):
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


def format_report(rep: CheckpointReport, *, limit: int = 20) -> str:
    """A readable text table of a report."""
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
        lines += [""] + _table(rows)
        if len(rep.lora_modules) > limit:
            lines.append(f"... and {len(rep.lora_modules) - limit} more module(s) (--json lists all)")
    if rep.other_tensors:
        rows = [("tensor", "dtype", "shape")] + [(n, _dtype_name(d), str(tuple(s)))
                                                 for n, d, s in rep.other_tensors[:limit]]
        lines += [""] + _table(rows)
        if len(rep.other_tensors) > limit:
            lines.append(f"... and {len(rep.other_tensors) - limit} more tensor(s) (--json lists all)")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)
