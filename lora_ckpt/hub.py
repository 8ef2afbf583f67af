"""The Hugging Face Hub: ``hf://`` sources, ``pull``, ``push`` with a correct PEFT model card.

Everything goes through ``huggingface_hub`` (its cache, token, retries and progress bars). This
module decides *which* files to fetch (only those a layout reads, never the whole repo), refuses
repo listings with names that would escape the cache before anything is downloaded, writes the
model card, and turns the client's exceptions into typed :mod:`lora_ckpt.errors` naming the repo.

``hf://ORG/NAME[@REVISION][/SUBDIR]``: ``REVISION`` is a branch, tag or commit sha (``refs/pr/N``
may be written as is or as ``refs%2Fpr%2FN``); ``SUBDIR`` a folder (or one file) in the repo.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .errors import (
    EntryNotFoundError,
    HubError,
    HubPermissionError,
    InvalidRepoIdError,
    NotCachedError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafeRepoError,
    UsageError,
    quote_list,
)
from .card import describe_source, model_card
from .files import PathLike, atomic_output, read_json

if TYPE_CHECKING:
    from .families import ModelConfig

__all__ = ["HubSource", "fetch_model_config", "parse_hf_url", "pull", "push", "resolve_source"]

logger = logging.getLogger(__name__)

MODEL_CONFIGS = ("config.json", "params.json")
_PR_REF = re.compile(r"^refs/(pr|convert)/[^/]+")


@dataclass(frozen=True)
class HubSource:
    """A parsed ``hf://ORG/NAME[@REVISION][/SUBDIR]``."""

    repo_id: str
    revision: str | None = None
    subdir: str = ""

    def __str__(self) -> str:
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "") + \
            (f"/{self.subdir}" if self.subdir else "")


# ------------------------------------------------------------------------------ names
def _unsafe_name(path: str) -> bool:
    """A repo path that could land outside the directory it is downloaded into."""
    return (not path or path.startswith("/") or "\\" in path or re.match(r"^[A-Za-z]:", path) is not None
            or any(part in ("", ".", "..") for part in path.split("/")) or any(ord(c) < 32 for c in path))


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).splitlines()[0].rstrip(".")
        raise InvalidRepoIdError(f"{repo_id!r} is not a valid Hub repo id ({reason}); expected ORG/NAME of "
                                 "letters, digits, '-', '_', '.'", repo_id=repo_id) from e


def _check_revision(repo_id: str, revision: str | None, what: str = "revision") -> None:
    if revision is not None and (_unsafe_name(revision) or revision.endswith(".lock")):
        raise InvalidRepoIdError(f"{repo_id}: {what} {revision!r} is not a valid git reference; expected a "
                                 "branch, tag or commit sha", repo_id=repo_id)


def parse_hf_url(src: str) -> HubSource:
    """Parse and validate ``hf://ORG/NAME[@REVISION][/SUBDIR]`` (``ORG/NAME`` alone is accepted too).

    Raises:
        InvalidRepoIdError: malformed id, revision or subdir (checked before any request).

    Example:
        >>> parse_hf_url("hf://my-org/adapter@v1/epoch_0")
        HubSource(repo_id='my-org/adapter', revision='v1', subdir='epoch_0')
    """
    rest = src.removeprefix("hf://").strip("/")
    if rest.split("/", 1)[0] in ("datasets", "spaces"):
        raise InvalidRepoIdError(f"{src}: only model repos hold adapters; expected hf://ORG/NAME", repo_id=rest)
    m = re.match(r"^(?P<repo>[^/@]+(?:/[^/@]+)?)(?:@(?P<rev>.*?))?(?:/(?P<sub>.*))?$", rest)
    if not m:
        raise InvalidRepoIdError(f"{src}: expected hf://ORG/NAME[@REVISION][/SUBDIR]", repo_id=rest)
    repo_id, rev, sub = m["repo"], m["rev"], m["sub"] or ""
    if rev is not None:  # "refs/pr/1/sub": the ref takes three segments
        full = rest[len(repo_id) + 1:]
        pr = _PR_REF.match(full)
        rev, sub = (pr.group(0), full[pr.end():].lstrip("/")) if pr else (rev, sub)
        rev = unquote(rev)
        if not rev:
            raise InvalidRepoIdError(f"{src}: empty revision after '@'", repo_id=repo_id)
    _check_repo_id(repo_id)
    _check_revision(repo_id, rev)
    sub = sub.strip("/")
    if sub and _unsafe_name(sub):
        raise InvalidRepoIdError(f"{src}: subfolder {sub!r} is not a plain relative path", repo_id=repo_id)
    return HubSource(repo_id, rev, sub)


