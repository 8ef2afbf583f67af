"""The README's Python API loop, run as written on a tiny tied Llama (the hub id made unique, and the
Trainer told it runs on a CPU)."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from peers import capture, rel_diff

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    return [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]


class _Batches(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_the_readme_training_loop_runs_as_written(tmp_path, monkeypatch, hub):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    loop = _python_blocks()[0]
    code = [ln for ln in loop.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(code) <= 12, code
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama-3.2-1b")
    repo = f"org/adapter-{uuid.uuid4().hex[:8]}"
    monkeypatch.chdir(tmp_path)
    first, second = loop.split("# or continue", 1)
    second = second.split("\n", 1)[1]  # past the rest of that comment line
    ns: dict = {"ds": _Batches()}
    first = first.replace("bf16=True", "bf16=True, use_cpu=True, report_to=[], disable_tqdm=True")  # no GPU here
    exec(compile(first, "README.md", "exec"), ns)
    trained = ns["model"]
    out = tmp_path / "out"
    with capture() as cap:
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "llama-3.2-1b"),
                                               str(out)).eval()
    assert not cap.about_keys()
    ids = _Batches().ids
    # the Trainer left the model's forward under its bf16 autocast, so compare the files, then logits
    # of the adapter applied to a fresh model (the README's second half) with PEFT's
    from lora_ckpt import load_adapter
    from lora_ckpt.conversion import compare_adapters
    from lora_ckpt.transfer import adapter_from_model

    assert compare_adapters(adapter_from_model(trained), load_adapter(out)).worst == 0
    hub.add_files(repo, {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()})
    exec(compile(second.replace("hf://org/adapter", f"hf://{repo}"), "README.md", "exec"), ns)
    with torch.no_grad():
        ours, theirs = ns["model"].eval()(ids).logits, peft_model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "llama-3.2-1b")(ids).logits
    assert rel_diff(theirs, ours) < 1e-5 and rel_diff(ours, plain) > 1e-4  # trained, and PEFT computes the same
