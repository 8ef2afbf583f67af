"""Tiny models of the REAL peer libraries, for conversion tests (no lora_ckpt code in here).

* HF ``transformers`` models from ``fixtures/hf/<family>`` (seeded, fp32) and PEFT on top of them
  (``PeftModel.from_pretrained`` with every warning and log record captured).
* torchtune LoRA/DoRA models built with torchtune's own component builders (``lora_llama3``,
  ``lora_qwen2``, ``lora_mistral``, ``lora_gemma``) at the fixture dims, whose base weights are
  the same ``fixtures/hf/<family>/model.safetensors`` converted by torchtune's own
  ``convert_weights.hf_to_tune`` (``qwen2_hf_to_tune`` for Qwen2).
* Logits helpers. Relative difference is defined as ``max|out - ref| / max|ref|`` over all logits.

Never imports ``torchtune.training`` (it fails with the installed torchao).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
HF = FIX / "hf"

#: the fixtures' logits input (fixtures/README.md)
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TT_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]
ADAPTER_STD = 0.2

#: the largest relative logit difference accepted for an exact conversion (fp32)
EXACT = 1e-5
#: a broken conversion must be at least this far off (relative)
BROKEN = 1e-2


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|``, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------------------- HF / PEFT
def hf_config_path(family: str) -> Path:
    return HF / family / "config.json"


@cache
def hf_config(family: str) -> dict:
    return json.loads(hf_config_path(family).read_text())


def head_dim(family: str) -> int:
    cfg = hf_config(family)
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


@cache
def _hf_model(family: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(HF / family), dtype=torch.float32).eval()


def load_hf(family: str):
    """A fresh copy of the fixture base model (PEFT wraps models in place)."""
    return copy.deepcopy(_hf_model(family))


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    return model(ids).logits.float()


class Captured:
    """Warnings and log records emitted while loading."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.records: list[str] = []

    @property
    def messages(self) -> list[str]:
        return self.warnings + self.records

    def about_keys(self) -> list[str]:
        """Messages about missing / unexpected keys."""
        words = ("missing", "unexpected", "not found", "size mismatch", "were not used", "not initialized")
        return [m for m in self.messages if any(w in m.lower() for w in words)]


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.sink.append(record.getMessage())