# ------------------------------------------------------------------------------ errors
def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None = None, *, writing: bool = False) -> Iterator[None]:
    """Turn ``huggingface_hub`` / transport exceptions into typed lora-ckpt errors naming the repo."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except hf.GatedRepoError as e:
        raise HubPermissionError(
            f"{repo_id}: gated repo, access refused (HTTP {_status(e)}); accept its conditions on the repo page "
            "and use a token that has access (HF_TOKEN or `hf auth login`)", repo_id=repo_id, status=_status(e)) from e
    except hf.RepositoryNotFoundError as e:
        raise RepoNotFoundError(
            f"{repo_id}: repo not found on {constants.ENDPOINT} (HTTP {_status(e)}); check the id, or log in "
            "(HF_TOKEN or `hf auth login`) if it is private", repo_id=repo_id) from e
    except hf.RevisionNotFoundError as e:
        raise RevisionNotFoundError(
            f"{repo_id}: revision {revision or 'main'!r} not found; expected an existing branch, tag or full "
            "commit sha of this repo", repo_id=repo_id, revision=revision) from e
    except hf.RemoteEntryNotFoundError as e:
        url = str(getattr(getattr(e, "response", None), "url", ""))
        path = url.split("/resolve/", 1)[1].split("/", 1)[-1] if "/resolve/" in url else None
        raise EntryNotFoundError(f"{at}: file {path or '(unknown)'!r} not found in the repo; check the path "
                                 "and revision", repo_id=repo_id, path=path) from e
    except (hf.LocalEntryNotFoundError, hf.RevisionResolutionError, hf.CachedRepoTreeNotFoundError,
            hf.OfflineModeIsEnabled) as e:
        why, fix = (("HF_HUB_OFFLINE=1 is set", "unset HF_HUB_OFFLINE and run once online")
                    if constants.is_offline_mode() else
                    (f"{constants.ENDPOINT} could not be reached", "check the network and run it again"))
        raise NotCachedError(f"{at}: not in the local cache ({constants.HF_HUB_CACHE}) and {why}; {fix}",
                             repo_id=repo_id) from e
    except hf.HfHubHTTPError as e:
        status = _status(e)
        detail = (getattr(e, "server_message", None) or str(e)).strip().splitlines()[0][:200]
        if status == 401:
            raise HubPermissionError(f"{repo_id}: authentication refused (HTTP 401: {detail}); set HF_TOKEN or "
                                     "run `hf auth login`", repo_id=repo_id, status=status) from e
        if status == 403:
            action = "write to" if writing else "read"
            raise HubPermissionError(f"{repo_id}: the token may not {action} this repo (HTTP 403: {detail}); use a "
                                     f"token with {'write' if writing else 'read'} access or a repo you own",
                                     repo_id=repo_id, status=status) from e
        raise HubError(f"{at}: the Hub answered HTTP {status} ({detail}); try again later", repo_id=repo_id) from e
    except (httpx2.HTTPError, ConnectionError, TimeoutError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise HubError(f"{at}: connection to {constants.ENDPOINT} failed ({type(e).__name__}: {first}); "
                       "the cache keeps only complete files; try again", repo_id=repo_id) from e


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[None]:
    """huggingface_hub's own progress bars, silenced for the block when ``quiet``."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not quiet or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


# ---------------------------------------------------------------------------- resolving
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")


