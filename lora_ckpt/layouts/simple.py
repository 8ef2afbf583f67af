"""Layouts that keep the model's own module names and record no scale: loralib (and the torch-rb
``trainers`` gem, same keys) and the LLMBook teaching layout (formats.md §6–8)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from ..adapter import Adapter
from ..errors import MissingConfigError
from ..io import read_json
from .base import Layout
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role, ScalePolicy

SIDECAR = "lora_config.json"  # written by lora-ckpt so a round trip needs no --alpha


class LoralibLayout(Layout):
    name = "loralib"
    order = 50
    summary = "loralib / trainers: bare lora_A / lora_B on each module; alpha not in the file (--alpha)"
    weight_files = ("lora_state_dict.pt", "lora.safetensors", "adapter.safetensors")
    sidecar_files = (SIDECAR,)
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_A", "B": "lora_B"}
    one_rank = True
    scale_policy = ScalePolicy.GLOBAL
    pickle = True

    def detect(self, src: Source) -> Detection | None:
        keys = src.keys()
        if keys and all(self.split(k) for k in keys):
            return Detection(1, "bare lora_A / lora_B keys (loralib, trainers)")
        return None

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        alpha = opts.alpha
        side = src.sibling(SIDECAR)
        if alpha is None and side is not None:
            alpha = read_json(side, what=SIDECAR).get("lora_alpha")
        if alpha is None:
            raise MissingConfigError(
                f"{src.weights}: loralib files do not record the scale (alpha/r); pass --alpha with the "
                "lora_alpha the model was trained with")
        for m in adapter.modules.values():
            m.scale = alpha / m.rank

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        r = next(iter(adapter.ranks()), 0)
        alpha = next(iter(adapter.scales()), 1.0) * r
        (out / SIDECAR).write_text(json.dumps({"r": r, "lora_alpha": alpha}, indent=2) + "\n")


class LlmbookLayout(Layout):
    name = "llmbook"
    order = 60
    summary = "LLMBook teaching layout: A.weight / B.weight, scale 1"
    weight_files = ("lora_weights.pt", "lora_weights.safetensors")
    leaves: ClassVar[dict[Role, str]] = {"A": "A.weight", "B": "B.weight"}
    scale_policy = ScalePolicy.FIXED
    fixed_scale = 1.0
    pickle = True

    def detect(self, src: Source) -> Detection | None:
        keys = src.keys()
        if keys and all(self.split(k) for k in keys):
            return Detection(1, "A.weight / B.weight keys (LLMBook)")
        return None

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        for m in adapter.modules.values():
            m.scale = 1.0
