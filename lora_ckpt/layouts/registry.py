"""The layout registry: every :class:`~.base.Layout` subclass defined in a module of this package
(other than the machinery modules) is an entry, in ``order``. Adding a layout is adding one file
here; nothing else lists layout names. Detection picks the entry whose ``detect`` scores highest.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import AmbiguousLayoutError, CheckpointNotFoundError, UnknownLayoutError, UsageError, quote_list
from ..io import PathLike
from .base import Layout
from .source import Source

__all__ = ["LAYOUTS", "Detected", "detect_layout", "get_layout", "layout_names"]

#: the modules of this package that are machinery, not layout entries
MACHINERY = frozenset({"base", "lossy", "placement", "registry", "source", "spec"})


def _discover() -> dict[str, Layout]:
    found: list[Layout] = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name in MACHINERY or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        found += [cls() for cls in vars(module).values()
                  if isinstance(cls, type) and issubclass(cls, Layout) and cls.__module__ == module.__name__
                  and "name" in vars(cls)]
    found.sort(key=lambda lay: (lay.order, lay.name))
    names = [lay.name for lay in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TypeError(f"two layout entries are named {dup}")
    return {lay.name: lay for lay in found}


#: name -> layout entry, in registry order
LAYOUTS: dict[str, Layout] = _discover()


def layout_names() -> list[str]:
    """The registered layout names, in registry order (CLI choices, help texts, tests)."""
    return list(LAYOUTS)


@dataclass
class Detected:
    """A layout found at a path, its resolved source, and why."""

    layout: Layout
    source: Source
    reason: str


def get_layout(name: str) -> Layout:
    """The entry named ``name``.

    Raises:
        UsageError: no such layout.
    """
    try:
        return LAYOUTS[name]
    except KeyError:
        raise UsageError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}") from None


def detect_layout(path: PathLike, *, layout: str | None = None) -> Detected:
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
        return Detected(lay, src, "chosen with --from")
    hits: list[tuple[int, Layout, Source, str]] = []
    for lay in LAYOUTS.values():
        src = lay.locate(p)
        if src is None:
            continue
        found = lay.detect(src)
        if found:
            hits.append((found.score, lay, src, found.reason))
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
    return Detected(lay, src, reason)