@contextmanager
def capture():
    """Capture every warning and every WARNING+ log record (root, ``transformers``, ``peft``:
    transformers' library logger does not propagate)."""
    cap = Captured()
    handler = _ListHandler(cap.records)
    loggers = [logging.getLogger(n) for n in ("", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield cap
        cap.warnings = [str(w.message) for w in caught]
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def peft_model(family: str, adapter_dir, **kwargs):
    """``PeftModel.from_pretrained`` on the fixture base; returns (model, Captured)."""
    from peft import PeftModel

    base = load_hf(family)
    with capture() as cap:
        model = PeftModel.from_pretrained(base, str(adapter_dir), **kwargs).eval()
    return model, cap


def peft_logits(family: str, adapter_dir, **kwargs) -> tuple[torch.Tensor, Captured]:
    model, cap = peft_model(family, adapter_dir, **kwargs)
    return hf_logits(model), cap


def peft_set_state_dict(family: str, adapter_dir) -> tuple[list[str], list[str]]:
    """Load ``adapter_dir`` by hand the way PEFT's own loader does (config from the directory,
    ``set_peft_model_state_dict``), returning (missing adapter keys, unexpected keys): unlike
    ``from_pretrained``, which never reports unexpected keys."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_hf(family), cfg)
    st = adapter_dir / "adapter_model.safetensors"
    sd = load_file(str(st)) if st.exists() else torch.load(adapter_dir / "adapter_model.bin", weights_only=True)
    res = set_peft_model_state_dict(model, sd)
    missing = [k for k in res.missing_keys if "lora_" in k]
    return missing, list(res.unexpected_keys)


@torch.no_grad()
def randomize_peft(model, seed: int) -> None:
    """As fixtures/make_fixtures.py: every trainable adapter tensor re-drawn (B non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.5 * (torch.rand(p.shape, generator=g) - 0.5))
        elif "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * ADAPTER_STD)
        elif "modules_to_save" in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def make_peft_adapter(family: str, out, *, seed: int, r: int = 4, lora_alpha: float = 8, **lora_kwargs):
    """A real PEFT adapter on the fixture base, written by ``save_pretrained``; returns its logits."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("target_modules", ALL_LINEAR)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM", **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_hf(family), cfg).eval()
        randomize_peft(model, seed)
        model.save_pretrained(str(out))
    return hf_logits(model)


# ------------------------------------------------------------------------------ torchtune
def tt_build(family: str, *, rank: int, alpha: float, use_dora: bool = False,
             attn: list[str] | None = None, mlp: bool = True, output: bool = False):
    """torchtune's own LoRA/DoRA model at the fixture dims of ``fixtures/hf/<family>`` (no weights)."""
    cfg = hf_config(family)
    kw = dict(lora_attn_modules=list(attn or TT_ATTN), apply_lora_to_mlp=mlp, vocab_size=cfg["vocab_size"],
              num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
              num_kv_heads=cfg["num_key_value_heads"], embed_dim=cfg["hidden_size"],
              intermediate_dim=cfg["intermediate_size"], max_seq_len=cfg["max_position_embeddings"],
              norm_eps=cfg["rms_norm_eps"], rope_base=cfg["rope_parameters"]["rope_theta"],
              lora_rank=rank, lora_alpha=alpha, lora_dropout=0.0, use_dora=use_dora)
    if family == "llama":
        from torchtune.models.llama3._component_builders import lora_llama3 as builder
    elif family == "qwen2":
        from torchtune.models.qwen2._component_builders import lora_qwen2 as builder

        kw["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    elif family == "mistral":
        from torchtune.models.mistral._component_builders import lora_mistral as builder
    elif family == "gemma":
        from torchtune.models.gemma._component_builders import lora_gemma as builder

        kw["head_dim"] = cfg["head_dim"]
    else:
        raise ValueError(f"no torchtune builder for {family}")
    if output:  # gemma's output is tied: no such option
        kw["apply_lora_to_output"] = True
    torch.manual_seed(0)
    return builder(**kw)


@cache
def _tt_base(family: str) -> dict[str, torch.Tensor]:
    from torchtune.models import convert_weights

    cfg = hf_config(family)
    sd = load_file(str(HF / family / "model.safetensors"))
    if family == "qwen2":
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        return qwen2_hf_to_tune(sd, num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
                                dim=cfg["hidden_size"], tie_word_embeddings=cfg["tie_word_embeddings"])
    if cfg.get("tie_word_embeddings"):  # gemma: torchtune's TiedLinear has no output.weight
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    return convert_weights.hf_to_tune(sd, num_heads=cfg["num_attention_heads"],
                                      num_kv_heads=cfg["num_key_value_heads"], dim=cfg["hidden_size"],
                                      head_dim=cfg.get("head_dim"))


def tt_base_state_dict(family: str) -> dict[str, torch.Tensor]:
    """fixtures/hf/<family> in torchtune keys, by torchtune's own converter."""
    return dict(_tt_base(family))


def tt_model(family: str, adapter_sd: dict[str, torch.Tensor], *, rank: int, alpha: float,
             use_dora: bool = False, attn: list[str] | None = None, mlp: bool = True, output: bool = False):
    """torchtune model with the fixture base and ``adapter_sd``, loaded with ``strict=True`` (every
    base and adapter key, nothing else). A loaded DoRA magnitude is used as is, never re-initialised."""
    model = tt_build(family, rank=rank, alpha=alpha, use_dora=use_dora, attn=attn, mlp=mlp, output=output)
    model.load_state_dict({**tt_base_state_dict(family), **adapter_sd}, strict=True)
    return model.eval()


@torch.no_grad()
def tt_logits(model, ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    return model(ids).float()


def tt_adapter_file(epoch_dir) -> dict[str, torch.Tensor]:
    return torch.load(Path(epoch_dir) / "adapter_model.pt", weights_only=True, map_location="cpu")


def make_tt_adapter(family: str, epoch_dir, *, seed: int, rank: int = 4, alpha: float = 8,
                    use_dora: bool = False, output: bool = False):
    """A torchtune adapter as a fine-tune would leave it: model built, base loaded,
    ``initialize_dora_magnitude()`` (what the recipe does after loading the base), then every
    lora_a / lora_b re-drawn and the magnitudes perturbed (standing in for training). Written like
    ``FullModelHFCheckpointer(adapter_only=True)``: ``adapter_model.pt`` (torchtune keys, via
    ``get_adapter_state_dict``), the recipe's ``adapter_config.json`` and the copied ``config.json``.
    Returns (model, adapter state dict)."""
    from torchtune.models import convert_weights
    from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names

    model = tt_build(family, rank=rank, alpha=alpha, use_dora=use_dora, output=output)
    missing, unexpected = model.load_state_dict(tt_base_state_dict(family), strict=False)
    assert not unexpected and all("lora" in k or "magnitude" in k for k in missing)
    if use_dora:
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_a" in name or "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * ADAPTER_STD)
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.5 * (torch.rand(p.shape, generator=g) - 0.5))
    model.eval()
    sd = get_adapter_state_dict(model.state_dict())
    epoch_dir = Path(epoch_dir)
    epoch_dir.mkdir(parents=True)
    torch.save(sd, epoch_dir / "adapter_model.pt")
    cfg = {"r": rank, "lora_alpha": alpha, "target_modules": get_lora_module_names(list(TT_ATTN), True, output),
           "peft_type": "LORA"}  # the recipe's dict; the checkpointer converts it with torchtune's own function
    cfg = convert_weights.tune_to_peft_adapter_config(adapter_config=cfg, base_model_name_or_path=None)
    (epoch_dir / "adapter_config.json").write_text(json.dumps(cfg))
    (epoch_dir / "config.json").write_bytes(hf_config_path(family).read_bytes())
    return model, sd


# ---------------------------------------------------------------- mistral-finetune names
#: Meta / mistral-finetune module names -> torchtune's (the test's own table, formats.md §2/§3)
META_TO_TT = {"attention.wq": "attn.q_proj", "attention.wk": "attn.k_proj", "attention.wv": "attn.v_proj",
              "attention.wo": "attn.output_proj", "feed_forward.w1": "mlp.w1", "feed_forward.w2": "mlp.w2",
              "feed_forward.w3": "mlp.w3"}


def mistral_to_tt(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``layers.{i}.attention.wq.lora_A.weight`` -> ``layers.{i}.attn.q_proj.lora_a.weight`` (both
    Meta row order, so no permutation), fp32."""
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        out[f"layers.{p[1]}.{META_TO_TT[p[2] + '.' + p[3]]}.{p[4].lower()}.weight"] = v.float()
    return out
