"""Streaming merge at model scale: lora-ckpt ``merge_checkpoint`` vs copying the files vs PEFT.

A synthetic bf16 Llama-shaped base (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocab 32000, untied; ``--layers`` full-size layers: 9 give 4.45 GB) is generated tensor by tensor
into 2 GB safetensors shards with an index and ``config.json``, plus a rank-16 all-linear PEFT
adapter (fp32, as PEFT saves), both cached in ``--workdir``. The same at about half the size
(``--layers`` // 2) shows how peak memory scales.

Each measurement runs in a fresh subprocess that reports the wall time and CPU time (user +
system, all threads) of the operation, after its imports, and its peak RSS (``VmHWM`` of
``/proc/self/status``, imports included; ``ru_maxrss`` is not used: Linux carries the parent's
high-water mark across ``execve``):

- ``copy``:      ``shutil.copyfile`` of every file of the base directory (the floor: bytes in, bytes out);
- ``lora_ckpt``: ``merge_checkpoint(base, adapter, out, progress=False)``;
- ``peft``:      ``AutoModelForCausalLM.from_pretrained(base, dtype=bfloat16)`` + ``PeftModel.from_pretrained``
                 + ``merge_and_unload()`` + ``save_pretrained(out)``.

Before each run the output is deleted, ``sync`` is called and the base is put in the page cache
(``warm``: read once) or taken out of it (``cold``: ``posix_fadvise(DONTNEED)`` on its files only),
all outside the timings. Methods are interleaved round by round so the machine's noise hits all
alike. Reported: medians over ``--runs`` (peak RSS: the largest), throughput = base bytes /
seconds. After the runs, two merged tensors of lora-ckpt's output are compared with PEFT's.

    python bench/merge.py                         # 9 layers (4.45 GB) and 4 (2.27 GB), warm and cold, 3 runs
    python bench/merge.py --layers 9 --runs 3 --cache warm --workdir /tmp/lora_ckpt_bench
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, RANK, ALPHA = 4096, 14336, 32, 8, 32000, 16, 32
HEAD_DIM = HIDDEN // HEADS
SHARD_BYTES = 2 * 10**9
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["copy", "lora_ckpt", "peft"]


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    kv = KV_HEADS * HEAD_DIM
    return {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER)}


def model_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(layer_shapes(i))
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


def config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM, "num_hidden_layers": layers, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", "use_cache": True}


def make_base(work: Path, layers: int) -> Path:
    """Sharded bf16 base, generated one shard at a time (at most one shard in memory), cached."""
    import torch
    from safetensors.torch import save_file

    out = work / f"base-{layers}L"
    if (out / "config.json").is_file():
        return out
    tmp = work / f".base-{layers}L.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = model_shapes(layers)
    shards: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        n = 2 * torch.Size(s).numel()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    g = torch.Generator().manual_seed(layers)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k in keys:
            shape = shapes[k]
            t = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else \
                (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            tensors[k] = t
            weight_map[k] = name
            total += t.numel() * 2
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {name}", file=sys.stderr, flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp / "config.json").write_text(json.dumps(config(layers), indent=2))
    os.replace(tmp, out)
    return out


def make_adapter(work: Path, layers: int, base: Path) -> Path:
    """Rank-16 all-linear PEFT adapter (fp32, random A and B so nothing is a no-op), cached."""
    import torch
    from safetensors.torch import save_file

    out = work / f"adapter-{layers}L"
    if (out / "adapter_config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1000 + layers)
    tensors = {}
    for i in range(layers):
        for k, (o, n) in ((k, s) for k, s in layer_shapes(i).items() if k.rsplit(".", 2)[-2] in TARGETS):
            mod = "base_model.model." + k[: -len(".weight")]
            tensors[f"{mod}.lora_A.weight"] = torch.randn(RANK, n, generator=g) * 0.01
            tensors[f"{mod}.lora_B.weight"] = torch.randn(o, RANK, generator=g) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
           "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": str(base),
           "inference_mode": True, "init_lora_weights": True, "fan_in_fan_out": False}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out


# ---------------------------------------------------------------------------------- child
def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return r.ru_utime + r.ru_stime


def child(method: str, base: str, adapter: str, out: str) -> None:
    c0 = cpu_seconds()  # reset after the imports below, in each branch
    if method == "copy":
        c0, t0 = cpu_seconds(), time.perf_counter()
        os.makedirs(out)
        for p in sorted(Path(base).iterdir()):
            shutil.copyfile(p, Path(out) / p.name)
        dt = time.perf_counter() - t0
    elif method == "lora_ckpt":
        sys.path.insert(0, str(ROOT))
        from lora_ckpt.merge import merge_checkpoint

        c0, t0 = cpu_seconds(), time.perf_counter()
        merge_checkpoint(base, adapter, out, progress=False)
        dt = time.perf_counter() - t0
    elif method == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        c0, t0 = cpu_seconds(), time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
        dt = time.perf_counter() - t0
    elif method == "imports":  # the RSS of python + torch + lora_ckpt imported, nothing done
        sys.path.insert(0, str(ROOT))
        import lora_ckpt.merge  # noqa: F401
        import torch  # noqa: F401

        dt = 0.0
    else:
        raise SystemExit(f"unknown method {method}")
    cpu = cpu_seconds() - c0
    print(json.dumps({"seconds": dt, "cpu": cpu, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process image's peak RSS: VmHWM (ru_maxrss would include the parent's RSS at spawn
    time: Linux keeps the high-water mark across execve)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evict(d: Path) -> None:
    """Drop this directory's files from the page cache (only them: posix_fadvise DONTNEED)."""
    for p in d.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(d: Path) -> None:
    """Read this directory's files once, so they are in the page cache."""
    for p in d.iterdir():
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def run_child(method: str, base: Path, adapter: Path, out: Path, *, cache: str | None = "warm") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if cache is not None:
        (evict if cache == "cold" else warm)(base)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(base), str(adapter), str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def compare_outputs(ours: Path, peft: Path) -> str:
    """One merged tensor from each output: max |difference| in bf16 ulps."""
    import torch
    from safetensors import safe_open

    def get(d: Path, key: str) -> torch.Tensor:
        index = d / "model.safetensors.index.json"
        name = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
        with safe_open(str(d / name), framework="pt") as f:
            return f.get_tensor(key)

    out = []
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        a, b = get(ours, key).float(), get(peft, key).float()
        ulp = (a - b).abs() / (b.abs().clamp_min(1e-30) * 2 ** -8)
        out.append(f"{key}: {int((a != b).sum())} of {a.numel()} elements differ, max {ulp.max().item():.2f} bf16 ulp")
    return "; ".join(out)


