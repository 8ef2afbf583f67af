"""Writing safetensors files as a stream: the header built from shapes and dtypes exactly as
``safetensors`` builds it, then each tensor's bytes written straight from its memory, one tensor
at a time. Nothing beyond the inputs is held but one tensor (made contiguous or moved to the CPU
only when it is not already), where ``safetensors.torch.save_file`` needs every tensor contiguous
and distinct up front (so callers copy views) and, before 0.6, copied all of them into one buffer.

The bytes equal ``save_file``'s for the same tensors and metadata (``tests/test_writing.py``
checks it): tensors in the data section in descending order of safetensors' ``Dtype`` enum (its
alignment order: 8-byte types first, e.g. U64, I64, F64, C64, F32, U32, I32, BF16, F16, ..., BOOL),
then by name (bytes of the UTF-8 name); the header compact JSON (no spaces, non-ASCII as is),
``__metadata__`` first if given, padded with spaces to a multiple of 8 bytes. One difference:
safetensors keeps ``__metadata__`` in a Rust ``HashMap`` and writes its keys in an order that
changes from process to process; here they are sorted, so the same input always gives the same bytes.

torch is imported inside the functions that need it (``import lora_ckpt`` stays torch-free).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import ConversionError, OutputPathError, StateDictError, UsageError
from .header import DTYPES, MAX_HEADER_BYTES, PathLike
from .pages import PageBatch

if TYPE_CHECKING:
    import torch

__all__ = ["DATA_ORDER", "byte_view", "safetensors_header", "write_all", "write_safetensors"]

#: safetensors' ``Dtype`` enum in declaration order (the Rust crate sorts the data section by it,
#: descending): increasing alignment, and within one alignment this fixed order.
DATA_ORDER: tuple[str, ...] = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_RANK = {code: i for i, code in enumerate(DATA_ORDER)}
#: bytes per write() of the buffered output (as safetensors' 1 MB BufWriter); larger tensors bypass it
_BUFFER = 1 << 20


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable, zero-copy byte view of a contiguous CPU tensor's memory, without numpy (not a
    dependency of lora-ckpt: ``Tensor.numpy()`` fails where it is not installed). The caller keeps
    ``t`` alive while the view is used.

    Args:
        t: a contiguous tensor on the CPU.

    Returns:
        Its ``numel() * element_size()`` bytes (an empty view for an empty tensor).

    Example:
        >>> byte_view(torch.ones(2, dtype=torch.int16)).tobytes()
        b'\\x01\\x00\\x01\\x00'
    """
    n = t.numel() * t.element_size()
    if n and (t.device.type != "cpu" or not t.is_contiguous()):
        raise ValueError(f"byte_view needs a contiguous CPU tensor; got one on {t.device}, "
                         f"contiguous={t.is_contiguous()}")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


def write_all(f: BinaryIO, t: torch.Tensor) -> None:
    """Write a tensor's bytes to ``f`` (made contiguous first if it is not), however many
    ``write`` calls that takes."""
    t = t.contiguous()
    view = byte_view(t)
    while view:
        n = f.write(view)
        view = view[n:]


