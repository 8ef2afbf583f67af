"""PEFT -> GGUF -> PEFT (verified) against a file copy and llama.cpp's ``convert_lora_to_gguf.py``.

Input: bench/convert_more.py's PEFT adapter (Llama-3-8B layer shapes, rank 64 on q,k,v,o,gate,up,down,
float32, ``--layers`` blocks: 16 is ~335 MB) and its HF ``config.json`` (``architectures`` added for the
reference converter).

Variants, each in a fresh subprocess, interleaved over ``--repeats`` rounds, medians reported:

- ``copy``          ``shutil.copyfile`` of ``adapter_model.safetensors``: the floor;
- ``peft2gguf``     ``lora_ckpt.conversion.convert(peft, out.gguf, to="gguf")``: names, q/k permutation,
                    write, read back, verify (clock after imports; peak RSS = the child's ``ru_maxrss``);
- ``gguf2peft``     back from that GGUF (un-permute, write safetensors, read back, verify);
- ``cli``           ``python -m lora_ckpt convert peft --to gguf -o out.gguf``: the whole process (imports too);
- ``reference``     ``python convert_lora_to_gguf.py --base BASE --outfile out.gguf peft`` (``--llama-cpp DIR``:
                    the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp): the whole process, as users run it.

    .venv/bin/python bench/convert_gguf.py --llama-cpp DIR            # prints the table
    .venv/bin/python bench/convert_gguf.py --llama-cpp DIR --append   # and appends it to bench/RESULTS.md
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
sys.path.insert(0, str(ROOT / "bench"))
from convert_more import make_input

VARIANTS = ("copy", "peft2gguf", "gguf2peft", "cli", "reference")


def child(variant: str, work: Path, llama_cpp: Path | None) -> dict:
    """Run one variant in this process (the in-process ones start the clock after the imports)."""
    import lora_ckpt.conversion as conv

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = work / "base/config.json"
    worst, rss_of = 0.0, resource.RUSAGE_SELF
    t0 = time.perf_counter()
    if variant == "copy":
        shutil.copyfile(work / "peft/adapter_model.safetensors", work / "copy.safetensors")
    elif variant == "peft2gguf":
        worst = conv.convert(work / "peft", work / "ours.gguf", to="gguf", base_config=cfg, force=True).verification.worst
    elif variant == "gguf2peft":
        worst = conv.convert(work / "ours.gguf", work / "back", to="peft", base_config=cfg, force=True).verification.worst
    else:
        cmd = ([sys.executable, "-m", "lora_ckpt", "-q", "convert", str(work / "peft"), "--to", "gguf", "-o",
                str(work / "cli.gguf"), "--base-config", str(cfg), "--force"] if variant == "cli" else
               [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(work / "base"),
                "--outfile", str(work / "reference.gguf"), str(work / "peft")])
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rss_of, base_rss = resource.RUSAGE_CHILDREN, 0
    wall = time.perf_counter() - t0
    return {"variant": variant, "wall_s": wall, "peak_rss_mb": resource.getrusage(rss_of).ru_maxrss / 1024,
            "base_rss_mb": base_rss / 1024, "worst": worst}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lora-ckpt-bench-gguf"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree with convert_lora_to_gguf.py")
    ap.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.llama_cpp)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    make_input(args.workdir, args.layers)
    cfg = json.loads((args.workdir / "base/config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]  # the reference converter picks its model class from it
    (args.workdir / "base/config.json").write_text(json.dumps(cfg))
    size = (args.workdir / "peft/adapter_model.safetensors").stat().st_size
    variants = [v for v in VARIANTS if v != "reference" or args.llama_cpp]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            cmd = [sys.executable, __file__, "--child", v, "--workdir", str(args.workdir)]
            cmd += ["--llama-cpp", str(args.llama_cpp)] if args.llama_cpp else []
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False,
                               env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
            if p.returncode:
                raise SystemExit(f"{v} failed:\n{p.stderr[-2000:]}")
            runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
    same = (args.workdir / "ours.gguf").read_bytes() == (args.workdir / "reference.gguf").read_bytes() \
        if args.llama_cpp else None
    lines = [(f"Input: PEFT adapter, {args.layers} Llama-3-8B-shaped blocks, rank 64, fp32, {size / 1e6:.0f} MB; "
              f"{args.repeats} rounds, medians; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at the end. Our GGUF byte-identical to the reference's: {same}."),
             "", ("| variant | wall s | MB/s | x copy | peak RSS MB | RSS after imports MB | (peak - imports) / adapter "
                  "| verified worst rel. diff |"), "|---|---|---|---|---|---|---|---|"]
    copy = statistics.median(r["wall_s"] for r in runs["copy"])
    for v in variants:
        wall = statistics.median(r["wall_s"] for r in runs[v])
        peak = statistics.median(r["peak_rss_mb"] for r in runs[v])
        base = statistics.median(r["base_rss_mb"] for r in runs[v])
        worst = max(r["worst"] for r in runs[v])
        lines.append(f"| {v} | {wall:.2f} | {size / 1e6 / wall:.0f} | {copy / wall:.2f} | {peak:.0f} | "
                     f"{base:.0f} | {(peak - base) * 1048576 / size:.2f} | "
                     f"{f'{worst:.1e}' if v in ('peft2gguf', 'gguf2peft') else '-'} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        with open(ROOT / "bench/RESULTS.md", "a", encoding="utf-8") as f:  # append only: others write here too
            f.write(f"\n## convert (gguf)\n\n`.venv/bin/python bench/convert_gguf.py --layers {args.layers} --repeats "
                    f"{args.repeats} --llama-cpp $LLAMA_CPP --append`\n\n{table}\n")


if __name__ == "__main__":
    main()
