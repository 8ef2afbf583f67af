"""Checkpoint discovery: which weight files make up a stock checkpoint (a file, a directory with
one weight file, or a shard index)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AmbiguousCheckpointError, CheckpointFormatError, CheckpointNotFoundError, quote_list
from .header import PathLike

__all__ = ["INDEX_SUFFIXES", "WEIGHT_SUFFIXES", "checkpoint_files", "index_shards"]

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
        return index_shards(src) if src.name.endswith(INDEX_SUFFIXES) else [src]
    if not src.is_dir():
        raise CheckpointNotFoundError(f"{src}: no such file or directory", path=src)
    indexes = sorted(p for p in src.iterdir() if p.name.endswith(INDEX_SUFFIXES))
    for index in indexes:  # safetensors index sorts first
        return index_shards(index)
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


def index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` lists (each once, sorted), all beside it.

    Raises:
        CheckpointFormatError: not a shard index.
        CheckpointNotFoundError: a listed shard is missing or not a plain file name.
    """
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
