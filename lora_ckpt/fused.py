"""Fused <-> split projections and stacked MoE experts, exactly (formats.md §13).

One mechanism for every many-to-one module correspondence a layout meets: LitGPT's fused
``attn.qkv`` <-> HF ``q_proj``/``k_proj``/``v_proj``, HF Phi-3 ``qkv_proj``/``gate_up_proj`` <->
torchtune's split ``q_proj``/``k_proj``/``v_proj`` and ``w1``/``w3``, and mlx-lm's stacked
``switch_mlp`` experts <-> per-expert HF modules. The correspondences themselves are data in
:mod:`lora_ckpt.families` (:class:`~lora_ckpt.families.Fused`, ``Family.stacked_experts``).

A fused module's LoRA comes in two parameterisations:

* **plain** (PEFT on HF ``qkv_proj``, one LoRA on the whole fused Linear): one ``A (r, in)``
  shared by all rows, ``B (Σout, r)``.
* **grouped** (LitGPT ``LoRAQKVLinear``, loralib ``MergedLinear``): ``A (r·n, in)`` stacks one A
  per enabled part, ``B (Σ enabled out, r)`` stacks the parts' B rows, and part *i* uses only
  A-group *i* — a compact storage of ``A = [A_q; A_k; A_v]``, ``B = blkdiag(B_q, B_k, B_v)``.

Rules (all exact; scale differences are folded into B in float32):

* split plain: each part keeps the full A and takes its row slice of B (and of magnitude, bias);
  columns of a part's B that are exactly zero are dropped with their A rows (they contribute
  nothing), so a block-diagonal fuse splits back to the original ranks.
* fuse plain: identical A's (and scales) -> concatenate B's; otherwise ``A = [A_1; ...; A_n]``
  and ``B = blkdiag(B_1, ..., B_n)`` (rank Σr). Missing parts contribute zero rows.
* group / ungroup: the grouped storage above; parts are zero-padded to a common rank.

Nothing here imports torch at module level (``inspect`` reads shapes only, as
:class:`~lora_ckpt.io.TensorMeta`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .adapter import ModuleLoRA
from .errors import ConversionError, LayoutError, UnsupportedAdapterError, quote_list
from .families import FAMILIES, Family, Fused, ModelConfig, template_regex
from .io import TensorMeta

if TYPE_CHECKING:
    import torch

__all__ = ["fuse", "group", "join", "separate", "split", "stack_experts", "ungroup", "unstack_experts"]


def _meta(t: Any) -> bool:
    return isinstance(t, TensorMeta)


def _rows(t: Any, start: int, stop: int) -> Any:
    if _meta(t):
        return TensorMeta((stop - start, *t.shape[1:]), t.dtype)
    return t[start:stop]


# ------------------------------------------------------------------------ one module
def split(m: ModuleLoRA, sizes: Sequence[int]) -> list[ModuleLoRA]:
    """A plain fused module -> one module per row block (full A, row slice of B; zero B columns
    dropped with their A rows)."""
    if sum(sizes) != m.out_features:
        raise ConversionError(f"cannot split {m.out_features} rows into parts of {tuple(sizes)} rows")
    out, start = [], 0
    for size in sizes:
        stop = start + size
        A, B = m.A, _rows(m.B, start, stop)
        if not _meta(B):
            keep = B.ne(0).any(dim=0)
            if 0 < int(keep.sum()) < B.shape[1]:
                A, B = A[keep], B[:, keep]
        out.append(replace(m, A=A, B=B, magnitude=None if m.magnitude is None else _rows(m.magnitude, start, stop),
                           bias=None if m.bias is None else _rows(m.bias, start, stop)))
        start = stop
    return out


def fuse(parts: Sequence[ModuleLoRA | None], sizes: Sequence[int]) -> ModuleLoRA:
    """Parts (None: not adapted) -> one plain fused module with ``sum(sizes)`` rows."""
    present = [p for p in parts if p is not None]
    if not present:
        raise ConversionError("nothing to fuse")
    _same_kind(present)
    scale = Counter(p.scale for p in present).most_common(1)[0][0]
    parts = [None if p is None else p.rescaled(scale) for p in parts]
    if any(p is not None and p.magnitude is not None for p in parts) and not all(
            p is not None and p.magnitude is not None for p in parts):
        raise UnsupportedAdapterError(
            "DoRA magnitudes on only some parts of a fused projection: the fused magnitude of an unadapted part "
            "is the base weight's row norm, which the adapter does not hold; merge the adapter instead")
    first = present[0]
    meta = _meta(first.A)
    same_a = (len(present) == len(parts) and not meta
              and all(p.A.shape == first.A.shape and bool((p.A == first.A).all()) for p in present))
    A: Any
    B: Any  # TensorMeta stand-ins when reading shapes only, else tensors
    if meta:  # shapes only (inspect): the stacked form's shapes
        rank = first.rank if len(present) == 1 else sum(p.rank for p in present)
        A = TensorMeta((rank, first.A.shape[1]), str(first.A.dtype))  # a TensorMeta dtype is already a str
        B = TensorMeta((sum(sizes), rank), str(first.B.dtype))
    else:
        import torch

        if same_a:
            A, B = first.A, torch.cat([p.B for p in present])
        else:
            A = torch.cat([p.A for p in present])
            B = torch.zeros(sum(sizes), A.shape[0], dtype=first.B.dtype)
            row, col = 0, 0
            for p, size in zip(parts, sizes, strict=False):
                if p is not None:
                    B[row:row + size, col:col + p.rank] = p.B
                    col += p.rank
                row += size
    magnitude = None if first.magnitude is None else _cat([p.magnitude for p in parts])  # type: ignore[union-attr]
    bias = None
    if any(p is not None and p.bias is not None for p in parts):
        bias = _cat([_zeros_like_rows(p.bias if p is not None else None, size, first.B)
                     for p, size in zip(parts, sizes, strict=False)])
    return ModuleLoRA(A=A, B=B, scale=scale, magnitude=magnitude, bias=bias, kind=first.kind,
                      fan_in_fan_out=first.fan_in_fan_out)


def group(parts: Sequence[ModuleLoRA | None], in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Enabled parts (None: enabled but not adapted, zero-filled) -> grouped ``(A (r·n, in), B (Σout, r))``.

    The parts must share one scale (the layout's ``prepare`` unifies it); ranks are zero-padded
    to the largest. A zero-filled part needs its row count: pass a zero-rank module for it, or
    use :func:`join` which knows the sizes.
    """
    import torch

    present = [p for p in parts if p is not None]
    _same_kind(present)
    if any(p.magnitude is not None or p.bias is not None for p in present):
        raise UnsupportedAdapterError("grouped (LitGPT-style) fused LoRA has no DoRA magnitudes or LoRA biases")
    r = max(p.rank for p in present)
    A = torch.cat([p.padded(r).A for p in present])
    B = torch.cat([p.padded(r).B for p in present])
    return A, B


