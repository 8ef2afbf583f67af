"""The streaming writer behind ``merge``: safetensors shards written front to back (our own header,
then each tensor's bytes), verbatim tensors copied file-to-file by the kernel, merged ones computed
in row blocks and written by a writer thread while the next block is computed. Pages of the
inputs are released as soon as a block is done, so memory stays at a few write units.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import queue
import threading
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .adapter import ModuleLoRA
from .errors import CheckpointFormatError, ConversionError
from .experts import ExpertLoRA
from .io import DTYPES, TensorInfo, read_safetensors_header
from .rope import rotate_half_to_interleaved

__all__ = ["BaseTensor", "OutTensor", "Streamer", "plan_shards", "shard_header", "write_shard"]

#: elements per row block of a merged tensor (4 MB of float32: the block's passes stay in cache)
BLOCK_ELEMENTS = 1 << 20
#: bytes per copy_file_range call (progress granularity)
COPY_BYTES = 1 << 26
#: bytes per write() of computed rows (large writes cost the kernel less per byte)
WRITE_BYTES = 1 << 24
#: write units computed ahead of the writer thread
WRITE_SLOTS = 3
@dataclass(frozen=True)
class BaseTensor:
    """A base tensor on disk."""

    path: str
    info: TensorInfo

    @property
    def dtype(self) -> str:
        return self.info.dtype


@dataclass
class OutTensor:
    """One output tensor: where its rows come from and what happens to them."""

    key: str  # output name
    hf_key: str  # HF name (for messages and head counts)
    dtype: str  # safetensors dtype code written
    shape: tuple[int, ...]
    src: BaseTensor | None = None  # rows from a base file ...
    tensor: torch.Tensor | None = None  # ... or from an adapter tensor (modules_to_save)
    lora: ModuleLoRA | None = None
    transposed: bool = False  # the stored weight is (in, out) or (vocab, dim): it receives ΔWᵀ
    add: torch.Tensor | None = None  # float32, added as is (scale·lora_B.bias)
    permute: tuple[int, int] | None = None  # (n_heads, head_dim): rotate-half -> interleaved rows
    experts: ExpertLoRA | None = None  # a fused 3-D expert parameter (E, out, in): row e receives ΔW_e

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0]

    @property
    def verbatim(self) -> bool:
        return (self.src is not None and self.lora is None and self.add is None and self.permute is None
                and self.experts is None and self.dtype == self.src.dtype)


def plan_shards(plan: list[OutTensor], limit: int | None) -> list[list[OutTensor]]:
    """Greedy split in input order (a tensor larger than ``limit`` gets a shard of its own);
    within a shard, larger itemsizes first so every tensor starts aligned to its dtype."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for o in plan:
        if limit is not None and shards[-1] and size + o.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    return [sorted(s, key=lambda o: -DTYPES[o.dtype][0]) for s in shards]


