"""mistral-finetune / mistral-inference: ``lora.safetensors`` + ``params.json`` (formats.md §3).
Meta names (``layers.0.attention.wq``), interleaved q/k rows, one rank, one fixed ``scaling``
(not alpha/r), one dtype. Mixtral's experts are per-expert modules
``layers.{i}.feed_forward.experts.{e}.w1/w2/w3`` (gate/down/up): fused transformers-5 expert LoRA
(PEFT ``target_parameters``) is split into them and joined back exactly (:mod:`lora_ckpt.experts`);
``params.json`` gets ``moe: {num_experts, num_experts_per_tok}``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from ..adapter import Adapter
from ..errors import ConfigError, MissingConfigError
from ..families import ModelConfig, model_config_from_dict
from .base import Layout
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role, ScalePolicy


class MistralLayout(Layout):
    name = "mistral"
    order = 40
    summary = "mistral-finetune lora.safetensors + params.json (Meta names, fixed scaling)"
    weight_files = ("lora.safetensors",)
    config_file = "params.json"
    scheme = "meta"
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_A.weight", "B": "lora_B.weight"}
    one_rank = True
    scale_policy = ScalePolicy.GLOBAL

    def detect(self, src: Source) -> Detection | None:
        keys = src.keys()
        if keys and all(self.split(k) and k.startswith("layers.") for k in keys):
            if src.weights.name == "lora.safetensors":
                return Detection(3, "lora.safetensors with Meta-named keys (layers.N.attention.wq.lora_A.weight)")
            return Detection(2, "Meta-named LoRA keys (layers.N.attention.wq.lora_A.weight)")
        return None

    def implied_model_config(self, src: Source) -> ModelConfig | None:
        return model_config_from_dict(src.config, source=str(src.config_path)) if src.config else None

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        lora = (src.config or {}).get("lora") or {}
        ranks = adapter.ranks()
        if len(ranks) > 1 or ("rank" in lora and lora["rank"] not in ranks and ranks):
            raise ConfigError(f"{src.path}: params.json lora.rank={lora.get('rank')} but tensors have ranks "
                              f"{sorted(ranks)}", path=src.config_path)
        scaling = opts.alpha / next(iter(ranks)) if opts.alpha is not None else lora.get("scaling")
        if scaling is None:
            if src.config is None:
                raise MissingConfigError(f"{src.weights}: no params.json beside it (it has the scaling and head "
                                         "counts); put it there or pass --base-config and --alpha")
            scaling = 2.0
            adapter.meta.notes.append("params.json has no lora.scaling: mistral-finetune's default 2.0 used")
        for m in adapter.modules.values():
            m.scale = float(scaling)

    def prepare(self, adapter: Adapter, opts: WriteOptions) -> Adapter:
        adapter = super().prepare(adapter, opts)
        dtypes = Counter(t.dtype for m in adapter.modules.values() for t in (m.A, m.B))
        if len(dtypes) > 1:  # mistral-inference's load_lora requires one dtype
            adapter = adapter.cast(dtypes.most_common(1)[0][0])
        return adapter

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        if opts.base_config is None:
            raise MissingConfigError("the mistral layout's params.json needs the model dims; pass --base-config")
        params = params_json(opts.base_config)
        rank = next(iter(adapter.ranks()), 0)
        scaling = next(iter(adapter.scales()), 2.0)
        params["lora"] = {"enable": True, "rank": rank, "dropout": 0.0, "scaling": scaling}
        (out / self.config_file).write_text(json.dumps(params, indent=4))


def params_json(cfg: ModelConfig) -> dict[str, Any]:
    """Meta/Mistral ``params.json`` fields from a model config (an HF config is translated)."""
    raw = cfg.raw
    if "dim" in raw and "n_heads" in raw:
        return {k: v for k, v in raw.items() if k != "lora"}
    try:
        rope = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return {"dim": raw["hidden_size"], "n_layers": raw["num_hidden_layers"], "head_dim": cfg.head_dim,
                "hidden_dim": raw["intermediate_size"], "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                "norm_eps": raw.get("rms_norm_eps", 1e-5), "vocab_size": raw["vocab_size"], "rope_theta": rope,
                "moe": ({"num_experts": cfg.n_experts, "num_experts_per_tok": raw.get("num_experts_per_tok", 2)}
                        if cfg.n_experts else None)}
    except KeyError as e:
        raise ConfigError(f"{cfg.source}: no {e} to write params.json from", path=cfg.source or None) from e
