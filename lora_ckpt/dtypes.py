"""One parser for dtype names, wherever a dtype is taken (``--dtype`` of convert and merge, and the
``dtype=`` of :func:`~lora_ckpt.conversion.convert`, :func:`~lora_ckpt.merge.merge_checkpoint` and
:func:`~lora_ckpt.layouts.save_adapter`): the long torch names and the short forms people type.
Torch-free at import."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from .errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPE_ALIASES", "DtypeLike", "parse_dtype"]

#: accepted name (lower case, ``torch.`` prefix optional) -> torch dtype name
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64",
}

#: a torch dtype or one of its names
DtypeLike = Union["torch.dtype", str]


def parse_dtype(value: DtypeLike | None) -> torch.dtype | None:
    """The torch dtype ``value`` names (None stays None).

    Accepts a ``torch.dtype``, a name from :data:`DTYPE_ALIASES` (``bf16``, ``fp16``, ``fp32``,
    ``bfloat16``, ``torch.float16``, ...; case-insensitive) or another floating-point torch dtype
    name (``float8_e4m3fn``).

    Raises:
        UsageError: not a floating-point dtype name.

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    if value is None:
        return None
    import torch  # only once a dtype is asked for

    if isinstance(value, torch.dtype):
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    dt = getattr(torch, DTYPE_ALIASES.get(name, name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise UsageError(f"dtype {value!r} is not a floating-point dtype; expected one of bf16, fp16, fp32, fp64 "
                         "(or bfloat16, float16, float32, float64)")
    return dt
