"""Loopback Hugging Face Hub for the test suite (stdlib only).

Speaks the part of the Hub HTTP protocol that the real ``huggingface_hub`` 2.4 client uses to create
repos, commit (regular files inline, LFS files through batch + PUT), read repo info, list trees and
download files (HEAD/GET ``resolve`` with ``Range``); see ``formats.md`` section 15.  It binds
127.0.0.1 only and keeps everything in memory.  Point the client at it through ``HF_ENDPOINT``
*before* ``huggingface_hub`` is imported (``tests/conftest.py`` does that).

Every repo starts, like on the Hub, with an initial commit holding a ``.gitattributes``.  Repo ids
must be ``namespace/name``.  Fault knobs: :meth:`HubServer.set_gated`, :meth:`HubServer.set_read_only`,
:attr:`HubServer.require_auth`, :meth:`HubServer.drop_connection_once`.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.onnx",
                "*.msgpack", "*.npy", "*.npz", "*.pkl", "*.model", "*.zip", "*.tar.gz", "*tfevents*")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob: what the Hub reports (and sends as ETag) for a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """One file of a commit; its bytes live in ``HubServer._blobs`` under ``sha256``."""
    size: int
    sha256: str
    lfs: bool
    git_oid: str  # git blob id: of the content (regular file) or of the LFS pointer

    @property
    def etag(self) -> str:  # what HEAD/GET resolve send: sha256 for LFS, git blob sha1 otherwise
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Entry]  # the full tree at this commit: path -> Entry
    title: str
    date: str


@dataclass
class Repo:
    type: str
    id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha ("refs/pr/N" for PRs)
    lfs_oids: set[str] = field(default_factory=set)  # sha256 present in this repo's LFS storage
    private: bool = False
    gated_status: int | None = None  # 401/403 on resolve when gated
    read_only: bool = False  # writes answer 403
    created: str = ""


class HubError(Exception):
    """Raised inside a route: becomes a JSON error with ``X-Error-Code`` / ``X-Error-Message``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _scalar(v: str):
    v = v.strip()
    if v.startswith("[") and v.endswith("]"):
        return [_scalar(x) for x in v[1:-1].split(",") if x.strip()]
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return {"true": True, "false": False, "null": None, "~": None}.get(v, v)


def front_matter(text: str) -> dict:
    """Tiny YAML subset for model-card front matter: ``key: scalar``, ``[a, b]`` and ``- item`` lists.
    Keys holding nested mappings are dropped."""
    m = re.match(r"---[ \t]*\n(.*?)\n---[ \t]*(\n|$)", text, re.S)
    out: dict = {}
    key = None
    for line in (m.group(1).splitlines() if m else []):
        body = line.strip()
        if not body or body.startswith("#"):
            continue
        if line[0] in " -" and key in out:
            if body.startswith("- ") and ": " not in body and isinstance(out[key], list):
                out[key].append(_scalar(body[2:]))
            else:
                out.pop(key)  # nested structure: not parsed
        elif ":" in line and line[0] not in " -":
            key, _, value = line.partition(":")
            key = key.strip()
            out[key] = _scalar(value) if value.strip() else []
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True  # server_close() joins handler threads (py3.7+ tracks them even if daemon)

    def __init__(self, hub: HubServer):
        self.hub = hub
        self.live: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        with self.hub._lock:
            self.live.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.hub._lock:
            self.live.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client going away is not interesting
            super().handle_error(request, client_address)