def fmt_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lora_ckpt_bench"))
    ap.add_argument("--layers", type=int, default=9, help="full-size layers of the large base (9: 4.45 GB)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--cache", default="warm,cold", help="base in the page cache before each run (warm: read "
                    "once; cold: evicted with posix_fadvise DONTNEED), or both")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    sizes = [args.layers, args.layers // 2]
    need = sum(2 * sum(torch_numel(s) for s in model_shapes(n).values()) for n in sizes) + \
        3 * 2 * sum(torch_numel(s) for s in model_shapes(args.layers).values())
    free = shutil.disk_usage(work).free
    print(f"disk: {fmt_gb(free)} free in {work}, this run needs at most {fmt_gb(need)} more", file=sys.stderr)
    if need > 0.8 * free:
        raise SystemExit("not enough free disk space for the benchmark; use --workdir elsewhere or fewer --layers")
    methods = args.methods.split(",")
    imports = run_child("imports", work, work, work / "out-imports", cache=None)
    results = []
    for layers in sizes:
        print(f"preparing {layers}-layer base ...", file=sys.stderr, flush=True)
        base = make_base(work, layers)
        adapter = make_adapter(work, layers, base)
        nbytes = dir_bytes(base)
        caches = args.cache.split(",")
        times: dict[tuple[str, str], list[dict]] = {(c, m): [] for c in caches for m in methods}
        for r in range(args.runs):
            for c in caches:
                for m in methods:
                    res = run_child(m, base, adapter, work / f"out-{m}", cache=c)
                    times[(c, m)].append(res)
                    print(f"  {layers}L run {r + 1} {c} {m}: {res['seconds']:.1f} s, CPU {res['cpu']:.1f} s, "
                          f"peak RSS {fmt_gb(res['peak_rss'])}", file=sys.stderr, flush=True)
                    if not (r == args.runs - 1 and m in ("lora_ckpt", "peft") and c == caches[-1]):
                        shutil.rmtree(work / f"out-{m}", ignore_errors=True)
        check = compare_outputs(work / "out-lora_ckpt", work / "out-peft") \
            if {"lora_ckpt", "peft"} <= set(methods) else ""
        for m in methods:
            shutil.rmtree(work / f"out-{m}", ignore_errors=True)
        for c in caches:
            row = {"layers": layers, "bytes": nbytes, "cache": c, "check": check if c == caches[-1] else ""}
            for m in methods:
                xs = times[(c, m)]
                row[m] = {"seconds": statistics.median(x["seconds"] for x in xs),
                          "cpu": statistics.median(x["cpu"] for x in xs),
                          "peak_rss": max(x["peak_rss"] for x in xs),
                          "all_seconds": [round(x["seconds"], 2) for x in xs]}
            results.append(row)
    report(results, imports, args)


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(results: list[dict], imports: dict, args: argparse.Namespace) -> None:
    import torch

    lines = [f"date: {datetime.date.today().isoformat()}; machine: {cpu_model()}, {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
             f"torch {torch.__version__};"
             f" python {platform.python_version()}",
             f"command: python bench/merge.py --layers {args.layers} --runs {args.runs} --cache {args.cache} "
             f"--workdir {args.workdir}",
             f"python + torch + lora_ckpt imported, nothing done: peak RSS {fmt_gb(imports['peak_rss'])}", "",
             "| base | page cache | method | time (median) | runs (s) | throughput | CPU time (median) | "
             "peak RSS (max) | vs copy | vs PEFT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        size = f"{row['layers']} layers, {fmt_gb(row['bytes'])} | {row['cache']}"
        for m in [m for m in METHODS if m in row]:
            r = row[m]
            thr = row["bytes"] / r["seconds"] / 1e9
            vs_copy = f"{row['copy']['seconds'] / r['seconds']:.2f}x" if "copy" in row else ""
            vs_peft = f"{row['peft']['seconds'] / r['seconds']:.1f}x faster" if "peft" in row and m != "peft" else ""
            lines.append(f"| {size} | {m} | {r['seconds']:.1f} s | {', '.join(map(str, r['all_seconds']))} | "
                         f"{thr:.2f} GB/s | {r['cpu']:.1f} s | {fmt_gb(r['peak_rss'])} | {vs_copy} | {vs_peft} |")
    lines.append("")
    for row in results:
        if row["check"]:
            lines.append(f"{row['layers']} layers, lora-ckpt's output vs PEFT's: {row['check']}")
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "imports": imports}, indent=2))


if __name__ == "__main__":
    main()
