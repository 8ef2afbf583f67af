"""The canonical in-memory adapter every reader produces and every writer consumes.

Per module (keyed by its HF module path, without ``base_model.model.``): ``A`` (r, in),
``B`` (out, r), an explicit float ``scale``, an optional DoRA ``magnitude`` (out,) and an
optional LoRA ``bias`` (out,). q/k rows (of B, magnitude, bias) are in HF rotate-half order.
``ΔW = scale · B @ A``; for an embedding ``ΔW`` is (dim, vocab) and the weight (vocab, dim)
receives its transpose; for ``fan_in_fan_out`` (GPT-2 ``Conv1D``) the stored weight is (in, out)
and receives the transpose too.

LoRA on 3-D MoE expert parameters (PEFT ``target_parameters`` on transformers-5 fused experts)
lives in ``Adapter.experts``: one :class:`~lora_ckpt.experts.ExpertLoRA` per parameter (keyed by
its full name, ``model.layers.0.mlp.experts.gate_up_proj``) with ``A (E, r, in)``,
``B (E, out, r)``, ``scale``: ``ΔW_e = scale · B[e] @ A[e]`` (the exact PEFT slicing is
documented in :mod:`lora_ckpt.experts`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from .errors import ShapeMismatchError
from .families import ModelConfig

if TYPE_CHECKING:
    import torch

    from .experts import ExpertLoRA

__all__ = ["Adapter", "AdapterMeta", "ModuleKind", "ModuleLoRA"]

ModuleKind = Literal["linear", "embedding"]


@dataclass
class ModuleLoRA:
    """One adapted module in canonical form."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    kind: ModuleKind = "linear"
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    def check(self, name: str) -> None:
        """Shapes agree with one another (A/B rank, magnitude and bias length)."""
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"{name}: lora_A {tuple(self.A.shape)} and lora_B {tuple(self.B.shape)} disagree on the rank; "
                "expected A (r, in) and B (out, r) with the same r; the adapter is corrupt or mis-assembled",
                key=name, expected=(self.B.shape[-1] if self.B.dim() == 2 else -1,), found=tuple(self.A.shape))
        for what, t in (("magnitude", self.magnitude), ("lora bias", self.bias)):
            if t is not None and tuple(t.shape) != (self.B.shape[0],):
                raise ShapeMismatchError(
                    f"{name}: {what} has shape {tuple(t.shape)}, expected ({self.B.shape[0]},) (lora_B's rows)",
                    key=name, expected=(self.B.shape[0],), found=tuple(t.shape))

    def delta(self) -> torch.Tensor:
        """``scale · B @ A`` in float32, (out, in) (for an embedding: (dim, vocab))."""
        return (self.B.float() @ self.A.float()) * self.scale

    def padded(self, r: int) -> ModuleLoRA:
        """Zero-pad to rank ``r`` (zero rows of A, zero columns of B): the same ΔW, exactly."""
        if r == self.rank:
            return self
        import torch

        A = torch.zeros(r, self.A.shape[1], dtype=self.A.dtype)
        B = torch.zeros(self.B.shape[0], r, dtype=self.B.dtype)
        A[: self.rank] = self.A
        B[:, : self.rank] = self.B
        return replace(self, A=A, B=B)

    def rescaled(self, scale: float) -> ModuleLoRA:
        """The same ΔW with another scale: ``B · (old/new)`` in float32 (exact up to rounding)."""
        if scale == self.scale:
            return self
        B = (self.B.float() * (self.scale / scale)).to(self.B.dtype)
        bias = None if self.bias is None else (self.bias.float() * (self.scale / scale)).to(self.bias.dtype)
        return replace(self, B=B, bias=bias, scale=scale)


@dataclass
class AdapterMeta:
    """Where an adapter came from and what it is for."""

    base_model: str | None = None
    family: str | None = None
    source_layout: str | None = None
    source_path: str | None = None
    task_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the source layout's original config
    model_config: ModelConfig | None = None  # the base model config used (or found) when reading
    notes: list[str] = field(default_factory=list)  # what a reader had to decide (shown by inspect)


@dataclass
class Adapter:
    """A LoRA adapter in canonical form (see the module docstring)."""

    modules: dict[str, ModuleLoRA]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # full tensors: modules_to_save, embeddings
    meta: AdapterMeta = field(default_factory=AdapterMeta)
    experts: dict[str, ExpertLoRA] = field(default_factory=dict)  # 3-D expert parameter name -> its LoRA

    def check(self) -> None:
        for name, m in self.modules.items():
            m.check(name)
        for name, x in self.experts.items():
            x.check(name)

    @property
    def dtype(self) -> torch.dtype | None:
        """The most common dtype of the adapter factors."""
        counts = Counter(t.dtype for m in self.modules.values() for t in (m.A, m.B))
        counts.update(t.dtype for x in self.experts.values() for t in (x.A, x.B))
        return counts.most_common(1)[0][0] if counts else None

    @property
    def uses_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def uses_bias(self) -> bool:
        return any(m.bias is not None for m in self.modules.values())

    def ranks(self) -> Counter[int]:
        return Counter(m.rank for m in self.modules.values())

    def scales(self) -> Counter[float]:
        return Counter(m.scale for m in self.modules.values())

    def num_parameters(self) -> int:
        n = sum(t.numel() for m in self.modules.values() for t in (m.A, m.B, m.magnitude, m.bias) if t is not None)
        n += sum(t.numel() for x in self.experts.values() for t in (x.A, x.B))
        return n + sum(t.numel() for t in self.extra.values())

    def cast(self, dtype: torch.dtype | None) -> Adapter:
        """All tensors converted to ``dtype`` (None: unchanged)."""
        if dtype is None:
            return self

        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        mods = {n: replace(m, A=m.A.to(dtype), B=m.B.to(dtype), magnitude=c(m.magnitude), bias=c(m.bias))
                for n, m in self.modules.items()}
        experts = {n: replace(x, A=x.A.to(dtype), B=x.B.to(dtype)) for n, x in self.experts.items()}
        return replace(self, modules=mods, extra={k: v.to(dtype) for k, v in self.extra.items()}, experts=experts)


def alpha_for(scale: float, r: int, *, rslora: bool = False) -> float | int:
    """The PEFT ``lora_alpha`` that gives ``scale`` at rank ``r`` (an int when exact)."""
    a = scale * (math.sqrt(r) if rslora else r)
    return round(a) if abs(a - round(a)) < 1e-9 * max(1.0, abs(a)) else a
