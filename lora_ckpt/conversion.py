"""``convert`` and ``verify``: every conversion is checked numerically, module by module.

Verification compares the effective update ``ΔW = scale·B@A`` of every module (and DoRA
magnitudes, LoRA biases, ``fan_in_fan_out`` and full tensors) between two canonical adapters,
whatever layouts they came from. Small modules are compared exactly in float64; large ones
through their low-rank Gram matrices (``‖ΔW_a − ΔW_b‖_F`` from (r×r) products, never
materialising ΔW).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .adapter import Adapter, ModuleLoRA
from .dtypes import DtypeLike, parse_dtype
from .errors import VerificationError, quote_list
from .experts import per_expert_view
from .families import ModelConfig
from .hub.client import fetch_model_config
from .io import PageBatch, PathLike
from .layouts import detect_layout, get_layout, load_adapter, save_adapter

__all__ = ["ConvertResult", "VerifyReport", "compare_adapters", "convert", "verify", "write_verified"]

logger = logging.getLogger(__name__)

EXPLICIT_LIMIT = 1 << 22  # out*in up to 4M elements: compare ΔW explicitly


@dataclass
class VerifyReport:
    """The outcome of comparing two adapters."""

    tolerance: float
    worst: float = 0.0
    worst_module: str | None = None
    modules: dict[str, float] = field(default_factory=dict)  # module -> relative difference
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.only_a and not self.only_b and not self.problems and self.worst <= self.tolerance

    def summary(self) -> str:
        head = (f"{len(self.modules)} module(s) compared, worst relative difference {self.worst:.2e}"
                + (f" ({self.worst_module})" if self.worst_module and self.worst > 0 else "")
                + f", tolerance {self.tolerance:.0e}")
        parts = [head]
        if self.only_a:
            parts.append(f"only in the first: {quote_list(self.only_a)}")
        if self.only_b:
            parts.append(f"only in the second: {quote_list(self.only_b)}")
        parts += self.problems[:5]
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "tolerance": self.tolerance, "worst": self.worst, "worst_module": self.worst_module,
                "modules": self.modules, "only_a": self.only_a, "only_b": self.only_b, "problems": self.problems}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included), compared in 8-byte words when the
    sizes allow; the same memory is equal without a look."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    a, b = a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    if a.numel() % 8 == 0 and a.data_ptr() % 8 == 0 and b.data_ptr() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    return torch.equal(a, b)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if _bitwise_equal(a, b):
        return 0.0
    a, b = a.double(), b.double()
    denom = max(a.abs().max().item() if a.numel() else 0.0, b.abs().max().item() if b.numel() else 0.0)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return 0.0 if diff == 0 else (diff / denom if denom else math.inf)


def _delta_rel(a: ModuleLoRA, b: ModuleLoRA) -> float:
    """Relative difference of the two updates (max-norm when explicit, Frobenius via Grams)."""
    if a.scale == b.scale and _bitwise_equal(a.A, b.A) and _bitwise_equal(a.B, b.B):
        return 0.0
    out, inn = a.B.shape[0], a.A.shape[1]
    if out * inn <= EXPLICIT_LIMIT:
        da = (a.B.double() @ a.A.double()) * a.scale
        db = (b.B.double() @ b.A.double()) * b.scale
        return _rel(da, db)
    Aa, Ba, Ab, Bb = a.A.double(), a.B.double(), b.A.double(), b.B.double()
    naa = a.scale ** 2 * torch.trace((Ba.T @ Ba) @ (Aa @ Aa.T)).item()
    nbb = b.scale ** 2 * torch.trace((Bb.T @ Bb) @ (Ab @ Ab.T)).item()
    nab = a.scale * b.scale * torch.trace((Ba.T @ Bb) @ (Ab @ Aa.T)).item()
    d2 = max(naa + nbb - 2 * nab, 0.0)
    denom = math.sqrt(max(naa, nbb))
    return 0.0 if d2 == 0 else (math.sqrt(d2) / denom if denom else math.inf)


def _noop(m: ModuleLoRA) -> bool:
    return m.magnitude is None and m.bias is None and (not bool(m.A.any()) or not bool(m.B.any()))


def _tolerance(a: Adapter, b: Adapter) -> float:
    low = {torch.bfloat16, torch.float16}
    dtypes = {t.dtype for ad in (a, b) for m in ad.modules.values() for t in (m.A, m.B)}
    return 1e-2 if dtypes & low else 1e-5


def compare_adapters(a: Adapter, b: Adapter, *, tolerance: float | None = None,
                     after_module: Callable[[ModuleLoRA, ModuleLoRA], None] | None = None) -> VerifyReport:
    """Compare the effective updates of two canonical adapters, module by module
    (``after_module(a_module, b_module)`` runs after each: ``convert`` releases pages there). LoRA on
    fused MoE experts is compared expert by expert (:func:`lora_ckpt.experts.per_expert_view`)."""
    a, b = per_expert_view(a), per_expert_view(b)
    rep = VerifyReport(tolerance=tolerance if tolerance is not None else _tolerance(a, b))
    # a module whose update is exactly zero computes the same as no module (placement fillers)
    rep.only_a = sorted(n for n in set(a.modules) - set(b.modules) if not _noop(a.modules[n]))
    rep.only_b = sorted(n for n in set(b.modules) - set(a.modules) if not _noop(b.modules[n]))
    for name in sorted(set(a.modules) & set(b.modules)):
        ma, mb = a.modules[name], b.modules[name]
        if ma.A.shape[1] != mb.A.shape[1] or ma.B.shape[0] != mb.B.shape[0]:
            rep.problems.append(f"{name}: shapes differ ({ma.B.shape[0]}x{ma.A.shape[1]} vs "
                                f"{mb.B.shape[0]}x{mb.A.shape[1]})")
            continue
        if ma.kind != mb.kind or ma.fan_in_fan_out != mb.fan_in_fan_out:
            rep.problems.append(f"{name}: {ma.kind}/fan_in_fan_out={ma.fan_in_fan_out} vs "
                                f"{mb.kind}/fan_in_fan_out={mb.fan_in_fan_out}")
        rel = _delta_rel(ma, mb)
        for what, ta, tb, sa, sb in (("magnitude", ma.magnitude, mb.magnitude, 1.0, 1.0),
                                     ("lora bias", ma.bias, mb.bias, ma.scale, mb.scale)):
            if (ta is None) != (tb is None):
                rep.problems.append(f"{name}: {what} in only one of them")
            elif ta is not None and tb is not None:
                rel = max(rel, _rel(ta.double() * sa, tb.double() * sb))
        if math.isnan(rel):
            rep.problems.append(f"{name}: NaN/Inf values that are not bit-identical")
            rel = math.inf
        rep.modules[name] = rel
        if after_module is not None:
            after_module(ma, mb)
        if rep.worst_module is None or rel > rep.worst:
            rep.worst, rep.worst_module = rel, name
    for key in sorted(set(a.extra) | set(b.extra)):
        if key not in a.extra or key not in b.extra:
            rep.problems.append(f"full tensor {key!r} in only one of them")
        elif a.extra[key].shape != b.extra[key].shape or _rel(a.extra[key], b.extra[key]) > rep.tolerance:
            rep.problems.append(f"full tensor {key!r} differs")
    return rep


def verify(a: PathLike, b: PathLike, *, base_config: PathLike | ModelConfig | None = None,
           alpha: float | None = None, tolerance: float | None = None) -> VerifyReport:
    """Compare two adapters in any layouts (see :func:`compare_adapters`)."""
    with one_thread():
        return compare_adapters(
            load_adapter(a, base_config=base_config, alpha=alpha, resolve_base_config=fetch_model_config),
            load_adapter(b, base_config=base_config, alpha=alpha, resolve_base_config=fetch_model_config),
            tolerance=tolerance)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch intra-op threads off for the duration: conversions run hundreds of small, memory-bound
    ops, and a second thread only adds synchronisation (3-5x slower on a loaded machine;
    bench/RESULTS.md)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class ConvertResult:
    """What ``convert`` did."""

    source_layout: str
    target_layout: str
    output: Path
    modules: int
    verification: VerifyReport | None
    notes: list[str]


def convert(source: PathLike, out: PathLike, *, to: str, from_: str | None = None,
            base_config: PathLike | ModelConfig | None = None, alpha: float | None = None,
            dtype: DtypeLike | None = None, force: bool = False, allow_lossy: bool = False,
            verify_output: bool = True, experts: Literal["keep", "fused", "per-expert"] = "keep") -> ConvertResult:
    """Convert an adapter between layouts, exactly, and verify the output by reading it back.

    Args:
        source: the adapter directory or file.
        out: the output directory (written atomically).
        to: target layout name.
        from_: source layout name (detected when None).
        base_config: base model ``config.json`` / ``params.json`` (head counts, family).
        alpha: alpha for sources that do not record it (loralib).
        dtype: cast tensors: a torch dtype or a name (``"bf16"``, ``"float16"``; default: keep the source dtype).
        force: replace an existing ``out``.
        allow_lossy: drop what the target cannot hold instead of failing.
        verify_output: re-read ``out`` and compare it with the source.
        experts: MoE expert LoRA in PEFT/native as read, ``"fused"`` (``target_parameters``) or
            ``"per-expert"`` (``experts.{e}.gate_proj`` ... modules); verified expert by expert.

    Raises:
        VerificationError: the written adapter does not compute the source's update.

    Example:
        >>> convert("peft_dir", "tt_dir", to="torchtune", base_config="llama/config.json")
    """
    with one_thread():
        return _convert(source, out, to=to, from_=from_, base_config=base_config, alpha=alpha,
                        dtype=parse_dtype(dtype), force=force, allow_lossy=allow_lossy, verify_output=verify_output,
                        experts=experts)


def _convert(source: PathLike, out: PathLike, *, to: str, from_: str | None, base_config: PathLike | ModelConfig | None,
             alpha: float | None, dtype: torch.dtype | None, force: bool, allow_lossy: bool,
             verify_output: bool, experts: Literal["keep", "fused", "per-expert"] = "keep") -> ConvertResult:
    det = detect_layout(source, layout=from_)
    adapter = load_adapter(source, layout=det.layout.name, base_config=base_config, alpha=alpha,
                           resolve_base_config=fetch_model_config)
    written, report = write_verified(adapter, out, to=to, base_config=base_config, dtype=dtype, force=force,
                                     allow_lossy=allow_lossy, inputs=(source,), verify_output=verify_output,
                                     experts=experts)
    return ConvertResult(det.layout.name, to, Path(out), len(written.modules), report, adapter.meta.notes)


def write_verified(adapter: Adapter, out: PathLike, *, to: str, base_config: PathLike | ModelConfig | None = None,
                   dtype: DtypeLike | None = None, force: bool = False, allow_lossy: bool = False,
                   inputs: tuple[PathLike, ...] = (), verify_output: bool = True,
                   experts: Literal["keep", "fused", "per-expert"] = "keep") -> tuple[Adapter, VerifyReport | None]:
    """Write an in-memory adapter as ``out`` in layout ``to`` and, before the output is moved into
    place, read it back and compare every module with ``adapter`` (what ``convert`` does after
    reading its source).

    Returns:
        The adapter as written (ranks padded, scales folded, ...) and the verification report
        (None with ``verify_output=False``).

    Raises:
        VerificationError: the written adapter does not compute ``adapter``'s update; nothing is written.
        OutputExistsError, LossyConversionError: as :func:`lora_ckpt.layouts.save_adapter`.
    """
    reports: list[VerifyReport] = []

    batch = PageBatch()  # one /proc/self/maps read per 64 MB: per-expert views are thousands of small modules

    def release(*mods: Any, flush: bool = False) -> None:
        """Memory-mapped pages leave RSS once modules are done (compared), in batches."""
        for m in mods:
            for t in (m.A, m.B, getattr(m, "magnitude", None), getattr(m, "bias", None)):
                if t is not None:
                    batch.add(t)
        if flush:
            batch.flush()

    def check(tmp: Path, written: Adapter) -> None:
        release(*adapter.modules.values(), *adapter.experts.values(), flush=True)  # the write touched every page
        # no NaN/Inf scan of the read-back: the bitwise comparison with the scanned source covers it
        back = load_adapter(tmp, layout=to, base_config=base_config or written.meta.model_config, scan_values=False,
                            resolve_base_config=fetch_model_config)
        report = compare_adapters(written, back, after_module=release)
        lay = get_layout(to)
        expected = lay.drop_unsupported(adapter, allow_lossy=True)  # what was meant to be written
        expected = per_expert_view(replace(expected, experts={}) if lay.expert_form == "none" else expected)
        written = per_expert_view(written)
        kept = Adapter({n: m for n, m in written.modules.items() if n in expected.modules}, written.extra)
        fold = compare_adapters(Adapter({n: expected.modules[n] for n in kept.modules}, written.extra), kept,
                                after_module=release)
        fold.problems += [f"{n}: written but not in the source, and not zero" for n, m in written.modules.items()
                          if n not in expected.modules and not _noop(m)]
        release(flush=True)
        report.worst = max(report.worst, fold.worst)
        report.problems += fold.problems
        reports.append(report)
        if not report.ok:
            raise VerificationError(f"{out}: the written {to} adapter does not reproduce the source "
                                    f"({report.summary()}); nothing was written; please report this")

    if adapter.meta.config.get("peft_type") and not get_layout(to).keeps_peft_config:
        adapter.meta.notes.append(f"{to} keeps no PEFT adapter_config.json: converting back to PEFT re-derives "
                                  "it (task_type, target_modules and modules_to_save as written, revision and init "
                                  "options are not kept)")
    written = save_adapter(adapter, out, layout=to, base_config=base_config, force=force, allow_lossy=allow_lossy,
                           dtype=dtype, inputs=inputs, check=check if verify_output else None, experts=experts)
    return written, reports[0] if reports else None
