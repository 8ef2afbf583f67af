"""Adapters made the way common trainers make them, with the real PEFT (and transformers) on tiny
models: HF Trainer SEQ_CLS / TOKEN_CLS (PEFT adds the heads to modules_to_save), TRL SFT
(modules_to_save ["embed_tokens", "lm_head"] after resizing the vocabulary), layers_to_transform,
rank_pattern / alpha_pattern with regex keys, target_modules as a regex string, GPT-2 Conv1D.
``make(name, root)`` writes ``root/name/{base,adapter}`` and returns the two paths."""

from __future__ import annotations

from pathlib import Path

import torch

import peers as P

LLAMA = P.FIX / "hf" / "llama"


def _roberta(head: str):
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaForTokenClassification

    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, num_labels=3)
    cls = RobertaForSequenceClassification if head == "seq" else RobertaForTokenClassification
    return cls(cfg)


def _llama(vocab: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(LLAMA)
    if vocab is not None:  # TRL SFT with added special tokens
        model.resize_token_embeddings(vocab)
    return model


def _gpt2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(P.FIX / "hf" / "gpt2")


#: name -> (base model maker, LoraConfig kwargs)
RECIPES = {
    "roberta-seq-cls": (lambda: _roberta("seq"), dict(task_type="SEQ_CLS", target_modules=["query", "value"])),
    "roberta-token-cls": (lambda: _roberta("tok"), dict(task_type="TOKEN_CLS", target_modules=["query", "key", "value"],
                                                       bias="none", lora_dropout=0.1)),
    "llama-sft-resized": (lambda: _llama(136), dict(task_type="CAUSAL_LM", target_modules="all-linear",
                                                    modules_to_save=["embed_tokens", "lm_head"])),
    "llama-layers": (_llama, dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                  layers_pattern="layers")),
    "llama-regex-target": (_llama, dict(task_type="CAUSAL_LM", target_modules=r".*\.(q_proj|v_proj|down_proj)")),
    "llama-regex-patterns": (_llama, dict(task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj"],
                                          rank_pattern={r"layers\.1\.\w+\.(q|v)_proj": 2},
                                          alpha_pattern={r"v_proj": 16}, init_lora_weights="gaussian",
                                          revision="main")),
    "gpt2-conv1d": (_gpt2, dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


def make(name: str, root: Path) -> tuple[Path, Path]:
    """Write the base model and the adapter of recipe ``name``; every adapter tensor re-drawn (seeded)."""
    from peft import LoraConfig, get_peft_model

    maker, kwargs = RECIPES[name]
    torch.manual_seed(0)
    model = maker().eval()
    base, adapter = root / name / "base", root / name / "adapter"
    model.save_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **kwargs))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:  # LoRA factors and the modules_to_save copies ("trained")
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    peft.save_pretrained(adapter)
    cfg = (adapter / "adapter_config.json")
    cfg.write_text(cfg.read_text().replace('"base_model_name_or_path": null', f'"base_model_name_or_path": "{base}"'))
    return base, adapter
