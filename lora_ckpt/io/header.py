"""The safetensors header, read and validated without torch and without touching tensor data:
``lora-ckpt inspect`` of a safetensors file reads only this."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointFormatError, CheckpointNotFoundError

__all__ = ["DTYPES", "MAX_HEADER_BYTES", "PathLike", "SafetensorsHeader", "TensorInfo", "read_safetensors_header"]

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
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
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
