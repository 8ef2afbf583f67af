"""torchtune 0.6.1: the epoch directory its checkpointer writes (formats.md §2).

``adapter_model.pt`` holds torchtune keys (``layers.0.attn.q_proj.lora_a.weight``) and is what
torchtune resumes from, so it is what we read. Llama/Mistral/Gemma q/k rows are interleaved
(Meta order) in torchtune, Qwen's are not. One global rank and alpha. When writing we also
write a *correct* PEFT-keyed ``adapter_model.safetensors`` and a PEFT ``adapter_config.json``
(with ``use_dora`` and ``task_type``), so the directory loads in PEFT and vLLM too.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

from ..adapter import Adapter
from ..errors import ConfigError, MissingConfigError
from ..io import save_tensors
from .base import Layout
from .peft import PeftLayout, peft_config_for, write_peft_config
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role, ScalePolicy


class TorchtuneLayout(Layout):
    name = "torchtune"
    order = 30
    summary = "torchtune epoch dir: adapter_model.pt (torchtune keys) + adapter_config.json"
    weight_files = ("adapter_model.pt",)
    config_file = "adapter_config.json"
    scheme = "torchtune"
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_a.weight", "B": "lora_b.weight", "magnitude": "magnitude"}
    features = frozenset({"dora"})
    one_rank = True
    expert_form = "none"  # torchtune 0.6.1 has no LoRA for MoE experts (no Qwen-MoE or Mixtral LoRA builders)
    scale_policy = ScalePolicy.GLOBAL
    pickle = True
    every_layer = True  # torchtune's lora_attn_modules / apply_lora_to_mlp apply to all layers
    keeps_peft_config = True  # adapter_config.json (read by PEFT consumers of the dir, not by torchtune)

    def detect(self, src: Source) -> Detection | None:
        keys = src.keys()
        if keys and all(self.split(k) for k in keys):
            if src.weights.name == "adapter_model.pt":
                return Detection(3, "adapter_model.pt with torchtune keys (lora_a/lora_b)")
            return Detection(2, "torchtune keys (lora_a.weight/lora_b.weight)")
        return None

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        cfg = src.config or {}
        ranks = adapter.ranks()
        if len(ranks) > 1:
            raise ConfigError(f"{src.weights}: torchtune adapters have one rank, found {sorted(ranks)}",
                              path=src.weights)
        rank = next(iter(ranks), 0)
        if "r" in cfg and cfg["r"] != rank:
            raise ConfigError(f"{src.config_path}: r={cfg['r']} but the tensors have rank {rank}; the config "
                              "belongs to another run", path=src.config_path)
        alpha = opts.alpha if opts.alpha is not None else cfg.get("lora_alpha")
        if alpha is None:
            raise MissingConfigError(
                f"{src.weights}: no adapter_config.json with lora_alpha (torchtune's Meta/TorchTune checkpointers "
                "write only adapter_model.pt); pass --alpha with the recipe's lora_alpha")
        for m in adapter.modules.values():
            m.scale = alpha / rank
        adapter.meta.base_model = cfg.get("base_model_name_or_path")
        adapter.meta.task_type = cfg.get("task_type")

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        # the PEFT copy without the all-zero placement fillers torchtune needs: the adapter as PEFT had it,
        # so its config (layers_to_transform, a target_modules regex) still fits and comes back as written
        real = {n: m for n, m in adapter.modules.items()
                if m.magnitude is not None or m.bias is not None or bool(m.A.any()) or bool(m.B.any())}
        adapter = replace(adapter, modules=real or adapter.modules)
        peft = PeftLayout()
        save_tensors(peft.tensors_for(adapter, opts.base_config), out / peft.weight_files[0])
        # torchtune has no rsLoRA: lora_alpha / r is what its recipe (and our reader) takes from the file
        write_peft_config(peft_config_for(adapter, opts, layout=self.name, plain_scale=True), out / self.config_file)
        cfg = opts.base_config
        if cfg is not None and "model_type" in cfg.raw:  # as torchtune's checkpointer copies it
            (out / "config.json").write_text(json.dumps(cfg.raw, indent=2, sort_keys=True) + "\n")
