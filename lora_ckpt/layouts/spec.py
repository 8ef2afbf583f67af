"""What a layout *is*, declaratively: its files, leaves, naming scheme, scale policy and features,
and the key grammar that follows from them (``<prefix><module>.<leaf>``). A layout entry sets
these class attributes; :mod:`.base` turns them into a reader and a writer."""

from __future__ import annotations

import re
from enum import Enum
from functools import cached_property
from typing import ClassVar, Literal, NamedTuple

from ..families import NameMap, Scheme, is_embedding
from ..keys import LEAF_ROLES

__all__ = ["Detection", "Feature", "LayoutSpec", "Role", "ScalePolicy"]

#: a tensor's part in a module: factors (of a Linear, or of an Embedding), DoRA magnitude, LoRA bias
Role = Literal["A", "B", "magnitude", "bias", "emb_A", "emb_B"]
#: what a layout can hold beyond plain Linear LoRA (the lossy policy drops the rest)
Feature = Literal["dora", "bias", "embedding", "extra", "fan_in_fan_out"]


class ScalePolicy(Enum):
    """How a layout records scales (``alpha / r``)."""

    PER_MODULE = "per-module"  #: each module keeps its own scale (PEFT's patterns, native)
    GLOBAL = "global"  #: one scale (and one rank) for the whole adapter: ranks zero-padded, scales folded into B
    FIXED = "fixed"  #: the format's scale is the constant ``fixed_scale``: the scale is folded into B
    #: one alpha, each module's scale alpha / its rank (llama.cpp): ranks kept, other scales folded into B
    ALPHA_OVER_RANK = "alpha/rank"


class Detection(NamedTuple):
    """Why a source is in a layout: the higher ``score`` wins (3: file name and config agree, 2: keys
    and file name, 1: keys alone)."""

    score: int
    reason: str


class LayoutSpec:
    """One ecosystem's adapter layout as data. Subclasses set the class attributes below."""

    name: ClassVar[str]
    summary: ClassVar[str]
    order: ClassVar[int] = 100  # position in the registry (CLI choices, detection messages)
    weight_files: ClassVar[tuple[str, ...]]  # accepted in a directory, preferred first; [0] is written
    config_file: ClassVar[str | None] = None
    sidecar_files: ClassVar[tuple[str, ...]] = ()  # other small files read beside the weights (hub fetches them)
    prefix: ClassVar[str] = ""
    scheme: ClassVar[Scheme] = "hf"
    leaves: ClassVar[dict[Role, str]]  # names from lora_ckpt.keys.LEAF_ROLES
    transposed: ClassVar[bool] = False  # factors stored as A (in, r), B (r, out)
    features: ClassVar[frozenset[Feature]] = frozenset()
    one_rank: ClassVar[bool] = False  # the layout has a single global rank
    scale_policy: ClassVar[ScalePolicy] = ScalePolicy.PER_MODULE
    fixed_scale: ClassVar[float] = 1.0  # the scale of a ScalePolicy.FIXED layout
    pickle: ClassVar[bool] = False  # weights written with torch.save instead of safetensors
    # The consumer puts LoRA on a projection type in every layer, and on all MLP projections or none
    # (torchtune): writing fills the rest with zero factors (a no-op), reading drops all-zero modules.
    every_layer: ClassVar[bool] = False
    container_key: ClassVar[str | None] = None  # weights saved as {container_key: tensors} (LitGPT)
    # how a fused module's LoRA is stored (lora_ckpt.fused): one shared A ("plain") or one A per part ("grouped")
    fused_lora: ClassVar[Literal["plain", "grouped"]] = "plain"
    legacy_names: ClassVar[dict[str, str]] = {}  # module template now -> older template accepted on read
    single_file: ClassVar[str | None] = None  # an output path ending in this suffix is written as one file (gguf)
    # the layout's files keep a PEFT adapter_config.json the adapter came with (task_type, target_modules as
    # written, modules_to_save, ...); elsewhere a conversion back to PEFT re-derives it (and a note says so)
    keeps_peft_config: ClassVar[bool] = False
    # how the layout holds LoRA on MoE experts (lora_ckpt.experts): fused 3-D "stacked" (PEFT target_parameters),
    # "per-expert" 2-D modules (experts.{e}.gate_proj ...), or "none" (refused, or dropped with allow_lossy)
    expert_form: ClassVar[Literal["stacked", "per-expert", "none"]] = "per-expert"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        leaves = getattr(cls, "leaves", {})
        unknown = [leaf for role, leaf in leaves.items() if LEAF_ROLES.get(leaf) != role.removeprefix("emb_")]
        if unknown:
            raise TypeError(f"{cls.__name__}: leaves {unknown} are not in lora_ckpt.keys.LEAF_ROLES with that role")

    # -------------------------------------------------------------------- keys
    @cached_property
    def _leaf_regex(self) -> re.Pattern[str]:
        leaves = sorted(set(self.leaves.values()), key=len, reverse=True)
        return re.compile(rf"^{re.escape(self.prefix)}(?P<module>.+?)\.(?P<leaf>{'|'.join(map(re.escape, leaves))})$")

    def split(self, key: str) -> tuple[str, Role] | None:
        """``key`` -> (module name in this layout's scheme, role), or None for other tensors."""
        m = self._leaf_regex.match(key)
        if not m:
            return None
        roles = [r for r, leaf in self.leaves.items() if leaf == m["leaf"]]
        if len(roles) > 1:  # one leaf for Linear and Embedding factors (mlx-lm): the module decides
            roles = [r for r in roles if r.startswith("emb_") == is_embedding(m["module"])] or roles
        return m["module"], roles[0]

    def key(self, module: str, role: Role) -> str:
        """The tensor key of ``module``'s ``role`` (inverse of :meth:`split`)."""
        return f"{self.prefix}{module}.{self.leaves[role]}"

    def leaf_pattern(self) -> str:
        """A regex alternative of this layout's leaves (for keys that end in one under another prefix)."""
        return "|".join(map(re.escape, self.leaves.values()))

    def current_name(self, name: str) -> str:
        """A module name in its current form (:attr:`legacy_names` map older LitGPT names)."""
        for now, old in self.legacy_names.items():
            current = NameMap({now: old}).to_hf(name)
            if current is not None:
                return current
        return name