def _model_files(src: HubSource, tree: set[str]) -> tuple[list[str], str]:
    """A base model's files under ``SUBDIR``: safetensors shards + index and every non-weight file
    (config, tokenizer); pickled or other-format weights only when there are no safetensors."""
    prefix = f"{src.subdir}/" if src.subdir else ""
    here = sorted(p for p in tree if p.startswith(prefix) and "/" not in p[len(prefix):])
    has_st = any(p.endswith(".safetensors") for p in here)
    files = [p for p in here if not (has_st and p.endswith(_OTHER_WEIGHTS))]
    if not files:
        raise EntryNotFoundError(f"{src}: no files in {src.subdir or 'the repo root'}", repo_id=src.repo_id,
                                 path=src.subdir or None)
    return files, src.subdir


MODEL = "model"  # resolve_source(layout=MODEL): a whole base model folder


def _needed_files(src: HubSource, tree: set[str], layout: str | None) -> tuple[list[str], str]:
    """The repo files to download for ``src`` (and the path to return, relative to the snapshot)."""
    from .layouts import LAYOUTS, get_layout

    if layout == MODEL:
        return _model_files(src, tree)

    layouts = [get_layout(layout)] if layout else list(LAYOUTS.values())
    configs = [c for lay in layouts for c in (lay.config_file, *lay.sidecar_files) if c]
    configs += list(MODEL_CONFIGS)
    if src.subdir in tree:  # hf://org/name/path/to/file: that file and the configs beside it
        folder = str(PurePosixPath(src.subdir).parent).removeprefix(".")
        near = [f"{folder}/{c}".lstrip("/") for c in dict.fromkeys(configs)]
        return [src.subdir] + [p for p in near if p in tree and p != src.subdir], src.subdir
    prefix = f"{src.subdir}/" if src.subdir else ""
    here = sorted(p[len(prefix):] for p in tree if p.startswith(prefix))
    if not here:
        raise EntryNotFoundError(f"{src}: no file or folder {src.subdir!r} in the repo", repo_id=src.repo_id,
                                 path=src.subdir)
    weights = [w for lay in layouts if (w := lay.weight_file_in(here))]  # each layout's preferred file only
    wanted = list(dict.fromkeys(weights + [c for c in configs if c in here]))
    if not weights and (layout or not any(c in here for c in MODEL_CONFIGS)):
        expected = [w for lay in layouts for w in lay.weight_files]
        raise EntryNotFoundError(
            f"{src}: no {layout or 'adapter'} weight file ({quote_list(expected, 4)}) in "
            f"{src.subdir or 'the repo root'}; found {quote_list(here)}; pass the subfolder (hf://ORG/NAME/SUBDIR)"
            + ("" if layout else " or --from LAYOUT"), repo_id=src.repo_id, path=src.subdir or None)
    return [prefix + w for w in wanted], src.subdir


def _download(src: HubSource, *, layout: str | None, quiet: bool) -> tuple[Path, Path, list[str]]:
    """(snapshot folder, target path in it, downloaded repo paths) for ``src``."""
    from huggingface_hub import HfApi, RepoFile, constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub import errors as hf

    offline = constants.is_offline_mode()
    with _hub_errors(src.repo_id, src.revision), _progress(quiet):
        api = HfApi()
        rev = api.resolve_revision(src.repo_id, revision=src.revision, local_files_only=offline)
        try:  # the listing of a commit never changes: the cached one costs no request
            entries = get_cached_repo_tree(src.repo_id, revision=rev.resolved)
        except hf.CachedRepoTreeNotFoundError:
            if offline:
                raise
            entries = api.list_repo_tree(src.repo_id, revision=rev.resolved, recursive=True)
        tree = {e.path for e in entries if isinstance(e, RepoFile)}
        unsafe = sorted(p for p in tree if _unsafe_name(p))
        if unsafe:
            raise UnsafeRepoError(
                f"{src.repo_id}@{rev.resolved[:12]}: the repo lists {len(unsafe)} file name(s) that would escape the "
                f"download folder ({quote_list(unsafe, 3)}); nothing was downloaded; do not use this repo",
                repo_id=src.repo_id, paths=unsafe)
        files, target = _needed_files(src, tree, layout)
        logger.info("%s: fetching %s (commit %s)", src, quote_list(files, 8), rev.resolved[:12])
        folder = Path(snapshot_download(src.repo_id, revision=rev, allow_patterns=[glob.escape(f) for f in files],
                                        local_files_only=offline))
    path = (folder / target) if target else folder
    if not path.resolve().is_relative_to(folder.resolve().parent.parent):  # the repo's cache folder
        raise UnsafeRepoError(f"{src}: resolved outside the cache ({path})", repo_id=src.repo_id, paths=[target])
    return folder, path, files


