"""Tensors on disk, torch-free at import: the safetensors header (:mod:`.header`), loading and
writing tensors (:mod:`.tensors`), shapes and dtypes without torch (:mod:`.index`), checkpoint
discovery (:mod:`.discover`) and atomic output (:mod:`.output`)."""

from __future__ import annotations

from .discover import INDEX_SUFFIXES, WEIGHT_SUFFIXES, checkpoint_files, index_shards
from .header import DTYPES, MAX_HEADER_BYTES, PathLike, SafetensorsHeader, TensorInfo, read_safetensors_header
from .index import VALUE_SCAN_LIMIT, TensorMeta, nonfinite_tensors, tensor_index
from .output import atomic_output, read_json
from .tensors import (
    STATE_DICT_KEYS,
    load_pickle,
    load_safetensors,
    load_tensors,
    nonfinite,
    release_file_pages,
    save_tensors,
    unwrap_state_dict,
)

__all__ = [
    "DTYPES", "INDEX_SUFFIXES", "MAX_HEADER_BYTES", "STATE_DICT_KEYS", "VALUE_SCAN_LIMIT", "WEIGHT_SUFFIXES",
    "PathLike", "SafetensorsHeader", "TensorInfo", "TensorMeta", "atomic_output", "checkpoint_files", "index_shards",
    "load_pickle", "load_safetensors", "load_tensors", "nonfinite", "nonfinite_tensors", "read_json",
    "read_safetensors_header", "release_file_pages", "save_tensors", "tensor_index", "unwrap_state_dict",
]
