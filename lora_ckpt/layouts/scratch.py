"""A throwaway layout (to count the files a new layout touches): kohya-style leaves, one scale in a JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from ..adapter import Adapter
from ..errors import MissingConfigError
from .base import Layout
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role, ScalePolicy


class ScratchLayout(Layout):
    name = "scratch"
    order = 90
    summary = "throwaway: lora_down / lora_up + scratch.json"
    weight_files = ("scratch_lora.safetensors",)
    config_file = "scratch.json"
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_down.weight", "B": "lora_up.weight"}
    one_rank = True
    scale_policy = ScalePolicy.GLOBAL

    def detect(self, src: Source) -> Detection | None:
        keys = src.keys()
        if keys and all(self.split(k) for k in keys):
            return Detection(2, "lora_down / lora_up keys")
        return None

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        scale = (src.config or {}).get("scale")
        if scale is None:
            raise MissingConfigError(f"{src.weights}: no scratch.json with the scale")
        for m in adapter.modules.values():
            m.scale = float(scale)

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        (out / self.config_file).write_text(json.dumps({"scale": next(iter(adapter.scales()), 1.0)}))
