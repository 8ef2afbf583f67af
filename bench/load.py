"""Time-to-ready-model and peak RSS: loading a stock bf16 checkpoint into a plain model, into the
same model with LoRA injected, and PEFT's way (transformers + get_peft_model).

Variants, each run in a fresh subprocess (so peak RSS is per variant), interleaved over
``--reps`` repetitions:

- ``plain``  ``lora_ckpt.demo.build_meta_model`` (meta device) + ``lora_ckpt.load_checkpoint``
             (``assign=True``: the memory-mapped tensors become the parameters) + one forward;
- ``lora``   the same with ``inject_lora`` on all 7 Linear types (r=16, alpha=32) before the load;
- ``peft``   ``transformers.LlamaForCausalLM.from_pretrained(dtype=bfloat16)`` on an HF-named copy of
             the same tensors + ``peft.get_peft_model`` with the same LoRA config (PEFT's defaults)
             + one forward.

"ready" is the time from after the imports until the model is built and loaded; "first
forward" is one forward on a (1, 32) batch under ``torch.no_grad``; imports are timed apart
(``torch._dynamo`` is imported up front in every variant: see ``child``).
Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the child (it includes the interpreter, the
imports and the file pages the process has touched through its memory maps).

The synthetic checkpoint (random bf16, Llama-3-8B layer shapes, few layers) is generated once
and cached under ``--workdir``: Meta names in one ``consolidated.safetensors`` + ``params.json``,
and an HF-named sharded copy (``model-*.safetensors`` + index + ``config.json``; wq/wk rows
permuted as HF's Llama conversion does, so both describe the same model). Tensors are written one
at a time. The page cache cannot be dropped without disturbing a shared machine, so every file is
read once before timing (warm cache for all variants alike).

    python bench/load.py                 # 4 layers, 2.27 GB bf16; about 3-5 minutes on 2 cores
    python bench/load.py --quick         # a 2-layer 256-dim model, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL = {"dim": 4096, "n_layers": 4, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 32000,
        "hidden_dim": 14336, "norm_eps": 1e-5, "rope_theta": 500000.0}
QUICK = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 32000,
         "hidden_dim": 768, "norm_eps": 1e-5, "rope_theta": 500000.0}
R, ALPHA = 16, 32
META_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["plain", "lora", "peft"]
SEQ = 32
SHARD_BYTES = 1 << 30


# ------------------------------------------------------------------------------ generator
def tensor_specs(p: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(meta name, hf name, shape) of every tensor, in Meta order."""
    d, hd = p["dim"], p["dim"] // p["n_heads"]
    q, kv, h, v = p["n_heads"] * hd, p["n_kv_heads"] * hd, p["hidden_dim"], p["vocab_size"]
    specs = [("tok_embeddings.weight", "model.embed_tokens.weight", (v, d))]
    for i in range(p["n_layers"]):
        m, f = f"layers.{i}.", f"model.layers.{i}."
        specs += [
            (m + "attention.wq.weight", f + "self_attn.q_proj.weight", (q, d)),
            (m + "attention.wk.weight", f + "self_attn.k_proj.weight", (kv, d)),
            (m + "attention.wv.weight", f + "self_attn.v_proj.weight", (kv, d)),
            (m + "attention.wo.weight", f + "self_attn.o_proj.weight", (d, q)),
            (m + "feed_forward.w1.weight", f + "mlp.gate_proj.weight", (h, d)),
            (m + "feed_forward.w2.weight", f + "mlp.down_proj.weight", (d, h)),
            (m + "feed_forward.w3.weight", f + "mlp.up_proj.weight", (h, d)),
            (m + "attention_norm.weight", f + "input_layernorm.weight", (d,)),
            (m + "ffn_norm.weight", f + "post_attention_layernorm.weight", (d,)),
        ]
    specs += [("norm.weight", "model.norm.weight", (d,)), ("output.weight", "lm_head.weight", (v, d))]
    return specs


