"""Tensors on disk: the safetensors header (read without torch), zero-copy loading, pickles
loaded only with ``weights_only=True``, checkpoint discovery in directories, and atomic output.

Nothing here imports torch at module level: ``lora-ckpt inspect`` of a safetensors file
reads only its header.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    AmbiguousCheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    OutputExistsError,
    OutputPathError,
    UnsafeCheckpointError,
    quote_list,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: safetensors dtype code -> (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
    "U64": (8, "uint64"), "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"), "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}
#: safetensors refuses headers above 100 MB; so do we (a header claiming more is hostile).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of a safetensors file."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_safetensors_header(path: PathLike) -> SafetensorsHeader:
    """Read and validate a safetensors header without reading tensor data or importing torch.

    Validates everything the format promises: the header fits in the file, is a JSON object,
    every dtype is known, every byte range lies inside the data section, matches its shape and
    overlaps no other.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointFormatError: the file is not a valid safetensors file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(
                    f"{path}: {size} bytes is too short for a safetensors file (8-byte header length "
                    "expected); the file is truncated or not safetensors", path=path)
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointFormatError(
                    f"{path}: header length {hlen} exceeds the file ({size} bytes) or the 100 MB limit; "
                    "the file is truncated or corrupt", path=path)
            raw = f.read(hlen)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such file", path=path) from e
    except IsADirectoryError as e:
        raise CheckpointFormatError(f"{path}: is a directory, expected a .safetensors file", path=path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(
            f"{path}: safetensors header is not valid UTF-8 JSON ({e.__class__.__name__}); the file is corrupt",
            path=path) from e
    if not isinstance(header, dict):
        raise CheckpointFormatError(
            f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object", path=path)
    data_start = 8 + hlen
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(f"{path}: __metadata__ must map strings to strings", path=path)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_len)
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointFormatError(
                f"{path}: tensors {n0!r} and {n1!r} overlap in the data section; the file is corrupt or "
                "hostile", path=path)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=dict(metadata))


def _tensor_info(path: str, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointFormatError(f"{path}: header entry {name!r} is not an object", path=path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointFormatError(
            f"{path}: tensor {name!r} has unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}",
            path=path)
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape)):
        raise CheckpointFormatError(f"{path}: tensor {name!r} has invalid shape {shape!r}", path=path)
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CheckpointFormatError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}", path=path)
    begin, end = offsets
    need = math.prod(shape) * DTYPES[dtype][0]
    if not 0 <= begin <= end <= data_len:
        raise CheckpointFormatError(
            f"{path}: tensor {name!r} spans bytes {begin}..{end} but the data section has {data_len} bytes; "
            "the file is truncated or corrupt", path=path)
    if end - begin != need:
        raise CheckpointFormatError(
            f"{path}: tensor {name!r} ({dtype}, shape {tuple(shape)}) needs {need} bytes, its offsets "
            f"span {end - begin}; the file is corrupt", path=path)
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def load_safetensors(path: PathLike, *, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file as zero-copy, copy-on-write, memory-mapped tensors.

    Pages are read only when touched; writing to a tensor (an optimiser step) copies that page
    privately and never changes the file. ``names`` restricts which tensors are returned.
    """
    import torch

    header = read_safetensors_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(header.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    for name in names if names is not None else header.tensors:
        info = header.tensors[name]
        itemsize, tname = DTYPES[info.dtype]
        dtype = getattr(torch, tname)
        if info.numel == 0 or mm is None:
            out[name] = torch.empty(info.shape, dtype=dtype)
        elif info.begin % itemsize:  # misaligned: a copy, never an unaligned view
            out[name] = torch.frombuffer(bytearray(mm[info.begin:info.end]), dtype=dtype).reshape(info.shape)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.begin).reshape(info.shape)
    return out


def load_pickle(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a torch ``.pt``/``.bin``/``.pth`` state dict with ``weights_only=True`` onto the CPU.

    Never runs code from the file. Unwraps the usual containers (``{"model": ...}``,
    ``{"state_dict": ...}``).

    Raises:
        UnsafeCheckpointError: the pickle references anything but tensors and plain containers.
        CheckpointFormatError: not a torch pickle, or not a dict of tensors.
    """
    import pickle

    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file", path=path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "GLOBAL" in str(e) or "Unsupported" in str(e):
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle: the file needs code to load ({reason[:160]}); expected "
                "plain tensors; re-save it as safetensors from a trusted environment", path=path) from e
        raise CheckpointFormatError(f"{path}: not a readable torch checkpoint ({reason[:160]})", path=path) from e
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such file", path=path) from e
    except Exception as e:  # a corrupt file can raise anything from torch's zip and pickle readers
        raise CheckpointFormatError(
            f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})",
            path=path) from e
    return _unwrap_state_dict(path, obj)


def _unwrap_state_dict(path: str, obj: Any) -> dict[str, torch.Tensor]:
    import torch

    for _ in range(2):
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("model", "state_dict", "module"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kinds = sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, Mapping) else [type(obj).__name__]
        raise CheckpointFormatError(
            f"{path}: expected a dict of tensors, found {', '.join(kinds)}", path=path)
    return dict(obj)


