"""Layouts that keep the model's own module names and record no scale: loralib (and the torch-rb
``trainers`` gem, same keys) and the LLMBook teaching layout (formats.md §6–8).

Neither format has a config, so lora-ckpt writes a sidecar ``lora_config.json`` (loralib: r and
lora_alpha, so a round trip needs no ``--alpha``; both: the PEFT config the adapter came with, so
a PEFT -> loralib -> PEFT round trip gives back what its author wrote, else the base model id).
loralib files may hold full tensors beside the factors (the loralib recipe trains a classifier head fully and saves it
with ``lora_A``/``lora_B``): they are read as ``modules_to_save``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..adapter import Adapter
from ..errors import ConfigError, MissingConfigError, quote_list
from ..io import read_json
from .base import Layout
from .peft import peft_config_for, source_peft_config
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role, ScalePolicy

SIDECAR = "lora_config.json"  # written by lora-ckpt; no loralib or LLMBook tool reads it
PEFT_KEY = "peft_config"  # the sidecar's copy of the source's PEFT adapter_config.json
BASE_KEY = "base_model_name_or_path"  # the base model id, when there is no PEFT config to hold it


def _read_sidecar(src: Source, adapter: Adapter) -> dict[str, Any]:
    """The sidecar (empty if absent); its PEFT config becomes ``adapter.meta.config``."""
    side = src.sibling(SIDECAR)
    if side is None:
        return {}
    data = read_json(side, what=SIDECAR)
    base = data.get(BASE_KEY)
    adapter.meta.base_model = base if isinstance(base, str) else None
    peft = data.get(PEFT_KEY)
    if peft is not None:
        if not isinstance(peft, dict):
            raise ConfigError(f"{side}: {PEFT_KEY!r} is a {type(peft).__name__}, expected an object (a PEFT "
                              "adapter_config.json); fix or delete the file", path=side)
        adapter.meta.config = peft
        adapter.meta.base_model = peft.get("base_model_name_or_path")
        adapter.meta.task_type = peft.get("task_type")
    return data


def _write_sidecar(adapter: Adapter, out: Path, fields: dict[str, Any], opts: WriteOptions, layout: str) -> None:
    """The sidecar: ``fields``, and the source's PEFT config as it describes the written tensors."""
    peft = peft_config_for(adapter, opts, layout=layout) if source_peft_config(adapter) else None
    base = {BASE_KEY: adapter.meta.base_model} if adapter.meta.base_model and not peft else {}
    data = {**fields, **base, **({PEFT_KEY: peft} if peft else {})}
    if data:
        (out / SIDECAR).write_text(json.dumps(data, indent=2) + "\n")


class LoralibLayout(Layout):
    name = "loralib"
    order = 50
    summary = "loralib / trainers: bare lora_A / lora_B on each module; alpha not in the file (--alpha)"
    weight_files = ("lora_state_dict.pt", "lora.safetensors", "adapter.safetensors")
    sidecar_files = (SIDECAR,)
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_A", "B": "lora_B"}
    features = frozenset({"extra"})  # full tensors saved beside the factors (a trained head)
    keeps_peft_config = True
    one_rank = True
    scale_policy = ScalePolicy.GLOBAL
    pickle = True

    def detect(self, src: Source) -> Detection | None:
        keys = src.keys()
        lora = [k for k in keys if self.split(k)]
        if lora and len(lora) == len(keys):
            return Detection(1, "bare lora_A / lora_B keys (loralib, trainers)")
        if lora:
            return Detection(1, f"bare lora_A / lora_B keys (loralib, trainers) and {len(keys) - len(lora)} full "
                                "tensor(s) (read as modules_to_save)")
        return None

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        side = _read_sidecar(src, adapter)
        alpha = opts.alpha if opts.alpha is not None else side.get("lora_alpha")
        if alpha is None:
            raise MissingConfigError(
                f"{src.weights}: loralib files do not record the scale (alpha/r); pass --alpha with the "
                "lora_alpha the model was trained with")
        for m in adapter.modules.values():
            m.scale = alpha / m.rank
        if adapter.extra:
            adapter.meta.notes.append(f"{len(adapter.extra)} full tensor(s) beside the LoRA factors "
                                      f"({quote_list(adapter.extra, 3)}) read as modules_to_save")

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        r = next(iter(adapter.ranks()), 0)
        alpha = next(iter(adapter.scales()), 1.0) * r
        _write_sidecar(adapter, out, {"r": r, "lora_alpha": alpha}, opts, self.name)


class LlmbookLayout(Layout):
    name = "llmbook"
    order = 60
    summary = "LLMBook teaching layout: A.weight / B.weight, scale 1"
    weight_files = ("lora_weights.pt", "lora_weights.safetensors")
    sidecar_files = (SIDECAR,)
    leaves: ClassVar[dict[Role, str]] = {"A": "A.weight", "B": "B.weight"}
    scale_policy = ScalePolicy.FIXED
    fixed_scale = 1.0
    keeps_peft_config = True
    pickle = True

    def detect(self, src: Source) -> Detection | None:
        keys = src.keys()
        if keys and all(self.split(k) for k in keys):
            return Detection(1, "A.weight / B.weight keys (LLMBook)")
        return None

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        _read_sidecar(src, adapter)
        for m in adapter.modules.values():
            m.scale = 1.0

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        _write_sidecar(adapter, out, {}, opts, self.name)
