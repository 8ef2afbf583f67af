"""Tensors on disk, torch-free at import: the safetensors header (:mod:`.header`), loading and
writing tensors (:mod:`.tensors`; safetensors streamed by :mod:`.writing`), shapes and dtypes without
torch (:mod:`.index`), checkpoint discovery (:mod:`.discover`), atomic output (:mod:`.output`) and
releasing memory-mapped pages (:mod:`.pages`)."""

from __future__ import annotations

from .discover import INDEX_SUFFIXES, WEIGHT_SUFFIXES, checkpoint_files, index_shards
from .header import DTYPES, MAX_HEADER_BYTES, PathLike, SafetensorsHeader, TensorInfo, read_safetensors_header
from .index import VALUE_SCAN_LIMIT, TensorMeta, nonfinite_tensors, tensor_index
from .output import atomic_output, read_json
from .pages import RELEASE_BYTES, PageBatch, release_file_pages
from .tensors import (
    STATE_DICT_KEYS,
    load_pickle,
    load_safetensors,
    load_tensors,
    nonfinite,
    save_tensors,
    unwrap_state_dict,
)
from .writing import DATA_ORDER, byte_view, safetensors_header, write_all, write_safetensors

__all__ = [
    "DATA_ORDER", "DTYPES", "INDEX_SUFFIXES", "MAX_HEADER_BYTES", "RELEASE_BYTES", "STATE_DICT_KEYS",
    "VALUE_SCAN_LIMIT", "WEIGHT_SUFFIXES", "PageBatch", "PathLike", "SafetensorsHeader", "TensorInfo", "TensorMeta",
    "atomic_output", "byte_view", "checkpoint_files", "index_shards", "load_pickle", "load_safetensors",
    "load_tensors", "nonfinite", "nonfinite_tensors", "read_json", "read_safetensors_header", "release_file_pages",
    "safetensors_header", "save_tensors", "tensor_index", "unwrap_state_dict", "write_all", "write_safetensors",
]
