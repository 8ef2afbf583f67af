"""Key dialects and key parsing, torch-free.

:data:`KEY_DIALECTS` is the one table of how LoRA implementations name the parameters of a
LoRA-wrapped Linear; ``LoRALinear`` accepts all of them when loading. :func:`split_key`
parses a checkpoint key into (module path, adapter part, parameter) with an anchored
pattern: keys are never substring-matched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ADAPTER_LEAVES", "ADAPTER_PARAMS", "ALIASES", "BASE_PARAMS", "KEY_DIALECTS", "LEAF_ROLES",
           "TRANSPOSED_LEAVES", "KeyDialect", "matches_target", "split_key"]

BASE_PARAMS = ("linear.weight", "linear.bias")
ADAPTER_PARAMS = ("lora_A.weight", "lora_B.weight")


@dataclass(frozen=True)
class KeyDialect:
    """How one implementation names the parameters of a LoRA-wrapped Linear.

    ``keys`` maps our parameter name (``linear.weight``, ``linear.bias``, ``lora_A.weight``,
    ``lora_B.weight``) to the suffix that implementation uses under the module's prefix.
    """

    name: str
    keys: Mapping[str, str]


#: Every key dialect a ``LoRALinear`` accepts when loading. Add a dialect here, nowhere else.
KEY_DIALECTS: tuple[KeyDialect, ...] = (
    KeyDialect("lora_ckpt", {p: p for p in BASE_PARAMS + ADAPTER_PARAMS}),
    KeyDialect("stock", {"linear.weight": "weight", "linear.bias": "bias"}),
    KeyDialect("peft", {"linear.weight": "base_layer.weight", "linear.bias": "base_layer.bias",
                        "lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight"}),
    KeyDialect("peft-in-memory", {"linear.weight": "base_layer.weight", "linear.bias": "base_layer.bias",
                                  "lora_A.weight": "lora_A.default.weight", "lora_B.weight": "lora_B.default.weight"}),
    KeyDialect("torchtune", {"linear.weight": "weight", "linear.bias": "bias",
                             "lora_A.weight": "lora_a.weight", "lora_B.weight": "lora_b.weight"}),
    KeyDialect("mistral-finetune", {"linear.weight": "frozen_W.weight",
                                    "lora_A.weight": "lora_A.weight", "lora_B.weight": "lora_B.weight"}),
    KeyDialect("loralib", {"linear.weight": "weight", "linear.bias": "bias",
                           "lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}),
    KeyDialect("llmbook", {"linear.weight": "weight", "linear.bias": "bias",
                           "lora_A.weight": "A.weight", "lora_B.weight": "B.weight"}),
)


def _aliases() -> dict[str, tuple[str, ...]]:
    """Our parameter name -> every suffix that may carry it, in table order, de-duplicated."""
    out: dict[str, list[str]] = {p: [] for p in BASE_PARAMS + ADAPTER_PARAMS}
    for dialect in KEY_DIALECTS:
        for ours, theirs in dialect.keys.items():
            if theirs not in out[ours]:
                out[ours].append(theirs)
    return {k: tuple(v) for k, v in out.items()}


#: Our parameter name -> every suffix (in :data:`KEY_DIALECTS` order) that may carry it when loading.
ALIASES: dict[str, tuple[str, ...]] = _aliases()

#: The one list of adapter leaves (the part of a key after the module path) any known implementation
#: uses, with the part each holds: factor ``A`` / ``B`` (embedding factors too), DoRA ``magnitude``,
#: LoRA ``bias``. Every layout entry's ``leaves`` are taken from here (a test checks it).
LEAF_ROLES: dict[str, str] = {
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias",  # PEFT, native, mistral
    "lora_a.weight": "A", "lora_b.weight": "B", "magnitude": "magnitude",  # torchtune
    "lora_magnitude_vector": "magnitude", "lora_embedding_A": "A", "lora_embedding_B": "B",  # PEFT
    "lora_magnitude": "magnitude", "lora_embedding_A.weight": "A", "lora_embedding_B.weight": "B",  # native
    "lora_A": "A", "lora_B": "B",  # loralib, LitGPT
    "lora_a": "A", "lora_b": "B", "m": "magnitude",  # mlx-lm
    "A.weight": "A", "B.weight": "B",  # LLMBook
    "lora_down.weight": "A", "lora_up.weight": "B", "dora_scale": "magnitude",  # kohya / diffusers (read only)
}
#: leaves stored transposed, A (in, r) and B (r, out): mlx-lm
TRANSPOSED_LEAVES = ("lora_a", "lora_b")
#: every adapter leaf name
ADAPTER_LEAVES = tuple(LEAF_ROLES)
_LEAF_RE = re.compile(r"^(?P<module>.+?)\.(?P<leaf>" + "|".join(
    re.escape(x) for x in sorted(ADAPTER_LEAVES, key=len, reverse=True)) + r")$")


def split_key(key: str) -> tuple[str, str] | None:
    """``"model.layers.0.q_proj.lora_A.weight"`` -> ``("model.layers.0.q_proj", "lora_A.weight")``.

    Returns None for a key that is not an adapter tensor of any known layout. The match is
    anchored at the end and at a dot boundary.
    """
    m = _LEAF_RE.match(key)
    return (m["module"], m["leaf"]) if m else None


def matches_target(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a full regex match; a list entry matches the exact name or a
    ``.``-delimited suffix of it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
