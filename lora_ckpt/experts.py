"""LoRA on fused MoE experts: transformers-5 3-D expert parameters and PEFT ``target_parameters``.

transformers 5.24 stores the experts of Qwen2-MoE, Qwen3-MoE, Mixtral (and most MoE families)
as two 3-D parameters of one ``…Experts`` module (``model.layers.L.mlp.experts``):
``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)``. Expert ``e``'s slice is shaped
(out, in) like a Linear weight: ``gate, up = (x @ gate_up_proj[e].T).chunk(2, -1)`` (rows
[0, I) are gate, [I, 2I) up) and ``y = h @ down_proj[e].T``. Modules decorated with
``use_experts_implementation(is_transposed=True)`` (gpt-oss, aria) store ``(E, in, out)`` instead.

PEFT 0.21.2's ``lora.ParamWrapper`` (``peft/tuners/lora/layer.py``) adapts one such parameter with
``lora_A.weight (r·E, in)`` and ``lora_B.weight (out, r·E)``, ``r`` the per-expert rank
(``LoraConfig.r`` / ``rank_pattern`` keyed by the full parameter name
``model.layers.L.mlp.experts.gate_up_proj``), and ``get_delta_weight``::

    ΔW = einsum("o r e, e r i -> e o i", B.reshape(out, r, E), A.reshape(E, r, in)) · scaling
         (einsum "... -> e i o" for an (E, in, out) parameter)

so, per expert ``e`` (the formula this module implements and tests check against real PEFT)::

    A_e = A[e·r : (e+1)·r, :]          (r, in)   contiguous rows: expert index slowest
    B_e = B[:, e::E]                   (out, r)  strided columns: expert index fastest
    ΔW_e = scaling · B_e @ A_e         (out, in); the parameter slice receives ΔW_e, or ΔW_eᵀ if transposed
    scaling = lora_alpha / r           (lora_alpha / √r with use_rslora)

Reading B in contiguous blocks (``B[:, e·r:(e+1)·r]``) loads without error and pairs every
expert with the wrong rank columns. When several parameters of one module are targeted, PEFT
nests the wrappers in the module's parameter registration order, the first innermost:
``…experts.base_layer.lora_A.weight`` is ``gate_up_proj`` and ``…experts.lora_A.weight`` is
``down_proj`` (parameter *i* of *n* carries ``base_layer.`` *n−1−i* times).

**Canonical form** (:class:`ExpertLoRA`, in ``Adapter.experts`` keyed by the full parameter name):
``A (E, r, in)``, ``B (E, out, r)``, ``scale``, ``transposed``; ``ΔW_e = scale · B[e] @ A[e]``.
The PEFT tensors are exact reshapes/permutations of it both ways (byte-identical round trips).
**Per-expert 2-D form** (transformers-4 modules, Hub checkpoints on disk, vLLM, mlx-lm, mistral):
``gate_up_proj`` expert ``e`` -> ``…experts.{e}.gate_proj`` and ``…experts.{e}.up_proj``, each with
the full ``A_e`` and its half of ``B_e``'s rows (exact); ``down_proj`` -> ``…experts.{e}.down_proj``
(Mixtral: ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``). Joining back concatenates the
halves' B when their A's are equal, else stacks A's with a block-diagonal B (rank 2r), exact.

Nothing here imports torch at module level (``inspect`` reads shapes only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .adapter import Adapter, ModuleLoRA
from .errors import ConversionError, LayoutError, ShapeMismatchError, UnsupportedAdapterError
from .families import FAMILIES, Family, template_regex
from .io import TensorMeta

if TYPE_CHECKING:
    import torch

__all__ = ["EXPERT_PARTS", "PARAM_ORDER", "TRANSPOSED_MODEL_TYPES", "ExpertLoRA", "describe", "expert_parts",
           "from_peft", "join_experts", "peft_nesting", "per_expert_view", "split_experts", "to_peft"]

#: model types whose experts are decorated ``use_experts_implementation(is_transposed=True)``: (E, in, out)
TRANSPOSED_MODEL_TYPES = ("gpt_oss", "aria", "aria_text", "openai_privacy_filter")
#: the registration order of expert parameters in transformers 5's ``…Experts`` modules (PEFT nests in it)
PARAM_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")

_QWEN = {"model.layers.{}.mlp.experts.gate_up_proj": ("model.layers.{}.mlp.experts.{}.gate_proj",
                                                      "model.layers.{}.mlp.experts.{}.up_proj"),
         "model.layers.{}.mlp.experts.down_proj": ("model.layers.{}.mlp.experts.{}.down_proj",)}
#: per family: fused expert parameter template -> its per-expert module templates in row order (the on-disk
#: checkpoint names; transformers 5.24 ``conversion_mapping.py`` stacks them on load; "{}" layer, then expert)
EXPERT_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "qwen2_moe": _QWEN,
    "qwen3_moe": _QWEN,
    "mixtral": {"model.layers.{}.mlp.experts.gate_up_proj": ("model.layers.{}.block_sparse_moe.experts.{}.w1",
                                                             "model.layers.{}.block_sparse_moe.experts.{}.w3"),
                "model.layers.{}.mlp.experts.down_proj": ("model.layers.{}.block_sparse_moe.experts.{}.w2",)},
}


def _meta(t: Any) -> bool:
    return isinstance(t, TensorMeta)


@dataclass
class ExpertLoRA:
    """LoRA on one 3-D expert parameter, per expert (module docstring): ``A (E, r, in)``,
    ``B (E, out, r)``, ``ΔW_e = scale · B[e] @ A[e]``; ``transposed``: the parameter is stored
    (E, in, out) and receives ``ΔW_eᵀ``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    transposed: bool = False

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def in_features(self) -> int:
        return self.A.shape[2]

    @property
    def out_features(self) -> int:
        return self.B.shape[1]

    @property
    def param_shape(self) -> tuple[int, int, int]:
        """The shape of the base parameter this LoRA adapts."""
        E, o, i = self.num_experts, self.out_features, self.in_features
        return (E, i, o) if self.transposed else (E, o, i)

    def check(self, name: str) -> None:
        """A and B agree on E and r."""
        if len(self.A.shape) != 3 or len(self.B.shape) != 3 or self.A.shape[0] != self.B.shape[0] \
                or self.A.shape[1] != self.B.shape[2]:
            raise ShapeMismatchError(
                f"{name}: expert factors A {tuple(self.A.shape)} and B {tuple(self.B.shape)} disagree; expected "
                "A (E, r, in) and B (E, out, r); the adapter is corrupt or mis-assembled",
                key=name, expected=(self.B.shape[0],), found=tuple(self.A.shape))

    def expert(self, e: int) -> ModuleLoRA:
        """Expert ``e`` as a 2-D module (out, in)."""
        return ModuleLoRA(A=self.A[e], B=self.B[e], scale=self.scale)

    def delta(self, e: int) -> torch.Tensor:
        """``scale · B[e] @ A[e]`` in float32, (out, in)."""
        return (self.B[e].float() @ self.A[e].float()) * self.scale

    def rescaled(self, scale: float) -> ExpertLoRA:
        """The same updates with another scale (``B · old/new`` in float32)."""
        if scale == self.scale:
            return self
        return replace(self, B=(self.B.float() * (self.scale / scale)).to(self.B.dtype), scale=scale)

    def padded(self, r: int) -> ExpertLoRA:
        """Zero-padded to rank ``r`` (the same updates, exactly)."""
        if r == self.rank:
            return self
        import torch

        A = torch.zeros(self.num_experts, r, self.in_features, dtype=self.A.dtype)
        B = torch.zeros(self.num_experts, self.out_features, r, dtype=self.B.dtype)
        A[:, : self.rank], B[:, :, : self.rank] = self.A, self.B
        return replace(self, A=A, B=B)


