"""Output: a file or directory appears complete or not at all (temp sibling, then rename), with the
permissions the process umask gives ordinary files (not the 0600/0700 of temp files); JSON in."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFoundError, ConfigError, OutputExistsError, OutputPathError
from .header import PathLike

__all__ = ["atomic_output", "ordinary_permissions", "process_umask", "read_json"]

_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


_UMASK_LOCK = threading.Lock()


def process_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # set and restore: the only portable way to read it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def ordinary_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the mode ``open()``/``mkdir()`` would have given under
    the process umask (files 0666, directories 0777, less the umask): temp files and directories
    (``mkstemp``, ``mkdtemp``, safetensors' own temp file) are created 0600/0700."""
    mask = process_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if root.is_symlink() or not root.exists():
        return
    if root.is_file():
        os.chmod(root, file_mode)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, file_mode)
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dir_mode)
    os.chmod(root, dir_mode)


@contextlib.contextmanager
def atomic_output(path: PathLike, *, force: bool = False, is_dir: bool = True,
                  inputs: tuple[PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Nothing that looks like a finished output ever exists before the rename; an exception
    (or a kill) leaves at most a hidden ``.<name>.tmp-*`` sibling. What appears has the
    permissions the umask gives ordinary files and directories (:func:`ordinary_permissions`).

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
        ordinary_permissions(target)
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
