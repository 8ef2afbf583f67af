"""The GGUF container, read and written without torch, numpy or the ``gguf`` package.

Reading is bounded the way :func:`lora_ckpt.files.read_safetensors_header` is: every count,
string and array length is checked against the bytes left in the file before anything is
allocated, nesting is capped, every tensor's byte range must lie inside the data section, match
its shape and type, and overlap no other. A truncated or hostile file is a
:class:`~lora_ckpt.errors.CheckpointFormatError`, never a crash or a huge allocation.

Writing produces the same bytes as gguf-py's ``GGUFWriter`` (version 3, little-endian, 32-byte
alignment, tensor data padded to the alignment), streaming one tensor at a time (unchanged
memory-mapped tensors copied file to file by the kernel).
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import CheckpointFormatError, CheckpointNotFoundError
from .writing import byte_view

if TYPE_CHECKING:
    import torch

__all__ = [
    "GGUF_MAGIC",
    "KV",
    "TENSOR_TYPES",
    "GgufFile",
    "GgufTensor",
    "GgufValue",
    "read_gguf_header",
    "write_gguf",
]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4

# value types (gguf.GGUFValueType)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALARS: dict[int, str] = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
                            FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
#: tensor types lora-ckpt reads and writes: ggml type -> (name, bytes per element, torch dtype name)
TENSOR_TYPES: dict[int, tuple[str, int, str]] = {0: ("F32", 4, "float32"), 1: ("F16", 2, "float16"),
                                                  30: ("BF16", 2, "bfloat16")}
#: other ggml types by name, for messages (quantized types: block size and bytes per block)
_QUANT_TYPES: dict[int, tuple[str, int, int]] = {8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
                                                 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24)}


@dataclass(frozen=True)
class GgufValue:
    """A typed KV value: ``type`` is the GGUF value type; arrays carry ``sub_type``."""

    value: Any
    type: int
    sub_type: int | None = None


KV = dict[str, GgufValue]


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's header entry. ``shape`` is torch/numpy order (ggml ``ne`` reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def dtype(self) -> str:
        """The torch dtype name (or the ggml type name of a type lora-ckpt does not read)."""
        t = TENSOR_TYPES.get(self.ggml_type)
        return t[2] if t else _type_name(self.ggml_type)


@dataclass
class GgufFile:
    """A parsed, validated GGUF header."""

    path: str
    version: int
    kv: KV = field(default_factory=dict)
    tensors: dict[str, GgufTensor] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        v = self.kv.get(key)
        return default if v is None else v.value


def _type_name(ggml_type: int) -> str:
    if ggml_type in TENSOR_TYPES:
        return TENSOR_TYPES[ggml_type][0]
    return _QUANT_TYPES[ggml_type][0] if ggml_type in _QUANT_TYPES else f"ggml type {ggml_type}"


class _Cursor:
    def __init__(self, f: BinaryIO, size: int, path: str) -> None:
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def fail(self, what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.path}: {what} at byte {self.pos} of {self.size}; the GGUF file is "
                                     "truncated or corrupt", path=self.path)

    def take(self, n: int) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"{n} bytes needed but {self.size - self.pos} left")
        raw = self.f.read(n)
        self.pos += len(raw)
        return raw

    def scalar(self, vtype: int) -> Any:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(UINT64)
        if n > self.size - self.pos:
            raise self.fail(f"a string of {n} bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail("a string that is not UTF-8") from e

    def value(self, vtype: int, depth: int = 0) -> GgufValue:
        if vtype in _SCALARS:
            return GgufValue(self.scalar(vtype), vtype)
        if vtype == STRING:
            return GgufValue(self.string(), STRING)
        if vtype == ARRAY and depth < MAX_NESTING:
            sub, n = self.scalar(UINT32), self.scalar(UINT64)
            smallest = struct.calcsize(_SCALARS[sub]) if sub in _SCALARS else 8 if sub in (STRING, ARRAY) else 0
            if not smallest or n * smallest > self.size - self.pos:
                raise self.fail(f"an array of {n} values of type {sub}")
            if sub in _SCALARS:
                fmt = _SCALARS[sub]
                items = list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt))))
            else:
                items = [self.value(sub, depth + 1).value for _ in range(n)]
            return GgufValue(items, ARRAY, sub)
        raise self.fail(f"unknown value type {vtype}" if vtype != ARRAY else "arrays nested too deep")


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf_header(path: str | os.PathLike[str]) -> GgufFile:
    """Read and validate a GGUF header (KV and tensor infos) without reading tensor data. The
    parse of an unchanged file (same inode, size and mtime) is reused: detection asks several times.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointFormatError: not a GGUF file, or truncated, corrupt or hostile.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such file", path=path) from e
    return _read_header(path, st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _read_header(path: str, ino: int, size: int, mtime_ns: int) -> GgufFile:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such file", path=path) from e
    with f:
        c = _Cursor(f, size, path)
        if size < 24 or c.take(4) != GGUF_MAGIC:
            raise CheckpointFormatError(f"{path}: not a GGUF file (no 'GGUF' magic in the first 4 of {size} bytes)",
                                        path=path)
        version = c.scalar(UINT32)
        if version not in (2, 3):
            raise CheckpointFormatError(f"{path}: GGUF version {version}; expected 2 or 3 (version 1 and big-endian "
                                        "files are not supported)", path=path)
        n_tensors, n_kv = c.scalar(UINT64), c.scalar(UINT64)
        if n_tensors > size // 24 or n_kv > size // 12:  # each entry takes at least that many bytes
            raise c.fail(f"{n_tensors} tensors and {n_kv} KV entries claimed")
        out = GgufFile(path, version)
        for _ in range(n_kv):
            key = c.string()
            if key in out.kv:
                raise c.fail(f"duplicate KV key {key!r}")
            out.kv[key] = c.value(c.scalar(UINT32))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = c.string(), c.scalar(UINT32)
            if n_dims > MAX_DIMS:
                raise c.fail(f"tensor {name!r} with {n_dims} dimensions (at most {MAX_DIMS})")
            ne = [c.scalar(UINT64) for _ in range(n_dims)]
            infos.append((name, tuple(reversed(ne)), c.scalar(UINT32), c.scalar(UINT64)))
        align = out.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise c.fail(f"general.alignment {align!r} (expected a power of two)")
        data_start = -(-c.pos // align) * align
    for name, shape, ggml_type, offset in infos:
        if name in out.tensors:
            raise CheckpointFormatError(f"{path}: tensor {name!r} appears twice; the file is corrupt", path=path)
        out.tensors[name] = _tensor(path, name, shape, ggml_type, data_start + offset, size)
    spans = sorted((t.begin, t.begin + t.nbytes, t.name) for t in out.tensors.values() if t.nbytes)
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CheckpointFormatError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section; the file is "
                                        "corrupt or hostile", path=path)
    return out


def _tensor(path: str, name: str, shape: tuple[int, ...], ggml_type: int, begin: int, size: int) -> GgufTensor:
    numel = math.prod(shape)
    if ggml_type in TENSOR_TYPES:
        nbytes = numel * TENSOR_TYPES[ggml_type][1]
    elif ggml_type in _QUANT_TYPES:
        _, block, block_bytes = _QUANT_TYPES[ggml_type]
        nbytes = -(-numel // block) * block_bytes
    else:
        raise CheckpointFormatError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}", path=path)
    if begin + nbytes > size:
        raise CheckpointFormatError(
            f"{path}: tensor {name!r} ({_type_name(ggml_type)}, shape {shape}) ends at byte {begin + nbytes} but the "
            f"file has {size} bytes; the file is truncated", path=path)
    return GgufTensor(name, shape, ggml_type, begin, nbytes)


# ------------------------------------------------------------------------------ writing
def _pack_value(v: GgufValue) -> bytes:
    if v.type in _SCALARS:
        return struct.pack(_SCALARS[v.type], v.value)
    if v.type == STRING:
        raw = str(v.value).encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    if v.type == ARRAY and v.sub_type is not None:
        body = b"".join(_pack_value(GgufValue(x, v.sub_type)) for x in v.value)
        return struct.pack("<IQ", v.sub_type, len(v.value)) + body
    raise ValueError(f"cannot write GGUF value type {v.type}")


def header_bytes(kv: KV, tensors: Iterable[tuple[str, tuple[int, ...], int, int]]) -> tuple[bytes, list[int]]:
    """The header (padded to the alignment) for ``tensors`` = (name, shape, ggml type, nbytes),
    and each tensor's offset in the data section, as ``GGUFWriter`` lays them out."""
    tensors = list(tensors)
    parts = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kv))]
    for key, v in kv.items():
        parts += [_pack_value(GgufValue(key, STRING)), struct.pack("<I", v.type), _pack_value(v)]
    offsets, at = [], 0
    for name, shape, ggml_type, nbytes in tensors:
        parts += [_pack_value(GgufValue(name, STRING)), struct.pack("<I", len(shape)),
                  struct.pack(f"<{len(shape)}Q", *reversed(shape)), struct.pack("<IQ", ggml_type, at)]
        offsets.append(at)
        at += -(-nbytes // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    head = b"".join(parts)
    return head + b"\x00" * (-len(head) % DEFAULT_ALIGNMENT), offsets


#: torch dtype name -> ggml type written
GGML_TYPES = {"float32": 0, "float16": 1, "bfloat16": 30}
#: a tensor to write: (name, shape, ggml type, nbytes, data) where data is bytes, or an object with
#: ``data_ptr()`` (a contiguous torch tensor) whose ``nbytes`` bytes are read in place
TensorEntry = tuple[str, tuple[int, ...], int, int, Any]


def tensor_entry(name: str, t: torch.Tensor) -> TensorEntry:
    """A torch tensor as a :func:`write_gguf` entry (its bytes read in place when written)."""
    t = t.contiguous()
    return name, tuple(t.shape), GGML_TYPES[str(t.dtype).removeprefix("torch.")], t.numel() * t.element_size(), t


def _file_mappings() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of this process's file-backed mappings (Linux; else none)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and not fields[5].endswith(" (deleted)"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, int(fields[2], 16), fields[5]))
    return sorted(out)


def write_gguf(path: str | os.PathLike[str], kv: KV, tensors: list[TensorEntry]) -> int:
    """Write a GGUF file, one tensor at a time, in order. A tensor whose bytes lie in a memory-mapped
    file (an unchanged factor of the source) is copied file to file by the kernel (``copy_file_range``,
    as ``shutil.copyfile`` does); the rest is written from memory. Returns the file size."""
    import bisect

    head, _ = header_bytes(kv, [(n, s, t, b) for n, s, t, b, _ in tensors])
    maps = _file_mappings() if hasattr(os, "copy_file_range") else []
    starts = [m[0] for m in maps]
    sources: dict[str, int] = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, head)
        for name, _, _, nbytes, data in tensors:
            if isinstance(data, (bytes, bytearray, memoryview)):
                if len(data) != nbytes:
                    raise ValueError(f"tensor {name!r}: {len(data)} bytes, expected {nbytes}")
                _write_all(fd, data)
            else:
                ptr = data.data_ptr()
                i = bisect.bisect_right(starts, ptr) - 1
                if nbytes and i >= 0 and ptr + nbytes <= maps[i][1]:
                    lo, _, offset, src = maps[i]
                    if src not in sources:
                        sources[src] = os.open(src, os.O_RDONLY)
                    _copy_range(sources[src], fd, nbytes, offset + ptr - lo)
                elif nbytes:
                    _write_all(fd, byte_view(data)[:nbytes])
            _write_all(fd, b"\x00" * (-nbytes % DEFAULT_ALIGNMENT))
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
        for src_fd in sources.values():
            os.close(src_fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src: int, dst: int, n: int, offset: int) -> None:
    while n:
        done = os.copy_file_range(src, dst, n, offset)
        if done <= 0:
            raise OSError(f"copy_file_range copied {done} bytes with {n} left")
        n, offset = n - done, offset + done