# ------------------------------------------------------------------------------ PEFT
def from_peft(A: Any, B: Any, r: int, *, name: str, scale: float = 1.0, transposed: bool = False) -> ExpertLoRA:
    """PEFT's ``lora_A.weight (r·E, in)`` / ``lora_B.weight (out, r·E)`` -> :class:`ExpertLoRA`
    (views: ``A.reshape(E, r, in)``, ``B.reshape(out, r, E).permute(2, 0, 1)``)."""
    if len(A.shape) != 2 or len(B.shape) != 2 or r <= 0 or A.shape[0] % r or A.shape[0] != B.shape[1]:
        raise LayoutError(
            f"{name}: PEFT expert factors lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit rank {r}; "
            "expected lora_A (r·E, in) and lora_B (out, r·E) with the config's per-expert r")
    E = A.shape[0] // r
    if _meta(A):
        shapes: Any = (TensorMeta((E, r, A.shape[1]), A.dtype), TensorMeta((E, B.shape[0], r), B.dtype))
        return ExpertLoRA(A=shapes[0], B=shapes[1], scale=scale, transposed=transposed)
    return ExpertLoRA(A=A.reshape(E, r, A.shape[1]), B=B.reshape(B.shape[0], r, E).permute(2, 0, 1), scale=scale,
                      transposed=transposed)


