"""Module and key names, torch-free: the one layer-index parser, the one template -> regex, and
:class:`NameMap`, a bijective table of key templates (``{}`` is a layer or expert index) usable in
both directions."""

from __future__ import annotations

import re
from functools import cache, cached_property
from typing import Literal, NamedTuple

__all__ = ["EMBEDDING_LEAVES", "IDENTITY", "LayerName", "NameMap", "Scheme", "is_embedding", "parse_layer",
           "template_regex"]

#: how a layout names a model's modules: HF's own paths, or one of the tables in
#: :mod:`lora_ckpt.families.tables`
Scheme = Literal["hf", "torchtune", "meta", "litgpt", "torchtitan"]

#: leaf names of token-embedding modules (LoRA on them is an embedding LoRA, ΔW transposed)
EMBEDDING_LEAVES = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embed_in")


def is_embedding(module: str) -> bool:
    """Whether ``module`` (any naming scheme) is a token embedding."""
    return module.rsplit(".", 1)[-1] in EMBEDDING_LEAVES


class LayerName(NamedTuple):
    """A module path inside a block list: ``model.layers.3.self_attn.q_proj`` is
    ``LayerName("model.layers.", 3, "self_attn.q_proj")``."""

    prefix: str  # up to and including the block list and its dot ("model.layers.")
    number: int  # the block's index
    rest: str  # the block-relative path

    @property
    def container(self) -> str:
        """The block list's path (``model.layers``)."""
        return self.prefix[:-1]


@cache
def _layer_regex(containers: tuple[str, ...]) -> re.Pattern[str]:
    names = "|".join(map(re.escape, containers))
    return re.compile(rf"^(?P<pre>(?:.*?\.)?(?:{names})\.)(?P<i>\d+)\.(?P<rest>.+)$")


def parse_layer(name: str, *, containers: tuple[str, ...] = ("layers",)) -> LayerName | None:
    """The (first) block of ``name``, a module path or key: the segment after a ``containers``
    segment (``layers``; GPT-2 and LitGPT also use ``h``) that is a number. None outside blocks.

    Example:
        >>> parse_layer("model.layers.3.self_attn.q_proj")
        LayerName(prefix='model.layers.', number=3, rest='self_attn.q_proj')
    """
    m = _layer_regex(containers).match(name)
    return LayerName(m["pre"], int(m["i"]), m["rest"]) if m else None


def template_regex(template: str) -> re.Pattern[str]:
    """A key template (``model.layers.{}.mlp.experts.{}.w1``) as an anchored-by-``fullmatch``
    pattern, each ``{}`` one captured index."""
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


class NameMap:
    """A bijective table of key templates, usable in both directions."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self._fwd = [(template_regex(k), v) for k, v in table.items()]
        self._rev = [(template_regex(v), k) for k, v in table.items()]

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
        for regex, target in rules:
            m = regex.fullmatch(key)
            if m:
                return target.format(*m.groups())
        return None

    def to_other(self, hf_key: str) -> str | None:
        """HF key -> this scheme's key (None if the table has no such key)."""
        return self._apply(self._fwd, hf_key)

    def to_hf(self, key: str) -> str | None:
        """This scheme's key -> HF key (None if the table has no such key)."""
        return self._apply(self._rev, key)

    @cached_property
    def modules(self) -> NameMap:
        """The same map on module paths (the entries whose parameter is ``weight`` on both sides)."""
        return NameMap({k[: -len(".weight")]: v[: -len(".weight")] for k, v in self.table.items()
                        if k.endswith(".weight") and v.endswith(".weight")})


IDENTITY = NameMap({})