def load_gguf_tensors(header: GgufFile) -> dict[str, torch.Tensor]:
    """The tensors of a parsed GGUF, memory-mapped copy-on-write (zero-copy, like safetensors).

    Raises:
        CheckpointFormatError: a tensor type lora-ckpt does not read (quantized Q8_0, ...).
    """
    import mmap

    import torch

    bad = [f"{n} ({t.dtype})" for n, t in header.tensors.items() if t.ggml_type not in TENSOR_TYPES]
    if bad:
        raise CheckpointFormatError(
            f"{header.path}: quantized tensors {', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}; lora-ckpt "
            "reads F32/F16/BF16 GGUF adapters; re-export the adapter with --outtype f32, f16 or bf16",
            path=header.path)
    with open(header.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, t in header.tensors.items():
        dtype, size = getattr(torch, t.dtype), TENSOR_TYPES[t.ggml_type][1]
        if t.nbytes == 0:
            out[name] = torch.empty(t.shape, dtype=dtype)
        elif t.begin % size:  # misaligned: a copy, never an unaligned view
            out[name] = torch.frombuffer(bytearray(mm[t.begin:t.begin + t.nbytes]), dtype=dtype).reshape(t.shape)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=t.nbytes // size, offset=t.begin).reshape(t.shape)
    return out
