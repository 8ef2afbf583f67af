"""Conversion speed and peak memory on a >= 1 GiB adapter (Llama-2-70B layer shapes).

The input is a real PEFT layout, generated once and cached in ``--workdir``:
``adapter_model.safetensors`` (keys ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``
..., float32 as PEFT saves by default, rank 64 on q,k,v,o,gate,up,down of hidden 8192,
intermediate 28672, 64 heads / 8 KV heads, head_dim 128; as many layers as needed for >= 1 GiB),
``adapter_config.json`` (written by ``peft.LoraConfig.save_pretrained``: r 64, lora_alpha 128),
and the base model's HF ``config.json`` in a separate directory, passed as ``base_config``.
Tensors are generated one at a time (seeded from their names) and streamed into the file; the
writer is checked against ``safetensors.torch.save_file`` on a small dict first (same bytes).

Variants, each in a fresh subprocess (peak RSS = ``ru_maxrss`` of that child, imports done
before the clock starts; the child's ``ru_maxrss`` after imports is reported as ``base RSS``):

- ``copy``            ``shutil.copyfile`` of ``adapter_model.safetensors``: the floor;
- ``peft2tt``         ``lora_ckpt.conversion(peft_dir, out, to="torchtune", base_config=...)`` (verified);
- ``peft2tt_nov``     the same with ``verify_output=False``;
- ``tt2peft``         ``convert(tt_dir, out, to="peft", ...)`` back (verified), ``tt_dir`` = peft2tt's output;
- ``tt2peft_nov``     the same with ``verify_output=False``;
- ``peer``            torchtune's own ``tune_to_peft_adapter_weights`` + ``safetensors save_file`` on the
                      state dict ``torch.load(tt_dir/adapter_model.pt, mmap=True, weights_only=True)``; the
                      clock covers convert + save (the mmap load is reported separately).

Variants run interleaved in ``--repeats`` rounds (drift hits all alike); the table shows medians.
Throughput = adapter bytes (the input safetensors file) / time. The PEFT -> torchtune direction
writes two copies (torchtune's ``adapter_model.pt`` and a PEFT-keyed ``adapter_model.safetensors``).
Inputs and outputs are in the page cache (nothing fsyncs), for every variant alike.

Also: the A -> B -> A round trip (tt2peft's output vs the original, byte for byte; the config is
diffed key by key), the peer's output vs the original, and ``lora-ckpt inspect`` whole-process wall
time (median of 5 after one warm-up) on the PEFT dir, the torchtune ``adapter_model.pt`` and dir,
and the PEFT ``adapter_model.safetensors``.

    .venv/bin/python bench/convert.py                      # ~1.08 GB, 3 rounds
    .venv/bin/python bench/convert.py --repeats 5 --experiments --json results.json
    .venv/bin/python bench/convert.py --repeats 5 --experiments --threads 1 --inspect-repeats 0
    .venv/bin/python bench/convert.py --trace peft2tt      # one traced run: RSS/time per phase + cProfile

``--experiments`` adds ``peft2tt_exp``/``tt2peft_exp``: (b)/(c) with candidate fixes patched in by this
script only (see ``_apply_experiment``). ``--threads N`` sets torch's intra-op threads in the children.
The generated input stays cached in ``--workdir`` (``--clean`` removes it); outputs are removed after
each variant.

Targets (issue): >= 0.5x copy throughput in-process, peak RSS <= 1.5x the adapter, inspect < 0.3 s.
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
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, INTER, N_HEADS, N_KV, HEAD_DIM, RANK, ALPHA, VOCAB = 8192, 28672, 64, 8, 128, 64, 128, 32000
#: (module path under the layer, in_features, out_features)
MODULES = [
    ("self_attn.q_proj", HIDDEN, N_HEADS * HEAD_DIM),
    ("self_attn.k_proj", HIDDEN, N_KV * HEAD_DIM),
    ("self_attn.v_proj", HIDDEN, N_KV * HEAD_DIM),
    ("self_attn.o_proj", N_HEADS * HEAD_DIM, HIDDEN),
    ("mlp.gate_proj", HIDDEN, INTER),
    ("mlp.up_proj", HIDDEN, INTER),
    ("mlp.down_proj", INTER, HIDDEN),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYER_BYTES = sum(RANK * (i + o) * 4 for _, i, o in MODULES)
GIB = 1 << 30
VARIANTS = ["copy", "peft2tt", "peft2tt_nov", "tt2peft", "tt2peft_nov", "peer"]
EXPERIMENTS = ["peft2tt_exp", "tt2peft_exp"]
LABELS = {
    "copy": "(a) copy (shutil.copyfile)",
    "peft2tt": "(b) lora-ckpt PEFT -> torchtune",
    "peft2tt_nov": "(b') same, verify_output=False",
    "tt2peft": "(c) lora-ckpt torchtune -> PEFT",
    "tt2peft_nov": "(c') same, verify_output=False",
    "peer": "(d) torchtune tune_to_peft_adapter_weights + save_file",
    "peft2tt_exp": "(b) with candidate fix (aminmax scan, numpy compare)",
    "tt2peft_exp": "(c) with candidate fix (aminmax scan, numpy compare)",
}
VERSION = 1  # bump when the generated input changes


# ----------------------------------------------------------------------------- input
def _entries(layers: int) -> list[tuple[str, tuple[int, int]]]:
    out = []
    for n in range(layers):
        for mod, i, o in MODULES:
            pre = f"base_model.model.model.layers.{n}.{mod}"
            out += [(f"{pre}.lora_A.weight", (RANK, i)), (f"{pre}.lora_B.weight", (o, RANK))]
    return out


def _header(specs: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The header ``safetensors`` writes for float32 tensors: sorted by name, compact JSON with
    ``__metadata__`` first, padded with spaces to a multiple of 8."""
    obj: dict = {"__metadata__": metadata}
    off = 0
    for name, shape in sorted(specs):
        n = 4 * (shape[0] * shape[1])
        obj[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _tensor(name: str, shape: tuple[int, int]):  # noqa: ANN202
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    std = 0.02 if name.endswith("lora_B.weight") else shape[1] ** -0.5
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def _write_safetensors(path: Path, specs: list[tuple[str, tuple[int, int]]]) -> None:
    """Stream a safetensors file one tensor at a time (peak memory: one tensor)."""
    with open(path, "wb") as f:
        f.write(_header(specs, {"format": "pt"}))
        for name, shape in sorted(specs):
            f.write(memoryview(_tensor(name, shape).numpy()).cast("B"))


def _check_writer(tmp: Path) -> None:
    """Our streaming writer must produce exactly what safetensors' save_file produces."""
    from safetensors.torch import save_file

    specs = [("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight", (4, 24)),
             ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", (32, 4)),
             ("base_model.model.model.layers.10.self_attn.q_proj.lora_A.weight", (4, 7))]
    _write_safetensors(tmp / "ours.safetensors", specs)
    save_file({n: _tensor(n, s) for n, s in specs}, tmp / "ref.safetensors", metadata={"format": "pt"})
    if (tmp / "ours.safetensors").read_bytes() != (tmp / "ref.safetensors").read_bytes():
        raise SystemExit("bench/convert.py: streaming safetensors writer differs from save_file; fix _header")
    (tmp / "ours.safetensors").unlink()
    (tmp / "ref.safetensors").unlink()


def generate(workdir: Path, layers: int) -> tuple[Path, Path]:
    """The PEFT input dir and the base config path (cached)."""
    inp = workdir / "input"
    peft_dir, base_dir = inp / "peft", inp / "base"
    stamp = {"version": VERSION, "layers": layers, "bytes": None}
    specs = _entries(layers)
    data = sum(4 * s[0] * s[1] for _, s in specs)
    stamp["bytes"] = len(_header(specs, {"format": "pt"})) + data
    sf = peft_dir / "adapter_model.safetensors"
    stamp_path = inp / "stamp.json"
    if (stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp and sf.is_file()
            and sf.stat().st_size == stamp["bytes"] and (base_dir / "config.json").is_file()
            and (peft_dir / "adapter_config.json").is_file()):
        print(f"input: cached {sf} ({sf.stat().st_size / 1e9:.3f} GB)", flush=True)
        return peft_dir, base_dir / "config.json"
    shutil.rmtree(inp, ignore_errors=True)
    # in a child: the parent must stay small (a forked child's ru_maxrss starts at the parent's RSS)
    subprocess.run([sys.executable, __file__, "--child-generate", str(layers), "--out", str(workdir)], check=True)
    assert sf.stat().st_size == stamp["bytes"]
    stamp_path.write_text(json.dumps(stamp))
    return peft_dir, base_dir / "config.json"


def _generate(workdir: Path, layers: int) -> None:
    inp = workdir / "input"
    peft_dir, base_dir = inp / "peft", inp / "base"
    sf = peft_dir / "adapter_model.safetensors"
    specs = _entries(layers)
    peft_dir.mkdir(parents=True)
    base_dir.mkdir(parents=True)
    _check_writer(inp)
    t0 = time.perf_counter()
    _write_safetensors(sf, specs)
    from peft import LoraConfig

    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM",
               base_model_name_or_path="meta-llama/Llama-2-70b-hf").save_pretrained(str(peft_dir))
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV,
            "head_dim": HEAD_DIM, "num_hidden_layers": layers, "vocab_size": VOCAB, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "float16"}
    (base_dir / "config.json").write_text(json.dumps(base, indent=2, sort_keys=True) + "\n")
    print(f"input: generated {sf} ({sf.stat().st_size / 1e9:.3f} GB, {layers} layers) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)


# ----------------------------------------------------------------------------- child
def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _hwm_kb() -> int:
    """VmHWM: the peak RSS of this process image only (not inherited across fork+exec)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(variant: str, src: Path, out: Path, base_config: Path, trace: bool) -> dict:
    """Run one variant in this (fresh) process; imports first, then the clock."""
    import torch  # noqa: F401
    from safetensors.torch import save_file

    import lora_ckpt.layouts  # noqa: F401
    from lora_ckpt.conversion import convert

    if variant == "peer":
        from torchtune.models.convert_weights import tune_to_peft_adapter_weights
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if variant.endswith("_exp"):
        _apply_experiment()
    tracer = _Tracer() if trace else None
    base_kb = _maxrss_kb()
    extra: dict = {}
    prof = None
    if trace:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    c0 = time.process_time()
    t0 = time.perf_counter()
    if variant == "copy":
        out.mkdir(parents=True)
        shutil.copyfile(src / "adapter_model.safetensors", out / "adapter_model.safetensors")
    elif variant.startswith(("peft2tt", "tt2peft")):
        to = "torchtune" if variant.startswith("peft2tt") else "peft"
        convert(src, out, to=to, base_config=base_config, verify_output=not variant.endswith("_nov"))
    elif variant == "peer":
        sd = torch.load(src / "adapter_model.pt", mmap=True, weights_only=True)
        extra["load_s"] = time.perf_counter() - t0
        c0 = time.process_time()
        t0 = time.perf_counter()
        conv = tune_to_peft_adapter_weights(sd, num_heads=N_HEADS, num_kv_heads=N_KV, dim=HIDDEN, head_dim=HEAD_DIM)
        out.mkdir(parents=True)
        save_file(conv, out / "adapter_model.safetensors", metadata={"format": "pt"})
    else:
        raise SystemExit(f"unknown variant {variant}")
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if prof is not None:
        prof.disable()
    res = {"variant": variant, "seconds": seconds, "cpu_s": cpu, "threads": torch.get_num_threads(),
           "maxrss_kb": _maxrss_kb(), "hwm_kb": _hwm_kb(), "base_maxrss_kb": base_kb, **extra}
    if tracer is not None:
        res["trace"] = tracer.stop()
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
        res["cprofile_cumulative"] = s.getvalue()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
        res["cprofile_tottime"] = s.getvalue()
    return res


def _apply_experiment() -> None:
    """Candidate fixes, measured here only (not part of the library): the NaN/Inf scan
    (``lora_ckpt.layouts.base.nonfinite``) through ``torch.aminmax`` (exact: NaN propagates, +-Inf
    shows as the max/min; no temporary, no float64 conversion), and the bitwise comparison
    (``lora_ckpt.conversion._bitwise_equal``) through numpy's ``array_equal`` on 8-byte words (single
    threaded) instead of ``torch.equal`` on uint8 views."""
    import numpy as np
    import torch

    import lora_ckpt.conversion as cv
    import lora_ckpt.layouts.base as base

    def finite(t: torch.Tensor) -> bool:
        if t.numel() == 0:
            return True
        lo, hi = torch.aminmax(t)
        return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))

    def nonfinite(tensors: dict) -> list[str]:
        return [k for k, t in tensors.items() if t.is_floating_point() and not finite(t)]

    def words(t: torch.Tensor) -> np.ndarray:
        u8 = t.contiguous().view(-1).view(torch.uint8).numpy()
        return u8.view(np.uint64) if u8.size % 8 == 0 else u8

    def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(np.array_equal(words(a), words(b)))

    assert hasattr(base, "nonfinite") and hasattr(cv, "_bitwise_equal"), "lora_ckpt changed: update the experiment"
    base.nonfinite = nonfinite
    cv._bitwise_equal = bitwise_equal


class _Tracer:
    """Wraps the phases of a conversion and records wall time and RSS (current and peak) around
    each, plus an RSS sampler (10 ms) for the timeline's peak between phases."""

    def __init__(self) -> None:
        import threading

        import torch
        from safetensors import torch as st

        import lora_ckpt.conversion as cv
        import lora_ckpt.io.tensors as files
        import lora_ckpt.layouts.base as base

        self.events: list[dict] = []
        self.t0 = time.perf_counter()
        self.depth = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

        def wrap(owner, name, label):  # noqa: ANN001, ANN202
            fn = getattr(owner, name)

            def wrapped(*a, **k):  # noqa: ANN002, ANN003, ANN202
                ev = {"phase": label, "depth": self.depth, "start_s": time.perf_counter() - self.t0,
                      "rss_before_mb": _rss_kb() / 1024, "maxrss_before_mb": _maxrss_kb() / 1024}
                self.depth += 1
                try:
                    return fn(*a, **k)
                finally:
                    self.depth -= 1
                    ev.update(seconds=time.perf_counter() - self.t0 - ev["start_s"], rss_after_mb=_rss_kb() / 1024,
                              maxrss_after_mb=_maxrss_kb() / 1024)
                    self.events.append(ev)

            setattr(owner, name, wrapped)

        import lora_ckpt.layouts.torchtune as tt

        wrap(cv, "load_adapter", "load_adapter")
        wrap(cv, "save_adapter", "save_adapter (write + check)")
        wrap(cv, "compare_adapters", "compare_adapters")
        wrap(base, "save_tensors", "save_tensors")
        wrap(tt, "save_tensors", "save_tensors (PEFT copy)")
        wrap(torch, "save", "torch.save")
        wrap(st, "save_file", "safetensors save_file")
        wrap(files, "load_pickle", "load_pickle (torch.load mmap)")
        wrap(files, "load_safetensors", "load_safetensors (mmap)")
        wrap(base.Layout, "read", "Layout.read")
        wrap(base.Layout, "write", "Layout.write")
        wrap(base.Layout, "tensors_for", "Layout.tensors_for")
        wrap(base.Layout, "prepare", "Layout.prepare")
        wrap(base.Layout, "_rope", "Layout._rope")

        def sample() -> None:
            while not self._stop.wait(0.01):
                self.samples.append((time.perf_counter() - self.t0, _rss_kb()))

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join()
        peak = max(self.samples, key=lambda s: s[1]) if self.samples else (0.0, 0)
        return {"events": sorted(self.events, key=lambda e: e["start_s"]),
                "sampled_peak": {"at_s": peak[0], "rss_mb": peak[1] / 1024}}