def ungroup(A: Any, B: Any, sizes: Sequence[int], enabled: Sequence[bool], scale: float) -> list[ModuleLoRA | None]:
    """Grouped ``(A (r·n, in), B (Σ enabled out, r))`` -> one module per part (None where disabled)."""
    n = sum(enabled)
    outs = [s for s, e in zip(sizes, enabled, strict=False) if e]
    if n == 0 or A.shape[0] % n or B.shape[0] != sum(outs) or A.shape[0] // n != B.shape[1]:
        raise LayoutError(
            f"a grouped fused LoRA with lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} does not fit "
            f"{n} enabled part(s) of {tuple(outs)} rows; expected lora_A (r·{n}, in) and lora_B ({sum(outs)}, r); "
            "check the enabled parts (LitGPT lora_query/lora_key/lora_value) and the base config")
    r = A.shape[0] // n
    out: list[ModuleLoRA | None] = []
    group_i, row = 0, 0
    for size, on in zip(sizes, enabled, strict=False):
        if not on:
            out.append(None)
            continue
        out.append(ModuleLoRA(A=_rows(A, group_i * r, (group_i + 1) * r), B=_rows(B, row, row + size), scale=scale))
        group_i += 1
        row += size
    return out


# ------------------------------------------------------------------- module dicts
def separate(fused_entries: Sequence[Fused], modules: dict[str, ModuleLoRA], cfg: ModelConfig | None, *,
             to_hf: bool, grouped: bool = False, enabled: Mapping[Fused, Sequence[bool]] | None = None,
             ) -> tuple[dict[str, ModuleLoRA], set[str]]:
    """Split every module that is the fused side of an entry.

    Args:
        fused_entries: the family's :class:`~lora_ckpt.families.Fused` entries for a scheme.
        modules: modules keyed by the names of the side being converted *from*.
        cfg: the base model config (head counts for ``"qkv"`` rows).
        to_hf: converting scheme -> HF (the fused side is ``other``) or HF -> scheme (``hf``).
        grouped: the fused modules are in grouped storage (LitGPT) rather than plain.
        enabled: per entry, which parts a grouped module holds (default: inferred from sizes).

    Returns:
        (new modules keyed by the target side's names, names consumed from ``modules``).
    """
    out: dict[str, ModuleLoRA] = {}
    used: set[str] = set()
    for fe in fused_entries:
        src, dst = (fe.other, fe.hf) if to_hf else (fe.hf, fe.other)
        if len(src) != 1:
            continue
        rx = template_regex(src[0])
        for name, m in modules.items():
            hit = rx.fullmatch(name)
            if not hit:
                continue
            if grouped:
                sizes = fe.sizes(cfg, _grouped_total(fe, cfg, m))
                on = (enabled or {}).get(fe) or _infer_enabled(name, sizes, m)
                parts: Sequence[ModuleLoRA | None] = ungroup(m.A, m.B, sizes, on, m.scale)
            else:
                parts = split(m, fe.sizes(cfg, m.out_features))
            for template, part in zip(dst, parts, strict=False):
                if part is not None:
                    out[template.format(*hit.groups())] = part
            used.add(name)
    return out, used


