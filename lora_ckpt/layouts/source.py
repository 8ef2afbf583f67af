"""A resolved input (:class:`Source`) and the read/write options every layout takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..families import ModelConfig
from ..io import TensorMeta, load_tensors, read_json, tensor_index

if TYPE_CHECKING:
    import torch

__all__ = ["ReadOptions", "Source", "WriteOptions"]


@dataclass
class Source:
    """A resolved input: the directory, its weight file, and its config if any (read by
    ``config_reader``: JSON unless the layout says otherwise, e.g. LitGPT's YAML)."""

    path: Path  # what the user passed
    root: Path  # the directory holding the files
    weights: Path
    config_path: Path | None = None
    shapes_only: bool = False  # read shapes and dtypes only (inspect): no torch, no data
    config_reader: Callable[[Path], dict[str, Any]] | None = None
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _index: dict[str, TensorMeta] | None = field(default=None, repr=False)
    _config: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def tensors(self) -> dict[str, Any]:
        """The tensors (``TensorMeta`` stand-ins when ``shapes_only``)."""
        if self.shapes_only:
            return self.index
        if self._tensors is None:
            self._tensors = load_tensors(self.weights)
        return self._tensors

    @property
    def index(self) -> dict[str, TensorMeta]:
        if self._index is None:
            self._index = tensor_index(self.weights)
        return self._index

    def keys(self) -> list[str]:
        """Tensor names, read without tensor data (and without torch where possible)."""
        return list(self.index)

    @property
    def config(self) -> dict[str, Any] | None:
        if self._config is None and self.config_path is not None:
            self._config = (self.config_reader(self.config_path) if self.config_reader is not None
                            else read_json(self.config_path, what=f"{self.config_path.name}"))
        return self._config

    def sibling(self, name: str) -> Path | None:
        p = self.root / name
        return p if p.is_file() else None


@dataclass
class ReadOptions:
    base_config: ModelConfig | None = None
    alpha: float | None = None
    scan_values: bool = True  # look for NaN/Inf (off when a bitwise comparison follows anyway)


@dataclass
class WriteOptions:
    base_config: ModelConfig | None = None
    allow_lossy: bool = False
    dtype: torch.dtype | None = None
    # MoE experts in a layout that holds both forms (PEFT, native): as read, fused target_parameters, or
    # per-expert modules (experts.{e}.gate_proj ...)
    experts: Literal["keep", "fused", "per-expert"] = "keep"
