"""Every error lora-ckpt raises on purpose.

Each class also subclasses the builtin a caller would naturally catch (``ValueError``,
``FileNotFoundError``, ...), carries the offending fields as attributes, and has a one-line
message saying what was found, what was expected and what to do. The CLI turns any
:class:`LoraCkptError` into that one line and its ``exit_code``.

Exit codes: 0 ok, 1 refused input (any :class:`LoraCkptError`), 2 usage, 3 verification
found a difference, 4 a hub request failed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AdapterMismatchError",
    "AlreadyWrappedError",
    "AmbiguousCheckpointError",
    "AmbiguousKeyError",
    "AmbiguousLayoutError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConversionError",
    "EntryNotFoundError",
    "HubError",
    "HubPermissionError",
    "IncompleteAdapterError",
    "InvalidRepoIdError",
    "KeyMismatchError",
    "LayoutError",
    "LoraCkptError",
    "LossyConversionError",
    "MergedLayerError",
    "MetaTensorError",
    "MissingConfigError",
    "MissingDependencyError",
    "NotACheckpointError",
    "NotCachedError",
    "OutputExistsError",
    "OutputPathError",
    "QuantizationError",
    "QuantizedMergeError",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "ShapeMismatchError",
    "StateDictError",
    "TargetNotFoundError",
    "UnknownLayoutError",
    "UnsafeCheckpointError",
    "UnsafeRepoError",
    "UnsupportedAdapterError",
    "UnsupportedModuleError",
    "UsageError",
    "VerificationError",
    "quote_list",
]


def quote_list(items: Iterable[Any], limit: int = 5) -> str:
    """Quote items for a message, capped: ``'a', 'b', 'c' and 37 more``."""
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:limit])
    if len(items) > limit:
        shown += f" and {len(items) - limit} more"
    return shown or "(none)"


class LoraCkptError(Exception):
    """Base class of every error lora-ckpt raises on purpose."""

    exit_code: int = 1


class UsageError(LoraCkptError, ValueError):
    """Arguments that cannot work together (the CLI's usage errors)."""

    exit_code = 2


# --------------------------------------------------------------------------------- files
class CheckpointNotFoundError(LoraCkptError, FileNotFoundError):
    """No checkpoint where one was expected."""

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return str(self.args[0])


class CheckpointFormatError(LoraCkptError, ValueError):
    """A file that is not what it claims to be (truncated, malformed header, bad JSON...)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class UnsafeCheckpointError(CheckpointFormatError):
    """A pickle that would need to run code to load; it is never unpickled."""


class AmbiguousCheckpointError(LoraCkptError, ValueError):
    """A directory with several candidate weight files and no way to choose."""

    def __init__(self, message: str, *, path: str | os.PathLike[str], candidates: list[str]) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.candidates = candidates


class ConfigError(CheckpointFormatError):
    """A configuration file (adapter_config.json, params.json, config.json) that is wrong."""


class OutputPathError(LoraCkptError, ValueError):
    """An output path that cannot be used (inside the input, not writable...)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.path = os.fspath(path)


class OutputExistsError(OutputPathError, FileExistsError):
    """The output exists and ``force`` was not given."""


# ---------------------------------------------------------------------- state dicts
class StateDictError(LoraCkptError, ValueError):
    """A state dict that does not fit the model or layer it is loaded into."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ShapeMismatchError(StateDictError):
    """A tensor whose shape differs from the parameter it is loaded into."""

    def __init__(self, message: str, *, key: str, expected: tuple[int, ...], found: tuple[int, ...]) -> None:
        super().__init__(message, key=key)
        self.expected = expected
        self.found = found


class IncompleteAdapterError(StateDictError):
    """Half an adapter: ``lora_A`` without ``lora_B`` or the reverse."""


class AmbiguousKeyError(StateDictError):
    """Two keys of a checkpoint that both claim the same parameter."""


class KeyMismatchError(StateDictError):
    """A strict load whose checkpoint misses keys of the model or has keys it does not know."""

    def __init__(self, message: str, *, missing: list[str], unexpected: list[str]) -> None:
        super().__init__(message, key=next(iter(missing or unexpected), None))
        self.missing = missing
        self.unexpected = unexpected

    @classmethod
    def for_load(cls, source: object, model_name: str, *, missing: list[str],
                 unexpected: list[str]) -> KeyMismatchError:
        """The strict-load error of ``load_checkpoint`` (one process or sharded: the same message)."""
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) of the model: {quote_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {quote_list(unexpected)}")
        return cls(f"{source}: checkpoint does not fit {model_name}: {'; '.join(parts)}; check that it is this "
                   "model's checkpoint, or pass strict=False", missing=missing, unexpected=unexpected)


class MergedLayerError(LoraCkptError, RuntimeError):
    """An operation that is wrong on a merged LoRA layer (or on an unmerged one)."""


class QuantizedMergeError(MergedLayerError):
    """``merge()`` asked of a LoRA layer whose base is quantized (NF4): it cannot hold the merged weight."""


class QuantizationError(StateDictError):
    """A weight that cannot be quantized as asked (a size NF4 cannot block, a non-float dtype)."""

    def __init__(self, message: str, *, key: str | None = None, shape: tuple[int, ...] | None = None) -> None:
        super().__init__(message, key=key)
        self.shape = shape


class MissingDependencyError(LoraCkptError, ImportError):
    """An optional dependency that a requested feature needs is not installed (``pip install lora-ckpt[extra]``)."""

    def __init__(self, message: str, *, package: str, extra: str | None = None) -> None:
        super().__init__(message)
        self.package = package
        self.extra = extra


class TargetNotFoundError(LoraCkptError, ValueError):
    """A LoRA target that matches no ``nn.Linear`` of the model."""

    def __init__(self, message: str, *, targets: list[str], candidates: list[str]) -> None:
        super().__init__(message)
        self.targets = targets
        self.candidates = candidates


class UnsupportedModuleError(LoraCkptError, ValueError):
    """A LoRA target that matches a module lora-ckpt cannot wrap (``nn.Embedding``, a container...).

    ``modules`` maps each such module's name to its class name.
    """

    def __init__(self, message: str, *, modules: dict[str, str]) -> None:
        super().__init__(message)
        self.modules = modules


class AlreadyWrappedError(LoraCkptError, ValueError):
    """An ``inject_lora`` that would wrap nothing new, or that asks for other settings than those of
    modules already wrapped (``modules``: their names)."""

    def __init__(self, message: str, *, modules: list[str]) -> None:
        super().__init__(message)
        self.modules = modules


class AdapterMismatchError(StateDictError):
    """An adapter that does not fit the model it is applied to: modules with no target in the model,
    a rank or scale that differs from the wrapped layer's, or nothing that would change.

    ``modules`` names the adapter modules concerned.
    """

    def __init__(self, message: str, *, modules: list[str]) -> None:
        super().__init__(message, key=modules[0] if modules else None)
        self.modules = modules


class MetaTensorError(LoraCkptError, RuntimeError):
    """Parameters or buffers still on the ``meta`` device after a load (``names``): the model
    cannot run."""

    def __init__(self, message: str, *, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


class NotACheckpointError(LoraCkptError, ValueError):
    """A model checkpoint was expected and an adapter was given (use ``apply_adapter``)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str], layout: str | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.layout = layout