def resolve_source(src: str, *, layout: str | None = None, quiet: bool = False) -> Path:
    """A local path for ``hf://ORG/NAME[@REVISION][/SUBDIR]``, downloading only the files needed.

    With ``layout``, that layout's weight file and config plus ``config.json``/``params.json``
    under ``SUBDIR``; without, the same for every known layout; with ``layout=hub.MODEL``, a base
    model's safetensors shards, index, config and tokenizer files (for ``merge``). Files come from (and go to) the
    standard Hugging Face cache; with ``HF_HUB_OFFLINE=1`` they are read from it, with no request.

    Args:
        src: the ``hf://`` path.
        layout: the layout whose files to fetch (``--from``); None: any layout's.
        quiet: no progress bars.

    Returns:
        The ``SUBDIR`` folder (or file) inside the cached snapshot.

    Raises:
        InvalidRepoIdError: malformed id, revision or subfolder (before any request).
        UnsafeRepoError: the repo lists path-traversal names (before any download).
        RepoNotFoundError, RevisionNotFoundError, EntryNotFoundError, HubPermissionError,
        NotCachedError, HubError: the Hub or the cache could not provide the files.

    Example:
        >>> resolve_source("hf://my-org/llama-lora@v1", layout="peft")
        PosixPath('.../models--my-org--llama-lora/snapshots/<sha>')
    """
    return _download(parse_hf_url(src), layout=layout, quiet=quiet)[1]


def pull(repo: str, out: str | None = None, *, revision: str | None = None, layout: str | None = None,
         force: bool = False, quiet: bool = False) -> Path:
    """Download an adapter from the Hub (only the files its layout needs).

    Args:
        repo: ``ORG/NAME`` or ``hf://ORG/NAME[@REVISION][/SUBDIR]``.
        out: copy the files into this directory (atomically); None: return the cache path.
        revision: branch, tag or commit sha (or ``@REVISION`` in ``repo``).
        layout: fetch only this layout's files.
        force: replace an existing ``out``.
        quiet: no progress bars.

    Returns:
        ``out``, or the folder (or file) in the cache.

    Raises:
        UsageError: two different revisions given.
        OutputExistsError: ``out`` exists and not ``force``.
        HubError: see :func:`resolve_source`.

    Example:
        >>> pull("my-org/llama-lora", "adapter/", revision="v1")
    """
    src = parse_hf_url(repo)
    if revision is not None:
        _check_revision(src.repo_id, revision)
        if src.revision not in (None, revision):
            raise UsageError(f"{repo}: revision {src.revision!r} in the path and --revision {revision!r} differ; "
                             "give one")
        src = HubSource(src.repo_id, revision, src.subdir)
    folder, path, files = _download(src, layout=layout, quiet=quiet)
    if out is None:
        return path
    base = path if path.is_dir() else path.parent
    rel_base = base.relative_to(folder)
    with atomic_output(out, force=force) as tmp:
        tmp.mkdir(parents=True)
        for f in files:
            rel = PurePosixPath(f).relative_to(rel_base.as_posix()) if str(rel_base) != "." else PurePosixPath(f)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / f, tmp / rel)  # follows the cache's symlink to the blob
    logger.info("copied %d file(s) of %s to %s", len(files), src, out)
    return Path(out)


