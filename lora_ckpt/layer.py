"""``LoRALinear``: an inner ``nn.Linear`` plus ``lora_A``/``lora_B``, whose state-dict hooks accept
stock checkpoints and the key dialects of other LoRA implementations.

The bridge is one declarative table, :data:`lora_ckpt.keys.KEY_DIALECTS`: for each dialect, the key suffix
each of our four parameters has there. When a checkpoint is loaded, the keys under a layer's
prefix are renamed to ours before torch sees them, so ``load_state_dict(strict=True)`` works
with a stock ``weight``/``bias`` and reports nothing extra or missing. When only a stock base
arrives, the adapter is (re)initialised as a trainable no-op (A Kaiming-uniform, B zero) by
putting those tensors into the state dict itself: no hook ever edits ``missing_keys``, so a
checkpoint that misses any *other* key still fails a strict load.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import (
    AmbiguousKeyError,
    IncompleteAdapterError,
    MergedLayerError,
    ShapeMismatchError,
    quote_list,
)
from .keys import ADAPTER_PARAMS, ALIASES

__all__ = ["LoRALinear"]

logger = logging.getLogger(__name__)


class LoRALinear(nn.Module):
    """A Linear layer with a low-rank adapter: ``y = linear(x) + scaling * B(A(dropout(x)))``.

    The base ``linear`` is frozen; only ``lora_A`` and ``lora_B`` train. ``scaling`` is
    ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    Args:
        in_features: input size.
        out_features: output size.
        r: adapter rank (> 0).
        alpha: adapter alpha.
        dropout: dropout probability applied to the adapter's input.
        bias: whether the base Linear has a bias.
        use_rslora: use ``alpha / sqrt(r)`` as the scale.
        device: device of all parameters.
        dtype: dtype of all parameters.

    Example:
        >>> layer = LoRALinear(16, 32, r=4, alpha=8)
        >>> layer.load_state_dict(nn.Linear(16, 32).state_dict())  # a stock layer's keys
        <All keys matched successfully>
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *,
                 dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False) -> LoRALinear:
        """Wrap an existing ``nn.Linear`` (its weight is shared, not copied).

        The adapter is created on the Linear's device and dtype (``meta`` stays ``meta``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        return self

    def _setup(self, linear: nn.Linear, *, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        w = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.linear = linear
        self.lora_A = nn.Linear(linear.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.linear.requires_grad_(False)
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        """The adapter's scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a=sqrt(5), as ``nn.Linear``), B zero: a no-op that trains."""
        if self.lora_A.weight.device.type != "meta":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                self.lora_B.weight.zero_()

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"
                + (", rslora" if self.use_rslora else "") + (", merged" if self.merged else ""))

    # ------------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        w, bias = self.linear.weight, self.linear.bias
        a, b = self.lora_A.weight, self.lora_B.weight
        fast = (type(self.linear) is nn.Linear and not w.requires_grad and (bias is None or not bias.requires_grad)
                and x.dtype == w.dtype == a.dtype == b.dtype
                and (isinstance(self.dropout, nn.Identity) or not self.training))
        if fast:
            return _LoRAFunction.apply(x, w, bias, a, b, self.scaling)
        # General path (base trains, dropout active, mixed dtypes, Linear subclasses): autograd
        # over the same two GEMMs, the adapter GEMM adding into the base output of a 2-D input.
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out = self.linear(x2)
        h = F.linear(self.dropout(x2).to(a.dtype), a)
        out.addmm_(h.to(out.dtype), b.t().to(out.dtype), alpha=self.scaling)
        return out.view(*lead, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in float32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``linear.weight`` (computed in float32, cast back once).

        Raises:
            MergedLayerError: the layer is already merged.
        """
        if self.merged:
            raise MergedLayerError("layer is already merged; call unmerge() first")
        w = self.linear.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from ``linear.weight`` again (exact up to float32 rounding).

        Raises:
            MergedLayerError: the layer is not merged.
        """
        if not self.merged:
            raise MergedLayerError("layer is not merged; nothing to unmerge")
        w = self.linear.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    # ------------------------------------------------------------------- state dicts
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if self.merged:
            raise MergedLayerError(
                f"{prefix[:-1] or 'layer'}: saving a merged LoRALinear would store the adapter twice "
                "(in the weight and in lora_A/lora_B); call unmerge() first, or export with "
                "lora_ckpt.stock_state_dict(model)")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        found = self._canonicalize(state_dict, prefix)
        has_base = prefix + "linear.weight" in found
        adapter = [p for p in ADAPTER_PARAMS if prefix + p in found]
        if len(adapter) == 1:
            present = adapter[0]
            absent = next(p for p in ADAPTER_PARAMS if p != present)
            raise IncompleteAdapterError(
                f"{prefix[:-1]}: checkpoint has {present.split('.')[0]} but not {absent.split('.')[0]}; "
                "expected both or neither; the adapter file is incomplete (re-export it, or drop both "
                "keys to start the adapter fresh)", key=prefix + absent)
        self._check_shapes(state_dict, prefix)
        if has_base and not adapter:
            self._fresh_adapter(state_dict, prefix, assign=bool(local_metadata.get("assign_to_params_buffers")))
        if has_base:
            self.merged = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _canonicalize(self, state_dict: dict[str, Any], prefix: str) -> set[str]:
        """Rename every dialect's keys under ``prefix`` to ours, in place; return our keys found."""
        found = set()
        for ours, suffixes in ALIASES.items():
            hits = [prefix + s for s in suffixes if prefix + s in state_dict]
            if len(hits) > 1:
                raise AmbiguousKeyError(
                    f"{prefix[:-1]}: keys {quote_list(hits)} all carry {ours}; expected one; the checkpoint "
                    "mixes two layouts (remove one of them)", key=hits[1])
            if hits:
                if hits[0] != prefix + ours:
                    state_dict[prefix + ours] = state_dict.pop(hits[0])
                found.add(prefix + ours)
        return found

    def _check_shapes(self, state_dict: dict[str, Any], prefix: str) -> None:
        for name, param in (("linear.weight", self.linear.weight), ("linear.bias", self.linear.bias),
                            ("lora_A.weight", self.lora_A.weight), ("lora_B.weight", self.lora_B.weight)):
            t = state_dict.get(prefix + name)
            if t is None or param is None or not isinstance(t, torch.Tensor) or t.shape == param.shape:
                continue
            if name.startswith("lora"):
                found_r = t.shape[0] if name == "lora_A.weight" else t.shape[-1]
                cause = (f"the adapter has rank {found_r}, this layer rank {self.r}; build the layer with "
                         f"r={found_r}" if t.dim() == 2 and found_r != self.r else
                         "the adapter was trained for another model")
            else:
                cause = "the checkpoint is of another model (or another layer was wrapped)"
            raise ShapeMismatchError(
                f"{prefix}{name}: checkpoint shape {tuple(t.shape)}, expected {tuple(param.shape)}; {cause}",
                key=prefix + name, expected=tuple(param.shape), found=tuple(t.shape))

    def _fresh_adapter(self, state_dict: dict[str, Any], prefix: str, *, assign: bool) -> None:
        """A stock base arrived: put a fresh trainable no-op adapter into the state dict."""
        base = state_dict[prefix + "linear.weight"]
        like = base if assign or self.lora_A.weight.device.type == "meta" else self.lora_A.weight
        device = like.device if like.device.type != "meta" else torch.device("cpu")
        a = torch.empty(self.r, self.in_features, device=device, dtype=like.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        state_dict[prefix + "lora_A.weight"] = a
        state_dict[prefix + "lora_B.weight"] = torch.zeros(self.out_features, self.r, device=device, dtype=like.dtype)


class _LoRAFunction(torch.autograd.Function):
    """``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` for a frozen base, with no pass over the (T, out) output
    that the math does not need: the small product ``hs = s·x·Aᵀ`` (T, r) is computed first, then
    ``hs·Bᵀ (+ b)`` seeds the output and the big GEMM accumulates onto it (beta=1, in cuBLAS's
    epilogue). Backward likewise accumulates the input gradient in one GEMM, saves only ``x`` and
    the (T, r) activation, and never copies the (T, out) gradient."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        x2 = x.reshape(-1, x.shape[-1])
        hs = torch.mm(x2, a.t()).mul_(s)
        out = torch.mm(hs, b.t()) if bias is None else torch.addmm(bias, hs, b.t())
        out.addmm_(x2, w.t())
        ctx.save_for_backward(x, w, a, b, hs)
        ctx.s = s
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, w, a, b, hs = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        gh = torch.mm(g2, b).mul_(ctx.s)  # (T, r)
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(gh, a).addmm_(g2, w).view(x.shape)
        if ctx.needs_input_grad[3]:
            ga = torch.mm(gh.t(), x.reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[4]:
            gb = torch.mm(g2.t(), hs)
        return gx, None, None, ga, gb, None
