"""``hf://ORG/NAME[@REVISION][/SUBDIR]`` sources and Hub repo ids, parsed and validated with no request.

``REVISION`` is a branch, tag or commit sha (``refs/pr/N`` may be written as is or as
``refs%2Fpr%2FN``); ``SUBDIR`` a folder (or one file) in the repo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..errors import InvalidRepoIdError

__all__ = ["HubSource", "check_repo_id", "check_revision", "is_hub_id", "parse_hf_url", "unsafe_name"]

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


def unsafe_name(path: str) -> bool:
    """Whether a repo path could land outside the directory it is downloaded into."""
    return (not path or path.startswith("/") or "\\" in path or re.match(r"^[A-Za-z]:", path) is not None
            or any(part in ("", ".", "..") for part in path.split("/")) or any(ord(c) < 32 for c in path))


def check_repo_id(repo_id: str) -> None:
    """Validate a Hub repo id with huggingface_hub's own rules.

    Raises:
        InvalidRepoIdError: not ``ORG/NAME`` (or ``NAME``) of allowed characters.
    """
    # huggingface_hub is imported here only: `import lora_ckpt`, --help and inspect do not pay for it
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        reason = str(e).splitlines()[0].rstrip(".")
        raise InvalidRepoIdError(f"{repo_id!r} is not a valid Hub repo id ({reason}); expected ORG/NAME of "
                                 "letters, digits, '-', '_', '.'", repo_id=repo_id) from e


def check_revision(repo_id: str, revision: str | None, what: str = "revision") -> None:
    """Validate a git reference (``what`` names it in the message: revision, branch).

    Raises:
        InvalidRepoIdError: a name that is no valid git reference or could escape a folder.
    """
    if revision is not None and (unsafe_name(revision) or revision.endswith(".lock")):
        raise InvalidRepoIdError(f"{repo_id}: {what} {revision!r} is not a valid git reference; expected a "
                                 "branch, tag or commit sha", repo_id=repo_id)


def is_hub_id(value: str | None) -> bool:
    """Whether ``value`` names a Hub repo (not a local path); no request is made.

    Example:
        >>> is_hub_id("meta-llama/Llama-3.1-8B"), is_hub_id("./base")
        (True, False)
    """
    if not value or value.startswith(("/", ".", "~")) or Path(value).exists():
        return False
    try:
        check_repo_id(value)
    except InvalidRepoIdError:
        return False
    return True


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
    check_repo_id(repo_id)
    check_revision(repo_id, rev)
    sub = sub.strip("/")
    if sub and unsafe_name(sub):
        raise InvalidRepoIdError(f"{src}: subfolder {sub!r} is not a plain relative path", repo_id=repo_id)
    return HubSource(repo_id, rev, sub)
