"""The Hugging Face Hub client: typed errors naming the repo, progress, choosing the files a layout
reads (never the whole repo), downloads into the standard cache, ``pull``, and the base model's
``config.json`` (the base-config resolver that readers are given).

Everything goes through ``huggingface_hub`` (its cache, token, retries and progress bars); repo
listings with names that would escape the cache are refused before anything is downloaded.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from ..errors import (
    EntryNotFoundError,
    HubError,
    HubPermissionError,
    NotCachedError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafeRepoError,
    UsageError,
    quote_list,
)
from ..io import atomic_output
from ..layouts import LAYOUTS, get_layout
from .uri import HubSource, check_revision, is_hub_id, parse_hf_url, unsafe_name

__all__ = ["MODEL", "MODEL_CONFIGS", "fetch_model_config", "hub_errors", "progress", "pull", "resolve_source"]

logger = logging.getLogger(__name__)

MODEL_CONFIGS = ("config.json", "params.json")


# ------------------------------------------------------------------------------ errors
def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, writing: bool = False) -> Iterator[None]:
    """Turn ``huggingface_hub`` / transport exceptions into typed lora-ckpt errors naming the repo."""
    # huggingface_hub is imported here only: `import lora_ckpt`, --help and inspect do not pay for it
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
def progress(quiet: bool) -> Iterator[None]:
    """huggingface_hub's own progress bars, silenced for the block when ``quiet``."""
    # huggingface_hub is imported here only: `import lora_ckpt`, --help and inspect do not pay for it
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
    # huggingface_hub is imported here only: `import lora_ckpt`, --help and inspect do not pay for it
    from huggingface_hub import HfApi, RepoFile, RepoFolder, constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub import errors as hf

    offline = constants.is_offline_mode()
    with hub_errors(src.repo_id, src.revision), progress(quiet):
        api = HfApi()
        rev = api.resolve_revision(src.repo_id, revision=src.revision, local_files_only=offline)
        entries: Iterable[RepoFile | RepoFolder]
        try:  # the listing of a commit never changes: the cached one costs no request
            entries = get_cached_repo_tree(src.repo_id, revision=rev.resolved)
        except hf.CachedRepoTreeNotFoundError:
            if offline:
                raise
            entries = api.list_repo_tree(src.repo_id, revision=rev.resolved, recursive=True)
        tree = {e.path for e in entries if isinstance(e, RepoFile)}
        unsafe = sorted(p for p in tree if unsafe_name(p))
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
    under ``SUBDIR``; without, the same for every known layout; with ``layout=MODEL``, a base
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
        check_revision(src.repo_id, revision)
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
    # huggingface_hub is imported here only: `import lora_ckpt`, --help and inspect do not pay for it
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


def fetch_model_config(repo_id: str) -> tuple[Path | None, str | None]:
    """The base model's ``config.json`` from the Hub (or the cache), never raising.

    Returns ``(path, note)``: the cached file and how it was found, or ``(None, why not)``;
    ``(None, None)`` when ``repo_id`` is not a Hub repo id (a local path, ...).
    """
    # huggingface_hub is imported here only: `import lora_ckpt`, --help and inspect do not pay for it
    from huggingface_hub import constants, hf_hub_download, hf_hub_url

    if not is_hub_id(repo_id):
        return None, None
    try:
        with hub_errors(repo_id), progress(True):
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
