"""RoPE row orders of q/k projections (formats.md §12).

HF stores q/k rows rotate-half per head (row ``i`` pairs with ``i + hd/2``); Meta, Mistral,
torchtune-Llama and GGUF interleave them (``2i`` with ``2i+1``). Since ``ΔW = s·B@A``,
permuting W's rows permutes **B only** (and the DoRA magnitude and LoRA bias), never A.
Both functions are pure re-indexings: bit-exact, and inverses of each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConversionError

if TYPE_CHECKING:
    import torch

__all__ = ["interleaved_to_rotate_half", "rotate_half_to_interleaved"]


def _check(t: torch.Tensor, n: int, hd: int) -> None:
    if hd % 2 or t.shape[0] != n * hd:
        raise ConversionError(
            f"cannot permute q/k rows: tensor has {t.shape[0]} rows, expected n_heads*head_dim = {n}*{hd} "
            f"= {n * hd} with an even head_dim; the base config does not match this adapter")


def interleaved_to_rotate_half(t: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    """Meta/torchtune/Mistral row order -> HF. ``t``: (n*hd, ...)."""
    _check(t, n, hd)
    rest = t.shape[1:]
    return t.reshape(n, hd // 2, 2, *rest).transpose(1, 2).reshape(n * hd, *rest).contiguous()


def rotate_half_to_interleaved(t: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    """HF row order -> Meta/torchtune/Mistral. ``t``: (n*hd, ...)."""
    _check(t, n, hd)
    rest = t.shape[1:]
    return t.reshape(n, 2, hd // 2, *rest).transpose(1, 2).reshape(n * hd, *rest).contiguous()
