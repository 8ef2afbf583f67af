"""``init_empty_weights``: build a model with its parameters on ``meta`` and its buffers real.

Why not ``with torch.device("meta")``: that puts *buffers* on meta too, and buffers that no
checkpoint holds (non-persistent ones such as a rotary embedding's ``inv_freq``, computed in
``__init__``) then stay on meta after loading and the first forward fails. Here only parameters
go to meta (accelerate's ``init_empty_weights(include_buffers=False)`` semantics); buffers are
computed for real, and they are small.

Why not depend on accelerate for these ~30 lines: it is not otherwise needed by lora-ckpt (it
would add numpy, psutil and pyyaml to a library whose core needs torch and safetensors), and its
version re-wraps a parameter that is already on meta in a new ``Parameter`` object, which unties
weights that a model ties in ``__init__`` (transformers' ``tie_weights`` assigns the embedding's
parameter to ``lm_head``). Here a parameter already on meta is kept as it is, so ties survive and
:func:`~lora_ckpt.checkpoint.load_checkpoint` can keep them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["init_empty_weights"]

_register_parameter = nn.Module.register_parameter


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Within the block, every parameter a module registers is put on the ``meta`` device (no
    memory, no random init paid); buffers stay on their real device.

    The model is then loaded with :func:`~lora_ckpt.checkpoint.load_checkpoint`, which assigns
    the checkpoint's tensors (memory-mapped for safetensors) as the parameters. Parameters that
    arrive already on ``meta`` keep their identity, so weights tied in ``__init__`` stay tied.
    Not thread-safe: it patches ``nn.Module.register_parameter`` for the duration of the block,
    as accelerate does; nesting is allowed.

    Yields:
        Nothing; build the model inside the block.

    Example:
        >>> with lora_ckpt.init_empty_weights():
        ...     model = AutoModelForCausalLM.from_config(config)
        >>> lora_ckpt.inject_lora(model, targets="all-linear", r=16, alpha=32)
        >>> lora_ckpt.load_checkpoint(model, "llama-3.2-1b/")   # nothing left on meta, or an error
    """
    patched = nn.Module.register_parameter
    nn.Module.register_parameter = _register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = patched  # type: ignore[method-assign]


def _register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _register_parameter(module, name, param)
    if param is None or param.device.type == "meta":
        return
    with torch.no_grad():
        meta = param.to("meta")
    if type(param) is nn.Parameter:
        new = nn.Parameter(meta, requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)  # attributes set on it (transformers' init flags)
    else:  # a Parameter subclass takes its attributes as constructor arguments (as accelerate does it)
        new = type(param)(meta, **{**param.__dict__, "requires_grad": param.requires_grad})
    module._parameters[name] = new