def shard_header(shard: list[OutTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for o in shard:
        header[o.key] = {"dtype": o.dtype, "shape": list(o.shape), "data_offsets": [offset, offset + o.nbytes]}
        offset += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # as safetensors pads: data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


# ------------------------------------------------------------------------------- writing
class Streamer:
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
            except BaseException as e:  # re-raised in the producer
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

    def _rows(self, o: OutTensor, i: int, j: int, cols: int) -> torch.Tensor:
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

    def prefetch(self, o: OutTensor) -> None:
        """Start reading ``o``'s bytes into the page cache in the background (the next tensor is
        prefetched while this one is computed); no-op for verbatim copies (the kernel reads ahead)."""
        if o.src is None or o.verbatim or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = o.src.info.begin - o.src.info.begin % mmap.PAGESIZE
        if o.src.info.end > start:
            self._map(o.src.path).madvise(mmap.MADV_WILLNEED, start, o.src.info.end - start)

    def _release(self, o: OutTensor, i: int, j: int, cols: int) -> None:
        """Unmap the pages of rows i..j (they stay in the page cache, out of this process's RSS)."""
        if o.src is None or o.src.path not in self.maps:
            return
        itemsize = DTYPES[o.src.dtype][0]
        begin = o.src.info.begin + i * cols * itemsize
        start = begin - begin % mmap.PAGESIZE
        self.maps[o.src.path].madvise(mmap.MADV_DONTNEED, start, begin + (j - i) * cols * itemsize - start)

    # --------------------------------------------------------------------- compute
    def write(self, f: BinaryIO, o: OutTensor) -> None:
        """Queue tensor ``o`` for writing at the current end of ``f``."""
        self._check()
        if o.verbatim and o.src is not None:
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
        if factors is not None and o.lora is not None and o.lora.magnitude is not None and o.transposed:
            col_factor = self._dora_column_factor(o, factors, o.lora.magnitude, rows, cols, step)
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

    def _block(self, o: OutTensor, factors: tuple[torch.Tensor, torch.Tensor] | None, i: int, j: int, cols: int,
               col_factor: torch.Tensor | None, *, dora: bool = True) -> torch.Tensor:
        """Rows i..j of the output: float32 if anything is added, else the source rows as they are."""
        src = self._rows(o, i, j, cols)
        m = o.lora
        if m is None and o.add is None and o.experts is None:
            return src
        w = self._buf("work", src.numel(), torch.float32).view(src.shape).copy_(src)
        if o.experts is not None:  # rows are experts: expert e's (out, in) slice += scale · B_e @ A_e (or its ᵀ)
            x = o.experts
            for e in range(i, j):
                A, B = x.A[e].float(), x.B[e].float()
                if x.transposed:
                    w[e - i].view(x.in_features, x.out_features).addmm_(A.T, B.T, alpha=x.scale)
                else:
                    w[e - i].view(x.out_features, x.in_features).addmm_(B, A, alpha=x.scale)
        if m is not None and factors is not None:
            A, B = factors
            a, b = (A.T[i:j], B.T) if o.transposed else (B[i:j], A)
            w.addmm_(a, b, alpha=m.scale)  # W + s·B@A, one BLAS call (mixed-dtype adds are 7x slower)
            if m.magnitude is not None and dora:  # PEFT: m / ‖W + ΔW‖ per output feature
                if col_factor is not None:  # an (in, out) weight: column norms from a first pass
                    w.mul_(col_factor)
                else:
                    w.mul_((m.magnitude.float()[i:j] / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1))
        if o.add is not None:
            w.add_(o.add.reshape(-1, cols)[i:j])
        return w

    def _dora_column_factor(self, o: OutTensor, factors: tuple[torch.Tensor, torch.Tensor], magnitude: torch.Tensor,
                            rows: int, cols: int, step: int) -> torch.Tensor:
        """DoRA on an (in, out) weight: the norm per output feature is a column norm over all rows
        (a first pass over the blocks)."""
        sq = torch.zeros(cols, dtype=torch.float64)
        for i in range(0, rows, step):
            j = min(rows, i + step)
            sq += self._block(o, factors, i, j, cols, None, dora=False).double().square().sum(0)
            self._release(o, i, j, cols)
        return (magnitude.float() / sq.sqrt().float()).unsqueeze(0)

    def _copy(self, f: BinaryIO, src: BaseTensor) -> None:
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
    with suppress(BufferError):  # a tensor view still alive (an exception mid-block): the GC unmaps it
        mm.close()


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable, zero-copy byte view of a contiguous CPU tensor's memory, without numpy (not a
    dependency of lora-ckpt: ``Tensor.numpy()`` fails where it is not installed). The caller keeps
    ``t`` alive while the view is used."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


def _pread_into(fd: int, buf: torch.Tensor, offset: int) -> None:
    view = _byte_view(buf)
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise CheckpointFormatError(f"unexpected end of file at byte {offset + got}; the base shard is truncated")
        got += n


def _write_all(f: BinaryIO, t: torch.Tensor) -> None:
    t = t.contiguous()
    view = _byte_view(t)
    while view:
        n = f.write(view)
        view = view[n:]


# ---------------------------------------------------------------------------------- API
def write_shard(path: Path, shard: list[OutTensor], streamer: Streamer) -> None:
    header = shard_header(shard)
    with open(path, "wb", buffering=0) as f:
        f.write(header)
        try:
            if shard:
                streamer.prefetch(shard[0])
            for k, o in enumerate(shard):
                if k + 1 < len(shard):
                    streamer.prefetch(shard[k + 1])
                streamer.write(f, o)
            streamer.flush()
        except BaseException:
            streamer.abort()  # the writer must be idle before f is closed
            raise
    expected = len(header) + sum(o.nbytes for o in shard)
    if path.stat().st_size != expected:  # a bug here must never produce a plausible file
        raise ConversionError(f"{path.name}: wrote {path.stat().st_size} bytes, planned {expected}; please report this")
    read_safetensors_header(path)  # validates offsets and sizes


