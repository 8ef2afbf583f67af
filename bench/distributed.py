"""A stock bf16 checkpoint into an FSDP2-sharded LoRA model, N processes: lora-ckpt's sharded load
vs torch's ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` from a rank-0
full load (what torchtune's and torchtitan's recipes do), in the same run.

Each method runs in a fresh ``torch.distributed.run`` launch (so peak RSS is per method), methods
interleaved over ``--reps`` repetitions, medians reported. Per rank: wall time of the load (barrier
to barrier), peak RSS during the load (``VmHWM`` after resetting it through ``/proc/self/clear_refs``
just before the load, and the process's RSS before it), bytes read from storage and through
``read()`` (``/proc/self/io`` ``read_bytes``/``rchar``; the checkpoint's pages are evicted from the
page cache with ``posix_fadvise(DONTNEED)`` before every launch, so ``read_bytes`` counts what each
rank really read, memory-mapped faults included), and a checksum of its local shards (both methods
must give the same bits).

The model: transformers ``LlamaForCausalLM`` with Llama-3-8B layer shapes and ``--layers`` layers
(4: 2.27 GB bf16) built under ``accelerate.init_empty_weights``, LoRA (r=16) on q/k/v/o, each decoder
layer and the root ``fully_shard``-ed on a 1-D mesh. The checkpoint (random bf16, HF names, two
shards + index) is generated under ``--workdir`` and deleted afterwards unless ``--keep``.

    python bench/distributed.py                    # 2 CPU processes, gloo
    python bench/distributed.py --backend nccl     # CUDA: one process per GPU, same code
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
          "vocab_size": 32000, "max_position_embeddings": 8192, "tie_word_embeddings": False}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, **SHAPES)


def generate(out: Path, layers: int) -> int:
    """Random bf16 HF checkpoint in two shards + index; returns its size in bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        shapes = {k: v.shape for k, v in LlamaForCausalLM(llama_config(layers)).state_dict().items()}
    out.mkdir(parents=True)
    keys = list(shapes)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
                   for k in part}
        save_file(tensors, out / name)
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k in part})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return total


def evict(ckpt: Path) -> None:
    """Drop the checkpoint's pages from the page cache (only these files; the machine is shared)."""
    for p in ckpt.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import init_empty_weights
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    from lora_ckpt import distributed as ld
    from lora_ckpt import inject_lora, load_checkpoint, read_checkpoint

    cuda = args.backend == "nccl"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    with init_empty_weights():
        model = LlamaForCausalLM(llama_config(args.layers)).to(torch.bfloat16)  # FSDP2 fixes dtypes at fully_shard
    inject_lora(model, targets=TARGETS, r=16, alpha=32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ckpt = Path(args.ckpt)
    dist.barrier()
    before_rss = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    io0 = _io()
    t0 = time.perf_counter()
    if args.method == "lora_ckpt":
        load_checkpoint(model, ckpt)
    else:  # torch's way: materialise the shards, rank 0 reads everything and broadcasts it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.to_empty(device=torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu")
        full = ld.model_state_dict(model, read_checkpoint(ckpt)) if rank == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - t0
    io1 = _io()
    peak = _rss_kb("VmHWM")
    checksum = 0
    for k, v in sorted(model.state_dict().items()):
        if "lora_" in k or "inv_freq" in k:
            continue
        local = v.to_local() if hasattr(v, "to_local") else v
        checksum = (checksum + int(torch.sum(local.contiguous().view(torch.int16), dtype=torch.int64))) % (1 << 61)
    out = {"rank": rank, "seconds": seconds, "rss_before_mb": before_rss / 1024, "peak_rss_mb": peak / 1024,
           "read_bytes": io1["read_bytes"] - io0["read_bytes"], "rchar": io1["rchar"] - io0["rchar"],
           "checksum": checksum}
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, method: str, ckpt: Path, tag: str) -> list[dict]:
    evict(ckpt)
    out = Path(args.workdir) / f"{tag}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_port()), __file__, "--worker", "--method", method, "--ckpt", str(ckpt),
           "--out", str(out), "--backend", args.backend, "--layers", str(args.layers)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL if not args.verbose else None)
    return [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(args.nproc)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/lora-ckpt-bench-dist")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    work = Path(args.workdir)
    ckpt = work / "ckpt"
    if not ckpt.exists():
        t = time.perf_counter()
        size = generate(ckpt, args.layers)
        print(f"generated {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    runs: dict[str, list[list[dict]]] = {"lora_ckpt": [], "broadcast": []}
    try:
        for rep in range(args.reps):
            for method in runs:
                runs[method].append(launch(args, method, ckpt, f"{method}-{rep}"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"checkpoint {size / 1e9:.2f} GB bf16, {args.nproc} x {args.backend}, {args.reps} reps (medians)")
    print(f"{'method':<10} {'rank':>4} {'time s':>7} {'peak RSS GB':>11} {'(before)':>8} {'x ckpt':>6} "
          f"{'load Δ x ckpt':>13} {'read GB':>8} {'x ckpt':>6}")
    for method, reps in runs.items():
        for r in range(args.nproc):
            med = {k: statistics.median(rep[r][k] for rep in reps) for k in ("seconds", "peak_rss_mb", "rss_before_mb",
                                                                           "read_bytes")}
            peak, before = med["peak_rss_mb"] * 2**20, med["rss_before_mb"] * 2**20
            print(f"{method:<10} {r:>4} {med['seconds']:>7.2f} {peak / 1e9:>11.2f} {before / 1e9:>8.2f} "
                  f"{peak / size:>6.2f} {(peak - before) / size:>13.2f} {med['read_bytes'] / 1e9:>8.2f} "
                  f"{med['read_bytes'] / size:>6.2f}")
    same = all(runs["lora_ckpt"][0][r]["checksum"] == rep[r]["checksum"] for reps in runs.values() for rep in reps
               for r in range(args.nproc))
    print(f"local shards identical across methods and reps: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