# -------------------------------------------------------------------------- layouts
class LayoutError(LoraCkptError, ValueError):
    """Base for problems with an adapter layout."""

    def __init__(self, message: str, *, layout: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.layout = layout
        self.path = path


class UnknownLayoutError(LayoutError):
    """Nothing in a file or directory looks like a known layout."""


class AmbiguousLayoutError(LayoutError):
    """Several layouts match; ``--from`` chooses."""

    def __init__(self, message: str, *, candidates: list[str], path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.candidates = candidates


class UnsupportedAdapterError(LayoutError):
    """A recognised adapter that lora-ckpt does not convert (AdaLoRA, legacy MergedLinear...)."""


class ConversionError(LoraCkptError, ValueError):
    """A conversion that cannot be done as asked."""


class MissingConfigError(ConversionError):
    """A conversion that needs model dimensions (head counts) that nothing supplied."""


class LossyConversionError(ConversionError):
    """The target layout cannot hold part of the adapter; ``allow_lossy`` drops it."""

    def __init__(self, message: str, *, dropped: list[str]) -> None:
        super().__init__(message)
        self.dropped = dropped


class VerificationError(LoraCkptError, RuntimeError):
    """A result checked after the fact that does not reproduce what it must (a written adapter read
    back, the demo's stock-vs-LoRA logits): a defect found at run time, not bad input. Not an
    ``AssertionError``, which callers and test runners read as a failed assertion of their own."""

    exit_code = 3


class HubError(LoraCkptError, OSError):
    """A Hugging Face Hub request that failed (missing repo or file, no permission...)."""

    exit_code = 4

    def __init__(self, message: str, *, repo_id: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id

    def __str__(self) -> str:
        return str(self.args[0])


class RepoNotFoundError(HubError, FileNotFoundError):
    """A Hub repo that does not exist, or that the token may not see (private)."""


class RevisionNotFoundError(HubError, FileNotFoundError):
    """A branch, tag or commit that the Hub repo does not have."""

    def __init__(self, message: str, *, repo_id: str | None = None, revision: str | None = None) -> None:
        super().__init__(message, repo_id=repo_id)
        self.revision = revision


class EntryNotFoundError(HubError, FileNotFoundError):
    """A file (or the files a layout needs) missing from a Hub repo at a revision."""

    def __init__(self, message: str, *, repo_id: str | None = None, path: str | None = None) -> None:
        super().__init__(message, repo_id=repo_id)
        self.path = path


class HubPermissionError(HubError, PermissionError):
    """A gated repo, a missing or invalid token (401), or no write access (403)."""

    def __init__(self, message: str, *, repo_id: str | None = None, status: int | None = None) -> None:
        super().__init__(message, repo_id=repo_id)
        self.status = status


class NotCachedError(HubError, FileNotFoundError):
    """Offline (``HF_HUB_OFFLINE=1``) or the Hub unreachable, and the files are not in the local cache."""


class UnsafeRepoError(HubError, ValueError):
    """A repo listing with file names that would escape the download directory (``../x``, ``/etc/x``)."""

    def __init__(self, message: str, *, repo_id: str | None = None, paths: list[str] | None = None) -> None:
        super().__init__(message, repo_id=repo_id)
        self.paths = paths or []


class InvalidRepoIdError(HubError, ValueError):
    """A repo id (or ``hf://`` path, revision, branch) that is malformed; refused before any request."""

    exit_code = 2
