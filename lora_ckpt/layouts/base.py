"""The generic reader and writer every layout entry shares: locating files, grouping keys into
modules, naming schemes (fused and renamed modules), RoPE row order, factor orientation, rank and
scale unification, and writing. A layout entry subclasses :class:`Layout`, sets the
:class:`~.spec.LayoutSpec` attributes (its data) and implements only its config translation:
``detect``, ``read_meta`` (scales and flags from its config) and ``write_config``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import fused
from ..adapter import Adapter, AdapterMeta, ModuleLoRA
from ..errors import (
    ConversionError,
    IncompleteAdapterError,
    LayoutError,
    LossyConversionError,
    MissingConfigError,
    UnsupportedAdapterError,
    quote_list,
)
from ..experts import ExpertLoRA, describe, join_experts, split_experts
from ..families import FAMILIES, Family, Fused, ModelConfig, NameMap, model_config_from_dict
from ..io import nonfinite, read_json, release_file_pages, save_tensors
from ..rope import interleaved_to_rotate_half, rotate_half_to_interleaved
from .lossy import drop_unsupported, lossy_parts
from .placement import drop_zero_modules, fill_every_layer
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, LayoutSpec, Role, ScalePolicy

if TYPE_CHECKING:
    import torch

__all__ = ["Layout", "ReadOptions", "Source", "WriteOptions", "nonfinite", "save_tensors"]

logger = logging.getLogger(__name__)


def release_source_pages(adapter: Adapter) -> None:
    """Drop the resident pages of the adapter's memory-mapped source tensors once the output
    tensors are built (copies, where the layout reorders): the write then holds one copy, not two."""
    release_file_pages([*(t for m in adapter.modules.values() for t in (m.A, m.B)),
                        *(t for x in adapter.experts.values() for t in (x.A, x.B))])


class Layout(LayoutSpec):
    """One ecosystem's adapter layout: the :class:`~.spec.LayoutSpec` data plus the machinery."""

    # ---------------------------------------------------------------- per-layout hooks
    def detect(self, src: Source) -> Detection | None:
        """Why ``src`` is in this layout (None if it is not)."""
        raise NotImplementedError

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        """Set each module's scale and flags from the layout's config (modules already parsed)."""
        raise NotImplementedError

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        """Write the layout's config file(s) next to the weights."""

    def unsupported(self, src: Source) -> str | None:
        """A reason to refuse this input outright (e.g. AdaLoRA), else None."""
        return None

    def enabled_parts(self, src: Source, entry: Fused) -> tuple[bool, ...] | None:
        """Which parts a grouped fused module of ``entry`` holds, per the config (None: infer from shapes)."""
        return None

    def read_experts(self, src: Source, opts: ReadOptions) -> tuple[dict[str, ExpertLoRA], set[str]]:
        """The fused MoE expert LoRA the file holds (``Adapter.experts``) and the tensor keys it used."""
        return {}, set()

    def expert_tensors(self, experts: dict[str, ExpertLoRA]) -> dict[str, torch.Tensor]:
        """The tensors of fused expert LoRA under this layout's keys (layouts with ``expert_form`` "stacked")."""
        raise NotImplementedError

    def modules_of(self, src: Source, name: str, parts: dict[Role, Any], family: Family | None,
                   ) -> dict[str, ModuleLoRA]:
        """The canonical module(s) one parsed module of the file holds (mlx-lm's stacked experts hold many)."""
        return {name: self._module(src, name, parts)}

    # ------------------------------------------------------------------- locating
    def weight_file_in(self, names: list[str]) -> str | None:
        """This layout's weight file among the file ``names`` of a folder (the Hub picks files with it)."""
        return next((w for w in self.weight_files if w in names), None)

    def locate(self, path: Path) -> Source | None:
        """The source files of this layout at ``path`` (a file or directory), if present."""
        if path.is_file():
            root, weights = path.parent, path
        else:
            root = path
            found = next((path / n for n in self.weight_files if (path / n).is_file()), None)
            if found is None:
                return None
            weights = found
        cfg = root / self.config_file if self.config_file and (root / self.config_file).is_file() else None
        return Source(path=path, root=root, weights=weights, config_path=cfg, config_reader=self.read_config)

    def read_config(self, path: Path) -> dict[str, Any]:
        """The layout's config file as a dict (JSON unless the layout says otherwise)."""
        return read_json(path, what=path.name)

    # ------------------------------------------------------------------ reading
    def read(self, src: Source, opts: ReadOptions) -> Adapter:
        reason = self.unsupported(src)
        if reason:
            raise UnsupportedAdapterError(f"{src.path}: {reason}", layout=self.name, path=str(src.path))
        groups: dict[str, dict[Role, torch.Tensor]] = {}
        extra: dict[str, torch.Tensor] = {}
        experts, expert_keys = self.read_experts(src, opts)
        for key, t in src.tensors.items():
            if key in expert_keys:
                continue
            parsed = self.split(key)
            if parsed:
                groups.setdefault(parsed[0], {})[parsed[1]] = t
            else:
                extra[key] = t
        self.check_extra(src, extra)
        model_cfg = opts.base_config or self.implied_model_config(src)
        family = model_cfg.family if model_cfg else None
        names_family = family if family is not None or self.scheme == "hf" else self._guess_family(groups)
        raw: dict[str, ModuleLoRA] = {}
        for name, parts in groups.items():
            for mod_name, m in self.modules_of(src, self.current_name(name), parts, names_family).items():
                if mod_name in raw:
                    raise LayoutError(f"{src.path}: two {self.name} modules are named {mod_name!r}; expected one; "
                                      "the file mixes two namings of the same module", layout=self.name,
                                      path=str(src.path))
                raw[mod_name] = m
        if not raw and not experts:
            raise LayoutError(f"{src.path}: no adapter tensors (keys ending in {quote_list(self.leaves.values())}); "
                              "the adapter is empty", layout=self.name, path=str(src.path))
        adapter = Adapter(modules=raw, extra={k.removeprefix(self.prefix): v for k, v in extra.items()},
                          meta=AdapterMeta(family=family.name if family else None, source_layout=self.name,
                                           source_path=str(src.path), config=dict(src.config or {}),
                                           model_config=model_cfg), experts=experts)
        self.read_meta(src, adapter, opts)  # the config describes the file's modules: before fusing/splitting
        adapter.modules = self.to_hf(src, raw, names_family, model_cfg)
        if model_cfg is not None:
            model_cfg.check_modules(adapter.modules, source=str(src.path))
        if not src.shapes_only:  # row order does not change shapes
            self._rope(adapter, model_cfg, to_hf=True)
            if self.every_layer:
                drop_zero_modules(adapter)
            bad = nonfinite(src.tensors, release_pages=True) if opts.scan_values else []
            if bad:
                adapter.meta.notes.append(f"{len(bad)} tensor(s) hold NaN/Inf ({quote_list(bad, 3)}); they are kept "
                                          "bit-for-bit, but the adapter computes NaN/Inf where they are used")
        adapter.check()
        return adapter

    def _guess_family(self, groups: dict[str, Any]) -> Family:
        """Without a model config, find the family whose names know every module (for the names
        only; RoPE and fused q/k/v rows still need the config)."""
        names = [self.current_name(n) for n in groups]
        for fam in FAMILIES.values():
            if self.scheme in fam.maps:
                nm = fam.names(self.scheme).modules
                fused = NameMap({t: t for fe in fam.fused.get(self.scheme, ()) for t in fe.other})
                if all(nm.to_hf(n) is not None or fused.to_hf(n) is not None for n in names):
                    return fam
        raise LayoutError(f"no model family's {self.scheme} names fit modules {quote_list(groups)}",
                          layout=self.name)

    def to_hf(self, src: Source, raw: dict[str, ModuleLoRA], family: Family | None,
               model_cfg: ModelConfig | None) -> dict[str, ModuleLoRA]:
        """Modules named in this layout's scheme -> HF names, splitting/fusing what the family fuses."""
        if self.scheme == "hf" or family is None:
            return raw
        entries = family.fused.get(self.scheme, ())
        enabled = {fe: on for fe in entries if (on := self.enabled_parts(src, fe)) is not None}
        split, used = fused.separate(entries, raw, model_cfg, to_hf=True, grouped=self.fused_lora == "grouped",
                                     enabled=enabled)
        joined, used2 = fused.join(entries, {n: m for n, m in raw.items() if n not in used}, model_cfg, to_hf=True)
        names = family.names(self.scheme).modules
        modules = {**split, **joined}
        for name, m in raw.items():
            if name in used or name in used2:
                continue
            hf = names.to_hf(name)
            if hf is None:
                raise LayoutError(
                    f"{src.path}: {self.name} module {name!r} maps to no {family.name} model module; expected names "
                    f"like {quote_list(list(names.table.values())[:3])}", layout=self.name, path=str(src.path))
            if hf in modules:
                raise LayoutError(f"{src.path}: two {self.name} modules map to {hf!r}; expected one; the file mixes "
                                  "two namings of the same module", layout=self.name, path=str(src.path))
            modules[hf] = m
        return modules

    def _module(self, src: Source, name: str, parts: dict[Role, torch.Tensor]) -> ModuleLoRA:
        emb = "emb_A" in parts or "emb_B" in parts
        a_role, b_role = ("emb_A", "emb_B") if emb else ("A", "B")  # type: tuple[Role, Role]
        if a_role not in parts or b_role not in parts:
            have, miss = (a_role, b_role) if a_role in parts else (b_role, a_role)
            raise IncompleteAdapterError(
                f"{src.path}: module {name!r} has {self.leaves[have]} but no {self.leaves[miss]}; expected both; "
                "the adapter file is incomplete", key=self.key(name, miss))
        A, B = parts[a_role], parts[b_role]
        for role, t in ((a_role, A), (b_role, B)):
            if t.dim() != 2:
                raise UnsupportedAdapterError(
                    f"{src.path}: {self.key(name, role)} is {t.dim()}-D {tuple(t.shape)}, expected a 2-D factor; "
                    "stacked (MergedLinear/enable_lora or MoE) factors are not supported by this layout",
                    layout=self.name, path=str(src.path))
        if self.transposed:  # views (no copy of the adapter); made contiguous where a consumer needs it
            A, B = A.T, B.T
        return ModuleLoRA(A=A, B=B, scale=1.0, magnitude=parts.get("magnitude"), bias=parts.get("bias"),
                          kind="embedding" if emb else "linear")

    def check_extra(self, src: Source, extra: dict[str, torch.Tensor]) -> None:
        """Tensors that are not adapter factors: refused unless the layout carries full tensors; and
        never a tensor that looks like an adapter factor under another prefix (consumers skip those
        silently)."""
        stray = [k for k in extra if re.search(rf"\.({self.leaf_pattern()})$", k)]
        if stray:
            raise LayoutError(
                f"{src.path}: adapter tensor(s) without the {self.name} key prefix {self.prefix!r}: "
                f"{quote_list(stray)}; consumers ignore such keys silently; fix the prefix (or pass --from with the "
                "right layout)",
                layout=self.name, path=str(src.path))
        if extra and "extra" not in self.features:
            raise LayoutError(
                f"{src.path}: {len(extra)} tensor(s) are not {self.name} adapter tensors: {quote_list(extra)}; "
                f"expected keys ending in {quote_list(self.leaves.values())}; pass --from to choose another layout",
                layout=self.name, path=str(src.path))

    def implied_model_config(self, src: Source) -> ModelConfig | None:
        """A model config found with the adapter (e.g. torchtune copies config.json)."""
        p = src.sibling("config.json")
        return model_config_from_dict(read_json(p, what="config.json"), source=str(p)) if p else None

    # -------------------------------------------------------------------- RoPE
    def _rope(self, adapter: Adapter, model_cfg: ModelConfig | None, *, to_hf: bool) -> None:
        family: Family | None = model_cfg.family if model_cfg else (
            FAMILIES.get(adapter.meta.family) if adapter.meta.family else None)
        qk = [n for n in adapter.modules if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj")]
        if not qk or self.scheme == "hf":
            return
        if family is None or model_cfg is None:
            raise MissingConfigError(
                f"{self.name} stores q/k rows in Meta order for Llama/Mistral/Gemma but not for Qwen, and "
                f"permuting them needs head counts; no model config was found for modules {quote_list(qk, 2)}; "
                "pass --base-config with the base model's config.json or params.json")
        if not family.interleaved(self.scheme):
            return
        perm = interleaved_to_rotate_half if to_hf else rotate_half_to_interleaved
        for name in qk:
            n, hd = model_cfg.heads(name)  # type: ignore[misc]
            m = adapter.modules[name]
            m.B = perm(m.B, n, hd)
            if m.magnitude is not None:
                m.magnitude = perm(m.magnitude, n, hd)
            if m.bias is not None:
                m.bias = perm(m.bias, n, hd)

    # ------------------------------------------------------------------ writing
    def lossy_parts(self, adapter: Adapter) -> list[str]:
        """What this layout cannot hold, as readable items."""
        return lossy_parts(adapter, self.features)

    def drop_unsupported(self, adapter: Adapter, *, allow_lossy: bool) -> Adapter:
        """``adapter`` without what this layout cannot hold (only with ``allow_lossy``)."""
        return drop_unsupported(adapter, self.features, layout=self.name, allow_lossy=allow_lossy)

    def prepare(self, adapter: Adapter, opts: WriteOptions) -> Adapter:
        """Drop what cannot be held (only with allow_lossy), unify rank/scale as the layout needs."""
        adapter = self.expert_form_for(adapter, opts)
        adapter = self.drop_unsupported(adapter, allow_lossy=opts.allow_lossy)
        adapter = adapter.cast(opts.dtype)
        fixed = self.fixed_scale if self.scale_policy is ScalePolicy.FIXED else None
        if fixed is not None:
            adapter = replace(adapter, modules={n: m.rescaled(fixed) for n, m in adapter.modules.items()})
        if self.one_rank or self.scale_policy is ScalePolicy.GLOBAL:
            if len(adapter.scales()) > 1 or len(adapter.ranks()) > 1:
                logger.info("%s has one rank and one scale: ranks zero-padded to the largest, scale differences "
                            "folded into lora_B (exact up to float32 rounding)", self.name)
            scale = fixed if fixed is not None else (adapter.scales().most_common(1) or [(1.0, 0)])[0][0]
            adapter = replace(adapter, modules={n: m.rescaled(scale) for n, m in adapter.modules.items()})
            rank = self._uniform_rank(adapter, opts)
            adapter = replace(adapter, modules={n: m.padded(rank) if m.rank < rank else m
                                                for n, m in adapter.modules.items()})
        if self.every_layer:
            adapter = fill_every_layer(adapter, opts.base_config or adapter.meta.model_config, layout=self.name)
        return adapter

    def expert_form_for(self, adapter: Adapter, opts: WriteOptions) -> Adapter:
        """MoE expert LoRA in the form this layout holds (:attr:`expert_form`; ``opts.experts`` picks
        for layouts that hold both): fused experts split into per-expert modules, per-expert modules
        joined into fused experts, or refused (dropped with ``allow_lossy``), all exactly."""
        cfg = opts.base_config or adapter.meta.model_config
        family = cfg.family if cfg else FAMILIES.get(adapter.meta.family or "")
        form: str = self.expert_form
        if form == "stacked" and opts.experts != "keep":
            form = opts.experts
        if form == "fused":
            joined, used = join_experts(adapter.modules, family, n_experts=cfg.n_experts if cfg else None)
            if not joined:
                return adapter
            return replace(adapter, modules={n: m for n, m in adapter.modules.items() if n not in used},
                           experts={**adapter.experts, **joined})
        if not adapter.experts or form == "stacked":
            return adapter
        if form == "none":
            if not opts.allow_lossy:
                raise LossyConversionError(
                    f"{self.name} cannot hold LoRA on MoE experts ({describe(adapter.experts)}); expected an adapter "
                    "without expert LoRA; convert to peft, native, mlx or mistral, or pass --allow-lossy to drop "
                    "them", dropped=sorted(adapter.experts))
            logger.warning("dropping what %s cannot hold: MoE expert LoRA (%s)", self.name, describe(adapter.experts))
            return replace(adapter, experts={})
        split = split_experts(adapter.experts, family, layout=self.name)
        return replace(adapter, modules={**adapter.modules, **split}, experts={})

    def _uniform_rank(self, adapter: Adapter, opts: WriteOptions) -> int:
        """The one rank of a one-rank layout: the largest rank *in this layout's modules* (a fused
        canonical module that the layout splits may have a larger rank than its parts)."""
        cfg = opts.base_config or adapter.meta.model_config
        family = cfg.family if cfg else FAMILIES.get(adapter.meta.family or "")
        if self.scheme != "hf" and family is not None and family.fused.get(self.scheme):
            try:
                return max(m.B.shape[1] for m in self.from_hf(adapter.modules, family, cfg).values())
            except ConversionError:
                pass  # reported with its full message by tensors_for
        return max(adapter.ranks(), default=0)

    def tensors_for(self, adapter: Adapter, model_cfg: ModelConfig | None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under this layout's keys, rows and orientation: views where they
        can be (transposes, slices of the source), made contiguous one at a time by :func:`save_tensors`."""
        work = Adapter({n: ModuleLoRA(**vars(m)) for n, m in adapter.modules.items()}, adapter.extra, adapter.meta)
        self._rope(work, model_cfg, to_hf=False)
        family = model_cfg.family if model_cfg else FAMILIES.get(adapter.meta.family or "")
        names = family.names(self.scheme).modules if self.scheme != "hf" and family else None
        if self.scheme != "hf" and names is None:
            raise MissingConfigError(f"{self.name} names modules by model family; pass --base-config")
        out: dict[str, torch.Tensor] = {}
        modules = self.from_hf(work.modules, family, model_cfg)
        if self.one_rank and self.fused_lora == "plain":  # split parts can come out below the one rank
            rank = max((m.rank for m in modules.values()), default=0)
            modules = {n: m.padded(rank) if m.rank < rank else m for n, m in modules.items()}
        for name, m in modules.items():
            A, B = (m.A.T, m.B.T) if self.transposed else (m.A, m.B)
            roles: Iterable[tuple[Role, torch.Tensor | None]] = (
                ("emb_A" if m.kind == "embedding" else "A", A), ("emb_B" if m.kind == "embedding" else "B", B),
                ("magnitude", m.magnitude), ("bias", m.bias))
            for role, t in roles:
                if t is not None:
                    out[self.key(name, role)] = t
        for k, v in work.extra.items():
            out[self.prefix + k] = v
        if adapter.experts:
            out.update(self.expert_tensors(adapter.experts))
        return out

    def from_hf(self, modules: dict[str, ModuleLoRA], family: Family | None,
                 model_cfg: ModelConfig | None) -> dict[str, ModuleLoRA]:
        """HF-named modules -> this layout's scheme, splitting/fusing what the family fuses."""
        if self.scheme == "hf" or family is None:
            return modules
        entries = family.fused.get(self.scheme, ())
        split, used = fused.separate(entries, modules, model_cfg, to_hf=False)
        joined, used2 = fused.join(entries, {n: m for n, m in modules.items() if n not in used}, model_cfg,
                                   to_hf=False, grouped=self.fused_lora == "grouped")
        names = family.names(self.scheme).modules
        out = {**split, **joined}
        for hf, m in modules.items():
            if hf in used or hf in used2:
                continue
            name = names.to_other(hf)
            if name is None:
                raise ConversionError(f"module {hf!r} has no {self.name} name for model family {family.name}; "
                                      f"{self.name} cannot hold it")
            out[name] = m
        return out

    def write(self, adapter: Adapter, out: Path, opts: WriteOptions) -> Adapter:
        """Write ``adapter`` into the (empty, temporary) directory ``out``; return what was written."""
        adapter = self.prepare(adapter, opts)
        model_cfg = opts.base_config or adapter.meta.model_config
        tensors = self.tensors_for(adapter, model_cfg)
        release_source_pages(adapter)
        out.mkdir(parents=True, exist_ok=True)
        if self.container_key:
            tensors = {self.container_key: tensors}  # type: ignore[dict-item]
        save_tensors(tensors, out / self.weight_files[0], pickle=self.pickle)
        self.write_config(adapter, out, replace(opts, base_config=model_cfg))
        return adapter


