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

import hashlib
import logging
import math
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import (
    AmbiguousKeyError,
    IncompleteAdapterError,
    MergedLayerError,
    QuantizationError,
    QuantizedMergeError,
    ShapeMismatchError,
    quote_list,
)
from .keys import ADAPTER_PARAMS, ALIASES
from .nf4 import NF4Linear, dequantize, qlora_linear

__all__ = ["DEFAULT_SEED", "LoRALinear", "draw_lora_A"]

logger = logging.getLogger(__name__)

_Layer = TypeVar("_Layer", bound="LoRALinear")

#: the seed fresh adapters are drawn with unless ``inject_lora(seed=...)`` says otherwise
DEFAULT_SEED = 0


def draw_lora_A(r: int, in_features: int, *, name: str, seed: int = DEFAULT_SEED,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh ``lora_A`` (r, in): Kaiming-uniform (a=sqrt(5), as ``nn.Linear``), drawn on the CPU
    from a generator seeded by ``seed`` and the module ``name`` alone. The full shape is always
    drawn, so a sharded model (each rank slicing its rows) and a single process get the same bits,
    whatever the world size, the device or the global RNG state.

    Example:
        >>> a = draw_lora_A(8, 4096, name="model.layers.0.self_attn.q_proj")
    """
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    a = torch.empty(r, in_features, dtype=dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return a


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
        dtype: dtype of all parameters (with ``quantize_base``: the adapters' dtype and the dtype the
            NF4 base is quantized in and dequantized to).
        quantize_base: hold the base weight in NF4 (QLoRA, torchao's ``NF4Tensor`` with torchtune's
            block sizes; see :mod:`lora_ckpt.nf4`). Needs ``pip install lora-ckpt[nf4]``.

    Raises:
        QuantizationError: ``quantize_base`` and NF4 cannot block a weight of this size.
        MissingDependencyError: ``quantize_base`` and torchao is not installed.

    Example:
        >>> layer = LoRALinear(16, 32, r=4, alpha=8)
        >>> layer.load_state_dict(nn.Linear(16, 32).state_dict())  # a stock layer's keys
        <All keys matched successfully>
    """

    linear: nn.Linear  # the base (for LoRAConv1D a transformers Conv1D: same weight/bias attributes)
    lora_A: nn.Linear
    lora_B: nn.Linear

    #: the exact base type whose forward is ``x @ Wᵀ + b`` (the fast path runs only for it)
    base_type: ClassVar[type[nn.Module]] = nn.Linear
    #: the base stores its weight (in, out), as transformers' ``Conv1D`` does, instead of (out, in)
    fan_in_fan_out: ClassVar[bool] = False

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *,
                 dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 quantize_base: bool = False, name: str = "", seed: int = DEFAULT_SEED) -> None:
        super().__init__()
        base = self.make_base(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(self._quantized(base) if quantize_base else base, r=r, alpha=alpha, dropout=dropout,
                    use_rslora=use_rslora, name=name, seed=seed)

    @classmethod
    def make_base(cls, in_features: int, out_features: int, *, bias: bool,
                  device: torch.device | str | None, dtype: torch.dtype | None) -> nn.Module:
        """A new base module of :attr:`base_type` (``nn.Linear`` here)."""
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)

    @staticmethod
    def base_features(base: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of a base module (from its (out, in) weight)."""
        out_features, in_features = _weight_of(base).shape
        return in_features, out_features

    @classmethod
    def from_linear(cls: type[_Layer], linear: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, quantize_base: bool = False, name: str = "",
                    seed: int = DEFAULT_SEED) -> _Layer:
        """Wrap an existing ``nn.Linear`` (its weight is shared, not copied), or an :class:`NF4Linear`.

        The adapter is created on the Linear's device and dtype (``meta`` stays ``meta``); a fresh
        ``lora_A`` is drawn by :func:`draw_lora_A` from ``seed`` and ``name`` (the module's name in
        the model; when empty, the name it is loaded under). With ``quantize_base`` the weight is
        quantized to NF4 instead of shared (the bias is shared).
        """
        quantized = isinstance(linear, NF4Linear) and not cls.fan_in_fan_out
        if not isinstance(linear, cls.base_type) and not quantized:
            raise TypeError(f"{cls.__name__}.from_linear expects an {cls.base_type.__name__}, "
                            f"got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        base = cls._quantized(linear) if quantize_base and not quantized else linear
        self._setup(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, name=name, seed=seed)
        return self

    @classmethod
    def _quantized(cls, base: nn.Module) -> NF4Linear:
        if cls.fan_in_fan_out or not isinstance(base, nn.Linear):
            raise QuantizationError(
                f"quantize_base=True for a {type(base).__name__} base: expected an nn.Linear (NF4 bases are "
                "Linear-only); leave this layer unquantized", shape=tuple(_weight_of(base).shape))
        return NF4Linear.from_linear(base)

    @property
    def quantized(self) -> bool:
        """Whether the base weight is NF4 (``quantize_base=True``)."""
        return isinstance(self.linear, NF4Linear)

    def _setup(self, linear: nn.Module, *, r: int, alpha: float, dropout: float, use_rslora: bool,
               name: str, seed: int) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        w = linear.weight
        self.in_features, self.out_features = self.base_features(linear)
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.linear = linear  # type: ignore[assignment]  # nn.Linear or a Conv1D
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.lora_name, self.lora_seed = name, seed
        self.linear.requires_grad_(False)
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        """The adapter's scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_lora_parameters(self) -> None:
        """A fresh (:func:`draw_lora_A`: seeded by ``lora_seed`` and ``lora_name``), B zero: a no-op that trains."""
        a = self.lora_A.weight
        if a.device.type != "meta":
            with torch.no_grad():
                a.copy_(draw_lora_A(self.r, self.in_features, name=self.lora_name, seed=self.lora_seed, dtype=a.dtype))
                self.lora_B.weight.zero_()

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"
                + (", rslora" if self.use_rslora else "") + (", nf4 base" if self.quantized else "")
                + (", merged" if self.merged else ""))

    # ------------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.linear(x)
        w, bias = self.linear.weight, self.linear.bias
        a, b = self.lora_A.weight, self.lora_B.weight
        if self.fan_in_fan_out:
            w = w.t()  # (out, in) view of the (in, out) weight: the GEMMs read it transposed, no copy
        quantized = self.quantized  # NF4 base: dequantized inside the GEMMs (nf4.dequantize), never saved
        fused = qlora_linear if quantized else _LoRAFunction.apply
        frozen = ((quantized or type(self.linear) is self.base_type) and not w.requires_grad
                  and (bias is None or not bias.requires_grad)
                  and (isinstance(self.dropout, nn.Identity) or not self.training))
        amp = _autocast_dtype(x)
        if frozen and amp is None and x.dtype == (x.dtype if quantized else w.dtype) == a.dtype == b.dtype:
            return fused(x, w, bias, a, b, self.scaling)
        if frozen and amp is not None and all(t.dtype in _AMP_ELIGIBLE for t in (x, w, a, b)):
            # Autocast casts every floating input of a matmul to ``amp`` (as it would for the two
            # F.linear calls of PEFT's forward); do those casts once here and run the same two
            # GEMMs in ``amp`` with autocast off, so the in-place accumulation sees one dtype.
            with torch.autocast(x.device.type, enabled=False):
                return fused(x.to(amp), w if quantized else w.to(amp), None if bias is None else bias.to(amp),
                             a.to(amp), b.to(amp), self.scaling)
        return self._general_forward(x)

    def _general_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base trains, dropout active, mixed dtypes, Linear subclasses: autograd over the same
        two GEMMs, the adapter GEMM adding into the base output of a 2-D input. Under autocast
        every matmul runs in autocast's dtype, as in PEFT."""
        a, b = self.lora_A.weight, self.lora_B.weight
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out = self.linear(x2)
        h = F.linear(self.dropout(x2).to(a.dtype), a)
        out.addmm_(h.to(out.dtype), b.t().to(out.dtype), alpha=self.scaling)
        return out.view(*lead, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in float32, shape (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _stored_delta(self) -> torch.Tensor:
        d = self.delta_weight()
        return d.t() if self.fan_in_fan_out else d

    def merged_weight(self) -> torch.Tensor:
        """``linear.weight + scaling * B @ A`` as the base stores it ((in, out) for ``fan_in_fan_out``),
        computed in float32 and cast once to the weight's dtype; the layer is not modified. An NF4 base
        is dequantized first: the adapter merges into the weight the quantized model computes with."""
        w = self.linear.weight.detach()
        if self.quantized:
            w = dequantize(w, w.dtype)
        return w if self.merged else (w.float() + self._stored_delta()).to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``linear.weight`` (computed in float32, cast back once).

        A quantized (NF4) base refuses: NF4 cannot hold ``W + scaling·B·A`` (re-quantizing would round
        the merged weight by up to half a code step per element, so the merged layer would no longer
        compute what was trained, and ``unmerge`` could not give the base back), and merging into a
        dense copy would bring back the memory the quantization was chosen to save. To ship a merged
        model use :func:`lora_ckpt.stock_state_dict` (the dequantized base plus the adapter, the weights
        the quantized model computes with) or ``lora-ckpt merge`` (the bf16 original plus the adapter).

        Raises:
            MergedLayerError: the layer is already merged.
            QuantizedMergeError: the base is NF4.
        """
        if self.quantized:
            raise QuantizedMergeError(
                "merge() of a LoRALinear with an NF4 base: NF4 cannot hold the merged weight exactly; expected a "
                "dense base; export with lora_ckpt.stock_state_dict(model) (dequantized base + adapter) or merge "
                "the bf16 original with `lora-ckpt merge`")
        if self.merged:
            raise MergedLayerError("layer is already merged; call unmerge() first")
        self.linear.weight.copy_(self.merged_weight())
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
        w.copy_((w.float() - self._stored_delta()).to(w.dtype))
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
        a = draw_lora_A(self.r, self.in_features, name=self.lora_name or prefix[:-1], seed=self.lora_seed,
                        dtype=like.dtype)
        state_dict[prefix + "lora_A.weight"] = a.to(device)
        state_dict[prefix + "lora_B.weight"] = torch.zeros(self.out_features, self.r, device=device, dtype=like.dtype)


def _weight_of(base: nn.Module) -> torch.Tensor:
    w = base.weight
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise TypeError(f"{type(base).__name__} has no 2-D weight; LoRA layers wrap Linear-like modules")
    return w


#: dtypes autocast casts (float64 is left alone, so a float64 input takes the general path)
_AMP_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


#: device type -> whether autocast exists for it (``meta`` has none); filled on first use
_AMP_AVAILABLE: dict[str, bool] = {}


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``x``'s device, or None when autocast is off there."""
    device = x.device.type
    available = _AMP_AVAILABLE.get(device)
    if available is None:
        available = _AMP_AVAILABLE[device] = torch.amp.is_autocast_available(device)
    if available and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


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