class HubServer:
    """In-memory Hub on 127.0.0.1.  ``start()``, point ``HF_ENDPOINT`` at ``.url``, ``stop()``."""

    user = "tester"

    def __init__(self, lfs_threshold: int = 10 * 1024 * 1024):
        self.lfs_threshold = lfs_threshold  # preupload answers "lfs" from this size (or LFS pattern/binary)
        self.require_auth = False  # True: any request without Authorization gets 401 RepoNotFound
        self.requests: list[tuple[str, str]] = []  # (method, unquoted path) of every request, in order
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> bytes
        self._drops: list[list] = []  # [path_substring, remaining, keep]
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        self._server = _Server(self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close kept-alive client sockets, join handler threads."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            live = list(self._server.live)
        for sock in live:  # wakes handlers blocked on a kept-alive connection
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- request log
    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    reset_log = clear_log

    def log(self, method: str | None = None, contains: str = "") -> list[tuple[str, str]]:
        """Copy of the request log, optionally filtered by method and path substring."""
        with self._lock:
            return [(m, p) for m, p in self.requests if (method is None or m == method) and contains in p]

    # ----------------------------------------------------------------- fixtures from Python
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create (or return the existing) repo, with an initial commit holding ``.gitattributes``."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                repo = self._repos[(repo_type, repo_id)] = Repo(repo_type, repo_id, private=private, created=_now())
                self._commit(repo, "main", {".gitattributes": self._store(GITATTRIBUTES, False)}, "initial commit")
            return repo

    def add_files(self, repo_id: str, files: dict[str, bytes], revision: str = "main", *,
                  lfs_threshold: int | None = None, delete: tuple[str, ...] = (),
                  message: str = "seed", repo_type: str = "model") -> str:
        """Commit ``files`` (any path, hostile ones included) onto branch ``revision``; return its sha.
        Files of ``lfs_threshold`` bytes or more are stored as LFS (default: the preupload rule)."""
        with self._lock:
            repo = self.create_repo(repo_id, repo_type)
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            tree = dict(repo.commits[repo.branches[revision]].files)
            for path in delete:
                tree.pop(path, None)
            for path, data in files.items():
                lfs = self._wants_lfs(path, data) if lfs_threshold is None else len(data) >= lfs_threshold
                tree[path] = self._store(data, lfs)
                if lfs:
                    repo.lfs_oids.add(tree[path].sha256)
            return self._commit(repo, revision, tree, message)

    def create_branch(self, repo_id: str, branch: str, start: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            repo.branches[branch] = self._resolve(repo, start).sha
            return repo.branches[branch]

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``revision`` (branch or sha) resolves to."""
        with self._lock:
            return self._resolve(self._repo(repo_type, repo_id), revision).sha

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            return self._blobs[self._resolve(self._repo(repo_type, repo_id), revision).files[path].sha256]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, Entry]:
        with self._lock:
            return dict(self._resolve(self._repo(repo_type, repo_id), revision).files)

    # ----------------------------------------------------------------- fault knobs
    def set_gated(self, repo_id: str, status: int | None = 401, repo_type: str = "model") -> None:
        """Gate a repo: resolve (HEAD/GET) answers ``status`` with ``X-Error-Code: GatedRepo``; None ungates."""
        with self._lock:
            self.create_repo(repo_id, repo_type).gated_status = status

    def set_read_only(self, repo_id: str, read_only: bool = True, repo_type: str = "model") -> None:
        """The token may read but not write this repo: every write answers 403."""
        with self._lock:
            self.create_repo(repo_id, repo_type).read_only = read_only

    def drop_connection_once(self, path_substring: str, times: int = 1, keep: float = 0.5) -> None:
        """The next ``times`` GETs of a resolve path containing ``path_substring`` send full headers
        (Content-Length of the whole body) but only the first ``keep`` fraction of the body, then close
        the socket."""
        with self._lock:
            self._drops.append([path_substring, times, keep])

    def reset_faults(self) -> None:
        """Forget pending connection drops and turn ``require_auth`` off (per-repo knobs stay)."""
        with self._lock:
            self._drops.clear()
            self.require_auth = False

    # ----------------------------------------------------------------- internals (hold _lock)
    def _take_drop(self, path: str) -> float | None:
        """Fraction of the body to send if this GET must be cut short, else None."""
        with self._lock:
            for d in self._drops:
                if d[0] in path and d[1] > 0:
                    d[1] -= 1
                    return d[2]
            return None

    def _wants_lfs(self, path: str, data_or_sample: bytes, size: int | None = None) -> bool:
        size = len(data_or_sample) if size is None else size
        name = path.rsplit("/", 1)[-1]
        return (size >= self.lfs_threshold or b"\0" in data_or_sample[:512]
                or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS))

    def _store(self, data: bytes, lfs: bool) -> Entry:
        oid = hashlib.sha256(data).hexdigest()
        self._blobs[oid] = data
        return Entry(len(data), oid, lfs, git_blob_sha1(lfs_pointer(oid, len(data)) if lfs else data))

    def _commit(self, repo: Repo, branch: str, files: dict[str, Entry], title: str) -> str:
        parent = repo.branches.get(branch)
        seed = f"{repo.type}/{repo.id}\n{parent}\n{title}\n{time.time_ns()}\n{len(repo.commits)}\n"
        seed += "".join(f"{p}\0{e.sha256}\0{e.lfs}\n" for p, e in sorted(files.items()))
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, files, title, _now())
        repo.branches[branch] = sha
        return sha

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository Not Found for {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        sha = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def _file_json(self, path: str, e: Entry, kind: str = "tree") -> dict:
        pointer_size = len(lfs_pointer(e.sha256, e.size))
        lfs = {"oid" if kind == "tree" else "sha256": e.sha256, "size": e.size, "pointerSize": pointer_size}
        if kind == "sibling":
            return {"rfilename": path, "size": e.size, "blobId": e.git_oid, **({"lfs": lfs} if e.lfs else {})}
        return {"type": "file", "path": path, "size": e.size, "oid": e.git_oid, **({"lfs": lfs} if e.lfs else {})}

    def _tree(self, commit: Commit, base: str, recursive: bool, exact: list[str] | None = None) -> list[dict]:
        """Tree listing (``exact`` given: paths-info for exactly those paths)."""
        prefix = base.strip("/") + "/" if base.strip("/") else ""
        out: dict[str, dict] = {}
        for path, entry in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for i in range(1, len(parts) if recursive or exact else min(2, len(parts))):
                d = prefix + "/".join(parts[:i])
                dir_oid = hashlib.sha1(f"{commit.sha}:{d}".encode()).hexdigest()
                out.setdefault(d, {"type": "directory", "path": d, "oid": dir_oid, "size": 0})
            if recursive or exact or len(parts) == 1:
                out[path] = self._file_json(path, entry)
        if exact is not None:
            return [out[p] for p in exact if p in out]
        if prefix and not out:
            raise HubError(404, f"{base} does not exist on {commit.sha}", "EntryNotFound")
        return [out[p] for p in sorted(out)]

    def _info(self, repo: Repo, commit: Commit, blobs: bool) -> dict:
        readme = commit.files.get("README.md")
        card = front_matter(self._blobs[readme.sha256].decode("utf-8", "replace")) if readme else {}
        tags = [str(t) for t in (card.get("tags") if isinstance(card.get("tags"), list) else [])]
        if isinstance(card.get("library_name"), str) and card["library_name"] not in tags:
            tags.insert(0, card["library_name"])
        siblings = [self._file_json(p, e, "sibling") if blobs else {"rfilename": p}
                    for p, e in sorted(commit.files.items())]
        return {"_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id,
                **({"modelId": repo.id} if repo.type == "model" else {}),
                "author": repo.id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
                "createdAt": repo.created, "private": repo.private, "disabled": False,
                "gated": "auto" if repo.gated_status else False, "downloads": 0, "likes": 0, "tags": tags,
                "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
                "cardData": card or None, "siblings": siblings}


class _Handler(BaseHTTPRequestHandler):
    """Routes one request.  Path segments are split *before* unquoting ("refs%2Fpr%2F1" is one)."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        self.hub = self.server.hub
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.req_path = unquote(split.path)
        with self.hub._lock:
            self.hub.requests.append((self.command, self.req_path))
        self.body = self._read_body()
        try:
            self._route([unquote(p) for p in split.path.split("/")[1:]])
        except HubError as e:
            safe = " ".join(e.message.split()).encode("ascii", "backslashreplace").decode()  # header-safe
            headers = {"X-Error-Message": safe, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            self._send(e.status, {"error": e.message}, headers=headers)
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception as e:  # a bug here: show it, and tell the client
            traceback.print_exc()
            self.close_connection = True
            self._send(500, {"error": f"hub_server: {e!r}"})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _json(self) -> dict:
        return json.loads(self.body or b"{}")

    def _send(self, status: int, payload, ctype: str = "application/json", headers: dict | None = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # ------------------------------------------------------------------ routing
    def _route(self, parts: list[str]) -> None:
        hub, method = self.hub, self.command
        if parts[:1] == ["__lfs"]:  # pre-signed upload/verify hrefs: no auth, like a storage bucket
            return self._lfs_object(parts[1])
        if parts == ["api", "agent-harnesses"]:
            return self._send(200, {"standardEnvVars": [], "harnesses": {}})
        if hub.require_auth and not self.headers.get("Authorization"):
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        if parts[:1] == ["api"] and len(parts) >= 2 and parts[1] not in _TYPES:
            return self._api_misc(method, "/".join(parts[1:]))
        if parts[:1] == ["api"] and len(parts) >= 4:
            repo_type, repo_id, action = _TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            with hub._lock:
                return self._api_repo(hub._repo(repo_type, repo_id), action)
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(parts[0], "model")
        parts = parts[1:] if repo_type != "model" else parts
        if parts[0] != "api" and len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        if parts[2:] == ["info", "lfs", "objects", "batch"] and parts[1].endswith(".git") and method == "POST":
            with hub._lock:
                return self._lfs_batch(hub._repo(repo_type, f"{parts[0]}/{parts[1][:-4]}"))
        raise HubError(404, f"hub_server: no route for {method} {self.path}")

    def _writable(self, repo: Repo) -> None:
        if repo.read_only:
            raise HubError(403, f"You don't have the rights to write to {repo.id}")

    def _api_misc(self, method: str, route: str) -> None:
        hub = self.hub
        if route == "whoami-v2":
            return self._send(200, {"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if route == "validate-yaml" and method == "POST":
            return self._send(200, {"errors": [], "warnings": []})
        if route in ("repos/create", "repos/delete") and method in ("POST", "DELETE"):
            body = self._json()
            repo_type = body.get("type") or "model"
            repo_id = f"{body.get('organization') or hub.user}/{body['name']}"
            url = f"{hub.url}/{_PREFIX[repo_type]}{repo_id}"
            with hub._lock:
                existing = hub._repos.get((repo_type, repo_id))
                if existing is not None:
                    self._writable(existing)
                if route == "repos/delete":
                    del hub._repos[(repo_type, hub._repo(repo_type, repo_id).id)]
                    return self._send(200, {})
                if existing is not None:
                    return self._send(409, {"error": f"You already created this {repo_type} repo", "url": url},
                                      headers={"X-Error-Message": f"You already created this {repo_type} repo"})
                hub.create_repo(repo_id, repo_type, private=body.get("private") or body.get("visibility") == "private")
            return self._send(200, {"url": url, "name": repo_id, "id": repo_id})
        raise HubError(404, f"hub_server: no route for {method} /api/{route}")

    def _api_repo(self, repo: Repo, action: list[str]) -> None:
        hub, method = self.hub, self.command
        verb, rev = ([*action, "", ""])[:2]
        if method == "GET" and verb in ("", "revision"):
            commit = hub._resolve(repo, rev if verb else "main")
            return self._send(200, hub._info(repo, commit, bool(self.query.get("blobs"))))
        if method == "GET" and verb == "tree":
            recursive = self.query.get("recursive", "false").lower() in ("1", "true")
            return self._send(200, hub._tree(hub._resolve(repo, rev), "/".join(action[2:]), recursive))
        if method == "POST" and verb == "paths-info":
            paths = parse_qs(self.body.decode()).get("paths", [])
            return self._send(200, hub._tree(hub._resolve(repo, rev), "", True, exact=paths))
        if method == "GET" and verb == "refs":
            def ref(name, sha):
                return {"name": name, "ref": name if name.startswith("refs/") else f"refs/heads/{name}",
                        "targetCommit": sha}
            refs = {"branches": [ref(n, s) for n, s in repo.branches.items() if not n.startswith("refs/pr/")],
                    "converts": [], "tags": []}
            if self.query.get("include_prs"):
                refs["pullRequests"] = [ref(n, s) for n, s in repo.branches.items() if n.startswith("refs/pr/")]
            return self._send(200, refs)
        if method == "POST" and verb == "branch":
            self._writable(repo)
            if rev in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{rev}")
            repo.branches[rev] = hub._resolve(repo, self._json().get("startingPoint") or "main").sha
            return self._send(200, {})
        if method == "POST" and verb == "preupload":
            self._writable(repo)
            commit = hub._resolve(repo, rev)
            files = []
            for f in self._json()["files"]:
                sample, existing = base64.b64decode(f["sample"]), commit.files.get(f["path"])
                mode = "lfs" if hub._wants_lfs(f["path"], sample, f["size"]) else "regular"
                oid = existing and existing.etag  # what the client compares with its local oid
                files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return self._send(200, {"files": files, "commitOid": commit.sha})
        if method == "POST" and verb == "commit":
            return self._commit(repo, rev)
        raise HubError(404, f"hub_server: no route for {method} {self.path}")

    def _commit(self, repo: Repo, branch: str) -> None:
        hub = self.hub
        self._writable(repo)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        ops = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = ops.pop(0)["value"] if ops and ops[0]["key"] == "header" else {}
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        pr_url = None
        if self.query.get("create_pr"):
            num = 1 + sum(n.startswith("refs/pr/") for n in repo.branches)
            repo.branches[f"refs/pr/{num}"] = repo.branches[branch]
            branch, pr_url = f"refs/pr/{num}", f"{hub.url}/{_PREFIX[repo.type]}{repo.id}/discussions/{num}"
        tree = dict(repo.commits[repo.branches[branch]].files)
        for op in ops:
            key, value = op["key"], op["value"]
            path = value["path"]
            if key == "file":
                tree[path] = hub._store(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if value["oid"] not in repo.lfs_oids:
                    raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                tree[path] = hub._store(hub._blobs[value["oid"]], True)
            elif key in ("deletedFile", "deletedFolder"):
                prefix = path.rstrip("/") + "/"
                gone = [p for p in tree if p == path or (key == "deletedFolder" and p.startswith(prefix))]
                if not gone:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
            else:
                raise HubError(400, f"hub_server: unsupported commit operation {key!r}")
        sha = hub._commit(repo, branch, tree, header.get("summary") or "commit")
        self._send(200, {"commitUrl": f"{hub.url}/{_PREFIX[repo.type]}{repo.id}/commit/{sha}",
                         "commitOid": sha, "success": True, "pullRequestUrl": pr_url})

    # ------------------------------------------------------------------ LFS
    def _lfs_batch(self, repo: Repo) -> None:
        self._writable(repo)
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(422, "hub_server: only LFS uploads are supported")
        objects = []
        for obj in body["objects"]:
            out = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in repo.lfs_oids:
                href = f"{self.hub.url}/__lfs/{obj['oid']}?repo={quote(repo.type + ':' + repo.id, safe='')}"
                out.update(authenticated=True, actions={"upload": {"href": href}, "verify": {"href": href}})
            objects.append(out)
        self._send(200, {"transfer": "basic", "objects": objects}, ctype="application/vnd.git-lfs+json")

    def _lfs_object(self, oid: str) -> None:
        hub = self.hub
        repo_type, _, repo_id = self.query.get("repo", "").partition(":")
        with hub._lock:
            repo = hub._repo(repo_type, repo_id)
            if self.command == "PUT":
                if hashlib.sha256(self.body).hexdigest() != oid:
                    raise HubError(400, f"sha256 of the uploaded body does not match {oid}")
                hub._store(self.body, True)
                repo.lfs_oids.add(oid)
            elif self.command == "POST" and (  # verify
                    oid not in repo.lfs_oids or len(hub._blobs[oid]) != self._json().get("size")):
                raise HubError(404, f"LFS object {oid} not found")
        self._send(200, {})

    # ------------------------------------------------------------------ downloads
    def _resolve_file(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._repo(repo_type, repo_id)
            if repo.gated_status:
                raise HubError(repo.gated_status, f"Access to model {repo_id} is restricted. You must have "
                               "access to it and be authenticated to access it. Please log in.", "GatedRepo")
            commit = hub._resolve(repo, rev)
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
            data = hub._blobs[entry.sha256]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes"}
        status, start, end = 200, 0, len(data)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if m and self.command == "GET":
            if m.group(1):
                start, end = int(m.group(1)), min(int(m.group(2)) + 1 if m.group(2) else end, end)
            else:  # suffix range: last N bytes
                start = max(0, end - int(m.group(2) or 0))
            if start >= len(data) and len(data) > 0:
                raise HubError(416, "Requested range not satisfiable", None, {"Content-Range": f"bytes */{len(data)}"})
            status, headers["Content-Range"] = 206, f"bytes {start}-{max(start, end - 1)}/{len(data)}"
        body = data[start:end]
        keep = hub._take_drop(self.req_path) if self.command == "GET" else None
        if keep is not None:
            self.send_response(status)
            for k, v in {**headers, "Content-Type": "application/octet-stream",
                         "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: int(len(body) * keep)])
            self.wfile.flush()
            self.close_connection = True  # socketserver then shuts the socket: the client sees a short body
            return
        self._send(status, body, "application/octet-stream", headers)
