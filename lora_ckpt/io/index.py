"""What a weight file holds without reading it into torch: tensor shapes and dtypes from a
safetensors header or a torch zip pickle (parsed with an allow-list, never executing code), and
a torch-free NaN/Inf scan. ``inspect`` and layout detection run on this."""

from __future__ import annotations

import collections
import math
import os
import pickle
import zipfile
from typing import Any

from ..errors import CheckpointNotFoundError
from .header import DTYPES, PathLike, SafetensorsHeader, read_safetensors_header
from .tensors import load_pickle, unwrap_state_dict

__all__ = ["VALUE_SCAN_LIMIT", "TensorMeta", "nonfinite_tensors", "tensor_index"]


class TensorMeta:
    """A tensor's shape and dtype without its data (what ``inspect`` needs; no torch)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple[int, ...] | list[int], dtype: str) -> None:
        self.shape = tuple(shape)
        self.dtype = dtype  # torch dtype name: "float32", "bfloat16", ...

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def T(self) -> TensorMeta:  # (upper case: mirrors torch.Tensor.T)
        return TensorMeta(self.shape[::-1], self.dtype)

    def contiguous(self) -> TensorMeta:
        return self

    def __repr__(self) -> str:
        return f"TensorMeta({self.shape}, {self.dtype})"


class _NeedTorch(Exception):
    """The fast pickle reader met something only torch itself should judge."""


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


def _pickle_index(path: str) -> dict[str, TensorMeta]:
    """Shapes and dtypes of a torch zip pickle, read without torch and without running code:
    only containers, tensor rebuilds and storage types are accepted."""
    def rebuild(storage: str, offset: int, size: tuple[int, ...], *_: Any) -> TensorMeta:
        return TensorMeta(tuple(size), storage)

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild,
        ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
        ("torch", "Size"): tuple,
    }

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "torch" and name in _STORAGE_DTYPES:
                return _STORAGE_DTYPES[name]
            if (module, name) in allowed:
                return allowed[(module, name)]
            raise _NeedTorch(f"{module}.{name}")

        def persistent_load(self, pid: Any) -> Any:
            if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage" and isinstance(pid[1], str):
                return pid[1]
            raise _NeedTorch("storage")

    try:
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise _NeedTorch("layout")
            obj = Unpickler(z.open(pkl[0])).load()
    except _NeedTorch:
        raise
    except Exception as e:  # anything odd in a hostile file: let torch's weights_only loader judge it
        raise _NeedTorch(str(e)) from e
    tensors = unwrap_state_dict(obj, lambda v: isinstance(v, TensorMeta))
    if tensors is None:
        raise _NeedTorch("not a flat dict of tensors")
    return tensors


def tensor_index(path: PathLike) -> dict[str, TensorMeta]:
    """Name -> shape and dtype of every tensor in a weight file, read without torch where the
    format allows (safetensors and GGUF headers; plain torch zip pickles), else via :func:`load_pickle`."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return {n: TensorMeta(t.shape, DTYPES[t.dtype][1]) for n, t in read_safetensors_header(path).tensors.items()}
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file", path=path)
    from .gguf import is_gguf, read_gguf_header

    if is_gguf(path):  # llama.cpp's container: its own bounded header reader, never the unpickler
        return {n: TensorMeta(t.shape, t.dtype) for n, t in read_gguf_header(path).tensors.items()}
    try:
        return _pickle_index(path)
    except _NeedTorch:
        return {n: TensorMeta(tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for n, t in load_pickle(path).items()}


#: bit patterns (little-endian words) whose exponent is all ones: NaN or Inf
_NONFINITE = {"F32": (4, 0x7F800000, 0x00800000, 0x80000000), "BF16": (2, 0x7F80, 0x0080, 0x8000),
              "F16": (2, 0x7C00, 0x0400, 0x8000), "F64": (8, 0x7FF0000000000000, 0x0010000000000000,
                                                         0x8000000000000000)}
VALUE_SCAN_LIMIT = 16_000_000  # bytes: inspect scans values of files up to this size (--values: any)


def nonfinite_tensors(path: PathLike, header: SafetensorsHeader | None = None) -> list[str]:
    """Names of the floating-point tensors of a safetensors file holding NaN or Inf, found
    without torch: per word, ``(w & EXP) + LSB`` sets the top bit only when the exponent is all
    ones; done with big-int arithmetic over 16 MB chunks (no carries cross words)."""
    header = header or read_safetensors_header(path)
    bad = []
    with open(header.path, "rb") as f:
        for t in header.tensors.values():
            if t.dtype not in _NONFINITE or not t.nbytes:
                continue
            size, exp, lsb, top = _NONFINITE[t.dtype]
            f.seek(t.begin)
            left = t.nbytes
            chunk_words = (16 << 20) // size
            while left:
                raw = f.read(min(left, chunk_words * size))
                left -= len(raw)
                n = len(raw) // size
                rep = int.from_bytes(b"\x01".rjust(size, b"\x00") * n, "big")  # 1 in every word
                x = int.from_bytes(raw, "little") & (exp * rep)
                if (x + lsb * rep) & (top * rep):
                    bad.append(t.name)
                    break
    return bad
