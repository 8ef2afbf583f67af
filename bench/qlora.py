"""QLoRA benchmarks: loading a stock bf16 checkpoint into an NF4 LoRA model, and one quantized layer's
forward + backward.

``load``: a synthetic bf16 Llama-shaped checkpoint (bench/load.py's generator: Llama-3-8B layer shapes, few
layers, generated under ``--workdir`` and deleted afterwards unless ``--keep``) is loaded into a quantized
LoRA model, all 7 projections, r=16, alpha=32, each variant in a fresh subprocess:

- ``lora_ckpt``  ``build_meta_model`` (meta device) + ``inject_lora(..., quantize_base=True)`` +
                 ``load_checkpoint`` (quantizes tensor by tensor, dropping the file pages it has read);
- ``torchtune``  torchtune's own path, as its QLoRA recipes run it: ``lora_llama3(..., quantize_base=True)``
                 built on the CPU under ``set_default_dtype(bf16)`` (it quantizes its random init), then
                 ``FullModelHFCheckpointer.load_checkpoint`` + ``load_state_dict(strict=False)`` (NF4 copy_).
                 (torchtune 0.6.1's ``training.quantization``, its QAT module, does not import with torchao
                 0.17; it is stubbed, nothing of it is used on this path.)

"ready" is the time from after the imports until the model is built and loaded; then one forward of a
(1, 32) batch. Peak RSS is ``ru_maxrss`` (it includes the interpreter, the imports and every file page
touched through a memory map); "above imports" subtracts the RSS measured right after the imports. The
model's bytes: NF4 (every inner tensor of every NF4Tensor), unquantized tensors (embeddings, norms, the
output head) and adapters. A hash of the first layer's q-projection NF4 codes checks that both variants
quantized the same checkpoint to the same bytes.

``forward``: forward + backward of one adapted Linear over an NF4 base, bench/forward.py's shapes and
timing (median over interleaved rounds, CUDA events), B random:

- ``nf4_base``        torchao ``linear_nf4`` alone (the dequantize + GEMM floor, no adapter);
- ``lora_ckpt``       ``LoRALinear.from_linear(linear, quantize_base=True)``;
- ``torchtune``       torchtune's ``LoRALinear(quantize_base=True)`` (same NF4 bytes);
- ``peft_bnb``        PEFT LoRA over a bitsandbytes ``Linear4bit`` (NF4, double quantization), adapters in
                      the base dtype (``autocast_adapter_dtype=False``, as the others).

A variant whose library is missing is reported as not measured.

    python bench/qlora.py load                    # 4 layers, 2.27 GB bf16; ~10 min on 2 CPU cores
    python bench/qlora.py load --quick            # a 2-layer 256-dim model, seconds
    python bench/qlora.py forward --device cuda   # the H200 run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from load import FULL, QUICK, generate  # noqa: E402  (bench/load.py's generator)

R, ALPHA = 16, 32
META_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
# bench/forward.py's, then a decode shape (T <= nf4_kernels.DECODE_MAX_TOKENS: the fused NF4 kernel on CUDA)
SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (16384, 8192, 8192, 64), (16, 4096, 14336, 16)]


# ----------------------------------------------------------------------------------- load
def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _model_bytes(model) -> dict[str, int]:
    from lora_ckpt.nf4 import is_nf4

    nf4 = plain = adapter = 0
    for name, p in model.named_parameters():
        if is_nf4(p) or type(p.data).__name__ == "NF4Tensor":
            nf4 += sum(t.numel() * t.element_size() for t in
                       (p.quantized_data, p.quantized_scalers, p.quantization_factor, p.scaler_mean, p.nf4))
        elif "lora" in name:
            adapter += p.numel() * p.element_size()
        else:
            plain += p.numel() * p.element_size()
    return {"nf4": nf4, "unquantized": plain, "adapter": adapter}


def child(variant: str, work: Path, params: dict, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    import torch._dynamo

    if variant == "lora_ckpt":
        import torchao.dtypes.nf4tensor  # noqa: F401  (lora_ckpt imports it on first use; counted as an import)

        from lora_ckpt.checkpoint import load_checkpoint
        from lora_ckpt.demo import build_meta_model
        from lora_ckpt.inject import inject_lora
    else:
        try:
            import torchtune.training  # noqa: F401
        except ImportError:  # torchtune 0.6.1's QAT module imports torchao APIs that torchao 0.17 removed:
            import types  # stub that one module (QLoRA never uses it), as a torchao<=0.15 environment needs not

            stub = types.ModuleType("torchtune.training.quantization")
            stub.get_quantizer_mode = lambda *a, **k: None  # type: ignore[attr-defined]
            sys.modules["torchtune.training.quantization"] = stub
        from torchtune import training
        from torchtune.models.llama3 import lora_llama3
        from torchtune.modules.peft import get_adapter_params, set_trainable_params
        from torchtune.training import FullModelHFCheckpointer
    rss_imported = rss_now()
    t0 = time.perf_counter()
    if variant == "lora_ckpt":
        model = build_meta_model(params)
        inject_lora(model, targets=META_TARGETS, r=R, alpha=ALPHA, quantize_base=True)
        load_checkpoint(model, work / "meta")
        q = model.layers[0].attention.wq.linear.weight
    else:
        with training.set_default_dtype(torch.bfloat16), torch.device("cpu"):
            model = lora_llama3(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                                vocab_size=params["vocab_size"], num_layers=params["n_layers"],
                                num_heads=params["n_heads"], num_kv_heads=params["n_kv_heads"],
                                embed_dim=params["dim"], max_seq_len=4096, intermediate_dim=params["hidden_dim"],
                                norm_eps=params["norm_eps"], rope_base=int(params["rope_theta"]),
                                lora_rank=R, lora_alpha=ALPHA, quantize_base=True)
        set_trainable_params(model, get_adapter_params(model))
        files = sorted(p.name for p in (work / "hf").glob("model-*.safetensors"))
        ckpt = FullModelHFCheckpointer(checkpoint_dir=str(work / "hf"), checkpoint_files=files,
                                       model_type="LLAMA3", output_dir=str(work / "tt_out"))
        sd = ckpt.load_checkpoint()["model"]
        res = model.load_state_dict(sd, strict=False)
        assert not res.unexpected_keys and all("lora" in k for k in res.missing_keys), res
        del sd
        q = model.layers[0].attn.q_proj.weight
    t_ready = time.perf_counter()
    peak_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        model(torch.arange(32).reshape(1, 32) % params["vocab_size"])
    t_fwd = time.perf_counter()
    return {"variant": variant, "ready_s": t_ready - t0, "forward_s": t_fwd - t_ready,
            "peak_rss_ready": peak_ready, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_imported": rss_imported,
            "codes_sha": hashlib.sha256(q.quantized_data.numpy().tobytes()).hexdigest()[:16], **_model_bytes(model)}


def run_load(args: argparse.Namespace) -> int:
    params = dict(QUICK if args.quick else FULL)
    if args.layers:
        params["n_layers"] = args.layers
    work = Path(args.workdir) / ("quick" if args.quick else f"full{params['n_layers']}")
    if not (work / "meta" / "consolidated.safetensors").exists():
        print(f"generating {work} ...", file=sys.stderr)
        generate(params, work)
    ckpt_bytes = (work / "meta" / "consolidated.safetensors").stat().st_size
    for p in list((work / "meta").iterdir()) + list((work / "hf").iterdir()):  # warm page cache, alike for all
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    try:
        for _ in range(args.reps):
            for v in args.variants:
                cmd = [sys.executable, __file__, "_child", v, str(work), json.dumps(params), str(args.threads or 0)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{v} failed")
                results[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[v][-1]), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_load(results, ckpt_bytes, params)
    return 0


def print_load(results: dict[str, list[dict]], ckpt_bytes: int, params: dict) -> None:
    mib = 1 << 20
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for v, rs in results.items() if rs}
    print(f"\ncheckpoint: {ckpt_bytes / 1e9:.2f} GB bf16, {params['n_layers']} layers (dim {params['dim']}, "
          f"hidden {params['hidden_dim']}, vocab {params['vocab_size']}); LoRA r={R} on all 7 projections; "
          f"medians of {len(next(iter(results.values())))}\n")
    print("| variant | ready s | first forward s | peak RSS at ready MiB | peak RSS after forward MiB | RSS after "
          "imports MiB | peak at ready above imports MiB | NF4 MiB | unquantized MiB | adapter MiB "
          "| NF4 codes sha (layer 0 q) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v, m in med.items():
        print(f"| {v} | {m['ready_s']:.1f} | {m['forward_s']:.2f} | {m['peak_rss_ready'] / mib:.0f} | "
              f"{m['peak_rss'] / mib:.0f} | "
              f"{m['rss_imported'] / mib:.0f} | {(m['peak_rss_ready'] - m['rss_imported']) / mib:.0f} | "
              f"{m['nf4'] / mib:.0f} | {m['unquantized'] / mib:.0f} | {m['adapter'] / mib:.1f} | "
              f"{results[v][0]['codes_sha']} |")
    print("\npeak = peak RSS at ready:\n\n| variant | peak above imports / model bytes | peak / model bytes "
          "| peak above imports / bf16 ckpt | peak / bf16 ckpt |")
    print("|---|---|---|---|---|")
    for v, m in med.items():
        model = m["nf4"] + m["unquantized"] + m["adapter"]
        above = m["peak_rss_ready"] - m["rss_imported"]
        print(f"| {v} | {above / model:.3f} | {m['peak_rss_ready'] / model:.3f} | {above / ckpt_bytes:.3f} | "
              f"{m['peak_rss_ready'] / ckpt_bytes:.3f} |")
    if "lora_ckpt" in med and "torchtune" in med:
        a, b = med["lora_ckpt"], med["torchtune"]
        same = results["lora_ckpt"][0]["codes_sha"] == results["torchtune"][0]["codes_sha"]
        print(f"\nlora_ckpt / torchtune: ready {a['ready_s'] / b['ready_s']:.3f}x, peak RSS at ready "
              f"{a['peak_rss_ready'] / b['peak_rss_ready']:.3f}x, above imports "
              f"{(a['peak_rss_ready'] - a['rss_imported']) / (b['peak_rss_ready'] - b['rss_imported']):.3f}x; "
              f"same NF4 codes: {same}")


# -------------------------------------------------------------------------------- forward
def build_layers(in_f: int, out_f: int, r: int, dtype, device: str, variants: list[str]) -> dict:
    import torch
    from torch import nn

    from lora_ckpt.layer import LoRALinear

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(dtype)
    a = (torch.randn(r, in_f, generator=gen) * 0.02).to(dtype)
    b = (torch.randn(out_f, r, generator=gen) * 0.02).to(dtype)
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for v in variants:
        try:
            if v == "nf4_base":
                from torchao.dtypes.nf4tensor import linear_nf4, to_nf4

                class Base(nn.Module):
                    def __init__(self) -> None:
                        super().__init__()
                        self.weight = nn.Parameter(to_nf4(w.to(device)), requires_grad=False)

                    def forward(self, x):
                        return linear_nf4(x, self.weight)

                layers[v] = Base()
                continue
            if v == "lora_ckpt":
                lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
                lin.weight.data.copy_(w)
                m = LoRALinear.from_linear(lin, r=r, alpha=2 * r, quantize_base=True)
                m.lora_A.weight.data.copy_(a)
                m.lora_B.weight.data.copy_(b)
            elif v == "torchtune":
                from torchtune.modules.peft import LoRALinear as TT

                default = torch.get_default_dtype()
                torch.set_default_dtype(dtype)
                try:
                    with torch.device(device):
                        m = TT(in_f, out_f, rank=r, alpha=2 * r, quantize_base=True)
                finally:
                    torch.set_default_dtype(default)
                m.load_state_dict({"weight": w.to(device), "lora_a.weight": a, "lora_b.weight": b})
            elif v == "peft_bnb":
                import bitsandbytes as bnb
                from peft import LoraConfig, get_peft_model

                q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
                holder = nn.Module()
                holder.proj = q.to(device)
                holder.forward = lambda x, _h=holder: _h.proj(x)  # type: ignore[method-assign]
                m = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]),
                                   autocast_adapter_dtype=False)
                lyr = m.base_model.model.proj
                lyr.lora_A["default"].weight.data.copy_(a)
                lyr.lora_B["default"].weight.data.copy_(b)
            else:
                raise SystemExit(f"unknown variant {v}")
            layers[v] = m.to(device)
        except ImportError as e:
            skipped[v] = f"not measured: {e.name or e} is not installed"
    return {"layers": layers, "skipped": skipped}


def time_steps(layers: dict, x, gy, *, rounds: int, iters: int, warmup: int, cuda: bool) -> dict[str, list[float]]:
    """Milliseconds of each forward+backward step, variants interleaved in rounds (bench/forward.py's scheme)."""
    import torch

    params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in layers.items()}

    def step(name: str) -> None:
        x.grad = None
        for p in params[name]:
            p.grad = None
        layers[name](x).backward(gy)

    for name in layers:
        for _ in range(warmup):
            step(name)
    times: dict[str, list[float]] = {n: [] for n in layers}
    per_round = max(1, math.ceil(iters / rounds))
    names = list(layers)
    for rnd in range(rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            for _ in range(per_round):
                if cuda:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    step(name)
                    e.record()
                    torch.cuda.synchronize()
                    times[name].append(s.elapsed_time(e))
                else:
                    t0 = time.perf_counter()
                    step(name)
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def _ratio(med: dict[str, float], u: str, v: str) -> str:
    return f"{med[u] / med[v]:.3f}" if u in med and v in med else "-"


def bench_forward(args: argparse.Namespace) -> int:
    import torch

    cuda = args.device.startswith("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    scale = args.token_scale or (1 if cuda else 64)
    rounds, iters, warmup = args.rounds, args.iters or (100 if cuda else 12), 10 if cuda else 2
    machine = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{machine}, torch {torch.__version__}, {args.dtype}, tokens / {scale}; median ms per forward+backward\n")
    print("| shape (T, in->out, r) | " + " | ".join(args.variants) + " | lora_ckpt / torchtune | lora_ckpt / peft_bnb "
          "| rel. L2 diff of out vs torchtune |")
    print("|---" * (len(args.variants) + 4) + "|")
    for si in args.shapes:
        t, in_f, out_f, r = SHAPES[si]
        t = max(1, t // scale)
        built = build_layers(in_f, out_f, r, dtype, args.device, args.variants)
        layers, skipped = built["layers"], built["skipped"]
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(t, in_f, generator=gen).to(args.device, dtype).requires_grad_(True)
        gy = torch.randn(t, out_f, generator=gen).to(args.device, dtype)
        outs = {}
        for n, m in list(layers.items()):  # one step each first: a variant that fails is reported, not fatal
            try:
                y = m(x)
                y.backward(gy)
                outs[n] = y.detach().float()
            except RuntimeError as e:
                skipped[n] = f"failed: {str(e).splitlines()[0][:70]}"
                del layers[n]
        times = time_steps(layers, x, gy, rounds=rounds, iters=iters, warmup=warmup, cuda=cuda)
        med = {n: statistics.median(v) for n, v in times.items()}
        cells = [f"{med[v]:.3f}" if v in med else skipped.get(v, "-") for v in args.variants]
        diff = (f"{((outs['lora_ckpt'] - outs['torchtune']).norm() / outs['torchtune'].norm()).item():.1e}"
                if "lora_ckpt" in outs and "torchtune" in outs else "-")
        ratios = f"{_ratio(med, 'lora_ckpt', 'torchtune')} | {_ratio(med, 'lora_ckpt', 'peft_bnb')}"
        print(f"| ({t}, {in_f}->{out_f}, {r}) | " + " | ".join(cells) + f" | {ratios} | {diff} |", flush=True)
        del layers, built
        if cuda:
            torch.cuda.empty_cache()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _, variant, work, params, threads = argv
        print(json.dumps(child(variant, Path(work), json.loads(params), int(threads) or None)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", nargs="?", choices=["load", "forward"],
                    help="load (CPU) or forward (default: forward with --device cuda, else load)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default="/tmp/lora-ckpt-qlora-bench")
    ap.add_argument("--layers", type=int, default=0, help="load: transformer layers (default 4: 2.27 GB)")
    ap.add_argument("--quick", action="store_true", help="load: a tiny model")
    ap.add_argument("--keep", action="store_true", help="load: keep the generated checkpoint")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variants", default="", help="comma list (load: lora_ckpt,torchtune; forward: "
                    "nf4_base,lora_ckpt,torchtune,peft_bnb)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--shapes", default="0,1,2,3")
    ap.add_argument("--token-scale", type=int, default=0)
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    part = args.part or ("forward" if args.device.startswith("cuda") else "load")
    if part == "load":
        args.variants = (args.variants or "lora_ckpt,torchtune").split(",")
        return run_load(args)
    args.variants = (args.variants or "nf4_base,lora_ckpt,torchtune,peft_bnb").split(",")
    args.shapes = [int(s) for s in args.shapes.split(",")]
    return bench_forward(args)


if __name__ == "__main__":
    raise SystemExit(main())
