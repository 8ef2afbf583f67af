"""Training as people train: one transformers.Trainer step (bf16 autocast on CPU) moves only the
adapters; gradient checkpointing gives the same gradients; torch.compile(fullgraph=True) matches eager."""

from __future__ import annotations

import pytest
import torch

from lora_ckpt import LoRALinear, inject_lora
from peers import load_hf


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 4, length: int = 12, vocab: int = 128) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_trainer_bf16_step_moves_only_adapters(tmp_path, checkpointing):
    from transformers import Trainer, TrainingArguments

    model = load_hf("llama")
    inject_lora(model, targets="all-linear", r=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[torch.dtype] = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                             bf16=True, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             gradient_checkpointing=checkpointing, dataloader_num_workers=0, disable_tqdm=True)
    out = Trainer(model=model, args=args, train_dataset=_Batches()).train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    assert seen and set(seen) == {torch.bfloat16}  # the layer ran under the Trainer's autocast
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert moved and moved <= adapters
    assert {k for k in adapters if ".lora_B." in k} <= moved  # every B left zero: all of them trained
    assert all(after[k].dtype == torch.float32 for k in adapters)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    ids = _Batches().ids[:2]

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = load_hf("llama")
        torch.manual_seed(0)  # the same Kaiming A in both runs
        inject_lora(model, targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.weight.normal_(generator=torch.Generator().manual_seed(1))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:  # reentrant checkpoints need an input that requires grad (frozen embeddings)
                model.enable_input_require_grads()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and all(g is not None for g in ckpt.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_compile_fullgraph_matches_eager(conv1d):
    """No graph break in any forward path (fast, autocast), and the same output and gradients.
    ``aot_eager`` traces forward and backward through AOTAutograd like inductor, without a C++ build."""
    torch._dynamo.reset()
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        from lora_ckpt.conv1d import LoRAConv1D

        layer = LoRAConv1D.from_conv1d(Conv1D(24, 16), r=4, alpha=8)
    else:
        layer = LoRALinear(16, 24, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    for amp in (None, torch.bfloat16):
        outs = []
        for fn in (layer, compiled):
            xi = x.clone().requires_grad_(True)
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                y = fn(xi)
            y.float().square().sum().backward()
            outs.append((y, xi.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad))
        for eager, comp in zip(*outs, strict=True):
            assert eager.dtype == comp.dtype
            torch.testing.assert_close(comp, eager, rtol=0, atol=0)