def safetensors_header(entries: Sequence[tuple[str, str, Sequence[int], int]],
                       metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes before a safetensors data section: the 8-byte little-endian header length, then
    the header JSON as safetensors writes it (compact, ``__metadata__`` first with its keys sorted,
    padded with spaces to a multiple of 8 bytes).

    Args:
        entries: ``(name, dtype code, shape, nbytes)`` per tensor, in data-section order.
        metadata: the ``__metadata__`` strings, or None for no ``__metadata__`` entry.

    Raises:
        StateDictError: a tensor is named ``__metadata__``.
        UsageError: a metadata key or value is not a string.
        ConversionError: the header would exceed safetensors' 100 MB limit.

    Example:
        >>> safetensors_header([("w", "F32", (2,), 8)])[8:]
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    """
    header: dict[str, object] = {}
    if metadata is not None:
        bad = [repr(k) for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise UsageError(f"safetensors metadata must map strings to strings; {', '.join(bad[:3])} do not")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, code, shape, nbytes in entries:
        if name == "__metadata__":
            raise StateDictError("a tensor named '__metadata__' cannot be stored in safetensors (the name is the "
                                 "header's metadata entry); rename it", key=name)
        header[name] = {"dtype": code, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    if len(raw) > MAX_HEADER_BYTES:
        raise ConversionError(f"the safetensors header would be {len(raw)} bytes, over the format's limit of "
                              f"{MAX_HEADER_BYTES}; write fewer tensors per file")
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: PathLike, *,
                      metadata: Mapping[str, str] | None = None, release_pages: bool = False) -> None:
    """Write ``tensors`` to a safetensors file, byte-identical to ``safetensors.torch.save_file``
    (see the module docstring), one tensor at a time straight from its memory.

    Tensors may be non-contiguous, share storage (views of one stacked tensor) or live on another
    device: each is made contiguous / copied to the CPU only while it is written. The file appears
    only once complete (a temporary sibling renamed over ``path``); on failure nothing is left.

    Args:
        tensors: name -> dense tensor.
        path: the output file.
        metadata: the ``__metadata__`` strings (None: no entry, as ``save_file``'s default).
        release_pages: release memory-mapped inputs' pages as they are written (:class:`.pages.PageBatch`).

    Raises:
        StateDictError: a value is not a dense tensor with data, or its dtype has no safetensors code.
        OutputPathError: writing failed (full disk, permissions); nothing was written.

    Example:
        >>> write_safetensors({"w": torch.zeros(2, 3).T}, "w.safetensors", metadata={"format": "pt"})
    """
    import torch  # torch-free import of lora_ckpt

    codes = {getattr(torch, name): code for code, (_, name) in DTYPES.items()}
    entries = []
    for name, t in tensors.items():
        try:
            name.encode("utf-8")
        except (AttributeError, UnicodeEncodeError):
            raise StateDictError(f"{name!r}: a safetensors tensor name must be a UTF-8 string", key=str(name)) from None
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            what = type(t).__name__ if not isinstance(t, torch.Tensor) else f"{t.layout} tensor on {t.device}"
            raise StateDictError(f"{name!r}: a {what} cannot be written to safetensors; expected a dense tensor "
                                 "with data", key=name)
        if t.dtype not in codes:
            raise StateDictError(f"{name!r}: dtype {t.dtype} has no safetensors code; expected one of "
                                 f"{', '.join(sorted(DTYPES))}; cast it first", key=name)
        entries.append((name, codes[t.dtype], tuple(t.shape), t.numel() * t.element_size()))
    entries.sort(key=lambda e: (-_RANK[e[1]], e[0]))  # code points order as UTF-8 bytes do (Rust's str order)
    header = safetensors_header(entries, metadata)
    expected = len(header) + sum(e[3] for e in entries)
    final = Path(path)
    try:
        with _temporary_sibling(final) as f, PageBatch() as batch:
            f.write(header)
            for name, *_ in entries:
                _write_tensor(f, tensors[name])
                if release_pages:
                    batch.add(tensors[name])
            f.flush()
            if f.tell() != expected:  # a bug here must never produce a plausible file
                raise ConversionError(f"{final}: wrote {f.tell()} bytes, planned {expected}; nothing was written; "
                                      "please report this")
    except OSError as e:
        raise OutputPathError(f"{final}: writing the output failed ({e.strerror or e}); free space or choose "
                              "another output; nothing was written", path=final) from e


def _write_tensor(f: BinaryIO, t: torch.Tensor) -> None:
    """One tensor's bytes, little-endian, from a CPU, contiguous, conjugation-resolved copy only
    where ``t`` is not that already (the copy is freed before the next tensor)."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    unit = t.element_size() // (2 if t.is_complex() else 1)  # complex: two floats, each swapped
    if sys.byteorder == "big" and unit > 1:  # safetensors is little-endian
        import torch

        t = t.contiguous().view(torch.uint8).view(-1, unit).flip(-1)
    write_all(f, t)


@contextlib.contextmanager
def _temporary_sibling(final: Path) -> Iterator[BinaryIO]:
    """A new ``.<name>.tmp-*`` file beside ``final`` (permissions from the umask, as a plain
    ``open``; ``tempfile`` would make it 0600), renamed over ``final`` when the block succeeds and
    removed when it fails. Never truncates ``final`` itself, which may be mapped by the inputs."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb", buffering=_BUFFER) as f:
            yield f
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
