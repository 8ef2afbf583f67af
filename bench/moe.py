"""Convert and merge of a Qwen3-MoE-shaped expert LoRA (PEFT ``target_parameters``), vs a copy.

Input (generated into ``--workdir``, deleted afterwards unless ``--keep``): a PEFT adapter as PEFT 0.21
writes it for ``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` plus
``target_modules=["q_proj", "v_proj"]`` on a Qwen3-MoE with hidden 2048, moe_intermediate 768 (Qwen3-30B-A3B's
expert shapes), ``--experts`` experts, ``--layers`` blocks, rank ``--rank``, float32 (~105 MB per block at
64 experts, rank 64); and a bf16 base checkpoint in the HF on-disk form (one tensor per expert,
``model.layers.L.mlp.experts.e.gate_proj.weight``), vocab 1024.

Variants, each in a fresh subprocess (imports before the clock; peak RSS = ``VmHWM``; the RSS after
imports is subtracted to give the working memory), interleaved over ``--repeats`` rounds, medians:

- ``copy-adapter``   ``shutil.copyfile`` of ``adapter_model.safetensors``: the floor for convert;
- ``peft2native``    ``convert(to="native")`` (stacked experts, verified expert by expert);
- ``peft2perexpert`` ``convert(to="peft", experts="per-expert")`` (vLLM's 2-D keys, verified per expert);
- ``peft2mlx``       ``convert(to="mlx")`` (``switch_mlp`` stacks, verified per expert);
- ``copy-base``      ``shutil.copyfile`` of the base shards: the floor for merge;
- ``merge``          ``merge_checkpoint(base, adapter)`` into the per-expert on-disk names.

    python bench/moe.py --experts 64 --layers 3 --rank 64 --repeats 3 --append
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, INTER, HEADS, KV, HD, VOCAB = 2048, 768, 32, 4, 128, 1024
VARIANTS = ("copy-adapter", "peft2native", "peft2perexpert", "peft2mlx", "copy-base", "merge")


def config(layers: int, experts: int) -> dict:
    return {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": HIDDEN,
            "intermediate_size": 6144, "moe_intermediate_size": INTER, "num_experts": experts,
            "num_experts_per_tok": 8, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
            "num_hidden_layers": layers, "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def make_input(work: Path, layers: int, experts: int, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    if (work / "peft/adapter_model.safetensors").is_file():
        return
    g = torch.Generator().manual_seed(0)
    (work / "peft").mkdir(parents=True, exist_ok=True)
    (work / "base").mkdir(exist_ok=True)
    ad = {}
    for i in range(layers):
        p = f"base_model.model.model.layers.{i}."
        for name, (inn, out) in {"mlp.experts.base_layer": (HIDDEN, 2 * INTER), "mlp.experts": (INTER, HIDDEN)}.items():
            ad[f"{p}{name}.lora_A.weight"] = torch.randn(rank * experts, inn, generator=g) * 0.02
            ad[f"{p}{name}.lora_B.weight"] = torch.randn(out, rank * experts, generator=g) * 0.02
        for name, out in (("self_attn.q_proj", HEADS * HD), ("self_attn.v_proj", KV * HD)):
            ad[f"{p}{name}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=g) * 0.02
            ad[f"{p}{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.02
    save_file(ad, work / "peft/adapter_model.safetensors", metadata={"format": "pt"})
    (work / "peft/adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}, indent=2, sort_keys=True))
    (work / "base/config.json").write_text(json.dumps(config(layers, experts), indent=2))
    bf = torch.bfloat16
    for i in range(layers):  # one shard per block, HF on-disk names
        p = f"model.layers.{i}."
        t = {f"{p}self_attn.{n}.weight": (torch.randn(o, inn, generator=g) * 0.02).to(bf) for n, (o, inn) in {
            "q_proj": (HEADS * HD, HIDDEN), "k_proj": (KV * HD, HIDDEN), "v_proj": (KV * HD, HIDDEN),
            "o_proj": (HIDDEN, HEADS * HD)}.items()}
        t[f"{p}mlp.gate.weight"] = (torch.randn(experts, HIDDEN, generator=g) * 0.02).to(bf)
        for e in range(experts):
            for n, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                             ("down_proj", (HIDDEN, INTER))):
                t[f"{p}mlp.experts.{e}.{n}.weight"] = (torch.randn(*shape, generator=g) * 0.02).to(bf)
        save_file(t, work / f"base/model-{i + 1:05d}-of-{layers + 1:05d}.safetensors", metadata={"format": "pt"})
    rest = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g).to(bf),
            "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g).to(bf),
            "model.norm.weight": torch.ones(HIDDEN, dtype=bf)}
    save_file(rest, work / f"base/model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors", metadata={"format": "pt"})
    from safetensors import safe_open

    wm = {}
    for f in sorted((work / "base").glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            wm.update({k: f.name for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
    (work / "base/model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def vmhwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def child(variant: str, work: Path) -> dict:
    import lora_ckpt.conversion as conv
    import lora_ckpt.merge as merge

    out = work / f"out-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    rss0 = vmhwm()
    t0 = time.perf_counter()
    worst: float | None = None
    if variant == "copy-adapter":
        out.mkdir()
        shutil.copyfile(work / "peft/adapter_model.safetensors", out / "adapter_model.safetensors")
    elif variant == "copy-base":
        out.mkdir()
        for f in (work / "base").glob("*.safetensors"):
            shutil.copyfile(f, out / f.name)
    elif variant == "merge":
        merge.merge_checkpoint(work / "base", work / "peft", out, progress=False)
    else:
        to, experts = {"peft2native": ("native", "keep"), "peft2perexpert": ("peft", "per-expert"),
                       "peft2mlx": ("mlx", "keep")}[variant]
        res = conv.convert(work / "peft", out, to=to, base_config=work / "base/config.json", experts=experts)
        worst = res.verification.worst if res.verification else None
    wall = time.perf_counter() - t0
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out)
    return {"variant": variant, "wall_s": wall, "peak": vmhwm(), "imports": rss0, "worst": worst, "bytes": nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lora-ckpt-bench-moe"))
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated input")
    ap.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        make_input(args.workdir, args.layers, args.experts, args.rank)
        size = (args.workdir / "peft/adapter_model.safetensors").stat().st_size
        base = sum(f.stat().st_size for f in (args.workdir / "base").glob("*.safetensors"))
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for v in VARIANTS:
                p = subprocess.run([sys.executable, __file__, "--child", v, "--workdir", str(args.workdir)],
                                   capture_output=True, text=True, cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
                if p.returncode:
                    raise SystemExit(f"{v} failed:\n{p.stderr[-3000:]}")
                runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    lines = [f"Input: PEFT target_parameters adapter on a Qwen3-MoE shape (hidden {HIDDEN}, moe_intermediate {INTER}, "
             f"{args.experts} experts, {args.layers} blocks, rank {args.rank} per expert, + q/v LoRA), fp32, "
             f"{size / 1e6:.0f} MB; bf16 base {base / 1e9:.2f} GB in per-expert on-disk names; {args.repeats} rounds, "
             f"medians; {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
             "", "| variant | wall s | MB/s (input) | peak RSS MB | RSS after imports MB | working RSS / adapter | "
             "verified worst rel. diff |", "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        wall = statistics.median(r["wall_s"] for r in runs[v])
        peak = max(r["peak"] for r in runs[v])
        imp = statistics.median(r["imports"] for r in runs[v])
        worst = [r["worst"] for r in runs[v] if r["worst"] is not None]
        moved = base if v in ("copy-base", "merge") else size
        lines.append(f"| {v} | {wall:.2f} | {moved / 1e6 / wall:.0f} | {peak / 2**20:.0f} | {imp / 2**20:.0f} | "
                     f"{(peak - imp) / size:.2f} | {f'{max(worst):.1e}' if worst else '-'} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(ROOT / "bench/RESULTS.md", "a", encoding="utf-8") as f:  # append only: others write here too
            f.write(f"\n## MoE experts: convert and merge (PEFT target_parameters)\n\n`python bench/moe.py --experts "
                    f"{args.experts} --layers {args.layers} --rank {args.rank} --repeats {args.repeats} --append`\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
