"""LitGPT: ``lit_model.pth.lora`` (``{"model": lora tensors}``, torch pickle) + ``hyperparameters.yaml``
(formats.md §5).

Keys are LitGPT module paths with bare ``lora_A`` (r, in) / ``lora_B`` (out, r) parameters (no
``.weight``); ``scaling = lora_alpha / lora_r``, one rank and one alpha for the whole model; no
DoRA, LoRA bias or embedding LoRA; no RoPE permutation (LitGPT keeps HF's rotate-half rows).
Llama-style names: ``transformer.h.{i}.attn.qkv`` (``attn.attn`` before LitGPT PR #1013, accepted
on read), ``attn.proj``, ``mlp.fc_1``/``fc_2``/``proj``, ``lm_head`` (table in
:mod:`lora_ckpt.families`).

The fused ``attn.qkv`` LoRA (``LoRAQKVLinear``) is *grouped* storage (:mod:`lora_ckpt.fused`):
``lora_A (r·n_enabled, in)`` stacks the enabled parts' A in q, k, v order and ``lora_B`` stacks
their B rows, sized ``n_head·hs``, ``n_query_groups·hs``, ``n_query_groups·hs``; part *i* uses only
A-group *i* (``LoRAQKVLinear.conv1d``: block-diagonal). Checked against Lightning-AI/litgpt
``litgpt/lora.py`` (``LoRAQKVLinear``: ``qkv_shapes``, ``conv1d``, ``zero_pad``/``lora_ind``) at
commits 01e39f50 and a2bc1403, and ``litgpt/scripts/convert_hf_checkpoint.py`` (current
``torch.cat((q, k, v))`` into ``attn.qkv``). The *base* ``qkv`` weight rows were interleaved per
query group (``[Q_g, K_g, V_g]`` per group, ``qkv_reassemble``) in older LitGPT and are
``[Q; K; V]`` blocks in current LitGPT, but ``zero_pad`` maps lora_B's rows to the base rows
either way, so lora_B's own row order is ``[q heads; k groups; v groups]`` (each in HF order) in
both: the adapter file does not depend on that change.

``hyperparameters.yaml`` is read with a small parser of top-level scalars (``lora_r``,
``lora_alpha``, ``lora_query`` ...), no YAML dependency; the same keys are written. The head
geometry comes from ``config.json`` beside the weights (LitGPT copies it there), else from
LitGPT's ``model_config.yaml``, else ``--base-config``.

LitGPT builds a LoRA on every block for each enabled flag and ``merge_lora`` loads the file
strictly, so modules a flag covers but the adapter lacks are written as zeros (a no-op) and
all-zero modules are read back as absent.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from ..adapter import Adapter, alpha_for
from ..errors import ConfigError, MissingConfigError
from ..families import Fused, ModelConfig, model_config_from_dict
from .base import Layout
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role, ScalePolicy

logger = logging.getLogger(__name__)

HPARAMS = "hyperparameters.yaml"
#: LitGPT's lora flags -> the HF leaf names they adapt (litgpt/lora.py Config)
FLAGS = {"lora_query": ("q_proj",), "lora_key": ("k_proj",), "lora_value": ("v_proj",),
         "lora_projection": ("o_proj",), "lora_mlp": ("gate_proj", "up_proj", "down_proj"), "lora_head": ("lm_head",)}


def read_yaml_scalars(path: Path) -> dict[str, Any]:
    """The top-level ``key: scalar`` entries of a YAML file (nested blocks and lists are skipped)."""
    out: dict[str, Any] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})", path=path) from e
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][\w.-]*):[ \t]*(.*?)[ \t]*$", line)
        if not m or not m[2] or m[2].startswith("#"):
            continue
        value = re.sub(r"\s+#.*$", "", m[2])
        out[m[1]] = _scalar(value)
    return out


def _scalar(v: str) -> Any:
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


class LitgptLayout(Layout):
    name = "litgpt"
    order = 80
    summary = "LitGPT lit_model.pth.lora + hyperparameters.yaml (fused attn.qkv, bare lora_A/lora_B)"
    weight_files = ("lit_model.pth.lora",)
    config_file = HPARAMS
    sidecar_files = ("model_config.yaml", "config.json")  # LitGPT's and HF's model configs (head counts)
    scheme = "litgpt"
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_A", "B": "lora_B"}
    one_rank = True
    expert_form = "none"  # LitGPT has no LoRA on MoE experts
    scale_policy = ScalePolicy.GLOBAL
    pickle = True
    fused_lora = "grouped"
    every_layer = True  # LitGPT's lora_query/.../lora_mlp flags adapt every block, and merge_lora loads strictly
    container_key = "model"  # as LitGPT's save_lora_checkpoint: torch.save({"model": lora tensors})
    legacy_names: ClassVar[dict[str, str]] = {"transformer.h.{}.attn.qkv": "transformer.h.{}.attn.attn"}

    def read_config(self, path: Path) -> dict[str, Any]:
        return read_yaml_scalars(path)

    def detect(self, src: Source) -> Detection | None:
        keys = src.keys()
        if not keys or not all(self.split(k) for k in keys):
            return None
        if not any(k.startswith(("transformer.h.", "lm_head.")) for k in keys):
            return None
        if src.weights.name == self.weight_files[0]:
            return Detection(3, f"{src.weights.name} with LitGPT keys (transformer.h.N..., bare lora_A/lora_B)")
        return Detection(2, "LitGPT keys (transformer.h.N..., bare lora_A/lora_B)")

    def implied_model_config(self, src: Source) -> ModelConfig | None:
        cfg = super().implied_model_config(src)
        if cfg is not None:
            return cfg
        p = src.sibling("model_config.yaml")
        if p is None:
            return None
        lit = read_yaml_scalars(p)
        if lit.get("mlp_class_name", "LLaMAMLP") != "LLaMAMLP":
            return None  # GPT-NeoX/Phi-style LitGPT models: names not in lora-ckpt's tables
        try:
            hf = {"model_type": "llama", "num_attention_heads": lit["n_head"], "hidden_size": lit["n_embd"],
                  "num_key_value_heads": lit.get("n_query_groups") or lit["n_head"],
                  "head_dim": lit.get("head_size") or lit["n_embd"] // lit["n_head"],
                  "num_hidden_layers": lit.get("n_layer"), "intermediate_size": lit.get("intermediate_size"),
                  "vocab_size": lit.get("padded_vocab_size") or lit.get("vocab_size")}
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{p}: not a LitGPT model config (missing {e})", path=p) from e
        return model_config_from_dict(hf, source=str(p))

    def enabled_parts(self, src: Source, entry: Fused) -> tuple[bool, ...] | None:
        hp = src.config or {}
        flags = ("lora_query", "lora_key", "lora_value")
        if entry.rows != "qkv" or not all(f in hp for f in flags):
            return None
        return tuple(bool(hp[f]) for f in flags)

    # ------------------------------------------------------------------ reading
    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        hp = src.config or {}
        ranks = {m.B.shape[1] for m in adapter.modules.values()}  # B's columns: also right for the grouped qkv
        rank = hp.get("lora_r")
        if rank is not None and set(ranks) - {rank}:
            raise ConfigError(f"{src.config_path}: lora_r={rank} but the tensors have rank(s) {sorted(ranks)}; the "
                              "hyperparameters belong to another run", path=src.config_path)
        alpha = opts.alpha if opts.alpha is not None else hp.get("lora_alpha")
        if alpha is None:
            raise MissingConfigError(
                f"{src.weights}: no {HPARAMS} with lora_alpha beside it, so the scale (alpha/r) is unknown; put the "
                "run's hyperparameters.yaml beside it, or pass --alpha")
        for m in adapter.modules.values():
            m.scale = alpha / m.B.shape[1]

    # ------------------------------------------------------------------ writing
    def prepare(self, adapter: Adapter, opts: WriteOptions) -> Adapter:
        adapter = super().prepare(adapter, opts)
        r = next(iter(adapter.ranks()), 0)
        scale = next(iter(adapter.scales()), 1.0)
        alpha = alpha_for(scale, r)
        if r and not isinstance(alpha, int):  # LitGPT types lora_alpha as int: fold the rest into lora_B
            new = max(1, round(alpha)) / r
            logger.info("LitGPT's lora_alpha is an integer: alpha %s -> %s, the difference folded into lora_B",
                        alpha, round(new * r))
            adapter = replace(adapter, modules={n: m.rescaled(new) for n, m in adapter.modules.items()})
        return adapter

    def write_config(self, adapter: Adapter, out: Path, opts: WriteOptions) -> None:
        r = next(iter(adapter.ranks()), 0)
        lines = ["# LoRA hyperparameters written by lora-ckpt (the keys LitGPT's finetune_lora writes)",
                 f"lora_r: {r}", f"lora_alpha: {alpha_for(next(iter(adapter.scales()), 1.0), r)}", "lora_dropout: 0.0"]
        leaves = {n.rsplit(".", 1)[-1] for n in adapter.modules}
        lines += [f"{flag}: {str(bool(leaves & set(hf))).lower()}" for flag, hf in FLAGS.items()]
        if adapter.meta.base_model:
            lines.append(f"checkpoint_dir: {adapter.meta.base_model}")
        (out / HPARAMS).write_text("\n".join(lines) + "\n")