def _header(entries: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """A safetensors header (8-byte aligned) for bf16 tensors written in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offsets, pos = {}, 0
    for name, shape in entries:
        n = 2
        for s in shape:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def generate(p: dict, out: Path) -> None:
    """Write the Meta-named and HF-named checkpoints, one tensor in memory at a time."""
    import torch
    from transformers import LlamaConfig

    specs = tensor_specs(p)
    meta_dir, hf_dir = out / "meta", out / "hf"
    meta_dir.mkdir(parents=True, exist_ok=True)
    hf_dir.mkdir(parents=True, exist_ok=True)
    (meta_dir / "params.json").write_text(json.dumps(p, indent=1))
    hd = p["dim"] // p["n_heads"]
    cfg = LlamaConfig(hidden_size=p["dim"], intermediate_size=p["hidden_dim"], num_attention_heads=p["n_heads"],
                      num_key_value_heads=p["n_kv_heads"], num_hidden_layers=p["n_layers"],
                      vocab_size=p["vocab_size"], rms_norm_eps=p["norm_eps"], rope_theta=p["rope_theta"],
                      tie_word_embeddings=False, max_position_embeddings=4096, head_dim=hd)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg_dict = json.loads(cfg.to_json_string())
    cfg_dict["dtype"] = "bfloat16"
    (hf_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2))

    # HF shards: greedy by bytes, in HF order (embeddings, layers, norm, lm_head)
    nbytes = {hf: 2 * _numel(shape) for _, hf, shape in specs}
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for _, hf, shape in specs:
        if shards[-1] and size + nbytes[hf] > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((hf, shape))
        size += nbytes[hf]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, hf_pos = {}, {}
    files = {}
    for fname, entries in zip(names, shards):
        head, offs = _header(entries)
        f = open(hf_dir / fname, "wb")
        f.write(head)
        files[fname] = f
        for name, _ in entries:
            weight_map[name] = fname
            hf_pos[name] = len(head) + offs[name]
    total = sum(nbytes.values())
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    meta_head, meta_offs = _header([(m, shape) for m, _, shape in specs])
    meta_f = open(meta_dir / "consolidated.safetensors", "wb")
    meta_f.write(meta_head)

    gen = torch.Generator().manual_seed(0)
    for m, hf, shape in specs:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
        meta_f.seek(len(meta_head) + meta_offs[m])
        meta_f.write(t.view(torch.uint8).numpy().data)
        if m.endswith(("attention.wq.weight", "attention.wk.weight")):  # Meta -> HF RoPE layout
            heads = p["n_heads"] if "wq" in m else p["n_kv_heads"]
            t = t.view(heads, hd // 2, 2, shape[1]).transpose(1, 2).reshape(shape).contiguous()
        f = files[weight_map[hf]]
        f.seek(hf_pos[hf])
        f.write(t.view(torch.uint8).numpy().data)
        del t
    meta_f.close()
    for f in files.values():
        f.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------- child
def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(variant: str, ckpt: Path, out_logits: Path | None, threads: int | None) -> dict:
    t_start = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)
    # Meta-device init runs the initialisers on meta tensors; nn.Embedding's normal_ goes through
    # torch._refs, which imports torch._dynamo once per process (2-5 s here). transformers and peft
    # import it anyway, so it is imported up front for every variant and counted under "imports".
    import torch._dynamo  # noqa: F401

    if variant in ("plain", "lora"):
        sys.path.insert(0, str(ROOT))
        from lora_ckpt.checkpoint import load_checkpoint
        from lora_ckpt.demo import build_meta_model
        from lora_ckpt.inject import adapter_state_dict, inject_lora
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM
    t_imported = time.perf_counter()
    rss_imported = _rss_now()

    params = json.loads((ckpt / "meta" / "params.json").read_text())
    tokens = torch.randint(0, params["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    if variant in ("plain", "lora"):
        model = build_meta_model(params)
        if variant == "lora":
            inject_lora(model, targets=META_TARGETS, r=R, alpha=ALPHA)
        load_checkpoint(model, ckpt / "meta" / "consolidated.safetensors", strict=True)
        adapter = adapter_state_dict(model) if variant == "lora" else {}
        adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
        adapter_dtype = str(next(iter(adapter.values())).dtype) if adapter else "-"
    else:
        model = LlamaForCausalLM.from_pretrained(ckpt / "hf", dtype=torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS))
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        adapter_bytes = sum(p.numel() * p.element_size() for p in lora)
        adapter_dtype = str(lora[0].dtype)
    t1 = time.perf_counter()
    rss_ready = _rss_now()
    with torch.no_grad():
        logits = model(tokens) if variant != "peft" else model(input_ids=tokens).logits
    t2 = time.perf_counter()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if out_logits is not None:
        torch.save(logits.float(), out_logits)
    return {"variant": variant, "import_s": t_imported - t_start, "ready_s": t1 - t0, "forward_s": t2 - t1,
            "rss_imported": rss_imported, "rss_ready": rss_ready, "rss_end": _rss_now(),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "adapter_bytes": adapter_bytes, "adapter_dtype": adapter_dtype, "trainable": trainable,
            "finite": bool(torch.isfinite(logits).all()), "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------- parent
def warm_read(paths: list[Path]) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    buf = bytearray(8 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while (k := f.readinto(buf)):
                n += k
    return n, time.perf_counter() - t0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/lora-ckpt-bench", help="where the checkpoints are cached")
    ap.add_argument("--quick", action="store_true", help="a tiny model (seconds), for a smoke run")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each variant (>= 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in each child (default: torch's default). On a crowded machine "
                    "every multi-threaded op can wait milliseconds for its second thread, so an op-count "
                    "difference shows up as time; --threads 1 removes that artefact")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    ckpt = Path(args.ckpt) if args.ckpt else Path(args.workdir) / (
        f"llama_d{p['dim']}_h{p['hidden_dim']}_l{p['n_layers']}_v{p['vocab_size']}")

    if args.child:
        print(json.dumps(child(args.child, ckpt, Path(args.logits) if args.logits else None, args.threads)))
        return 0
    if args.generate:
        t0 = time.perf_counter()
        generate(p, ckpt)
        print(json.dumps({"generate_s": time.perf_counter() - t0,
                          "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return 0

    t_all = time.perf_counter()
    load_start = os.getloadavg()[0]
    done = ckpt / "DONE.json"
    if not (done.exists() and json.loads(done.read_text()).get("params") == p):
        print(f"# generating {ckpt} ...", flush=True)
        gen = _run_child(["--generate", "--ckpt", str(ckpt)] + (["--quick"] if args.quick else []))
        done.write_text(json.dumps({"params": p, **gen}))
        print(f"# generated in {gen['generate_s']:.1f} s, generator peak RSS {gen['peak_rss'] / 2**20:.0f} MiB",
              flush=True)
    files = sorted(f for f in ckpt.rglob("*") if f.is_file())
    meta_bytes = (ckpt / "meta" / "consolidated.safetensors").stat().st_size
    hf_bytes = sum(f.stat().st_size for f in (ckpt / "hf").glob("*.safetensors"))
    nbytes, secs = warm_read(files)
    print(f"# checkpoint: {meta_bytes / 1e9:.2f} GB Meta-named (1 file), {hf_bytes / 1e9:.2f} GB HF-named "
          f"({len(list((ckpt / 'hf').glob('*.safetensors')))} shards); warm-up read of {nbytes / 1e9:.2f} GB "
          f"in {secs:.1f} s", flush=True)

    reps = max(3, args.reps)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(reps):
        order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]
        for v in order:
            extra = ["--logits", str(ckpt / f"logits_{v}.pt")] if rep == 0 else []
            t0 = time.perf_counter()
            threads = ["--threads", str(args.threads)] if args.threads else []
            res = _run_child(["--child", v, "--ckpt", str(ckpt), *threads, *extra])
            res["process_s"] = time.perf_counter() - t0
            runs[v].append(res)
            print(json.dumps(res), flush=True)

    import torch  # only to compare the saved logits

    lg = {v: torch.load(ckpt / f"logits_{v}.pt") for v in VARIANTS}
    diff_lora = (lg["lora"] - lg["plain"]).abs().max().item()
    diff_peft = (lg["peft"] - lg["plain"]).abs().max().item()

    keys = ["import_s", "ready_s", "forward_s", "process_s", "peak_rss", "rss_imported", "rss_end"]
    med = {v: {k: statistics.median(r[k] for r in runs[v]) for k in keys} for v in VARIANTS}
    for v in VARIANTS:
        med[v]["ready_fwd_s"] = statistics.median(r["ready_s"] + r["forward_s"] for r in runs[v])
        med[v]["adapter_bytes"] = runs[v][0]["adapter_bytes"]
        med[v]["adapter_dtype"] = runs[v][0]["adapter_dtype"]
        med[v]["trainable"] = runs[v][0]["trainable"]
    pl, lo, pe = med["plain"], med["lora"], med["peft"]
    mib = 2 ** 20

    print()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; python {sys.version.split()[0]}, torch {torch.__version__}; "
          f"torch threads per child {runs['plain'][0]['threads']}; load average {load_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(f"checkpoint: {p}; {meta_bytes / 1e9:.2f} GB bf16; LoRA r={R} alpha={ALPHA} on {len(META_TARGETS)} "
          f"Linear types; forward batch (1, {SEQ}); medians of {reps} runs, each variant a fresh process")
    print()
    print("| variant | imports s | ready s | first forward s | ready + forward s | process wall s | "
          "peak RSS MiB | RSS after imports MiB | adapter MiB (dtype) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, label in (("plain", "(a) plain + load_checkpoint"), ("lora", "(b) inject_lora + load_checkpoint"),
                     ("peft", "(c) from_pretrained + get_peft_model")):
        m = med[v]
        print(f"| {label} | {m['import_s']:.2f} | {m['ready_s']:.3f} | {m['forward_s']:.3f} | {m['ready_fwd_s']:.3f} | "
              f"{m['process_s']:.2f} | {m['peak_rss'] / mib:.0f} | {m['rss_imported'] / mib:.0f} | "
              f"{m['adapter_bytes'] / mib:.2f} ({m['adapter_dtype'].replace('torch.', '')}) |")
    print()
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    print("| ratio | ready | ready + forward | peak RSS |")
    print("|---|---|---|---|")
    for v, label in (("lora", "LoRA / plain"), ("peft", "PEFT / plain")):
        print(f"| {label} | {ratio(med[v]['ready_s'], pl['ready_s']):.3f} | "
              f"{ratio(med[v]['ready_fwd_s'], pl['ready_fwd_s']):.3f} | {ratio(med[v]['peak_rss'], pl['peak_rss']):.3f} |")
    rss_budget = pl["peak_rss"] + lo["adapter_bytes"]
    print()
    print(f"target time: LoRA ready+forward {ratio(lo['ready_fwd_s'], pl['ready_fwd_s']):.3f}x plain (<= 1.02): "
          f"{'met' if lo['ready_fwd_s'] <= 1.02 * pl['ready_fwd_s'] else 'NOT met'}; ready alone "
          f"{lo['ready_s'] - pl['ready_s']:+.3f} s ({ratio(lo['ready_s'], pl['ready_s']):.2f}x)")
    print(f"target RSS:  LoRA peak {lo['peak_rss'] / mib:.0f} MiB vs plain + adapter {rss_budget / mib:.0f} MiB "
          f"= {ratio(lo['peak_rss'], rss_budget):.3f}x (<= 1.05): "
          f"{'met' if lo['peak_rss'] <= 1.05 * rss_budget else 'NOT met'}")
    print(f"logits: max |LoRA - plain| = {diff_lora:.1e} (adapters start as no-ops); max |PEFT model - plain| "
          f"= {diff_peft:.2e} (HF Llama vs demo MetaTransformer, same weights); all finite: "
          f"{all(r['finite'] for v in VARIANTS for r in runs[v])}")
    print(f"total benchmark time {time.perf_counter() - t_all:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu_name(), "params": p, "reps": reps, "runs": runs,
                                               "medians": med, "diff_lora": diff_lora, "diff_peft": diff_peft},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
