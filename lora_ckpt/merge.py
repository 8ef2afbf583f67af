"""``merge``: fold an adapter into a (sharded) base checkpoint, streaming tensor by tensor.

The output is planned from the safetensors headers alone (names, dtypes, shapes: every byte
offset is known before any data is read), then each shard file is written front to back: our
own safetensors header, then each tensor's bytes. A tensor the adapter does not touch is copied
file-to-file by the kernel (``os.copy_file_range``). A merged one is read through a private
memory map in row blocks of 1M elements, ``W + scale·B@A`` is computed in float32 (DoRA:
``m / ‖W+ΔW‖_row ⊙ (W+ΔW)``, as PEFT's merge; embeddings and GPT-2 ``Conv1D`` receive ``ΔWᵀ``),
cast once to the output dtype into a 16 MB write unit that a writer thread writes while the
next unit is computed. Each block's mapped pages are released as soon as it is done
(``MADV_DONTNEED``: they stay in the page cache, not in this process), and the next tensor is
prefetched (``MADV_WILLNEED``), so peak memory is the adapter plus a few write units whatever
the model size, and disk reads overlap the arithmetic.

Output schemes (``to``):

- ``hf``: ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``
  (``metadata.total_size``, ``weight_map``), split at ``max_shard_size`` as ``save_pretrained`` does.
- ``torchtune``: torchtune parameter names (``layers.0.attn.q_proj.weight``, norms ``.scale``), q/k rows
  interleaved for Llama/Mistral/Gemma (not Qwen), one file ``model-00001-of-00001.safetensors``:
  torchtune 0.6.1's ``FullModelTorchTuneCheckpointer`` reads exactly one checkpoint file (through
  ``safe_torch_load``, which accepts safetensors), so ``max_shard_size`` does not apply.
- ``meta``: Meta/Mistral names (``layers.0.attention.wq.weight``), interleaved q/k rows, one file
  ``consolidated.safetensors`` plus ``params.json`` (mistral-inference, torchtune's
  ``FullModelMetaCheckpointer``: one file too).

Every target also gets the base directory's non-weight files (config, tokenizer, generation
config, licence; not ``README.md``, which describes the base).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import mmap
import os
import queue
import re
import shutil
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch

from .adapter import Adapter, ModuleLoRA
from .errors import CheckpointFormatError, ConversionError, MissingConfigError, UsageError, quote_list
from .conversion import one_thread
from .families import ModelConfig, load_model_config, model_config_from_dict
from .files import DTYPES, PathLike, TensorInfo, atomic_output, checkpoint_files, read_json, read_safetensors_header
from .rope import rotate_half_to_interleaved

__all__ = ["MergeResult", "merge_checkpoint", "parse_size"]

logger = logging.getLogger(__name__)

Target = Literal["hf", "torchtune", "meta"]
#: elements per row block of a merged tensor (4 MB of float32: the block's passes stay in cache)
BLOCK_ELEMENTS = 1 << 20
#: bytes per copy_file_range call (progress granularity)
COPY_BYTES = 1 << 26
#: bytes per write() of computed rows (large writes cost the kernel less per byte)
WRITE_BYTES = 1 << 24
#: write units computed ahead of the writer thread
WRITE_SLOTS = 3
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_CODE = {getattr(torch, name): code for code, (_, name) in DTYPES.items()}
#: input-embedding keys an ``lm_head`` may be tied to, most common first
EMBED_KEYS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.language_model.embed_tokens.weight",
              "model.decoder.embed_tokens.weight", "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight")
HEAD_KEY = "lm_head.weight"
CONV1D_MODEL_TYPES = ("gpt2",)  # weights stored (in, out): PEFT forces fan_in_fan_out for them
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
SKIPPED_FILES = ("README.md",)


@dataclass
class MergeResult:
    """What :func:`merge_checkpoint` wrote."""

    output: Path
    to: str
    modules_merged: int
    tensors_replaced: int
    tensors: int
    bytes: int
    files: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: tensors merged, bytes, time, output."""
        rate = _size(self.bytes / self.seconds) + "/s" if self.seconds > 0 else "-"
        replaced = f" + {self.tensors_replaced} replaced" if self.tensors_replaced else ""
        return (f"merged {self.modules_merged} module(s){replaced} into {self.tensors} tensors ({self.to} names), "
                f"{_size(self.bytes)} in {len(self.files)} file(s), {self.seconds:.1f} s ({rate}) -> {self.output}")


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass
class _Out:
    """One output tensor: where its rows come from and what happens to them."""

    key: str  # output name
    hf_key: str  # HF name (for messages and head counts)
    dtype: str  # safetensors dtype code written
    shape: tuple[int, ...]
    src: _Src | None = None  # rows from a base file ...
    tensor: torch.Tensor | None = None  # ... or from an adapter tensor (modules_to_save)
    lora: ModuleLoRA | None = None
    transposed: bool = False  # the stored weight is (in, out) or (vocab, dim): it receives ΔWᵀ
    add: torch.Tensor | None = None  # float32, added as is (scale·lora_B.bias)
    permute: tuple[int, int] | None = None  # (n_heads, head_dim): rotate-half -> interleaved rows

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0]

    @property
    def verbatim(self) -> bool:
        return (self.src is not None and self.lora is None and self.add is None and self.permute is None
                and self.dtype == self.src.dtype)