def load_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Load one weight file of any supported kind (safetensors, torch pickle)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return load_pickle(path)


# --------------------------------------------------------------------------- discovery
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def checkpoint_files(source: PathLike) -> list[Path]:
    """The weight files that make up a stock checkpoint (a file, a shard index, or a directory).

    A directory is resolved by its shard index (``*.safetensors.index.json`` first), else by
    its single weight file (safetensors preferred over a pickle of the same model).

    Raises:
        CheckpointNotFoundError: nothing to load.
        AmbiguousCheckpointError: several unrelated weight files and no index.
    """
    src = Path(source)
    if src.is_file():
        return _index_shards(src) if src.name.endswith(INDEX_SUFFIXES) else [src]
    if not src.is_dir():
        raise CheckpointNotFoundError(f"{src}: no such file or directory", path=src)
    indexes = sorted(p for p in src.iterdir() if p.name.endswith(INDEX_SUFFIXES))
    for index in indexes:  # safetensors index sorts first
        return _index_shards(index)
    by_kind: dict[str, list[Path]] = {}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."):
            by_kind.setdefault("safetensors" if p.suffix == ".safetensors" else "pickle", []).append(p)
    for kind in ("safetensors", "pickle"):
        files = by_kind.get(kind, [])
        if len(files) == 1:
            return files
        if len(files) > 1:
            raise AmbiguousCheckpointError(
                f"{src}: {len(files)} candidate weight files ({quote_list(f.name for f in files)}) and no "
                "*.index.json; expected one file or a shard index; pass the file itself",
                path=src, candidates=[f.name for f in files])
    raise CheckpointNotFoundError(
        f"{src}: no weight file (*.safetensors, *.bin, *.pt, *.pth or a shard index) in this directory", path=src)


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointFormatError(
            f"{index}: not a shard index (expected JSON with a 'weight_map' object)", path=index) from e
    shards = []
    for name in names:
        shard = (index.parent / name)
        if not isinstance(name, str) or Path(name).name != name or not shard.is_file():
            raise CheckpointNotFoundError(f"{index}: lists shard {name!r}, which is not in {index.parent}",
                                          path=shard)
        shards.append(shard)
    return shards


# ------------------------------------------------------------------------------ output
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def atomic_output(path: PathLike, *, force: bool = False, is_dir: bool = True,
                  inputs: tuple[PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Nothing that looks like a finished output ever exists before the rename; an exception
    (or a kill) leaves at most a hidden ``.<name>.tmp-*`` sibling.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        OutputPathError: ``path`` lies inside one of ``inputs`` (or the reverse), or its
            directory is not writable.
    """
    final = Path(path).absolute()
    for src in inputs:
        s = Path(src).absolute()
        if final == s or s in final.parents or final in s.parents:
            raise OutputPathError(
                f"{final}: output overlaps the input {s}; choose an output outside it", path=final)
    if final.exists() and not force:
        raise OutputExistsError(f"{final}: exists; pass --force (force=True) to replace it", path=final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent)) if is_dir else \
            Path(tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)[1])
    except OSError as e:
        raise OutputPathError(f"{final.parent}: cannot write here ({e.strerror}); choose another output",
                              path=final) from e
    try:
        target = tmp / "out" if is_dir else tmp
        try:
            yield target
        except OSError as e:
            if e.errno in _OUTPUT_ERRNOS and not isinstance(e, (FileNotFoundError,)):
                raise OutputPathError(f"{final}: writing the output failed ({e.strerror or e}); free space or "
                                      "choose another output; nothing was written", path=final) from e
            raise
        if is_dir and not target.exists():
            target.mkdir()
        if final.exists():  # force: replace
            if final.is_dir() and not final.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                os.replace(final, old / "x")
                os.replace(target, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                final.unlink()
                os.replace(target, final)
        else:
            os.replace(target, final)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def read_json(path: PathLike, *, what: str = "JSON file") -> dict[str, Any]:
    """Read a JSON object, with a clear error for anything else."""
    from .errors import ConfigError

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such {what}", path=path) from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} is not UTF-8 text", path=path) from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: {what} is not valid JSON (line {e.lineno}: {e.msg})", path=path) from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: {what} holds a JSON {type(obj).__name__}, expected an object", path=path)
    return obj


# ----------------------------------------------------------------------- page release
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def release_file_pages(tensors: Iterable[Any]) -> None:
    """Drop this process's resident pages of memory-mapped (file-backed) tensors: they leave the
    process's RSS, stay in the page cache, and are re-read from it if touched again. Tensors in
    anonymous memory are never touched. Only for tensors that were never written to (a private
    mapping's modified pages would be lost). Linux only; elsewhere a no-op."""
    import bisect
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0":  # inode != 0: backed by a file
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    spans.sort()
    starts = [lo for lo, _ in spans]
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for t in tensors:
        if t is None or not t.numel():
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or end > spans[i][1]:
            continue  # not (entirely) inside one file mapping
        a, b = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside the tensor only
        if b > a:
            madvise(a, b - a, _MADV_DONTNEED)
