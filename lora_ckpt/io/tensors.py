"""Tensors in memory: zero-copy memory-mapped safetensors, torch pickles loaded only with
``weights_only=True``, writing, the NaN/Inf check, and releasing a mapping's resident pages.

torch and ``safetensors.torch`` are imported inside the functions that need them, so that
``import lora_ckpt``, ``--help`` and ``inspect`` stay torch-free.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError, CheckpointNotFoundError, OutputPathError, UnsafeCheckpointError
from .header import DTYPES, PathLike, read_safetensors_header

if TYPE_CHECKING:
    import torch

__all__ = ["STATE_DICT_KEYS", "load_pickle", "load_safetensors", "load_tensors", "nonfinite", "release_file_pages",
           "save_tensors", "unwrap_state_dict"]

#: the containers training scripts wrap a state dict in (``{"model": ...}``, ...), looked into up to twice
STATE_DICT_KEYS = ("model", "state_dict", "module")


def unwrap_state_dict(obj: Any, is_tensor: Callable[[Any], bool]) -> dict[str, Any] | None:
    """The flat name -> tensor dict in a loaded checkpoint object: the object itself, or what up to two
    levels of :data:`STATE_DICT_KEYS` containers hold; None when there is no such dict.

    Args:
        obj: what the pickle held.
        is_tensor: what counts as a tensor (``torch.Tensor``, or the shape-only index's ``TensorMeta``).
    """
    for _ in range(2):
        if isinstance(obj, Mapping) and not all(is_tensor(v) for v in obj.values()):
            for key in STATE_DICT_KEYS:
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
    if isinstance(obj, Mapping) and all(is_tensor(v) for v in obj.values()):
        return dict(obj)
    return None


def load_safetensors(path: PathLike, *, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file as zero-copy, copy-on-write, memory-mapped tensors.

    Pages are read only when touched; writing to a tensor (an optimiser step) copies that page
    privately and never changes the file. ``names`` restricts which tensors are returned.
    """
    import torch  # torch-free import of lora_ckpt

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
    import torch  # torch-free import of lora_ckpt

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
    return _state_dict(path, obj)


def _state_dict(path: str, obj: Any) -> dict[str, torch.Tensor]:
    import torch  # torch-free import of lora_ckpt

    tensors = unwrap_state_dict(obj, lambda v: isinstance(v, torch.Tensor))
    if tensors is None:
        kinds = sorted({type(v).__name__ for v in obj.values()}) if isinstance(obj, Mapping) else [type(obj).__name__]
        raise CheckpointFormatError(
            f"{path}: expected a dict of tensors, found {', '.join(kinds)}", path=path)
    return tensors


def load_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Load one weight file of any supported kind (safetensors, torch pickle)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return load_pickle(path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, *, pickle: bool = False,
                 metadata: dict[str, str] | None = None) -> None:
    """Write tensors (safetensors, or a torch pickle); a failed write is an :class:`OutputPathError`."""
    import torch  # torch-free import of lora_ckpt
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not pickle:  # safetensors refuses tensors sharing storage (views of one stacked factor): copy the others
        seen: set[int] = set()
        tensors = dict(tensors)
        for k, t in tensors.items():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen and t.numel():
                tensors[k] = t.clone()
            seen.add(ptr)
    try:
        if pickle:
            torch.save(tensors, path)
        else:
            save_file(tensors, path, metadata=metadata if metadata is not None else {"format": "pt"})
    except (OSError, RuntimeError, SafetensorError) as e:  # torch reports a full disk as RuntimeError
        reason = (getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__)[:120]
        raise OutputPathError(f"{path}: writing the output failed ({reason}); free space or choose another "
                              "output; nothing was written", path=path) from e


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf (one read each: ``aminmax`` propagates
    NaN and returns the infinities, so both are finite iff every value is)."""
    import torch  # torch-free import of lora_ckpt

    bad = []
    for k, t in tensors.items():
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t.reshape(-1))
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                bad.append(k)
    return bad


# ----------------------------------------------------------------------- page release
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def release_file_pages(tensors: Iterable[Any]) -> None:
    """Drop this process's resident pages of memory-mapped (file-backed) tensors: they leave the
    process's RSS, stay in the page cache, and are re-read from it if touched again. Tensors in
    anonymous memory are never touched. Only for tensors that were never written to (a private
    mapping's modified pages would be lost). Linux only; elsewhere a no-op."""
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
