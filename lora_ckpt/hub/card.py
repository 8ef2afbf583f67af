"""The model card (README.md) ``push`` uploads: PEFT front matter and a body saying what the adapter
is, where it came from and how it was verified."""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..adapter import Adapter
from .uri import is_hub_id

__all__ = ["describe_source", "model_card"]


def describe_source(path: Path) -> str:
    """``hf://org/name@sha/sub`` for a path inside the HF cache; a relative path as given; for an
    absolute one only its last component (a public card should not show the uploader's directories)."""
    parts = path.absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith("models--") and parts[i + 1] == "snapshots":
            repo = "/".join(parts[i].split("--")[1:])
            return f"hf://{repo}@{parts[i + 2]}" + "".join(f"/{p}" for p in parts[i + 3:])
    return path.as_posix() if not path.is_absolute() else f".../{path.name}"


def model_card(adapter: Adapter, *, repo_id: str, layout: str, base_model: str | None, config: dict[str, Any],
               source: str, source_layout: str, verified: str | None, notes: Sequence[str] = ()) -> str:
    """The README.md for an uploaded adapter: PEFT front matter and a body saying what it is.

    Args:
        adapter: the adapter as uploaded (read back from the files).
        repo_id: the repo it goes to.
        layout: its layout (``library_name: peft`` only for ``peft``; other layouts become a tag).
        base_model: the base model's Hub id (a local path is named in the body, not linked).
        config: the uploaded ``adapter_config.json`` (empty if the layout has none).
        source: where it was converted from (``hf://...`` or a path).
        source_layout: the source's layout.
        verified: the verification summary line.
        notes: what the reader had to decide (shown as provenance notes).

    Returns:
        The card text: YAML front matter (``library_name``, ``base_model``, sorted ``tags``,
        ``pipeline_tag``) and a Markdown body ending in ``### Framework versions``.
    """
    # huggingface_hub is imported here only: `import lora_ckpt`, --help and inspect do not pay for it
    from huggingface_hub import ModelCard, ModelCardData, constants

    base = base_model if is_hub_id(base_model) else None
    tags = ["lora", "transformers"] + ([f"base_model:adapter:{base}"] if base else []) + \
        ([] if layout == "peft" else [layout])
    data = ModelCardData(base_model=base, library_name="peft" if layout == "peft" else None, tags=sorted(tags),
                         pipeline_tag="text-generation")
    ranks = ", ".join(f"{r} ({n} module(s))" for r, n in sorted(adapter.ranks().items()))
    scales = ", ".join(f"{s:g}" for s in sorted(adapter.scales()))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapter.modules})
    rslora = bool((config or adapter.meta.config).get("use_rslora"))
    base_txt = f"[{base}]({constants.ENDPOINT}/{base})" if base else (f"`{base_model}`" if base_model else
                                                                     "an unrecorded base model")
    try:
        peft_version = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        peft_version = None
    if layout == "peft":
        load = ("```python\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base or 'BASE_MODEL')})\n"
                f"model = PeftModel.from_pretrained(base, {json.dumps(repo_id)})\n```")
    else:
        load = (f"This repo holds the **{layout}** layout. For PEFT, convert it (exact, verified):\n\n"
                f"```bash\nlora-ckpt convert hf://{repo_id} --to peft -o adapter/\n```")
    body = [
        f"# {repo_id.split('/')[-1]}", "",
        (f"A {'DoRA' if adapter.uses_dora else 'LoRA'} adapter for {base_txt}, in the {layout} layout, "
         "converted and uploaded by lora-ckpt, which checked every module's update numerically."), "",
        "## Adapter", "",
        f"- modules: {len(adapter.modules)} (targets {', '.join(f'`{x}`' for x in leaves)})",
        f"- rank: {ranks}",
        f"- scale: {scales}" + (f" (lora_alpha {config['lora_alpha']}, r {config['r']})"
                                if "lora_alpha" in config and "r" in config else ""),
        f"- DoRA: {'yes' if adapter.uses_dora else 'no'}; rsLoRA: {'yes' if rslora else 'no'}"
        + ("; LoRA bias: yes" if adapter.uses_bias else ""),
        f"- parameters: {adapter.num_parameters():,}; dtype: {str(adapter.dtype).removeprefix('torch.')}", "",
        "## Provenance", "",
        f"- converted from the {source_layout} layout at `{source}`",
        f"- verification: {verified or 'not run'}",
        *[f"- note: {n}" for n in notes if not n.startswith("base model config")], "",
        "## How to load", "", load, "",
        "### Framework versions", "",
        *([f"- PEFT {peft_version}"] if peft_version else []),
        f"- lora-ckpt {__version__}", "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))