def join(fused_entries: Sequence[Fused], modules: dict[str, ModuleLoRA], cfg: ModelConfig | None, *,
         to_hf: bool, grouped: bool = False) -> tuple[dict[str, ModuleLoRA], set[str]]:
    """Fuse every set of modules that is the split side of an entry (missing parts: zero rows).

    In grouped storage (``grouped=True``) the result's A is (r·n, in) and B (Σ enabled out, r):
    the enabled parts are those present in any layer (one flag per part, as LitGPT has), and a
    layer that lacks an enabled part gets zeros for it. Such a module is storage, not a valid
    :class:`ModuleLoRA` (its rank check would fail); layouts only write its tensors.

    Returns:
        (fused modules keyed by the target side's names, names consumed from ``modules``).
    """
    out: dict[str, ModuleLoRA] = {}
    used: set[str] = set()
    for fe in fused_entries:
        src, dst = (fe.other, fe.hf) if to_hf else (fe.hf, fe.other)
        if len(dst) != 1:
            continue
        found: dict[tuple[str, ...], dict[int, str]] = {}
        for name in modules:
            for i, template in enumerate(src):
                hit = template_regex(template).fullmatch(name)
                if hit:
                    found.setdefault(hit.groups(), {})[i] = name
        on = [any(i in idx for idx in found.values()) for i in range(len(src))]
        for key, idx in sorted(found.items()):
            parts = [modules[idx[i]] if i in idx else None for i in range(len(src))]
            first = next(p for p in parts if p is not None)
            sizes = (tuple(p.out_features for p in parts) if all(p is not None for p in parts) and cfg is None  # type: ignore[union-attr]
                     else fe.sizes(cfg, _total_from_parts(fe, cfg, parts)))
            if any(p is not None and p.out_features != size for p, size in zip(parts, sizes, strict=False)):
                raise ConversionError(f"{dst[0].format(*key)}: parts with {[p and p.out_features for p in parts]} rows "
                                      f"do not fit the fused rows {tuple(sizes)}")
            if grouped:
                filled = [p if p is not None else _zero(first, size)
                          for p, size, e in zip(parts, sizes, on, strict=False) if e]
                A, B = group(filled, first.A.shape[1])
                out[dst[0].format(*key)] = ModuleLoRA(A=A, B=B, scale=first.scale)
            else:
                out[dst[0].format(*key)] = fuse(parts, sizes)
            used.update(idx.values())
    return out, used


