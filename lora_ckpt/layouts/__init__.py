"""The layout registry: one entry per ecosystem; detection; ``load_adapter`` / ``save_adapter``.

Adding an ecosystem is adding one :class:`~lora_ckpt.layouts.base.Layout` subclass to
:data:`LAYOUTS` (plus its tests).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import Adapter
from ..errors import (
    AmbiguousLayoutError,
    CheckpointNotFoundError,
    LoraCkptError,
    UnknownLayoutError,
    UsageError,
    quote_list,
)
from ..families import ModelConfig, load_model_config
from ..io import PathLike, atomic_output
from .base import Layout, ReadOptions, Source, WriteOptions
from .gguf import GgufLayout
from .litgpt import LitgptLayout
from .mistral import MistralLayout
from .mlx import MlxLayout
from .native import NativeLayout
from .peft import PeftLayout
from .simple import LlmbookLayout, LoralibLayout
from .torchtune import TorchtuneLayout

if TYPE_CHECKING:
    import torch

__all__ = ["LAYOUTS", "BaseConfigResolver", "Detection", "detect_layout", "get_layout", "load_adapter", "read_detected",
           "save_adapter"]

logger = logging.getLogger(__name__)

#: finds a base model's ``config.json`` from its ``base_model_name_or_path`` (a Hub id): ``(path, note)``
#: or ``(None, why not)``, never raising; :func:`lora_ckpt.hub.fetch_model_config` is the Hub's
BaseConfigResolver = Callable[[str], tuple[Path | None, str | None]]

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    NativeLayout(), PeftLayout(), TorchtuneLayout(), MistralLayout(), LoralibLayout(), LlmbookLayout(),
    MlxLayout(), LitgptLayout(), GgufLayout())}


class Detection:
    """A layout found at a path, and why."""

    def __init__(self, layout: Layout, source: Source, reason: str) -> None:
        self.layout, self.source, self.reason = layout, source, reason


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise UsageError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}") from None


def detect_layout(path: PathLike, *, layout: str | None = None) -> Detection:
    """Which layout ``path`` (a file or directory) is in, and why.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        UnknownLayoutError: nothing matches.
        AmbiguousLayoutError: several layouts match equally well (``layout`` chooses).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or directory", path=p)
    if layout is not None:
        lay = get_layout(layout)
        src = lay.locate(p)
        if src is None:
            raise UnknownLayoutError(f"{p}: no {lay.name} weight file ({quote_list(lay.weight_files)}) here",
                                     layout=lay.name, path=str(p))
        return Detection(lay, src, "chosen with --from")
    hits: list[tuple[int, Layout, Source, str]] = []
    for lay in LAYOUTS.values():
        src = lay.locate(p)
        if src is None:
            continue
        found = lay.detect(src)
        if found:
            hits.append((found[0], lay, src, found[1]))
    if not hits:
        listing = [f.name for f in p.iterdir()] if p.is_dir() else [p.name]
        raise UnknownLayoutError(
            f"{p}: no known adapter layout ({', '.join(LAYOUTS)}) matches {quote_list(sorted(listing))}; "
            "pass --from LAYOUT if you know it", path=str(p))
    best = max(h[0] for h in hits)
    top = [h for h in hits if h[0] == best]
    if len(top) > 1:
        raise AmbiguousLayoutError(
            f"{p}: matches {len(top)} layouts equally ({'; '.join(f'{h[1].name}: {h[3]}' for h in top)}); "
            "pass --from LAYOUT to choose", candidates=[h[1].name for h in top], path=str(p))
    _, lay, src, reason = top[0]
    return Detection(lay, src, reason)


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


def read_detected(det: Detection, *, base_config: PathLike | ModelConfig | None = None, alpha: float | None = None,
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
                 force: bool = False, allow_lossy: bool = False, dtype: torch.dtype | None = None,
                 inputs: tuple[PathLike, ...] = (),
                 check: Callable[[Path, Adapter], None] | None = None) -> Adapter:
    """Write ``adapter`` as directory ``out`` in ``layout``, atomically (temp dir, then rename); a
    single-file layout (gguf) writes the file ``out`` when it ends in the layout's suffix.

    ``check(tmp_dir, written)`` runs before the final rename (``convert`` verifies there).
    Returns the adapter as written (ranks padded, scales folded, parts dropped as the layout
    required), for verification.

    Raises:
        OutputExistsError: ``out`` exists and not ``force``.
        LossyConversionError: the layout cannot hold part of the adapter and not ``allow_lossy``.
    """
    lay = get_layout(layout)
    cfg = _model_config(base_config)
    single = lay.single_file is not None and os.fspath(out).endswith(lay.single_file)
    with atomic_output(out, force=force, inputs=inputs, is_dir=not single) as tmp:
        written = lay.write(adapter, tmp, WriteOptions(base_config=cfg, allow_lossy=allow_lossy, dtype=dtype))
        if check is not None:  # before the rename: a failed check leaves nothing behind
            check(tmp, written)
    logger.debug("wrote %s layout to %s", lay.name, os.fspath(out))
    return written
