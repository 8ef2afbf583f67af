"""lora-ckpt's own layout: one self-describing ``lora_adapter.safetensors``. Keys are those of
:class:`lora_ckpt.LoRALinear` (``<module>.lora_A.weight``), so ``model.load_state_dict`` of an
``inject_lora`` model takes the file directly; per-module scales and flags live in the header
metadata. Lossless for everything PEFT can express."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..adapter import Adapter
from ..errors import ConfigError, LayoutError, MissingConfigError
from ..experts import ExpertLoRA
from ..io import read_safetensors_header, save_tensors
from .base import Layout, release_source_pages
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role

META_KEY = "lora_ckpt"
VERSION = 1


class NativeLayout(Layout):
    name = "native"
    order = 10
    summary = "lora-ckpt's own lora_adapter.safetensors (LoRALinear keys, scales in the header)"
    weight_files = ("lora_adapter.safetensors",)
    leaves: ClassVar[dict[Role, str]] = {
        "A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude", "bias": "lora_B.bias",
        "emb_A": "lora_embedding_A.weight", "emb_B": "lora_embedding_B.weight"}
    features = frozenset({"dora", "bias", "embedding", "extra", "fan_in_fan_out"})
    keeps_peft_config = True
    expert_form = "stacked"  # <param>.lora_A (E, r, in), <param>.lora_B (E, out, r); scales in the header

    def _meta(self, src: Source) -> dict[str, Any] | None:
        if src.weights.suffix != ".safetensors":
            return None
        raw = read_safetensors_header(src.weights).metadata.get(META_KEY)
        if raw is None:
            return None
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{src.weights}: '{META_KEY}' header metadata is not JSON ({e}); expected lora-ckpt's "
                              "metadata; rewrite the file with lora-ckpt convert", path=src.weights) from e
        if not isinstance(meta, dict) or not isinstance(meta.get("scales"), dict):
            raise ConfigError(f"{src.weights}: '{META_KEY}' header metadata has no 'scales' object; expected "
                              "lora-ckpt's metadata; rewrite the file with lora-ckpt convert", path=src.weights)
        return meta

    def detect(self, src: Source) -> Detection | None:
        if self._meta(src) is not None:
            return Detection(3, f"{src.weights.name} carries lora-ckpt metadata")
        return None

    def read_experts(self, src: Source, opts: ReadOptions) -> tuple[dict[str, ExpertLoRA], set[str]]:
        meta = self._meta(src) or {}
        experts: dict[str, ExpertLoRA] = {}
        used: set[str] = set()
        for name, info in (meta.get("experts") or {}).items():
            keys = (f"{name}.lora_A", f"{name}.lora_B")
            if not all(k in src.index for k in keys) or not isinstance(info, dict) or "scale" not in info:
                raise LayoutError(f"{src.weights}: expert LoRA {name!r} is recorded in the header but "
                                  f"{keys[0]} / {keys[1]} or its scale are missing; the file is incomplete",
                                  layout=self.name, path=str(src.weights))
            experts[name] = ExpertLoRA(A=src.tensors[keys[0]], B=src.tensors[keys[1]], scale=float(info["scale"]),
                                       transposed=bool(info.get("transposed")))
            used.update(keys)
        return experts, used

    def expert_tensors(self, experts: dict[str, ExpertLoRA]) -> dict[str, Any]:
        out = {}
        for name, x in experts.items():
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = x.A, x.B  # views: save_tensors copies one at a time
        return out

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        meta = self._meta(src)
        if meta is None:
            raise MissingConfigError(f"{src.weights}: no '{META_KEY}' metadata (scales); not a lora-ckpt native file")
        scales, fifo = meta["scales"], set(meta.get("fan_in_fan_out", []))
        missing = [n for n in adapter.modules if n not in scales]
        if missing:
            raise ConfigError(f"{src.weights}: no scale recorded for {missing[0]!r}", path=src.weights)
        for name, m in adapter.modules.items():
            m.scale = float(scales[name])
            m.fan_in_fan_out = name in fifo
        adapter.meta.base_model = meta.get("base_model")
        adapter.meta.family = adapter.meta.family or meta.get("family")
        adapter.meta.task_type = meta.get("task_type")
        adapter.meta.config = meta.get("source_config") or {}
        adapter.meta.source_layout = meta.get("source_layout") or self.name

    def write(self, adapter: Adapter, out: Path, opts: WriteOptions) -> Adapter:
        adapter = self.prepare(adapter, opts)
        meta = {"version": VERSION, "scales": {n: m.scale for n, m in adapter.modules.items()},
                "fan_in_fan_out": sorted(n for n, m in adapter.modules.items() if m.fan_in_fan_out),
                "base_model": adapter.meta.base_model, "family": adapter.meta.family,
                "task_type": adapter.meta.task_type, "source_layout": adapter.meta.source_layout,
                "source_config": adapter.meta.config}
        if adapter.experts:
            meta["experts"] = {n: {"scale": x.scale, "transposed": x.transposed}
                               for n, x in adapter.experts.items()}
        out.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors_for(adapter, opts.base_config or adapter.meta.model_config)
        release_source_pages(adapter)
        save_tensors(tensors, out / self.weight_files[0],
                     metadata={"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})
        return adapter