def _grouped_total(fe: Fused, cfg: ModelConfig | None, m: ModuleLoRA) -> int:
    if fe.rows == "qkv" and cfg is not None:
        return (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    if fe.rows == "qkv":
        fe.sizes(None, 0)  # raises MissingConfigError
    raise ConversionError("grouped fused LoRA with equal row blocks needs the enabled parts to size them")


def _total_from_parts(fe: Fused, cfg: ModelConfig | None, parts: Sequence[ModuleLoRA | None]) -> int:
    if fe.rows == "qkv":
        if cfg is None:
            fe.sizes(None, 0)  # raises MissingConfigError
        return (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim  # type: ignore[union-attr]
    outs = {p.out_features for p in parts if p is not None}
    return outs.pop() * len(parts)


def _infer_enabled(name: str, sizes: Sequence[int], m: ModuleLoRA) -> tuple[bool, ...]:
    """The enabled parts of a grouped module from its B rows, when only one subset fits."""
    n = len(sizes)
    fits = [mask for mask in _masks(n) if sum(s for s, e in zip(sizes, mask, strict=False) if e) == m.B.shape[0]
            and m.A.shape[0] % sum(mask) == 0 and m.A.shape[0] // sum(mask) == m.B.shape[1]]
    if len(fits) != 1:
        raise LayoutError(
            f"{name}: lora_B has {m.B.shape[0]} rows, which {'several' if fits else 'no'} combinations of the "
            f"parts' {tuple(sizes)} rows give; expected the enabled parts in the config (LitGPT hyperparameters.yaml "
            "lora_query/lora_key/lora_value); put it beside the weights")
    return fits[0]


def _masks(n: int) -> list[tuple[bool, ...]]:
    return [tuple(bool(i >> b & 1) for b in range(n)) for i in range(1, 1 << n)]


def _zero(like: ModuleLoRA, rows: int) -> ModuleLoRA:
    import torch

    return ModuleLoRA(A=torch.zeros(like.rank, like.A.shape[1], dtype=like.A.dtype),
                      B=torch.zeros(rows, like.rank, dtype=like.B.dtype), scale=like.scale, kind=like.kind,
                      fan_in_fan_out=like.fan_in_fan_out)


def _same_kind(parts: Sequence[ModuleLoRA]) -> None:
    kinds = {(p.kind, p.fan_in_fan_out, p.A.shape[1]) for p in parts}
    if len(kinds) > 1:
        raise ConversionError(f"cannot fuse parts that differ in kind, fan_in_fan_out or input size: {sorted(kinds)}")


def _cat(ts: Sequence[Any]) -> Any:
    if _meta(ts[0]):
        return TensorMeta((sum(t.shape[0] for t in ts), *ts[0].shape[1:]), ts[0].dtype)
    import torch

    return torch.cat(list(ts))


def _zeros_like_rows(t: Any, rows: int, like: Any) -> Any:
    if t is not None:
        return t
    if _meta(like):
        return TensorMeta((rows,), like.dtype)
    import torch

    return torch.zeros(rows, dtype=like.dtype)


# ------------------------------------------------------------------------ MoE experts
def unstack_experts(family: Family | None, name: str, A: Any, B: Any, *, layout: str) -> dict[str, ModuleLoRA]:
    """A stacked-experts LoRA (mlx-lm ``LoRASwitchLinear``: A (E, r, in) or, older, (E·r, in);
    B (E, out, r); not transposed) -> one module per expert, keyed by the family's HF names."""
    hf_template, groups = _expert_template(family, name, layout=layout)
    if B.dim() != 3 or A.dim() not in (2, 3):
        raise LayoutError(f"{name}: stacked expert factors {tuple(A.shape)} / {tuple(B.shape)}; expected "
                          "lora_a (E, r, in) and lora_b (E, out, r)", layout=layout)
    E, r = B.shape[0], B.shape[2]
    out = {}
    for e in range(E):
        a: Any
        b: Any
        a = (TensorMeta((r, A.shape[-1]), A.dtype) if _meta(A)
             else A[e] if A.dim() == 3 else A[e * r:(e + 1) * r])
        b = TensorMeta(B.shape[1:], B.dtype) if _meta(B) else B[e]
        out[hf_template.format(*groups, e)] = ModuleLoRA(A=a, B=b, scale=1.0)
    return out


def stack_experts(family: Family | None, modules: dict[str, ModuleLoRA], *, n_experts: int | None,
                  layout: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], set[str]]:
    """Per-expert HF modules -> stacked ``(A (E, r, in), B (E, out, r), scale)`` per switch module.

    Experts missing from the adapter get zero factors (a no-op); ranks are padded to the largest.
    """
    import torch

    tables = [family.stacked_experts] if family is not None else [f.stacked_experts for f in FAMILIES.values()]
    pairs = {(switch, expert) for table in tables for switch, expert in table.items()}
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    used: set[str] = set()
    for switch, expert in sorted(pairs):
        rx = template_regex(expert)
        found: dict[tuple[str, ...], dict[int, str]] = {}
        for name in modules:
            hit = rx.fullmatch(name)
            if hit:
                found.setdefault(hit.groups()[:-1], {})[int(hit.groups()[-1])] = name
        for key, experts in sorted(found.items()):
            if set(experts.values()) & used:
                continue
            mods = {e: modules[n] for e, n in experts.items()}
            if any(m.magnitude is not None or m.bias is not None for m in mods.values()):
                raise UnsupportedAdapterError(
                    f"{switch.format(*key)}: mlx-lm's LoRASwitchLinear has no DoRA or LoRA bias; expected plain "
                    "LoRA on MoE experts", layout=layout)
            scales = {m.scale for m in mods.values()}
            if len(scales) > 1:
                raise ConversionError(f"{switch.format(*key)}: experts with different scales {sorted(scales)}")
            E = max(n_experts or 0, max(experts) + 1)
            r = max(m.rank for m in mods.values())
            like = next(iter(mods.values()))
            A = torch.zeros(E, r, like.A.shape[1], dtype=like.A.dtype)
            B = torch.zeros(E, like.B.shape[0], r, dtype=like.B.dtype)
            for e, m in mods.items():
                p = m.padded(r)
                A[e], B[e] = p.A, p.B
            out[switch.format(*key)] = (A, B, like.scale)
            used.update(experts.values())
    return out, used


def _expert_template(family: Family | None, name: str, *, layout: str) -> tuple[str, tuple[str, ...]]:
    candidates = [family] if family is not None else list(FAMILIES.values())
    for fam in candidates:
        for switch, expert in fam.stacked_experts.items():
            hit = template_regex(switch).fullmatch(name)
            if hit:
                return expert, hit.groups()
    known = sorted({k for f in FAMILIES.values() for k in f.stacked_experts})
    raise UnsupportedAdapterError(
        f"{name}: stacked MoE expert LoRA (SwitchLinear) for a model family "
        f"{'(' + family.name + ') ' if family else ''}without per-expert module names in lora-ckpt; expected one of "
        f"{quote_list(known, 3)}; other layouts cannot hold it", layout=layout)
