"""Forward + backward time of one adapted Linear with a frozen base.

Variants, all sharing one frozen base weight (no bias, as in Llama):

- ``frozen``     plain ``nn.Linear`` with ``requires_grad=False`` (the baseline: the cost LoRA adds
                 is measured against it);
- ``lora_ckpt``  ``lora_ckpt.LoRALinear.from_linear`` (adapters in the base dtype);
- ``peft``       PEFT's ``peft.tuners.lora.layer.Linear``, built by ``get_peft_model`` on a tiny module
                 holding one Linear, with PEFT's defaults (``autocast_adapter_dtype=True``: bf16/fp16
                 adapters are upcast to float32, and the input is cast to float32 for them);
- ``peft_same``  the same with ``autocast_adapter_dtype=False`` (adapters in the base dtype, like ours);
- ``exp_*``      candidate rewrites of ``LoRALinear.forward`` (see their classes), opt-in via ``--variants``.

The input requires grad (as inside a network), so every variant computes the input gradient;
the LoRA variants also compute the adapter gradients. The adapter's B is random (not PEFT's zero
init), so no kernel can take a shortcut on zeros. One timed step = ``x.grad = None`` and adapter
grads set to None, ``y = layer(x)``, ``y.backward(gy)``; on CUDA each step is timed with CUDA events.
Variants are interleaved in rounds so that drift on a noisy machine hits all of them alike; the
reported number is the median over all timed steps.

    python bench/forward.py --device cpu --dtype fp32,bf16      # CPU, tokens scaled down 64x
    python bench/forward.py --device cuda --dtype bf16          # full shapes
    python bench/forward.py --device cuda --autocast bf16,fp16  # fp32 weights under torch.autocast
    python bench/forward.py --device cuda --shapes 0 --profile --variants lora_ckpt,exp_function

``--autocast bf16,fp16`` measures mixed precision as ``Trainer(bf16=True)`` runs it: weights and
adapters in ``--dtype`` (default fp32), the forward under ``torch.autocast(device, dtype)``, the
backward after it (as accelerate does); ``gy`` is in the output's dtype. Each autocast dtype is one
row; ``frozen`` is then a frozen fp32 ``nn.Linear`` under the same autocast, ``peft`` PEFT's layer
under it (fp32 adapters: ``peft_same`` is the same layer and is skipped), and the ``exp_*``
experiments (which ignore autocast) are refused.

Shapes are (tokens T, in -> out, rank r): (8192, 4096->4096, 16), (8192, 4096->14336, 16),
(16384, 8192->8192, 64). ``--token-scale N`` divides T by N (default 64 on CPU, 1 on CUDA); the
feature sizes and ranks are never scaled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_ckpt.layer import LoRALinear  # noqa: E402

SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (16384, 8192, 8192, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ["frozen", "lora_ckpt", "peft", "peft_same"]
#: candidate rewrites of LoRALinear.forward, measured here only (not part of the library)
EXPERIMENTS = ["exp_inplace2d", "exp_addmm", "exp_function"]  # exp_epilogue became LoRALinear's fast path


class _Inplace2D(nn.Module):
    """Candidate fix 1: flatten the input to 2-D first and ``addmm_`` into the base output itself,
    not into a ``view`` of it (an in-place op on a view makes autograd record ``CopySlices``, whose
    backward clones the whole (T, out) gradient)."""

    def __init__(self, lora: LoRALinear) -> None:
        super().__init__()
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.lora
        x2 = x.reshape(-1, m.in_features)
        out = F.linear(x2, m.linear.weight, m.linear.bias)
        h = F.linear(m.dropout(x2).to(m.lora_A.weight.dtype), m.lora_A.weight)
        out.addmm_(h.to(out.dtype), m.lora_B.weight.t().to(out.dtype), alpha=m.scaling)
        return out.view(*x.shape[:-1], m.out_features)


class _Addmm(nn.Module):
    """Candidate fix 1b: no in-place op at all: ``torch.addmm(out, h, B^T)`` (a new output; the
    base output is not saved for backward, so it is freed at once)."""

    def __init__(self, lora: LoRALinear) -> None:
        super().__init__()
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.lora
        x2 = x.reshape(-1, m.in_features)
        out = F.linear(x2, m.linear.weight, m.linear.bias)
        h = F.linear(m.dropout(x2).to(m.lora_A.weight.dtype), m.lora_A.weight)
        out = torch.addmm(out, h.to(out.dtype), m.lora_B.weight.t().to(out.dtype), alpha=m.scaling)
        return out.view(*x.shape[:-1], m.out_features)


class _LoRAFunction(torch.autograd.Function):
    """Candidate fix 2: a hand-written backward (no dropout, no bias): the adapter's input
    gradient is added into the base's with one ``addmm_`` (beta=1), nothing full-size is
    cloned, and only x and the (T, r) activation are saved."""

    @staticmethod
    def forward(ctx, x, w, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.mm(x2, w.t())
        h = torch.mm(x2, a.t())
        out.addmm_(h, b.t(), alpha=s)
        ctx.save_for_backward(x, w, a, b, h)
        ctx.s = s
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, w, a, b, h = ctx.saved_tensors
        s = ctx.s
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gh = torch.mm(g2, b).mul_(s)  # (T, r)
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g2, w).addmm_(gh, a).view(x.shape)
        if ctx.needs_input_grad[2]:
            ga = torch.mm(gh.t(), x2)
        if ctx.needs_input_grad[3]:
            gb = torch.mm(g2.t(), h).mul_(s)
        return gx, None, ga, gb, None


class _Function(nn.Module):
    def __init__(self, lora: LoRALinear, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.lora, self.fn = lora, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.lora
        return self.fn.apply(x, m.linear.weight, m.lora_A.weight, m.lora_B.weight, m.scaling)


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _linear_sharing(weight: nn.Parameter) -> nn.Linear:
    out_f, in_f = weight.shape
    with torch.device("meta"):
        lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight = weight
    return lin


def build_layers(in_f: int, out_f: int, r: int, dtype: torch.dtype, device: str,
                 variants: list[str]) -> dict[str, nn.Module]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)).to(device=device, dtype=dtype)
    weight = nn.Parameter(w, requires_grad=False)
    a = (torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)).to(device=device, dtype=dtype)
    b = (torch.randn(out_f, r, generator=gen) * 0.01).to(device=device, dtype=dtype)
    alpha = 2.0 * r
    layers: dict[str, nn.Module] = {}
    if "frozen" in variants:
        layers["frozen"] = _linear_sharing(weight)
    for name in ["lora_ckpt"] + EXPERIMENTS:
        if name not in variants:
            continue
        ours = LoRALinear.from_linear(_linear_sharing(weight), r=r, alpha=alpha)
        with torch.no_grad():
            ours.lora_A.weight.copy_(a)
            ours.lora_B.weight.copy_(b)
        layers[name] = {"lora_ckpt": ours, "exp_inplace2d": _Inplace2D(ours),
                        "exp_addmm": _Addmm(ours), "exp_function": _Function(ours, _LoRAFunction)}[name]
    for name, autocast in (("peft", True), ("peft_same", False)):
        if name not in variants:
            continue
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.layer import Linear as PeftLinear

        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
        pm = get_peft_model(_Holder(_linear_sharing(weight)), cfg, autocast_adapter_dtype=autocast)
        layer = pm.base_model.model.proj
        assert isinstance(layer, PeftLinear), type(layer)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        layers[name] = layer
    for layer in layers.values():
        assert not any(p.requires_grad for n, p in layer.named_parameters() if "lora" not in n)
    return layers


def _step(layer: nn.Module, params: list[nn.Parameter], x: torch.Tensor, gy: torch.Tensor,
          amp: torch.dtype | None = None) -> None:
    x.grad = None
    for p in params:
        p.grad = None
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        y = layer(x)
    y.backward(gy)


def check(layers: dict[str, nn.Module], x: torch.Tensor, gy: torch.Tensor,
          amp: torch.dtype | None = None) -> dict[str, dict[str, float]]:
    """Relative L2 differences of output, input gradient and adapter-A gradient of each LoRA
    variant against ``peft_same`` (PEFT with adapters in the base dtype; ``peft`` under autocast)."""
    ref_name = "peft" if amp is not None else "peft_same"
    if ref_name not in layers:
        return {}
    outs = {}
    for name, layer in layers.items():
        if name == "frozen":
            continue
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            y = layer(x)
        y.backward(gy)
        ga = next(p.grad for n, p in layer.named_parameters() if "lora_A" in n)
        gb = next(p.grad for n, p in layer.named_parameters() if "lora_B" in n)
        outs[name] = (y.detach().float(), x.grad.detach().float(), ga.detach().float(), gb.detach().float())
        for p in layer.parameters():
            p.grad = None
    x.grad = None
    ref = outs[ref_name]
    rel = lambda u, v: ((u - v).norm() / v.norm()).item()  # noqa: E731
    return {n: {"out": rel(o[0], ref[0]), "grad_x": rel(o[1], ref[1]), "grad_A": rel(o[2], ref[2]),
                "grad_B": rel(o[3], ref[3])}
            for n, o in outs.items() if n != ref_name}


def bench_shape(t: int, in_f: int, out_f: int, r: int, dtype: torch.dtype, device: str, iters: int,
                warmup: int, rounds: int, variants: list[str], profile: bool = False,
                amp: torch.dtype | None = None) -> dict:
    layers = build_layers(in_f, out_f, r, dtype, device, variants)
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(t, in_f, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(t, out_f, generator=gen).to(device=device, dtype=amp or dtype)  # the output's dtype
    params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in layers.items()}
    cuda = device.startswith("cuda")
    errs = check(layers, x, gy, amp)
    for name, layer in layers.items():  # warm-up: allocator, kernels, handles
        for _ in range(warmup):
            _step(layer, params[name], x, gy, amp)
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in layers}
    peak: dict[str, int] = {}
    per_round = max(1, math.ceil(iters / rounds))
    names = list(layers)
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            layer, ps = layers[name], params[name]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                       for _ in range(per_round)]
                for s, e in evs:
                    s.record()
                    _step(layer, ps, x, gy, amp)
                    e.record()
                torch.cuda.synchronize()
                times[name] += [s.elapsed_time(e) for s, e in evs]
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() - base_mem)
            else:
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    _step(layer, ps, x, gy, amp)
                    times[name].append((time.perf_counter() - t0) * 1e3)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof
        acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        for name, layer in layers.items():
            with prof(activities=acts) as p:
                for _ in range(5):
                    _step(layer, params[name], x, gy, amp)
                if cuda:
                    torch.cuda.synchronize()
            print(f"## profile {name} {[t, in_f, out_f, r]} (5 steps)")
            print(p.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=14,
                                         max_name_column_width=70))
    med = {n: statistics.median(v) for n, v in times.items()}
    spread = {n: (min(v), max(v)) for n, v in times.items()}
    label = str(dtype).replace("torch.", "") + ("" if amp is None else f"+autocast-{str(amp).replace('torch.', '')}")
    return {"shape": [t, in_f, out_f, r], "dtype": label, "device": device,
            "n": {n: len(v) for n, v in times.items()}, "median_ms": med, "min_max_ms": spread,
            "ratio_to_frozen": {n: med[n] / med["frozen"] for n in med} if "frozen" in med else {},
            "peak_extra_bytes": peak, "check": errs}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="comma list of fp32,bf16,fp16 (default: bf16 on CUDA, fp32 on CPU; "
                    "fp32 with --autocast)")
    ap.add_argument("--autocast", default=None, help="comma list of bf16,fp16: run each under torch.autocast in that "
                    "dtype (weights in --dtype)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per variant and shape "
                    "(default 100 on CUDA, 24 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 10 CUDA, 2 CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10 CUDA, 6 CPU)")
    ap.add_argument("--token-scale", type=int, default=None, help="divide T by this (default 64 on CPU, 1 on CUDA)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma list of {', '.join(VARIANTS + EXPERIMENTS)} (frozen is always run)")
    ap.add_argument("--allow-tf32", action="store_true", help="allow TF32 for fp32 matmuls on CUDA")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler kernel table per variant")
    ap.add_argument("--shapes", default=None, help="indices of SHAPES to run, e.g. 0 or 0,2 (default all)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtypes = (args.dtype or ("bf16" if cuda and not args.autocast else "fp32")).split(",")
    amps: list[torch.dtype | None] = [DTYPES[a] for a in args.autocast.split(",")] if args.autocast else [None]
    iters = args.iters or (100 if cuda else 24)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    rounds = args.rounds or (10 if cuda else 6)
    scale = args.token_scale or (1 if cuda else 64)
    variants = args.variants.split(",")
    if "frozen" not in variants:
        variants.insert(0, "frozen")
    if args.autocast:
        if any(v in EXPERIMENTS for v in variants):
            ap.error("the exp_* experiments ignore autocast; leave them out with --autocast")
        variants = [v for v in variants if v != "peft_same"]  # fp32 adapters: the same layer as peft
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    import peft  # noqa: F401  (version for the record; import noise before the table)

    print(f"# machine: {machine(args.device)}; peft {peft.__version__}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    print(f"# tokens scaled by 1/{scale}; {iters} timed steps per variant after {warmup} warm-up, "
          f"{rounds} interleaved rounds", flush=True)
    results = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for amp, (t, i, o, r) in ((a, sh) for a in amps for sh in shapes):
            res = bench_shape(t // scale, i, o, r, dtype, args.device, iters, warmup, rounds, variants,
                              args.profile, amp)
            results.append(res)
            print(json.dumps(res), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    head = "| dtype | T, in->out, r | " + " | ".join(f"{v} ms (x frozen)" for v in variants) + " |"
    print()
    print(head)
    print("|" + "---|" * (2 + len(variants)))
    for res in results:
        t, i, o, r = res["shape"]
        cells = [f"{res['median_ms'][v]:.3f}" + ("" if v == "frozen" else f" ({res['ratio_to_frozen'][v]:.2f}x)")
                 for v in variants]
        print(f"| {res['dtype']} | {t}, {i}->{o}, {r} | " + " | ".join(cells) + " |")
    if cuda:
        print("\nextra peak CUDA memory per step (MiB): " + "; ".join(
            f"{res['shape']} " + ", ".join(f"{v} {res['peak_extra_bytes'][v] / 2**20:.0f}" for v in variants)
            for res in results))
    ref = "peft" if args.autocast else "peft_same"
    print(f"\nvs {ref}, relative L2 of output / input grad / grad of A / grad of B: " + "; ".join(
        f"{res['dtype']} {res['shape'][0]},{res['shape'][1]}->{res['shape'][2]} " + ", ".join(
            f"{n} {c['out']:.0e}/{c['grad_x']:.0e}/{c['grad_A']:.0e}/{c['grad_B']:.0e}"
            for n, c in res["check"].items())
        for res in results))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
