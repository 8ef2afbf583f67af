"""``LoRAConv1D``: LoRA for transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``).

``Conv1D`` is a Linear that stores its weight (in, out) and computes ``x @ W + b``. The adapter
is the same as for a Linear (``lora_A`` (r, in), ``lora_B`` (out, r), PEFT's ``fan_in_fan_out``
semantics): only the merge transposes ``scale·B@A`` into the stored layout. The base keeps
Conv1D's own keys and shapes, so a stock GPT-2 checkpoint loads ``strict=True`` and
:func:`~lora_ckpt.inject.stock_state_dict` exports stock (in, out) weights. Importing this module
imports transformers; :mod:`lora_ckpt.inject` does so only for a model that has a ``Conv1D``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layer import LoRALinear

__all__ = ["Conv1D", "LoRAConv1D"]


class LoRAConv1D(LoRALinear):
    """A transformers ``Conv1D`` with a low-rank adapter: ``y = conv(x) + scaling * B(A(dropout(x)))``.

    Same arguments, forward paths (fast, autocast, general), merge and state-dict bridge as
    :class:`~lora_ckpt.layer.LoRALinear`; ``linear`` is the ``Conv1D`` (weight (in, out), always
    a bias).

    Example:
        >>> layer = LoRAConv1D.from_conv1d(gpt2.transformer.h[0].attn.c_attn, r=8, alpha=16)
    """

    base_type = Conv1D
    fan_in_fan_out = True

    @classmethod
    def make_base(cls, in_features: int, out_features: int, *, bias: bool,
                  device: torch.device | str | None, dtype: torch.dtype | None) -> nn.Module:
        if not bias:
            raise ValueError("a transformers Conv1D always has a bias; pass bias=True")
        return Conv1D(out_features, in_features).to(device=device, dtype=dtype)

    @staticmethod
    def base_features(base: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` from Conv1D's (in, out) weight."""
        in_features, out_features = LoRALinear.base_features(base)[::-1]
        return in_features, out_features

    @classmethod
    def from_conv1d(cls, conv: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False) -> LoRAConv1D:
        """Wrap an existing ``Conv1D`` (its weight is shared, not copied)."""
        return cls.from_linear(conv, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
