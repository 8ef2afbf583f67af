"""GPU benchmark and bit-identity check of ``lora_ckpt.nf4_kernels`` (issue #18), one device call.

Sections, in order:
  1. ceilings: device-to-device copy bandwidth (bytes read + written).
  2. bit-identity on the GPU: ``dequantize`` vs torchao's ``NF4Tensor.to(dtype)`` (fresh random weights,
     several shapes, block layouts and dtypes, outputs poisoned first); the decode kernel vs dequant +
     matmul (relative error); ``nf4_linear`` vs torchao's ``linear_nf4`` for a training-size input.
  3. dequant: 4096 x 14336 NF4 -> bf16, ours vs torchao, GB/s counting bytes read + written; a sweep of
     launch shapes.
  4. decode kernel sweep (T = 16, 4096 -> 14336), forward only.
  5. the layer table: frozen bf16 Linear, bf16 LoRA (``LoRALinear``), torchtune's QLoRA layer
     (``linear_nf4`` + adapter, the code of torchtune 0.6.1's ``LoRALinear.forward``), ours as a drop-in
     ``nf4_linear`` for ``linear_nf4``, ours fused (``nf4_lora_linear``), the integrated layer
     (``LoRALinear(quantize_base=True)`` holding the same NF4 weight), and for the decode shape PEFT +
     bitsandbytes ``Linear4bit`` if importable; fwd+bwd (input and adapter gradients) and fwd alone,
     CUDA events, medians, variants interleaved in rounds, peak extra memory of fwd+bwd.

Usage: ``python bench/qlora_gpu.py [--iters 100] [--json out.json] [--sweep]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import traceback

import torch
from torch import nn
from torchao.dtypes.nf4tensor import linear_nf4, to_nf4

from lora_ckpt import nf4_kernels as K
from lora_ckpt.layer import LoRALinear

BF16 = torch.bfloat16
SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (16384, 8192, 8192, 64), (16, 4096, 14336, 16)]
DEV = "cuda"  # --smoke: "cpu" (run under TRITON_INTERPRET=1 to exercise the kernels), tiny shapes
SMALL = {(4096, 14336): (256, 512), (14336, 4096): (512, 256), (4096, 4096): (256, 256)}


def dims(shape):
    return SMALL.get(tuple(shape), tuple(shape)) if DEV == "cpu" else tuple(shape)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup if DEV == "cuda" else 1):
        fn()
    if DEV == "cpu":
        import time

        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs)


def copy_bandwidth() -> float:
    src = torch.empty(2**31 if DEV == "cuda" else 2**24, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / ms / 1e6  # GB/s


def rand_weight(shape, dtype, gen):
    w = torch.randn(shape, generator=gen, device=DEV) * 0.02
    w[torch.rand(shape, generator=gen, device=DEV) < 1e-3] *= 30  # a few outliers, as real weights have
    return w.to(dtype)


def check_identity() -> dict:
    gen = torch.Generator(device=DEV).manual_seed(1)
    cases = [
        (dims((4096, 14336)), 64, 256, BF16),
        (dims((4096, 4096)), 64, 256, torch.float16),
        ((96, 96), 64, 16, BF16),
        ((3, 16384 * 5), 32, 128, torch.float32),
        ((300, 128), 128, 25, BF16),
    ]
    bad = []
    n_checked = 0
    for shape, bs, sbs, base in cases:
        nf4 = to_nf4(rand_weight(shape, base, gen), block_size=bs, scaler_block_size=sbs)
        for dt in (BF16, torch.float16, torch.float32):
            K.dequantize(nf4, dt).fill_(float("nan"))  # poison the allocator's next block
            ours, ref = K.dequantize(nf4, dt), nf4.to(dt)
            n_checked += 1
            if not torch.equal(
                ours.view(torch.int16 if dt != torch.float32 else torch.int32),
                ref.view(torch.int16 if dt != torch.float32 else torch.int32),
            ):
                bad.append(f"{shape} bs={bs} sbs={sbs} base={base} -> {dt}")
    decode = {}
    n_out, k = dims((14336, 4096))
    nf4 = to_nf4(rand_weight((n_out, k), BF16, gen))
    w = nf4.to(BF16).float()
    for t in (1, 7, 16, 33, 64):
        x = torch.randn(t, k, generator=gen, device=DEV).to(BF16)
        ref = x.float() @ w.t()
        y = K.nf4_linear(x, nf4).float()
        base = (x @ nf4.to(BF16).t()).float()  # cuBLAS bf16, the torchao way
        decode[t] = {
            "ours_rel": ((y - ref).norm() / ref.norm()).item(),
            "cublas_rel": ((base - ref).norm() / ref.norm()).item(),
        }
    x = torch.randn(300, k, generator=gen, device=DEV).to(BF16).requires_grad_()
    g = torch.randn(300, n_out, generator=gen, device=DEV).to(BF16)
    y1, y2 = K.nf4_linear(x, nf4), linear_nf4(x, nf4)
    (g1,), (g2,) = torch.autograd.grad(y1, x, g), torch.autograd.grad(y2, x, g)
    train_equal = torch.equal(y1, y2) and torch.equal(g1, g2)
    return {"dequant_cases": n_checked, "dequant_mismatches": bad, "decode": decode, "train_bit_equal": train_equal}


def bench_dequant(iters: int, sweep: bool) -> dict:
    """Dequant GB/s. With ``sweep``, time each launch shape and keep the fastest (which then ships)."""
    gen = torch.Generator(device=DEV).manual_seed(2)
    ws = [to_nf4(rand_weight(dims((4096, 14336)), BF16, gen)) for _ in range(3)]  # rotate: 3 x 147 MB > L2
    n = ws[0]
    nbytes = n.quantized_data.numel() + n.quantized_scalers.numel() + 2 * n.quantization_factor.numel() + 2 * n.numel()
    it = iter(range(10**9))
    torchao_ms = median_ms(lambda: ws[next(it) % 3].to(BF16), max(iters // 4, 10))
    res = {
        "shape": n.shape,
        "bytes": nbytes,
        "torchao_ms": torchao_ms,
        "torchao_GBs": nbytes / torchao_ms / 1e6,
        "configs": {},
    }
    default = (K.DEQUANT_ROWS, K.DEQUANT_WARPS)
    configs = [(8, 1), (8, 2), (16, 1), (16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
    configs = list(dict.fromkeys((configs if DEV == "cuda" else configs[:2]) + [default])) if sweep else [default]
    for rows, warps in configs:
        K.DEQUANT_ROWS, K.DEQUANT_WARPS = rows, warps
        if not torch.equal(K.dequantize(ws[1], BF16), ws[1].to(BF16)):
            res["configs"][f"{rows},{warps}"] = "MISMATCH"
            continue
        ms = median_ms(lambda: K.dequantize(ws[next(it) % 3], BF16), iters)
        res["configs"][f"{rows},{warps}"] = {"ms": ms, "GBs": nbytes / ms / 1e6}
    timed = {c: v for c, v in res["configs"].items() if isinstance(v, dict)}
    best = min(timed, key=lambda c: timed[c]["ms"])
    K.DEQUANT_ROWS, K.DEQUANT_WARPS = (int(v) for v in best.split(","))
    res["chosen (rows,warps)"] = best
    res["ours_ms"] = timed[best]["ms"]
    res["ours_GBs"] = nbytes / res["ours_ms"] / 1e6
    return res


DECODE_KNOBS = ("DECODE_BLOCK_N", "DECODE_BLOCKS_K", "DECODE_WARPS", "DECODE_STAGES")


def bench_decode_sweep(iters: int) -> dict:
    """The fused decode kernel at T = 16, 4096 -> 14336 across launch shapes (each checked against dequant +
    matmul first); the fastest correct one is kept. Then fused vs dequant + cuBLAS at T = 1..64 sets
    ``DECODE_MAX_TOKENS`` to the largest T where the fused kernel wins."""
    gen = torch.Generator(device=DEV).manual_seed(3)
    n_out, k = dims((14336, 4096))
    ws = [to_nf4(rand_weight((n_out, k), BF16, gen)) for _ in range(4)]  # 4 x 29 MB > L2
    ref_w = ws[0].to(BF16).float()
    xs = {t: torch.randn(t, k, generator=gen, device=DEV).to(BF16) for t in (1, 16, 32, 64)}
    configs = [  # BLOCK_N, BLOCKS_K, warps, stages
        (64, 2, 4, 4),
        (64, 1, 4, 4),
        (128, 1, 4, 4),
        (128, 2, 8, 4),
        (64, 8, 8, 3),
        (32, 2, 4, 4),
        (32, 4, 4, 3),
        (16, 4, 2, 4),
        (64, 4, 4, 3),
        (128, 1, 4, 3),
    ]
    if DEV == "cpu":
        configs = configs[:2]
    K.DECODE_MAX_TOKENS = 64
    it = iter(range(10**9))
    out: dict = {"configs": {}}
    for cfg in configs:
        for knob, v in zip(DECODE_KNOBS, cfg, strict=True):
            setattr(K, knob, v)
        try:
            errs = []
            for t in (16, 64):  # 64: four token tiles
                ref = xs[t].float() @ ref_w.t()
                errs.append(((K.nf4_linear(xs[t], ws[0]).float() - ref).norm() / ref.norm()).item())
            if max(errs) > 1e-2:
                out["configs"][str(cfg)] = f"WRONG rel err {errs}"
                continue
            out["configs"][str(cfg)] = median_ms(lambda: K.nf4_linear(xs[16], ws[next(it) % 4]), iters)
        except Exception as e:
            out["configs"][str(cfg)] = repr(e)[:200]
    timed = {c: v for c, v in out["configs"].items() if isinstance(v, float)}
    best = {str(c): c for c in configs}[min(timed, key=timed.get)]
    for knob, v in zip(DECODE_KNOBS, best, strict=True):
        setattr(K, knob, v)
    out["chosen"] = dict(zip(DECODE_KNOBS, best, strict=True))
    cross = {}
    for t, x in xs.items():
        K.DECODE_MAX_TOKENS = 64
        fused = median_ms(lambda x=x: K.nf4_linear(x, ws[next(it) % 4]), iters)
        K.DECODE_MAX_TOKENS = 0
        plain = median_ms(lambda x=x: K.nf4_linear(x, ws[next(it) % 4]), iters)
        cross[t] = {"fused_ms": fused, "dequant_mm_ms": plain}
    out["fused_vs_dequant_mm"] = cross
    wins = [t for t, v in cross.items() if v["fused_ms"] < v["dequant_mm_ms"]]
    K.DECODE_MAX_TOKENS = max(wins) if wins else 0
    out["chosen"]["DECODE_MAX_TOKENS"] = K.DECODE_MAX_TOKENS
    return out


class TorchtuneQLoRA(nn.Module):
    """torchtune 0.6.1 ``LoRALinear(quantize_base=True).forward``, line for line (torchtune's import chain
    needs datasets/omegaconf/torchdata, which the device image lacks)."""

    def __init__(self, nf4, a, b, alpha, r):
        super().__init__()
        self.weight = nn.Parameter(nf4, requires_grad=False)
        self.lora_a = nn.Linear(a.shape[1], r, bias=False, device=DEV, dtype=BF16)
        self.lora_b = nn.Linear(r, b.shape[0], bias=False, device=DEV, dtype=BF16)
        with torch.no_grad():
            self.lora_a.weight.copy_(a)
            self.lora_b.weight.copy_(b)
        self.scaling, self.dropout = alpha / r, nn.Identity()

    def forward(self, x):
        out = linear_nf4(input=x, weight=self.weight)
        lora_out = self.lora_a(self.dropout(x))
        lora_out = self.scaling * self.lora_b(lora_out)
        return out + lora_out


class OursDropIn(TorchtuneQLoRA):
    def forward(self, x):
        out = K.nf4_linear(x, self.weight)
        return out + self.scaling * self.lora_b(self.lora_a(x))


class OursFused(TorchtuneQLoRA):
    def forward(self, x):
        return K.nf4_lora_linear(x, self.weight, self.lora_a.weight, self.lora_b.weight, scale=self.scaling)


def peft_bnb(w, a, b, alpha, r):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=BF16, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", blocksize=64)

        def forward(self, x):
            return self.proj(x)

    pm = get_peft_model(Holder().cuda(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0))
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer


def build(t, k, n, r, n_layers, gen, decode):
    layers: dict[str, list[nn.Module]] = {}
    alpha = 2.0 * r
    for _ in range(n_layers):
        w = rand_weight((n, k), BF16, gen)
        nf4 = to_nf4(w)
        wd = nf4.to(BF16)  # every variant computes with the same (dequantized) weights
        a = (torch.randn(r, k, generator=gen, device=DEV) / k**0.5).to(BF16)
        b = (torch.randn(n, r, generator=gen, device=DEV) * 0.01).to(BF16)
        frozen = nn.Linear(k, n, bias=False, device=DEV, dtype=BF16).requires_grad_(False)
        frozen.weight.copy_(wd)
        lora = LoRALinear.from_linear(frozen, r=r, alpha=alpha)
        with torch.no_grad():
            lora.lora_A.weight.copy_(a)
            lora.lora_B.weight.copy_(b)
        layer = LoRALinear.from_linear(frozen, r=r, alpha=alpha, quantize_base=True)  # the integrated layer
        layer.linear.weight = nn.Parameter(nf4, requires_grad=False)  # the very NF4 bytes the others use
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        row = {
            "frozen": frozen,
            "lora_ckpt_qlora_layer": layer,
            "bf16_lora": lora,
            "torchtune_qlora": TorchtuneQLoRA(nf4, a, b, alpha, r),
            "ours_nf4_linear": OursDropIn(nf4, a, b, alpha, r),
            "ours_fused": OursFused(nf4, a, b, alpha, r),
        }
        if decode:
            try:
                row["peft_bnb"] = peft_bnb(wd, a, b, alpha, r)
            except Exception as e:
                print(f"peft+bnb unavailable: {e!r}"[:300], file=sys.stderr)
        for name, m in row.items():
            layers.setdefault(name, []).append(m)
    return layers


def bench_layers(iters: int, rounds: int) -> list[dict]:
    gen = torch.Generator(device=DEV).manual_seed(4)
    rows = []
    for t, k, n, r in SHAPES:
        if DEV == "cpu":
            t, k, n = min(t, 96), min(k, 256), min(n, 512)
        decode = t <= 64
        n_layers = 8 if decode else 1  # decode weights would sit in the 60 MB L2: rotate through 8 layers
        layers = build(t, k, n, r, n_layers, gen, decode)
        x = torch.randn(t, k, generator=gen, device=DEV).to(BF16).requires_grad_()
        g = torch.randn(t, n, generator=gen, device=DEV).to(BF16)
        ref = layers["torchtune_qlora"][0](x).float()
        row = {"shape": (t, k, n, r), "fwdbwd": {}, "fwd": {}, "peak_MiB": {}, "rel_to_torchtune": {}}
        for name, ms in layers.items():
            out = ms[0](x).float()
            row["rel_to_torchtune"][name] = ((out - ref).norm() / ref.norm()).item()
        it = iter(range(10**9))

        def fwdbwd(ms, x=x, g=g, it=it):
            m = ms[next(it) % len(ms)]
            params = [x] + [p for p in m.parameters() if p.requires_grad]
            torch.autograd.grad(m(x), params, g)

        def fwd(ms, x=x, it=it):
            with torch.no_grad():
                ms[next(it) % len(ms)](x)

        samples: dict[str, dict[str, list[float]]] = {"fwdbwd": {}, "fwd": {}}
        for _ in range(rounds):  # interleave the variants
            for name, ms in layers.items():
                sync()
                if DEV == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base_mem = torch.cuda.memory_allocated()
                samples["fwdbwd"].setdefault(name, []).append(median_ms(lambda ms=ms: fwdbwd(ms), iters // rounds))
                if DEV == "cuda":
                    row["peak_MiB"][name] = max(
                        row["peak_MiB"].get(name, 0), (torch.cuda.max_memory_allocated() - base_mem) / 2**20
                    )
                samples["fwd"].setdefault(name, []).append(median_ms(lambda ms=ms: fwd(ms), iters // rounds))
        row["rounds"] = samples
        for kind in ("fwdbwd", "fwd"):
            for name, v in samples[kind].items():
                row[kind][name] = statistics.median(v)
        rows.append(row)
        del layers
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--sweep", action="store_true", help="also sweep the kernels' launch shapes")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    args = ap.parse_args(argv)
    import triton

    global DEV
    DEV = "cpu" if args.smoke else "cuda"
    res = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "kernels_on": K.triton_enabled("cuda"),
    }
    res["copy_GBs"] = copy_bandwidth()
    print(f"{res['device']} torch {res['torch']} triton {res['triton']}; copy {res['copy_GBs']:.0f} GB/s", flush=True)
    torch.manual_seed(0)

    def section(name, fn):  # one failing section must not cost the rest of a device call
        try:
            res[name] = fn()
        except Exception:
            traceback.print_exc()
            res[name] = None
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
        return res[name]

    if section("identity", check_identity):
        print("identity:", json.dumps(res["identity"]), flush=True)
    d = section("dequant", lambda: bench_dequant(args.iters, args.sweep))
    if d:
        print(
            f"dequant {tuple(d['shape'])}: ours {d['ours_ms'] * 1e3:.1f} us {d['ours_GBs']:.0f} GB/s; torchao "
            f"{d['torchao_ms'] * 1e3:.1f} us {d['torchao_GBs']:.0f} GB/s; {d['torchao_ms'] / d['ours_ms']:.1f}x; "
            f"chosen {d['chosen (rows,warps)']}; all {json.dumps(d['configs'])}",
            flush=True,
        )
    if args.sweep and section("decode_sweep", lambda: bench_decode_sweep(args.iters)):
        print("decode sweep", DECODE_KNOBS, "-> ms:", json.dumps(res["decode_sweep"]), flush=True)
    res["settings"] = {k: getattr(K, k) for k in (*DECODE_KNOBS, "DECODE_MAX_TOKENS", "DEQUANT_ROWS", "DEQUANT_WARPS")}
    print("settings for the table:", res["settings"], flush=True)
    if not section("layers", lambda: bench_layers(args.iters, rounds=4 if DEV == "cuda" else 1)):
        return 1
    names = list(res["layers"][0]["fwdbwd"])
    for kind in ("fwdbwd", "fwd"):
        print(f"\n{kind} ms (x frozen) | " + " | ".join(names))
        for row in res["layers"]:
            fr = row[kind]["frozen"]
            cells = [f"{row[kind][nm]:.3f} ({row[kind][nm] / fr:.2f}x)" if nm in row[kind] else "-" for nm in names]
            print(f"{row['shape']} | " + " | ".join(cells))
    print("\nintegrated LoRALinear(quantize_base=True) vs the alternatives, fwd+bwd ms (ratio):")
    print("| shape (T, in, out, r) | lora_ckpt layer | torchtune | peft+bnb | layer / torchtune | layer / peft+bnb |")
    print("|---|---|---|---|---|---|")
    for row in res["layers"]:
        m = row["fwdbwd"]
        ours, tt, pb = m.get("lora_ckpt_qlora_layer"), m.get("torchtune_qlora"), m.get("peft_bnb")
        cells = [f"{v:.3f}" if v is not None else "-" for v in (ours, tt, pb)]
        rat = [f"{ours / v:.2f}x" if ours is not None and v else "-" for v in (tt, pb)]
        print(f"| {row['shape']} | " + " | ".join(cells + rat) + " |")
    print("\npeak extra MiB (fwd+bwd):")
    for row in res["layers"]:
        print(row["shape"], {k: round(v) for k, v in row["peak_MiB"].items()})
    print("rel. diff of output vs torchtune's layer:")
    for row in res["layers"]:
        print(row["shape"], {k: f"{v:.1e}" for k, v in row["rel_to_torchtune"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
