"""Conversion time and peak memory for the mlx-lm and LitGPT layouts (verified conversions).

Input: a PEFT adapter at Llama-3-8B layer shapes (hidden 4096, intermediate 14336, 32 heads / 8 KV
heads, head_dim 128), rank 64 on q,k,v,o,gate,up,down, float32 (PEFT's default), ``--layers``
blocks (16: ~335 MB), generated once into ``--workdir`` with a matching HF ``config.json``.

Variants, each in a fresh subprocess (imports done before the clock; peak RSS = the child's
``ru_maxrss``), interleaved over ``--repeats`` rounds, medians reported:

- ``copy``         ``shutil.copyfile`` of ``adapter_model.safetensors``: the floor;
- ``peft2mlx``     ``lora_ckpt.conversion(peft, out, to="mlx")``: transpose factors, write, read back, verify;
- ``mlx2peft``     back from that mlx output;
- ``peft2litgpt``  ``to="litgpt"``: fuse q/k/v into LitGPT's grouped ``attn.qkv``, torch.save, verify;
- ``litgpt2peft``  back from that LitGPT output (split ``attn.qkv``).

    .venv/bin/python bench/convert_more.py                 # prints the table
    .venv/bin/python bench/convert_more.py --append        # and appends it to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
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
HIDDEN, INTER, HEADS, KV, HD, RANK = 4096, 14336, 32, 8, 128, 64
SHAPES = {"self_attn.q_proj": (HEADS * HD, HIDDEN), "self_attn.k_proj": (KV * HD, HIDDEN),
          "self_attn.v_proj": (KV * HD, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HD),
          "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
VARIANTS = ("copy", "peft2mlx", "mlx2peft", "peft2litgpt", "litgpt2peft")


def make_input(work: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file

    peft = work / "peft"
    if (peft / "adapter_model.safetensors").is_file():
        return
    peft.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for mod, (out, inn) in SHAPES.items():
            key = f"base_model.model.model.layers.{i}.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inn, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=g) * 0.02
    save_file(tensors, peft / "adapter_model.safetensors", metadata={"format": "pt"})
    (peft / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "task_type": "CAUSAL_LM",
        "target_modules": [m.rsplit(".", 1)[-1] for m in SHAPES]}, indent=2, sort_keys=True))
    (work / "base").mkdir(exist_ok=True)
    (work / "base/config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HD, "num_hidden_layers": layers, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))


def child(variant: str, work: Path) -> dict:
    """Run one variant in this process; the clock starts after the imports."""
    import lora_ckpt.conversion as conv  # noqa: F401 - imported before the clock

    src = {"copy": "peft", "peft2mlx": "peft", "mlx2peft": "mlx", "peft2litgpt": "peft", "litgpt2peft": "litgpt"}[variant]
    to = {"peft2mlx": "mlx", "mlx2peft": "peft", "peft2litgpt": "litgpt", "litgpt2peft": "peft"}.get(variant)
    out = work / f"out-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "copy":
        out.mkdir()
        shutil.copyfile(work / "peft/adapter_model.safetensors", out / "adapter_model.safetensors")
        worst = 0.0
    else:
        res = conv.convert(work / src, out, to=to, base_config=work / "base/config.json")
        worst = res.verification.worst
    wall = time.perf_counter() - t0
    if variant in ("peft2mlx", "peft2litgpt"):  # keep the output as the next variant's input
        dst = work / ("mlx" if to == "mlx" else "litgpt")
        shutil.rmtree(dst, ignore_errors=True)
        out.rename(dst)
    return {"variant": variant, "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "base_rss_mb": base_rss / 1024, "worst": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lora-ckpt-bench-more"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    make_input(args.workdir, args.layers)
    size = (args.workdir / "peft/adapter_model.safetensors").stat().st_size
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            p = subprocess.run([sys.executable, __file__, "--child", v, "--workdir", str(args.workdir)],
                               capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if p.returncode:
                raise SystemExit(f"{v} failed:\n{p.stderr[-2000:]}")
            runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
    lines = [f"Input: PEFT adapter, {args.layers} Llama-3-8B-shaped blocks, rank {RANK}, fp32, {size / 1e6:.0f} MB; "
             f"{args.repeats} rounds, medians; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"load average {os.getloadavg()[0]:.1f} at the end.", "",
             "| variant | wall s | MB/s | peak RSS MB | RSS after imports MB | verified worst rel. diff |",
             "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        wall = statistics.median(r["wall_s"] for r in runs[v])
        peak = statistics.median(r["peak_rss_mb"] for r in runs[v])
        base = statistics.median(r["base_rss_mb"] for r in runs[v])
        worst = max(r["worst"] for r in runs[v])
        lines.append(f"| {v} | {wall:.2f} | {size / 1e6 / wall:.0f} | {peak:.0f} | {base:.0f} | "
                     f"{'-' if v == 'copy' else f'{worst:.1e}'} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(ROOT / "bench/RESULTS.md", "a", encoding="utf-8") as f:  # append only: others write here too
            f.write(f"\n## convert (mlx, litgpt)\n\n`.venv/bin/python bench/convert_more.py --layers {args.layers} "
                    f"--repeats {args.repeats} --append`\n\n{table}\n")


if __name__ == "__main__":
    main()