# -------------------------------------------------------------------------- base config
_UNREACHABLE: set[str] = set()  # endpoints that failed a probe in this process


def _reachable(url: str) -> bool:
    """One quick request, no retries: huggingface_hub would retry an unreachable Hub for ~20 s."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    if constants.ENDPOINT in _UNREACHABLE:
        return False
    try:
        get_session().head(url, headers=build_hf_headers(), timeout=5.0)
    except httpx2.TransportError:
        _UNREACHABLE.add(constants.ENDPOINT)
        return False
    return True


def _is_hub_id(value: str | None) -> bool:
    """Whether ``value`` names a Hub repo (not a local path)."""
    if not value or value.startswith(("/", ".", "~")) or Path(value).exists():
        return False
    try:
        _check_repo_id(value)
    except InvalidRepoIdError:
        return False
    return True


def fetch_model_config(repo_id: str) -> tuple[Path | None, str | None]:
    """The base model's ``config.json`` from the Hub (or the cache), never raising.

    Returns ``(path, note)``: the cached file and how it was found, or ``(None, why not)``;
    ``(None, None)`` when ``repo_id`` is not a Hub repo id (a local path, ...).
    """
    from huggingface_hub import constants, hf_hub_download, hf_hub_url

    if not _is_hub_id(repo_id):
        return None, None
    try:
        with _hub_errors(repo_id), _progress(True):
            try:
                path = hf_hub_download(repo_id, "config.json", local_files_only=True)
                return Path(path), f"base model config.json of {repo_id!r} read from the Hugging Face cache"
            except FileNotFoundError:
                if constants.is_offline_mode():
                    raise
            if not _reachable(hf_hub_url(repo_id, "config.json")):
                return None, (f"base model config.json of {repo_id!r} not fetched: {constants.ENDPOINT} is "
                              "unreachable (pass --base-config, or set HF_HUB_OFFLINE=1)")
            path = hf_hub_download(repo_id, "config.json")
            return Path(path), f"base model config.json fetched from the Hub ({repo_id!r})"
    except HubError as e:
        return None, f"base model config.json of {repo_id!r} not fetched: {e}"


# ------------------------------------------------------------------------------ push
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
    from huggingface_hub import HfApi

    from .conversion import convert
    from .layouts import detect_layout, get_layout, load_adapter
    from .layouts.peft import write_peft_config

    src_h = parse_hf_url(repo) if repo.startswith("hf://") else HubSource(repo)
    if src_h.revision or src_h.subdir:
        raise UsageError(f"{repo}: push takes ORG/NAME; use --branch for a branch")
    repo_id = src_h.repo_id
    _check_repo_id(repo_id)
    _check_revision(repo_id, branch, "branch")
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
    adapter = load_adapter(src, layout=det.layout.name, base_config=base_config, alpha=alpha)
    base = base_model or adapter.meta.base_model
    if not base:
        logger.warning("%s: no base model recorded; the card and config will not name one (pass --base-model)", src)
    elif not _is_hub_id(base):
        logger.warning("%s: base model %r is not a Hub repo id; the card will not link it (pass --base-model)",
                       src, base)
    if "/" not in repo_id:  # the card names the full id
        with _hub_errors(repo_id, writing=True):
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
        uploaded = load_adapter(out, layout=to, base_config=model_cfg)  # the card describes what is uploaded
        (out / "README.md").write_text(model_card(
            uploaded, repo_id=repo_id, layout=to, base_model=base, config=config, source=source,
            source_layout=res.source_layout, verified=verified, notes=res.notes), encoding="utf-8")
        message = commit_message or f"Upload {to} LoRA adapter with lora-ckpt"
        with _hub_errors(repo_id, branch, writing=True), _progress(quiet):
            api = HfApi()
            repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=out, commit_message=message, revision=branch)
    summary = (f"pushed {res.modules} module(s) ({res.source_layout} -> {to}) to {repo_id}"
               f"{'@' + branch if branch else ''}: {info.commit_url}")
    logger.info("%s", summary)
    return summary

