"""The README's demo: a tiny Meta-style (Llama/Mistral ``consolidated``) transformer, its stock
checkpoint loaded ``strict=True`` into the LoRA-injected model, and one training step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_checkpoint
from .errors import VerificationError
from .inject import adapter_state_dict, inject_lora, stock_state_dict
from .io import PathLike

__all__ = ["MetaTransformer", "run_demo"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, p: dict) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = p["n_heads"], p.get("n_kv_heads", p["n_heads"])
        self.head_dim = p.get("head_dim", p["dim"] // p["n_heads"])
        self.wq = nn.Linear(p["dim"], self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(p["dim"], self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(p["dim"], self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, p["dim"], bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = _rope_interleaved(q, freqs), _rope_interleaved(k, freqs)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))


def _rope_interleaved(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Meta's RoPE: rotates pairs (2i, 2i+1) of each head."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[: x.shape[1], None, :]).flatten(-2).type_as(x)


class FeedForward(nn.Module):
    def __init__(self, p: dict) -> None:
        super().__init__()
        self.w1 = nn.Linear(p["dim"], p["hidden_dim"], bias=False)
        self.w2 = nn.Linear(p["hidden_dim"], p["dim"], bias=False)
        self.w3 = nn.Linear(p["dim"], p["hidden_dim"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, p: dict) -> None:
        super().__init__()
        self.attention = Attention(p)
        self.feed_forward = FeedForward(p)
        self.attention_norm = RMSNorm(p["dim"], p["norm_eps"])
        self.ffn_norm = RMSNorm(p["dim"], p["norm_eps"])

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaTransformer(nn.Module):
    """A Llama/Mistral transformer with Meta's ``consolidated`` parameter names."""

    def __init__(self, params: dict, max_seq_len: int = 256) -> None:
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params["vocab_size"], params["dim"])
        self.layers = nn.ModuleList(Block(params) for _ in range(params["n_layers"]))
        self.norm = RMSNorm(params["dim"], params["norm_eps"])
        self.output = nn.Linear(params["dim"], params["vocab_size"], bias=False)
        hd = params.get("head_dim", params["dim"] // params["n_heads"])
        inv = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, device="cpu").float() / hd))
        angles = torch.outer(torch.arange(max_seq_len, device="cpu").float(), inv)
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.freqs)
        return self.output(self.norm(h)).float()


def build_meta_model(params: dict) -> MetaTransformer:
    """The model on the ``meta`` device (no init cost), with the RoPE table on the CPU."""
    with torch.device("meta"):
        model = MetaTransformer(params)
    hd = params.get("head_dim", params["dim"] // params["n_heads"])
    inv = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.outer(torch.arange(256).float(), inv)
    model.freqs = torch.polar(torch.ones_like(angles), angles)
    return model


def run_demo(fixture: PathLike) -> str:
    """Run the demo on a fixture directory (``params.json`` + ``consolidated.safetensors``).

    Returns:
        The demo's report, one line per step, ending with ``demo OK``.

    Raises:
        VerificationError: a step did not reproduce what it must (the CLI exits with code 3).
    """
    fixture = Path(fixture)
    params = json.loads((fixture / "params.json").read_text())
    ckpt = fixture / "consolidated.safetensors"
    lines = [f"stock checkpoint  {ckpt} ({ckpt.stat().st_size:,} bytes)"]

    plain = build_meta_model(params)
    load_checkpoint(plain, ckpt)
    lora = build_meta_model(params)
    targets = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    wrapped = inject_lora(lora, targets=targets, r=8, alpha=16)
    res = load_checkpoint(lora, ckpt, strict=True)
    lines.append(f"strict load       {len(wrapped)} LoRALinear layers, missing={len(res.missing)} "
                 f"unexpected={len(res.unexpected)}")

    tokens = torch.randint(0, params["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = plain(tokens), lora(tokens)
    diff = (ref - out).abs().max().item()
    lines.append(f"outputs           max |logits(LoRA) - logits(stock)| = {diff:.1e} (adapters start as no-ops)")
    if diff != 0.0:
        raise VerificationError(f"the LoRA model's logits differ from the stock model's by {diff:.1e} "
                                "(expected 0: fresh adapters are no-ops); please report this")

    before = {k: v.detach().clone() for k, v in lora.state_dict().items()}
    trainable = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    logits = lora(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    changed = sorted(k for k, v in lora.state_dict().items() if not torch.equal(v, before[k]))
    only_adapters = all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in changed)
    n_adapter = sum(v.numel() for v in adapter_state_dict(lora).values())
    n_total = sum(v.numel() for v in lora.state_dict().values())
    lines.append(f"one AdamW step    loss {loss.item():.4f}; {len(changed)} tensors changed, all adapters: "
                 f"{only_adapters}; trainable {n_adapter:,} of {n_total:,} parameters "
                 f"({100 * n_adapter / n_total:.1f}%)")
    if not only_adapters or not changed:
        raise VerificationError(f"the training step changed {len(changed)} tensors, all adapters: {only_adapters} "
                                "(expected only and some adapter tensors); please report this")

    with torch.no_grad():
        after = lora(tokens)
        plain.load_state_dict(stock_state_dict(lora), strict=True)
        merged = plain(tokens)
    moved = (after - ref).abs().max().item()
    back = (merged - after).abs().max().item()
    lines.append(f"after the step    output moved by {moved:.2e}; stock export (adapters merged) reloads "
                 f"strict into the plain model, max diff {back:.1e}")
    if not math.isfinite(back) or back > 1e-4 or moved == 0.0:
        raise VerificationError(f"the stock export reproduces the fine-tuned model to {back:.1e} and the step moved "
                                f"the output by {moved:.1e} (expected <= 1e-4 and > 0); please report this")
    lines.append("demo OK")
    return "\n".join(lines)