# ---------------------------------------------------------------------------- parent
THREADS: int | None = None  # --threads: torch intra-op threads in the children (None: torch's default)


def run_child(variant: str, src: Path, out: Path, base_config: Path, trace: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--src", str(src), "--out", str(out),
           "--base-config", str(base_config)] + (["--child-trace"] if trace else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    if THREADS:
        env["OMP_NUM_THREADS"] = str(THREADS)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _rm(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def compare_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> tuple[bool, int | None]:
    """(identical, first differing offset)."""
    if a.stat().st_size != b.stat().st_size:
        return False, min(a.stat().st_size, b.stat().st_size)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if not x:
                return True, None
            if x != y:
                i = next(i for i in range(len(x)) if x[i] != y[i])
                return False, off + i
            off += len(x)


def describe_difference(orig: Path, new: Path) -> dict:
    """Byte comparison of two safetensors files, and if they differ, where: header or data, and
    for tensors, which ones (compared by name, independent of order)."""
    from lora_ckpt.io import read_safetensors_header

    same, at = compare_bytes(orig, new)
    res: dict = {"identical": same}
    if same:
        return res
    ha, hb = read_safetensors_header(orig), read_safetensors_header(new)
    res["first_diff_offset"] = at
    res["header_identical"] = (orig.read_bytes()[:min(t.begin for t in ha.tensors.values())]
                               == new.read_bytes()[:min(t.begin for t in hb.tensors.values())])
    res["metadata"] = [ha.metadata, hb.metadata]
    res["only_in_original"] = sorted(set(ha.tensors) - set(hb.tensors))[:5]
    res["only_in_new"] = sorted(set(hb.tensors) - set(ha.tensors))[:5]
    diff = []
    with open(orig, "rb") as fa, open(new, "rb") as fb:
        for name in sorted(set(ha.tensors) & set(hb.tensors)):
            ta, tb = ha.tensors[name], hb.tensors[name]
            if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
                diff.append(f"{name}: {ta.dtype}{ta.shape} vs {tb.dtype}{tb.shape}")
                continue
            fa.seek(ta.begin)
            fb.seek(tb.begin)
            if fa.read(ta.nbytes) != fb.read(tb.nbytes):
                diff.append(name)
    res["tensors_differing"] = len(diff)
    res["tensors_differing_examples"] = diff[:5]
    return res


def diff_json(a: Path, b: Path) -> dict:
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    return {"identical_bytes": a.read_bytes() == b.read_bytes(),
            "changed": {k: [ja.get(k), jb.get(k)] for k in sorted(set(ja) | set(jb))
                        if k in ja and k in jb and ja[k] != jb[k]},
            "only_original": sorted(set(ja) - set(jb)), "only_new": sorted(set(jb) - set(ja))}


def time_inspect(path: Path | None, n: int, cmd: list[str] | None = None) -> dict:
    if cmd is None:
        exe = Path(sys.executable).with_name("lora-ckpt")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lora_ckpt"]
        cmd += ["inspect", str(path)]
    times = []
    for i in range(n + 1):  # one warm-up
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}")
        if i:
            times.append(dt)
    return {"path": str(path), "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs": times}


def fmt_table(rows: dict[str, list[dict]], nbytes: int) -> str:
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_s", "maxrss_kb", "hwm_kb",
                                                                 "base_maxrss_kb")}
           for v, rs in rows.items() if rs}
    copy_s = med["copy"]["seconds"] if "copy" in med else float("nan")
    lines = ["| variant | time s (median; min-max) | CPU s | GB/s | x copy throughput | peak RSS GB "
             "| peak RSS / adapter | base RSS GB | (peak - base) / adapter |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v, m in med.items():
        secs = [r["seconds"] for r in rows[v]]
        rss = m["maxrss_kb"] * 1024
        lines.append(
            f"| {LABELS[v]} | {m['seconds']:.2f} ({min(secs):.2f}-{max(secs):.2f}) | {m['cpu_s']:.2f} "
            f"| {nbytes / m['seconds'] / 1e9:.2f} "
            f"| {copy_s / m['seconds']:.2f} | {rss / 1e9:.2f} | {rss / nbytes:.2f} | "
            f"{m['base_maxrss_kb'] * 1024 / 1e9:.2f} | {(m['maxrss_kb'] - m['base_maxrss_kb']) * 1024 / nbytes:.2f} |")
    return "\n".join(lines)


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lora_ckpt"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split("\n")
        dirty = [ln[3:] for ln in dirty if ln.strip()]
        return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lora_ckpt_bench_convert"))
    ap.add_argument("--layers", type=int, default=None, help="default: the fewest for >= 1 GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inspect-repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--experiments", action="store_true",
                    help=f"also run {', '.join(EXPERIMENTS)}: candidate fixes patched in (bench only)")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--threads", type=int, help="torch intra-op threads in the children (default: torch's, "
                    "one per core)")
    ap.add_argument("--clean", action="store_true", help="also remove the cached input at the end")
    ap.add_argument("--trace", metavar="VARIANT", help="one traced run (phases, RSS, cProfile) of VARIANT instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-generate", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--base-config", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child_generate:
        _generate(args.out, args.child_generate)
        return
    if args.child:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        print("RESULT " + json.dumps(child(args.child, args.src, args.out, args.base_config, args.child_trace)))
        return

    global THREADS
    THREADS = args.threads
    layers = args.layers or -(-GIB // LAYER_BYTES)
    need = layers * LAYER_BYTES * 6  # input + torchtune dir (2 copies) + one output (up to 2 copies) + slack
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        raise SystemExit(f"{args.workdir}: {free / 1e9:.1f} GB free, need about {need / 1e9:.1f} GB")
    git = _git_state()
    print(f"{platform.node()}: {os.cpu_count()} cpus, python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.1f}; {args.workdir}: {free / 1e9:.1f} GB free; lora_ckpt at {git}", flush=True)
    peft_dir, base_config = generate(args.workdir, layers)
    sf = peft_dir / "adapter_model.safetensors"
    nbytes = sf.stat().st_size
    outs = args.workdir / "out"
    _rm(outs)
    outs.mkdir()
    tt_src = outs / "tt_src"
    variants = args.variants.split(",") + (EXPERIMENTS if args.experiments else [])
    try:
        if args.trace:
            if args.trace.startswith("tt2peft") or args.trace == "peer":
                run_child("peft2tt_nov", peft_dir, tt_src, base_config)
            src = tt_src if (args.trace.startswith("tt2peft") or args.trace == "peer") else peft_dir
            res = run_child(args.trace, src, outs / args.trace, base_config, trace=True)
            print(f"{args.trace}: {res['seconds']:.2f} s, peak RSS {res['maxrss_kb'] / 1e6 * 1.024:.2f} GB "
                  f"({res['maxrss_kb'] * 1024 / nbytes:.2f}x the adapter), base {res['base_maxrss_kb'] / 1024:.0f} MB")
            print("phase (nested by indent)                 start s   secs  RSS before->after MB   peak after MB")
            for ev in res["trace"]["events"]:
                print(f"{'  ' * ev['depth']}{ev['phase']:<{40 - 2 * ev['depth']}} {ev['start_s']:7.2f} "
                      f"{ev['seconds']:6.2f}  {ev['rss_before_mb']:7.0f} -> {ev['rss_after_mb']:7.0f}   "
                      f"{ev['maxrss_after_mb']:7.0f}")
            print(f"sampled RSS peak {res['trace']['sampled_peak']['rss_mb']:.0f} MB at "
                  f"{res['trace']['sampled_peak']['at_s']:.2f} s")
            print(res["cprofile_tottime"])
            print(res["cprofile_cumulative"])
            if args.json:
                args.json.write_text(json.dumps(res, indent=2))
            return

        rows: dict[str, list[dict]] = {v: [] for v in variants}
        checks: dict = {}
        for rnd in range(args.repeats):
            for v in variants:
                src = tt_src if v.startswith("tt2peft") or v == "peer" else peft_dir
                if src == tt_src and not tt_src.exists():
                    run_child("peft2tt_nov", peft_dir, tt_src, base_config)
                out = outs / v
                res = run_child(v, src, out, base_config)
                rows[v].append(res)
                print(f"round {rnd + 1} {v:<12} {res['seconds']:6.2f} s  peak RSS {res['maxrss_kb'] / 1024:6.0f} MB"
                      f"  ({res['maxrss_kb'] * 1024 / nbytes:.2f}x)", flush=True)
                if v in ("peft2tt", "peft2tt_nov") and not tt_src.exists():
                    os.replace(out, tt_src)  # the torchtune source for (c) and (d)
                if rnd == 0 and v in ("tt2peft", "tt2peft_exp", "peer"):
                    checks[v] = {"safetensors": describe_difference(sf, out / "adapter_model.safetensors")}
                    if v == "tt2peft":
                        checks[v]["adapter_config.json"] = diff_json(peft_dir / "adapter_config.json",
                                                                     out / "adapter_config.json")
                _rm(out)
        inspect = {}
        if args.inspect_repeats:
            if not tt_src.exists():
                run_child("peft2tt_nov", peft_dir, tt_src, base_config)
            inspect["floor: python -c pass"] = time_inspect(None, args.inspect_repeats, [sys.executable, "-c", "pass"])
            for label, p in (("PEFT dir", peft_dir), ("PEFT adapter_model.safetensors", sf),
                             ("torchtune adapter_model.pt", tt_src / "adapter_model.pt"),
                             ("torchtune dir (adds the value-level export check)", tt_src)):
                inspect[label] = time_inspect(p, args.inspect_repeats)
        print()
        threads = sorted({r["threads"] for rs in rows.values() for r in rs})
        print(f"adapter: {nbytes} bytes ({nbytes / 1e9:.3f} GB, {nbytes / GIB:.3f} GiB), {layers} layers x 7 modules, "
              f"rank {RANK}, float32; medians of {args.repeats} rounds; torch threads {threads}; lora_ckpt at {git}")
        print(fmt_table(rows, nbytes))
        worst = max((abs(r["maxrss_kb"] - r["hwm_kb"]) / r["hwm_kb"], r["variant"]) for rs in rows.values() for r in rs)
        print(f"peak RSS is the child's ru_maxrss; its VmHWM agrees within {worst[0]:.1%} (worst: {worst[1]})")
        for v, c in checks.items():
            print(f"{v} output vs original: {json.dumps(c)}")
        if inspect:
            print("| lora-ckpt inspect | median s | min-max s |\n|---|---|---|")
            for label, r in inspect.items():
                print(f"| {label} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} |")
        git_end = _git_state()
        if git_end != git:
            print(f"NOTE: lora_ckpt changed during the run: now at {git_end}")
        if args.json:
            args.json.write_text(json.dumps({"adapter_bytes": nbytes, "layers": layers, "git": git,
                                             "git_end": git_end, "rows": rows,
                                             "checks": checks, "inspect": inspect}, indent=2))
    finally:
        _rm(outs)
        if args.clean:
            shutil.rmtree(args.workdir / "input", ignore_errors=True)


if __name__ == "__main__":
    main()
