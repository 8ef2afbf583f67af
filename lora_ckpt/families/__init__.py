"""Name maps and model geometry, in one place.

* :mod:`.names`: the one layer-index parser (:func:`parse_layer`), the one template -> regex
  (:func:`template_regex`), :class:`NameMap`, embedding module names.
* :mod:`.tables`: the families as data (:data:`FAMILIES`): HF <-> torchtune / Meta / LitGPT name
  tables, fused and stacked-expert correspondences, the RoPE row-order policy.
* :mod:`.config`: :class:`ModelConfig`, read from ``config.json`` / ``params.json`` (head counts,
  ``n_layers``, ``n_experts``, projection shapes).
"""

from .config import ModelConfig, load_model_config, model_config_from_dict
from .names import EMBEDDING_LEAVES, IDENTITY, LayerName, NameMap, Scheme, is_embedding, parse_layer, template_regex
from .tables import FAMILIES, Family, Fused, family_for_model_type

__all__ = ["EMBEDDING_LEAVES", "FAMILIES", "IDENTITY", "Family", "Fused", "LayerName", "ModelConfig", "NameMap",
           "Scheme", "family_for_model_type", "is_embedding", "load_model_config", "model_config_from_dict",
           "parse_layer", "template_regex"]