def to_peft(x: ExpertLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`ExpertLoRA` -> PEFT's ``(lora_A.weight (r·E, in), lora_B.weight (out, r·E))``, contiguous."""
    E, r = x.num_experts, x.rank
    return (x.A.reshape(E * r, x.in_features).contiguous(),
            x.B.permute(1, 2, 0).reshape(x.out_features, r * E).contiguous())


def peft_nesting(params: list[str]) -> dict[str, str]:
    """Parameter -> the ``base_layer.`` prefix PEFT gives its factors when ``params`` of one
    module are targeted (registration order :data:`PARAM_ORDER`, the first innermost)."""
    ordered = sorted(params, key=lambda p: (PARAM_ORDER.index(p) if p in PARAM_ORDER else len(PARAM_ORDER), p))
    return {p: "base_layer." * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}


# ------------------------------------------------------------------------- per-expert
def expert_parts(family: Family | None, key: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(per-expert module templates, the layer groups) of fused expert parameter ``key``, or None."""
    if family is None:
        return None
    for fused, parts in EXPERT_PARTS.get(family.name, {}).items():
        hit = template_regex(fused).fullmatch(key)
        if hit:
            return parts, hit.groups()
    return None


def split_experts(experts: Mapping[str, ExpertLoRA], family: Family | None, *, layout: str,
                  ) -> dict[str, ModuleLoRA]:
    """Fused expert LoRA -> per-expert 2-D modules (``gate_up_proj``'s B rows halved; exact).

    Raises:
        UnsupportedAdapterError: the family has no per-expert module names in lora-ckpt.
    """
    out: dict[str, ModuleLoRA] = {}
    for key, x in experts.items():
        found = expert_parts(family, key)
        if found is None:
            raise UnsupportedAdapterError(
                f"{layout} holds MoE experts as per-expert modules, and lora-ckpt has no per-expert names for "
                f"{key!r} (family {family.name if family else 'unknown: pass --base-config'}); per-expert names are "
                f"known for {', '.join(EXPERT_PARTS)}; convert to peft or native instead", layout=layout)
        templates, groups = found
        if x.transposed:
            raise UnsupportedAdapterError(f"{key}: an (E, in, out) expert parameter has no per-expert Linear form "
                                          "in lora-ckpt; convert to peft or native instead", layout=layout)
        rows = x.out_features // len(templates)
        if rows * len(templates) != x.out_features:
            raise ConversionError(f"{key}: {x.out_features} rows do not split into {len(templates)} projections")
        for e in range(x.num_experts):
            for i, template in enumerate(templates):
                B = x.B[e] if len(templates) == 1 else _rows(x.B[e], i * rows, (i + 1) * rows)
                out[template.format(*groups, e)] = ModuleLoRA(A=_expert(x.A, e), B=B, scale=x.scale)
    return out


def join_experts(modules: Mapping[str, ModuleLoRA], family: Family | None, *, n_experts: int | None,
                 ) -> tuple[dict[str, ExpertLoRA], set[str]]:
    """Per-expert 2-D modules -> fused :class:`ExpertLoRA` (experts the adapter lacks get zero
    factors, a no-op; ranks zero-padded to the largest; gate/up with equal A's share it, else
    A's stacked with a block-diagonal B).

    Returns:
        (fused expert LoRA keyed by parameter name, the module names consumed).
    """
    import torch

    from .fused import fuse

    out: dict[str, ExpertLoRA] = {}
    used: set[str] = set()
    for fused, templates in (EXPERT_PARTS.get(family.name, {}) if family else {}).items():
        found: dict[tuple[str, ...], dict[int, dict[int, str]]] = {}  # layer -> expert -> part -> name
        for name in modules:
            for i, t in enumerate(templates):
                hit = template_regex(t).fullmatch(name)
                if hit:
                    groups = hit.groups()
                    found.setdefault(groups[:-1], {}).setdefault(int(groups[-1]), {})[i] = name
        for layer_groups, by_expert in sorted(found.items()):
            key = fused.format(*layer_groups)
            parts: dict[int, ModuleLoRA] = {}
            for e, names in by_expert.items():
                mods = [modules[names[i]] if i in names else None for i in range(len(templates))]
                if any(m is not None and (m.magnitude is not None or m.bias is not None or m.kind != "linear")
                       for m in mods):
                    raise UnsupportedAdapterError(f"{key}: DoRA or LoRA bias on MoE experts; PEFT's target_parameters "
                                                  "has neither; convert to native instead")
                size = next(m.out_features for m in mods if m is not None)
                parts[e] = mods[0] if len(mods) == 1 else fuse(mods, [size] * len(mods))  # type: ignore[assignment]
                used.update(names.values())
            scales = sorted({p.scale for p in parts.values()})
            scale = scales[0] if len(scales) == 1 else max(scales)
            E = max(n_experts or 0, max(parts) + 1)
            r = max(p.rank for p in parts.values())
            like = next(iter(parts.values()))
            A = torch.zeros(E, r, like.A.shape[1], dtype=like.A.dtype)
            B = torch.zeros(E, like.B.shape[0], r, dtype=like.B.dtype)
            for e, p in parts.items():
                p = p.rescaled(scale).padded(r)
                A[e], B[e] = p.A, p.B
            out[key] = ExpertLoRA(A=A, B=B, scale=scale)
    return out, used


def per_expert_view(adapter: Adapter) -> Adapter:
    """``adapter`` with its fused expert LoRA as per-expert 2-D modules (views, no copies): the
    family's per-expert names where lora-ckpt knows them (so a fused adapter compares equal to its
    per-expert conversion), else ``<parameter>.<e>``. Used to verify expert LoRA expert by expert."""
    if not adapter.experts:
        return adapter
    cfg = adapter.meta.model_config
    family = cfg.family if cfg and cfg.family else FAMILIES.get(adapter.meta.family or "")
    modules = dict(adapter.modules)
    for key, x in adapter.experts.items():
        if expert_parts(family, key) is not None and not x.transposed:
            modules.update(split_experts({key: x}, family, layout="verify"))
        else:
            modules.update({f"{key}.{e}": x.expert(e) for e in range(x.num_experts)})
    return replace(adapter, modules=modules, experts={})


def describe(experts: Mapping[str, ExpertLoRA], limit: int = 3) -> str:
    """``'model.layers.0.mlp.experts.gate_up_proj' (E=4, r=2), …``: for messages."""
    items = [f"{k!r} (E={x.num_experts}, r={x.rank})" for k, x in sorted(experts.items())]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _expert(t: Any, e: int) -> Any:
    return TensorMeta(tuple(t.shape[1:]), t.dtype) if _meta(t) else t[e]


def _rows(t: Any, start: int, stop: int) -> Any:
    return TensorMeta((stop - start, *t.shape[1:]), t.dtype) if _meta(t) else t[start:stop]