def parse_size(size: int | str) -> int:
    """``5GB`` -> 5_000_000_000 (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary, B, or a plain int)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise UsageError(f"max_shard_size {size!r} is not a size; expected e.g. 5GB, 500MB, 2GiB or bytes")
        unit = (m[2] or "B").upper().replace("IB", "iB")
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
        value = int(float(m[1]) * mult)
    if value <= 0:
        raise UsageError(f"max_shard_size {size!r} must be positive")
    return value


# ------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class _Src:
    """A base tensor on disk."""

    path: str
    info: TensorInfo

    @property
    def dtype(self) -> str:
        return self.info.dtype


def _base_sources(base: Path) -> dict[str, _Src]:
    """Every base tensor, from the safetensors headers (no data read)."""
    files = checkpoint_files(base)
    other = [f.name for f in files if f.suffix != ".safetensors"]
    if other:
        raise CheckpointFormatError(
            f"{base}: weights are torch pickles ({quote_list(other)}), expected safetensors; merge streams "
            "safetensors only: re-save the base with save_pretrained(safe_serialization=True)", path=base)
    sources: dict[str, _Src] = {}
    for f in files:
        for name, info in read_safetensors_header(f).tensors.items():
            if name in sources:
                raise CheckpointFormatError(f"{base}: tensor {name!r} is in two shards ({Path(sources[name].path).name}"
                                            f" and {f.name}); the checkpoint is inconsistent", path=base)
            sources[name] = _Src(str(f), info)
    return sources


def _base_config(base: Path, base_config: PathLike | ModelConfig | None) -> tuple[dict[str, Any] | None,
                                                                                   ModelConfig | None]:
    """(config.json dict to copy/edit, model config for head counts and family)."""
    root = base if base.is_dir() else base.parent
    raw = None
    if base.is_dir() and (base / "config.json").is_file():
        raw = read_json(base / "config.json", what="config.json")
    if isinstance(base_config, ModelConfig):
        cfg: ModelConfig | None = base_config
    elif base_config is not None:
        cfg = load_model_config(base_config)
    elif raw is not None:
        cfg = model_config_from_dict(raw, source=str(root / "config.json"))
    else:
        cfg = None
    if raw is None and cfg is not None and "model_type" in cfg.raw:
        raw = dict(cfg.raw)  # a single-file base: the given HF config becomes the output's config.json
    return raw, cfg


class _Planner:
    """Turns (base headers, adapter, config, options) into the list of output tensors, or refuses
    with every problem at once."""

    def __init__(self, sources: dict[str, _Src], adapter: Adapter, raw: dict[str, Any] | None,
                 cfg: ModelConfig | None, *, to: Target, dtype: torch.dtype | None, untie: bool) -> None:
        self.sources, self.adapter, self.raw, self.cfg = sources, adapter, raw or {}, cfg
        self.to, self.dtype, self.untie = to, dtype, untie
        self.problems: dict[str, list[str]] = {}  # what is wrong -> where
        self.untied = False
        self.replaced = 0

    def _problem(self, what: str, where: str) -> None:
        self.problems.setdefault(what, []).append(where)

    def _resolve(self, key: str) -> str | None:
        if key in self.sources:
            return key
        short = key.split(".", 1)[-1]  # a base saved without its prefix (old GPT-2: "h.0..." for "transformer.h.0...")
        return short if short in self.sources else None

    def build(self) -> list[_Out]:
        outs = {k: _Out(k, k, s.dtype, s.info.shape, src=s) for k, s in self.sources.items()}
        embed_key = next((k for k in EMBED_KEYS if k in self.sources), None)
        tied = embed_key is not None and (HEAD_KEY not in self.sources or self.raw.get("tie_word_embeddings") is True)
        if tied:
            self._tied(outs, embed_key)  # type: ignore[arg-type]
        for key, t in self.adapter.extra.items():  # modules_to_save / saved (or resized) embeddings
            plain = key.replace(".base_layer.", ".")
            target = self._resolve(plain) or (plain if plain in outs else None)
            if target is None:
                self._problem("full adapter tensors (modules_to_save) replace no base tensor", repr(key))
            elif tuple(t.shape) != outs[target].shape:
                self._problem("full adapter tensors differ in shape from the base's",
                              f"{key!r} {tuple(t.shape)} vs {outs[target].shape}")
            else:
                outs[target].tensor, outs[target].src = t, None
                self.replaced += 1
        conv1d = self.raw.get("model_type") in CONV1D_MODEL_TYPES
        for name, m in self.adapter.modules.items():
            self._module(outs, name, m, conv1d)
        if self.problems:
            found = "; ".join(f"{what}: {quote_list(where, 3)}" for what, where in self.problems.items())
            raise ConversionError(f"cannot merge this adapter into this base: {found}; expected an adapter "
                                  "trained on this base model")
        plan = list(outs.values())
        for o in plan:
            if self.dtype is not None and o.dtype in FLOAT_CODES:
                o.dtype = _CODE[self.dtype]
        if self.to != "hf":
            self._rename(plan)
        return plan

    def _tied(self, outs: dict[str, _Out], embed_key: str) -> None:
        embed_mod = embed_key[: -len(".weight")]
        touched = [n for n in self.adapter.modules if n in ("lm_head", embed_mod)]
        touched += [k for k in self.adapter.extra if k in (HEAD_KEY, embed_key)]
        if not touched:
            return
        if not self.untie:
            raise ConversionError(
                f"the base ties lm_head to {embed_key!r} (tie_word_embeddings) and the adapter changes "
                f"{quote_list(touched)}: merged into the shared weight, it would change both, unlike the adapter "
                "(PEFT runs them untied); pass --untie (untie=True) to write both tensors and set "
                "tie_word_embeddings false")
        src = outs[embed_key]
        outs[HEAD_KEY] = _Out(HEAD_KEY, HEAD_KEY, src.dtype, src.shape, src=src.src)
        if any(k.endswith(".base_layer.weight") and k.replace(".base_layer.", ".") == embed_key
               for k in self.adapter.extra):  # the shared weight the adapter was trained on: both get it
            outs[HEAD_KEY].tensor, outs[HEAD_KEY].src = self.adapter.extra[
                embed_key.replace(".weight", ".base_layer.weight")], None
        self.untied = True

    def _module(self, outs: dict[str, _Out], name: str, m: ModuleLoRA, conv1d: bool) -> None:
        key = self._resolve(f"{name}.weight") or (f"{name}.weight" if f"{name}.weight" in outs else None)
        if key is None:
            self._problem("adapter modules have no base weight", f"{name}.weight")
            return
        o = outs[key]
        if o.lora is not None:
            self._problem("several adapter modules target one weight", key)
            return
        src_dtype = o.src.dtype if o.src is not None else _CODE.get(o.tensor.dtype)  # type: ignore[union-attr]
        if src_dtype not in FLOAT_CODES:
            self._problem("targets are not float tensors (a quantised base? merge needs a float one)",
                          f"{key} ({o.dtype})")
            return
        out_f, in_f = m.B.shape[0], m.A.shape[1]
        transposed = m.kind == "embedding" or m.fan_in_fan_out or (conv1d and m.kind == "linear")
        if conv1d and not m.fan_in_fan_out and m.kind == "linear":
            logger.info("%s: GPT-2 Conv1D weight stored (in, out): merged with fan_in_fan_out (as PEFT does)", name)
        expected = (in_f, out_f) if transposed else (out_f, in_f)
        if o.shape != expected:
            self._problem("base weights differ in shape from the adapter's update", f"{key} {o.shape} vs {expected}")
            return
        if m.magnitude is not None and m.kind == "embedding":
            self._problem("DoRA on an embedding is not supported by merge", name)
            return
        o.lora, o.transposed = m, transposed
        if m.bias is not None:
            bias_key = self._resolve(f"{name}.bias")
            if bias_key is None:
                self._problem("modules have lora_B.bias but the base has no bias there, so the merged architecture "
                              "cannot hold it (PEFT refuses this merge too)", f"{name}.bias")
            else:
                outs[bias_key].add = m.bias.float() * m.scale

    def _rename(self, plan: list[_Out]) -> None:
        if self.cfg is None or self.cfg.family is None:
            raise MissingConfigError(
                f"--to {self.to} needs the base model's family and head counts; no usable config.json "
                f"({'unknown model_type ' + repr(self.raw.get('model_type')) if self.raw else 'none found'}); "
                "pass --base-config")
        fam = self.cfg.family
        names = fam.names(self.to)
        missing = []
        for o in plan:
            new = names.to_other(o.hf_key)
            if new is None:
                missing.append(o.hf_key)
                continue
            o.key = new
            module, _, leaf = o.hf_key.rpartition(".")
            heads = self.cfg.heads(module)
            if heads and fam.interleaved(self.to) and leaf in ("weight", "bias"):
                o.permute = heads
        if missing:
            raise ConversionError(f"{len(missing)} base tensor(s) have no {self.to} name for family "
                                  f"{fam.name!r}: {quote_list(missing)}; expected a stock {fam.name} checkpoint")


def _shards(plan: list[_Out], limit: int | None) -> list[list[_Out]]:
    """Greedy split in input order (a tensor larger than ``limit`` gets a shard of its own);
    within a shard, larger itemsizes first so every tensor starts aligned to its dtype."""
    shards: list[list[_Out]] = [[]]
    size = 0
    for o in plan:
        if limit is not None and shards[-1] and size + o.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return [sorted(s, key=lambda o: -DTYPES[o.dtype][0]) for s in shards]


def _header(shard: list[_Out]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for o in shard:
        header[o.key] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [offset, offset + o.nbytes]}
        offset += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # as safetensors pads: data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


# ------------------------------------------------------------------------------- writing
class _Streamer:
    """Writes output tensors in order: verbatim ones file-to-file, others in row blocks computed
    here and written by a writer thread (so writing overlaps computing the next block)."""

    def __init__(self, bar: Any) -> None:
        self.stack, self.bar = ExitStack(), bar  # input files; closed after the writer stopped
        self.fds: dict[str, int] = {}
        self.maps: dict[str, mmap.mmap] = {}
        self.scratch: dict[str, torch.Tensor] = {}
        self.copy_range = hasattr(os, "copy_file_range")
        self.free: queue.Queue[int] = queue.Queue()
        self.slots: list[torch.Tensor | None] = [None] * WRITE_SLOTS
        for k in range(WRITE_SLOTS):
            self.free.put(k)
        self.jobs: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._writer, name="lora-ckpt-merge-writer", daemon=True)
        self.thread.start()

    # ----------------------------------------------------------------- writer thread
    def _writer(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job[0] == "call":  # a flush/abort marker: everything before it is done
                job[2].set()
                continue
            if self.error is not None:  # failed: skip the rest, keep the producer from blocking
                if job[0] == "block":
                    self.free.put(job[3])
                continue
            try:
                if job[0] == "block":
                    _, f, block, slot = job
                    _write_all(f, block)
                    self.free.put(slot)
                    self.bar.update(block.numel() * block.element_size())
                else:
                    _, f, src = job
                    self._copy(f, src)
            except BaseException as e:  # noqa: BLE001 - re-raised in the producer
                self.error = e
                if job[0] == "block":
                    self.free.put(job[3])

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _drain(self) -> threading.Event:
        done = threading.Event()
        self.jobs.put(("call", None, done))
        return done

    def flush(self) -> None:
        """Wait until everything submitted is written (before its file is closed)."""
        done = self._drain()
        while not done.wait(0.1):
            self._check()
        self._check()

    def abort(self) -> None:
        """After a failure: let the writer skip what is queued, and wait until it has."""
        if self.error is None:
            self.error = ConversionError("merge aborted")
        self._drain().wait()

    def close(self) -> None:
        """Stop the writer thread, then close the inputs."""
        self.jobs.put(None)
        self.thread.join()
        self.stack.close()

    # ---------------------------------------------------------------------- inputs
    def _fd(self, path: str) -> int:
        if path not in self.fds:
            fd = os.open(path, os.O_RDONLY)
            self.stack.callback(os.close, fd)
            self.fds[path] = fd
        return self.fds[path]

    def _map(self, path: str) -> mmap.mmap:
        if path not in self.maps:
            mm = mmap.mmap(self._fd(path), 0, access=mmap.ACCESS_COPY)  # private: the file is never written
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                mm.madvise(mmap.MADV_SEQUENTIAL)  # aggressive readahead when pages are not cached
            self.stack.callback(_close_map, mm)
            self.maps[path] = mm
        return self.maps[path]

    def _buf(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable flat scratch buffer (big allocations are page-faulted afresh each time otherwise)."""
        t = self.scratch.get(name)
        if t is None or t.dtype != dtype or t.numel() < n:
            t = self.scratch[name] = torch.empty(n, dtype=dtype)
        return t[:n]

    def _slot(self, n: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        """A free output buffer (blocks while all are queued for writing)."""
        while True:
            try:
                k = self.free.get(timeout=0.1)
                break
            except queue.Empty:
                self._check()
        t = self.slots[k]
        nbytes = n * dtype.itemsize
        if t is None or t.numel() < nbytes:
            t = self.slots[k] = torch.empty(nbytes, dtype=torch.uint8)
        return k, t[:nbytes].view(dtype)

    def _rows(self, o: _Out, i: int, j: int, cols: int) -> torch.Tensor:
        if o.tensor is not None:
            return o.tensor.reshape(-1, cols)[i:j]
        assert o.src is not None
        itemsize, name = DTYPES[o.src.dtype]
        dtype, begin, n = getattr(torch, name), o.src.info.begin + i * cols * itemsize, (j - i) * cols
        if begin % itemsize or not hasattr(mmap, "MADV_DONTNEED"):  # misaligned (or no madvise): a copy
            buf = self._buf("read", n * itemsize, torch.uint8)
            _pread_into(self._fd(o.src.path), buf, begin)
            return buf.view(dtype).view(j - i, cols)
        # mapped: converted straight from the page cache (no read copy); _release drops the pages
        return torch.frombuffer(self._map(o.src.path), dtype=dtype, count=n, offset=begin).view(j - i, cols)

    def prefetch(self, o: _Out) -> None:
        """Start reading ``o``'s bytes into the page cache in the background (the next tensor is
        prefetched while this one is computed); no-op for verbatim copies (the kernel reads ahead)."""
        if o.src is None or o.verbatim or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = o.src.info.begin - o.src.info.begin % mmap.PAGESIZE
        if o.src.info.end > start:
            self._map(o.src.path).madvise(mmap.MADV_WILLNEED, start, o.src.info.end - start)

    def _release(self, o: _Out, i: int, j: int, cols: int) -> None:
        """Unmap the pages of rows i..j (they stay in the page cache, out of this process's RSS)."""
        if o.src is None or o.src.path not in self.maps:
            return
        itemsize = DTYPES[o.src.dtype][0]
        begin = o.src.info.begin + i * cols * itemsize
        start = begin - begin % mmap.PAGESIZE
        self.maps[o.src.path].madvise(mmap.MADV_DONTNEED, start, begin + (j - i) * cols * itemsize - start)

    # --------------------------------------------------------------------- compute
    def write(self, f: BinaryIO, o: _Out) -> None:
        """Queue tensor ``o`` for writing at the current end of ``f``."""
        self._check()
        if o.verbatim:
            self._fd(o.src.path)  # opened here: only this thread opens files
            self.jobs.put(("copy", f, o.src))
            return
        rows = o.shape[0] if o.shape else 1
        cols = math.prod(o.shape[1:]) if len(o.shape) > 1 else 1
        step = max(1, BLOCK_ELEMENTS // max(cols, 1))
        if o.permute:
            hd = o.permute[1]
            step = max(hd, step // hd * hd)
        factors = (o.lora.A.float().contiguous(), o.lora.B.float().contiguous()) if o.lora else None
        col_factor = None
        if o.lora is not None and o.lora.magnitude is not None and o.transposed:
            col_factor = self._dora_column_factor(o, factors, rows, cols, step)  # type: ignore[arg-type]
        out_dtype = getattr(torch, DTYPES[o.dtype][1])
        # blocks are computed into write units of ~WRITE_BYTES (a whole number of blocks): fewer, larger writes
        unit = max(1, WRITE_BYTES // (max(cols, 1) * out_dtype.itemsize) // step) * step
        for u in range(0, rows, unit):
            v = min(rows, u + unit)
            slot, out = self._slot((v - u) * cols, out_dtype)
            out = out.view(v - u, cols)
            for i in range(u, v, step):
                j = min(v, i + step)
                block, dst = self._block(o, factors, i, j, cols, col_factor), out[i - u: j - u]
                if o.permute:
                    dst.copy_(rotate_half_to_interleaved(block, (j - i) // o.permute[1], o.permute[1]))
                else:
                    dst.copy_(block)
                del block
                self._release(o, i, j, cols)
            self.jobs.put(("block", f, out, slot))

    def _block(self, o: _Out, factors: tuple[torch.Tensor, torch.Tensor] | None, i: int, j: int, cols: int,
               col_factor: torch.Tensor | None, *, dora: bool = True) -> torch.Tensor:
        """Rows i..j of the output: float32 if anything is added, else the source rows as they are."""
        src = self._rows(o, i, j, cols)
        m = o.lora
        if m is None and o.add is None:
            return src
        w = self._buf("work", src.numel(), torch.float32).view(src.shape).copy_(src)
        if m is not None and factors is not None:
            A, B = factors
            a, b = (A.T[i:j], B.T) if o.transposed else (B[i:j], A)
            w.addmm_(a, b, alpha=m.scale)  # W + s·B@A, one BLAS call (mixed-dtype adds are 7x slower)
            if m.magnitude is not None and dora:  # PEFT: m / ‖W + ΔW‖ per output feature
                if o.transposed:
                    w.mul_(col_factor)  # type: ignore[arg-type]
                else:
                    w.mul_((m.magnitude.float()[i:j] / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1))
        if o.add is not None:
            w.add_(o.add.reshape(-1, cols)[i:j])
        return w

    def _dora_column_factor(self, o: _Out, factors: tuple[torch.Tensor, torch.Tensor], rows: int, cols: int,
                            step: int) -> torch.Tensor:
        """DoRA on an (in, out) weight: the norm per output feature is a column norm over all rows
        (a first pass over the blocks)."""
        sq = torch.zeros(cols, dtype=torch.float64)
        for i in range(0, rows, step):
            j = min(rows, i + step)
            sq += self._block(o, factors, i, j, cols, None, dora=False).double().square().sum(0)
            self._release(o, i, j, cols)
        return (o.lora.magnitude.float() / sq.sqrt().float()).unsqueeze(0)  # type: ignore[union-attr]

    def _copy(self, f: BinaryIO, src: _Src) -> None:
        fd_in, fd_out = self._fd(src.path), f.fileno()
        pos, end = src.info.begin, src.info.end
        while pos < end:
            n = min(COPY_BYTES, end - pos)
            done = 0
            if self.copy_range:
                try:
                    done = os.copy_file_range(fd_in, fd_out, n, pos)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    self.copy_range = False
            if not done:
                buf = self._buf("copy", n, torch.uint8)
                _pread_into(fd_in, buf, pos)
                _write_all(f, buf)
                done = n
            pos += done
            self.bar.update(done)


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a tensor view still alive (an exception mid-block): the GC unmaps it
        pass


def _pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    view = memoryview(buf.numpy()).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise CheckpointFormatError(f"unexpected end of file at byte {offset + got}; the base shard is truncated")
        got += n


def _write_all(f: BinaryIO, t: torch.Tensor) -> None:
    view = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    while view:
        n = f.write(view)
        view = view[n:]


# ---------------------------------------------------------------------------------- API
def merge_checkpoint(base: PathLike, adapter: PathLike | Adapter, out: PathLike, *,
                     dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB", to: Target = "hf",
                     base_config: PathLike | ModelConfig | None = None, alpha: float | None = None,
                     force: bool = False, untie: bool = False, progress: bool = True) -> MergeResult:
    """Merge ``adapter`` into the base checkpoint ``base``, streaming, and write the result to ``out``.

    Memory stays at about the adapter plus a few row blocks of one tensor, whatever the model
    size. Updates are computed and added in float32 and cast once. The output directory is
    written beside ``out`` and renamed into place only when complete.

    Args:
        base: an HF model directory (``model.safetensors`` or shards + index, ``config.json``,
            tokenizer files) or a single ``.safetensors`` file.
        adapter: an adapter directory/file in any supported layout, or an :class:`Adapter`.
        out: the output directory.
        dtype: output dtype of floating tensors (default: each tensor keeps the base's).
        max_shard_size: largest shard (``"5GB"``, ``"500MB"``, ``"2GiB"``, bytes); ``to="hf"`` only.
        to: parameter names of the output: ``"hf"``, ``"torchtune"`` or ``"meta"`` (module docstring).
        base_config: the base's ``config.json``/``params.json`` (default: ``config.json`` in ``base``).
        alpha: LoRA alpha for adapter layouts that do not record it.
        force: replace an existing ``out``.
        untie: when the base ties ``lm_head`` to the input embedding and the adapter changes one of
            them, write both tensors and set ``tie_word_embeddings`` false (otherwise refused).
        progress: show a progress bar (bytes written) on stderr.

    Returns:
        A :class:`MergeResult` (``.summary()`` is one line).

    Raises:
        ConversionError: the adapter does not fit the base (missing modules, shapes, a LoRA bias
            the base has no bias for, tied embeddings without ``untie``...), all problems at once.
        MissingConfigError: ``to`` is torchtune/meta and no model config is known.
        CheckpointFormatError: the base is not safetensors.
        OutputExistsError: ``out`` exists and not ``force``.
        OutputPathError: ``out`` overlaps an input.

    Example:
        >>> merge_checkpoint("llama-3-8b/", "adapter/", "merged/", max_shard_size="2GB")
    """
    t0 = time.perf_counter()
    if to not in ("hf", "torchtune", "meta"):
        raise UsageError(f"to={to!r}; expected one of hf, torchtune, meta")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or dtype not in _CODE):
        raise UsageError(f"dtype {dtype!r} is not a floating-point dtype safetensors can hold; expected e.g. "
                         "torch.bfloat16, torch.float16 or torch.float32")
    limit = parse_size(max_shard_size)
    base_path = Path(base)
    sources = _base_sources(base_path)
    raw, cfg = _base_config(base_path, base_config)
    if isinstance(adapter, Adapter):
        ad, inputs = adapter, (base,)
    else:
        from .layouts import load_adapter

        ad, inputs = load_adapter(adapter, base_config=cfg, alpha=alpha), (base, adapter)
    for note in ad.meta.notes:
        logger.info("adapter: %s", note)
    planner = _Planner(sources, ad, raw, cfg, to=to, dtype=dtype, untie=untie)
    plan = planner.build()
    total = sum(o.nbytes for o in plan)
    if to != "hf" and total > limit:
        logger.info("%s output is one file (%.2f GB): its checkpointers read exactly one; max_shard_size ignored",
                    to, total / 1e9)
    shards = _shards(plan, limit if to == "hf" else None)
    names = _file_names(len(shards), to)
    from tqdm.auto import tqdm

    with atomic_output(out, force=force, inputs=inputs) as tmp:
        tmp.mkdir()
        with ExitStack() as stack:
            stack.enter_context(one_thread())
            bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc="merge", disable=not progress, leave=False))
            streamer = _Streamer(bar)
            stack.callback(streamer.close)
            for shard, name in zip(shards, names):
                _write_shard(tmp / name, shard, streamer)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total,
                                  "total_parameters": sum(math.prod(o.shape) for o in plan)},
                     "weight_map": {o.key: name for shard, name in zip(shards, names) for o in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _companions(base_path, tmp, raw, dtype=dtype, untied=planner.untied)
        if to == "meta":
            from .layouts.mistral import params_json

            (tmp / "params.json").write_text(json.dumps(params_json(cfg), indent=4))  # type: ignore[arg-type]
    res = MergeResult(Path(out), to, sum(o.lora is not None for o in plan), planner.replaced, len(plan), total,
                      names, time.perf_counter() - t0, list(ad.meta.notes))
    logger.info("%s", res.summary())
    return res


def _file_names(n: int, to: Target) -> list[str]:
    if to == "meta":
        return ["consolidated.safetensors"]
    if to == "torchtune":
        return ["model-00001-of-00001.safetensors"]
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_shard(path: Path, shard: list[_Out], streamer: _Streamer) -> None:
    header = _header(shard)
    with open(path, "wb", buffering=0) as f:
        f.write(header)
        try:
            if shard:
                streamer.prefetch(shard[0])
            for k, o in enumerate(shard):
                if k + 1 < len(shard):
                    streamer.prefetch(shard[k + 1])
                streamer.write(f, o)  # type: ignore[arg-type]
            streamer.flush()
        except BaseException:
            streamer.abort()  # the writer must be idle before f is closed
            raise
    expected = len(header) + sum(o.nbytes for o in shard)
    if path.stat().st_size != expected:  # a bug here must never produce a plausible file
        raise ConversionError(f"{path.name}: wrote {path.stat().st_size} bytes, planned {expected}; please report this")
    read_safetensors_header(path)  # validates offsets and sizes


def _companions(base: Path, out: Path, raw: dict[str, Any] | None, *, dtype: torch.dtype | None,
                untied: bool) -> None:
    """Copy the base's non-weight files; write config.json edited for ``untie`` / ``dtype``."""
    if base.is_dir():
        for p in sorted(base.iterdir()):
            if p.name.startswith(".") or p.name in SKIPPED_FILES or p.name == "config.json":
                continue
            if not p.is_file():
                logger.info("not copied: %s (a directory)", p.name)
            elif not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".index.json"):
                shutil.copyfile(p, out / p.name)
    if raw is None:
        return
    cfg = dict(raw)
    if untied:
        cfg["tie_word_embeddings"] = False
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = str(dtype).removeprefix("torch.")
    if cfg == raw and base.is_dir() and (base / "config.json").is_file():
        shutil.copyfile(base / "config.json", out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

