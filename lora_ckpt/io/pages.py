"""Releasing memory-mapped tensors' resident pages: they leave the process's RSS and stay in the
page cache (re-read from it if touched again), so reading or writing a large adapter through a
mapping holds a batch of it, not all of it. Pages changed in place are never released."""

from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import os
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["RELEASE_BYTES", "PageBatch", "release_file_pages"]

logger = logging.getLogger(__name__)

#: bytes of tensors collected before a :class:`PageBatch` releases them (one ``/proc/self/maps`` read each)
RELEASE_BYTES = 1 << 26
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def release_file_pages(tensors: Iterable[Any]) -> None:
    """Drop this process's resident pages of memory-mapped (file-backed) tensors: they leave the
    process's RSS, stay in the page cache, and are re-read from it if touched again. Tensors in
    anonymous memory are never touched, nor are pages that were written to (a copy-on-write
    mapping's modified pages exist only in this process: ``/proc/self/pagemap`` tells them apart,
    and where it cannot be read nothing is released). Linux only; elsewhere a no-op."""
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
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError:
        logger.debug("/proc/self/pagemap unreadable: memory-mapped pages are not released")
        return
    with pagemap:
        for t in tensors:
            if t is None or not t.numel():
                continue
            start = t.data_ptr()
            end = start + t.numel() * t.element_size()
            i = bisect.bisect_right(starts, start) - 1
            if i < 0 or end > spans[i][1]:
                continue  # not (entirely) inside one file mapping
            a, b = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside the tensor only
            for lo, hi in _unmodified_runs(pagemap, a, b):
                madvise(lo, hi - lo, _MADV_DONTNEED)


def _unmodified_runs(pagemap: Any, a: int, b: int) -> list[tuple[int, int]]:
    """The address ranges in [a, b) without a private (copy-on-write) page: a pagemap entry per page,
    bit 63 present, 62 swapped, 61 file-backed; present and not file-backed, or swapped, is a
    modified page (``Documentation/admin-guide/mm/pagemap.rst``)."""
    if b <= a:
        return []
    n = (b - a) // _PAGE
    raw = os.pread(pagemap.fileno(), n * 8, a // _PAGE * 8)
    if len(raw) != n * 8:
        return []
    entries = memoryview(raw).cast("Q")
    modified = [k for k, e in enumerate(entries) if (e >> 63 and not e >> 61 & 1) or e >> 62 & 1]
    runs, lo = [], 0
    for k in [*modified, n]:
        if k > lo:
            runs.append((a + lo * _PAGE, a + k * _PAGE))
        lo = k + 1
    return runs


class PageBatch:
    """Tensors whose pages may go, released :data:`RELEASE_BYTES` at a time (per-expert views are
    thousands of small tensors: one ``/proc/self/maps`` read per batch, not per tensor).

    Example:
        >>> with PageBatch() as batch:
        ...     for t in tensors.values():
        ...         use(t)
        ...         batch.add(t)
    """

    def __init__(self, limit: int = RELEASE_BYTES) -> None:
        self.limit, self.nbytes = limit, 0
        self.pending: list[Any] = []

    def add(self, t: Any) -> None:
        """Queue ``t``'s pages; release the batch once it holds ``limit`` bytes."""
        self.pending.append(t)
        self.nbytes += t.numel() * t.element_size()
        if self.nbytes >= self.limit:
            self.flush()

    def flush(self) -> None:
        """Release what is queued."""
        if self.pending:
            release_file_pages(self.pending)
        self.pending, self.nbytes = [], 0

    def __enter__(self) -> PageBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
