"""Adapter layouts: one file per ecosystem, discovered by :mod:`.registry`; ``load_adapter`` /
``save_adapter``.

* :mod:`.spec`: what a layout is, as data (files, leaves, naming scheme, :class:`ScalePolicy`,
  features) and :class:`Detection`.
* :mod:`.source`: the resolved input and the read/write options.
* :mod:`.base`: the generic reader and writer (:class:`Layout`).
* :mod:`.placement`: every-layer fill and all-zero module removal; :mod:`.lossy`: the lossy policy.
* :mod:`.registry`: the list of layouts (every ``Layout`` subclass in this package) and detection.
* one file per ecosystem: ``native``, ``peft``, ``torchtune``, ``mistral``, ``simple`` (loralib,
  LLMBook), ``mlx``, ``litgpt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ..adapter import Adapter
from ..dtypes import DtypeLike, parse_dtype
from ..errors import LoraCkptError
from ..families import ModelConfig, load_model_config
from ..io import PathLike, atomic_output
from .base import Layout
from .registry import LAYOUTS, Detected, detect_layout, get_layout, layout_names
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, ScalePolicy

__all__ = ["LAYOUTS", "BaseConfigResolver", "Detected", "Detection", "Layout", "ReadOptions", "ScalePolicy", "Source",
           "WriteOptions", "detect_layout", "get_layout", "layout_names", "load_adapter", "read_detected",
           "save_adapter"]

logger = logging.getLogger(__name__)

#: finds a base model's ``config.json`` from its ``base_model_name_or_path`` (a Hub id): ``(path, note)``
#: or ``(None, why not)``, never raising; :func:`lora_ckpt.hub.fetch_model_config` is the Hub's
BaseConfigResolver = Callable[[str], tuple[Path | None, str | None]]


def _model_config(base_config: PathLike | ModelConfig | None) -> ModelConfig | None:
    if base_config is None or isinstance(base_config, ModelConfig):
        return base_config
    return load_model_config(base_config)


def load_adapter(source: PathLike, *, layout: str | None = None,
                 base_config: PathLike | ModelConfig | None = None, alpha: float | None = None,
                 scan_values: bool = True, resolve_base_config: BaseConfigResolver | None = None) -> Adapter:
    """Read an adapter in any supported layout into the canonical :class:`~lora_ckpt.adapter.Adapter`.

    Args:
        source: a directory or a weight file.
        layout: force a layout instead of detecting it.
        base_config: the base model's ``config.json`` / ``params.json`` (for head counts and family).
        alpha: the alpha for layouts that do not record it (loralib) or to override one.
        scan_values: note tensors holding NaN/Inf (one extra read of the data).
        resolve_base_config: finds the base config from ``base_model_name_or_path`` when no
            ``base_config`` is given and it is not a local folder (pass
            :func:`lora_ckpt.hub.fetch_model_config` to ask the Hub); None: no lookup.

    Example:
        >>> adapter = load_adapter("epoch_0/", base_config="llama/config.json")
    """
    det = detect_layout(source, layout=layout)
    logger.debug("%s: %s layout (%s)", source, det.layout.name, det.reason)
    return read_detected(det, base_config=base_config, alpha=alpha, scan_values=scan_values,
                         resolve_base_config=resolve_base_config)


def read_detected(det: Detected, *, base_config: PathLike | ModelConfig | None = None, alpha: float | None = None,
                  resolve_base_config: BaseConfigResolver | None = None, scan_values: bool = True) -> Adapter:
    """Read a detected source (``det.source.shapes_only`` reads shapes only); find the base model's
    config from ``base_model_name_or_path`` when none was given (a local folder, else through
    ``resolve_base_config``, e.g. the Hub's)."""
    adapter = det.layout.read(det.source, ReadOptions(base_config=_model_config(base_config), alpha=alpha,
                                                      scan_values=scan_values))
    base = adapter.meta.base_model
    if adapter.meta.model_config is None and base:
        cfg, how = None, None
        if (Path(base) / "config.json").is_file():
            cfg = load_model_config(Path(base) / "config.json")
            how = f"base model config read from base_model_name_or_path {base!r}"
        elif resolve_base_config is not None:  # e.g. a Hub repo id; a failure is a note, never an error here
            path, how = resolve_base_config(base)
            if path is not None:
                try:
                    cfg = load_model_config(path)
                except LoraCkptError as e:  # a conversion that needs it raises MissingConfigError later
                    how = f"{how}, but it is not usable: {e}"
        if cfg is not None:
            adapter.meta.model_config = cfg
            adapter.meta.family = adapter.meta.family or (cfg.family.name if cfg.family else None)
        if how:
            adapter.meta.notes.append(how)
    return adapter


def save_adapter(adapter: Adapter, out: PathLike, *, layout: str, base_config: PathLike | ModelConfig | None = None,
                 force: bool = False, allow_lossy: bool = False, dtype: DtypeLike | None = None,
                 inputs: tuple[PathLike, ...] = (),
                 check: Callable[[Path, Adapter], None] | None = None,
                 experts: Literal["keep", "fused", "per-expert"] = "keep") -> Adapter:
    """Write ``adapter`` as directory ``out`` in ``layout``, atomically (temp dir, then rename); a
    single-file layout (gguf) writes the file ``out`` when it ends in the layout's suffix.

    ``check(tmp_dir, written)`` runs before the final rename (``convert`` verifies there).
    Returns the adapter as written (ranks padded, scales folded, parts dropped as the layout
    required), for verification. ``experts`` picks the form of MoE expert LoRA in layouts that
    hold both (PEFT, native): as it is, ``"fused"`` (``target_parameters`` on transformers-5 3-D
    experts) or ``"per-expert"`` (``experts.{e}.gate_proj`` ... modules).

    Raises:
        OutputExistsError: ``out`` exists and not ``force``.
        LossyConversionError: the layout cannot hold part of the adapter and not ``allow_lossy``.
    """
    lay = get_layout(layout)
    cfg = _model_config(base_config)
    single = lay.single_file is not None and os.fspath(out).endswith(lay.single_file)
    with atomic_output(out, force=force, inputs=inputs, is_dir=not single) as tmp:
        opts = WriteOptions(base_config=cfg, allow_lossy=allow_lossy, dtype=parse_dtype(dtype), experts=experts)
        written = lay.write(adapter, tmp, opts)
        if check is not None:  # before the rename: a failed check leaves nothing behind
            check(tmp, written)
    logger.debug("wrote %s layout to %s", lay.name, os.fspath(out))
    return written
