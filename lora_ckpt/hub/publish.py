"""``push``: convert an adapter (verified), write its PEFT config and model card, and upload it in one commit.

Named ``publish`` so that ``lora_ckpt.hub.push`` stays the function, never this module."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from ..conversion import convert
from ..errors import UsageError
from ..families import ModelConfig
from ..io import PathLike, read_json
from ..layouts import detect_layout, get_layout, load_adapter
from ..layouts.peft import write_peft_config
from .card import describe_source, model_card
from .client import fetch_model_config, hub_errors, progress, resolve_source
from .uri import HubSource, check_repo_id, check_revision, is_hub_id, parse_hf_url

__all__ = ["push"]

logger = logging.getLogger(__name__)


def push(src: PathLike, repo: str, *, to: str = "peft", private: bool = False, branch: str | None = None,
         commit_message: str | None = None, base_config: PathLike | ModelConfig | None = None,
         base_model: str | None = None, alpha: float | None = None, from_: str | None = None,
         quiet: bool = False) -> str:
    """Convert an adapter (any layout) to ``to``, verify it, and upload it with a model card in one commit.

    ``adapter_config.json`` gets ``base_model_name_or_path`` (``base_model`` or the adapter's own)
    and ``task_type`` (default ``CAUSAL_LM``); ``README.md`` is a PEFT model card.

    Args:
        src: the adapter (directory, file, or ``hf://``).
        repo: ``ORG/NAME`` (created if missing; ``private`` applies only then).
        to: the layout to upload.
        private: create the repo private.
        branch: commit to this branch (created from main if missing).
        commit_message: default ``"Upload <layout> LoRA adapter with lora-ckpt"``.
        base_config: base model ``config.json`` / ``params.json`` (default: fetched for ``base_model``).
        base_model: the base model's Hub id (default: the adapter's ``base_model_name_or_path``).
        alpha: alpha for layouts that do not record it.
        from_: the source layout (default: detected).
        quiet: no progress bars.

    Returns:
        A one-line summary with the commit URL.

    Raises:
        InvalidRepoIdError: malformed ``repo`` or ``branch`` (before anything is read or sent).
        VerificationError: the converted adapter does not reproduce the source.
        HubPermissionError, HubError: the Hub refused the upload.

    Example:
        >>> push("epoch_0/", "my-org/llama-lora", base_model="meta-llama/Llama-3.1-8B")
    """
    # huggingface_hub is imported here only: `import lora_ckpt`, --help and inspect do not pay for it
    from huggingface_hub import HfApi

    src_h = parse_hf_url(repo) if repo.startswith("hf://") else HubSource(repo)
    if src_h.revision or src_h.subdir:
        raise UsageError(f"{repo}: push takes ORG/NAME; use --branch for a branch")
    repo_id = src_h.repo_id
    check_repo_id(repo_id)
    check_revision(repo_id, branch, "branch")
    lay = get_layout(to)
    if str(src).startswith("hf://"):
        src = resolve_source(str(src), layout=from_, quiet=quiet)
    source = describe_source(Path(src))  # hf://ORG/NAME@SHA/SUBDIR for a cached download
    if isinstance(base_config, str) and base_config.startswith("hf://"):
        base_config = resolve_source(base_config, quiet=quiet)
    if base_config is None and base_model:
        base_config, note = fetch_model_config(base_model)
        if note:
            logger.info("%s", note)
    det = detect_layout(src, layout=from_)
    adapter = load_adapter(src, layout=det.layout.name, base_config=base_config, alpha=alpha,
                           resolve_base_config=fetch_model_config)
    base = base_model or adapter.meta.base_model
    if not base:
        logger.warning("%s: no base model recorded; the card and config will not name one (pass --base-model)", src)
    elif not is_hub_id(base):
        logger.warning("%s: base model %r is not a Hub repo id; the card will not link it (pass --base-model)",
                       src, base)
    if "/" not in repo_id:  # the card names the full id
        with hub_errors(repo_id, writing=True):
            repo_id = f"{HfApi().whoami()['name']}/{repo_id}"
    with tempfile.TemporaryDirectory(prefix="lora-ckpt-push-") as tmp:
        out = Path(tmp) / "upload"
        model_cfg = base_config if base_config is not None else adapter.meta.model_config
        res = convert(src, out, to=to, from_=det.layout.name, alpha=alpha, base_config=model_cfg)
        cfg_path = out / lay.config_file if lay.config_file else None
        config: dict[str, Any] = {}
        if cfg_path is not None and cfg_path.name == "adapter_config.json" and cfg_path.is_file():
            config = read_json(cfg_path, what="adapter_config.json")
            if base:
                config["base_model_name_or_path"] = base
            if not config.get("task_type"):
                config["task_type"] = adapter.meta.task_type or "CAUSAL_LM"
            write_peft_config(config, cfg_path)  # PEFT's formatting: indent 2, sorted keys, no newline
        verified = res.verification.summary() if res.verification else None
        # the card describes what is uploaded
        uploaded = load_adapter(out, layout=to, base_config=model_cfg, resolve_base_config=fetch_model_config)
        (out / "README.md").write_text(model_card(
            uploaded, repo_id=repo_id, layout=to, base_model=base, config=config, source=source,
            source_layout=res.source_layout, verified=verified, notes=res.notes), encoding="utf-8")
        message = commit_message or f"Upload {to} LoRA adapter with lora-ckpt"
        with hub_errors(repo_id, branch, writing=True), progress(quiet):
            api = HfApi()
            repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=out, commit_message=message, revision=branch)
    summary = (f"pushed {res.modules} module(s) ({res.source_layout} -> {to}) to {repo_id}"
               f"{'@' + branch if branch else ''}: {info.commit_url}")
    logger.info("%s", summary)
    return summary
