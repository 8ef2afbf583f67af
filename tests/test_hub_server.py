"""The loopback Hub (tests/hub_server.py) driven by the real huggingface_hub client over HTTP."""

import hashlib
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


def new_repo_id(name: str = "repo") -> str:
    return f"tester/{name}-{uuid.uuid4().hex[:10]}"


def payload(tag: str, size: int = 4096) -> bytes:
    """Unique, binary-looking bytes (a NUL inside), distinct per test."""
    seed = hashlib.sha256(f"{tag}-{uuid.uuid4()}".encode()).digest()
    return (b"\0" + seed * (size // len(seed) + 1))[:size]


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.url)


def test_endpoint_is_the_loopback_server(hub):
    from huggingface_hub import constants

    assert hub.url.startswith("http://127.0.0.1:")
    assert hub.url == constants.ENDPOINT
    assert constants.HF_HUB_DISABLE_XET
    assert not constants.HF_HUB_OFFLINE


def test_create_repo_and_exist_ok(hub, api):
    repo_id = new_repo_id()
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.startswith(hub.url)
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(repo_id)
    assert info.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    assert api.repo_exists(repo_id)
    assert not api.repo_exists(new_repo_id("missing"))
    assert ("POST", "/api/repos/create") in hub.log()


def test_upload_safetensors_takes_lfs_route(hub, api, tmp_path):
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    data = payload("lfs")
    info = api.upload_file(path_or_fileobj=data, path_in_repo="adapter_model.safetensors", repo_id=repo_id)

    assert hub.log("POST", f"/{repo_id}.git/info/lfs/objects/batch")
    assert hub.log("PUT", "/__lfs/" + hashlib.sha256(data).hexdigest())
    assert hub.log("POST", f"/api/models/{repo_id}/commit/main")
    entry = hub.files(repo_id)["adapter_model.safetensors"]
    assert entry.lfs and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert info.oid == hub.head(repo_id)

    path = hf_hub_download(repo_id, "adapter_model.safetensors", cache_dir=tmp_path)
    assert Path(path).read_bytes() == data
    assert api.file_exists(repo_id, "adapter_model.safetensors")
    assert not api.file_exists(repo_id, "nope.safetensors")


def test_upload_folder_is_one_commit(hub, api, tmp_path):
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    folder = tmp_path / "folder"
    files = {
        "adapter_config.json": b'{"r": 8}\n',
        "adapter_model.safetensors": payload("folder"),
        "README.md": b"---\nlibrary_name: peft\nbase_model: org/base\ntags:\n- lora\n- transformers\n---\n# hi\n",
        "sub/notes.txt": b"nested\n",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="many files")

    assert len(hub.log("POST", "/commit/")) == 1
    assert hub.log("POST", "/api/validate-yaml")  # README.md front matter is validated first
    model = api.model_info(repo_id)
    assert model.sha == info.oid == hub.head(repo_id)
    assert model.library_name == "peft" and "lora" in model.tags
    assert model.card_data.base_model == "org/base"
    assert set(api.list_repo_files(repo_id)) == set(files) | {".gitattributes"}
    for name, data in files.items():
        assert hub.read_file(repo_id, name) == data
    hf_hub_download(repo_id, "adapter_config.json", cache_dir=tmp_path / "cache")
    ref = tmp_path / "cache" / f"models--tester--{repo_id.split('/')[1]}" / "refs" / "main"
    assert ref.read_text() == model.sha


def test_snapshot_download_allow_patterns(hub, tmp_path):
    repo_id = new_repo_id()
    files = {"a.json": b"{}", "sub/b.json": b"[1]", "weights.safetensors": payload("w"), "c.txt": b"c"}
    sha = hub.add_files(repo_id, files)
    hub.clear_log()

    folder = Path(snapshot_download(repo_id, allow_patterns=["*.json"], cache_dir=tmp_path))
    assert folder.name == sha
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == ["a.json", os.path.join("sub", "b.json")]
    assert (folder / "sub" / "b.json").read_bytes() == b"[1]"
    fetched = {path.split("/resolve/", 1)[1] for _, path in hub.log("GET", "/resolve/")}
    assert fetched == {f"{sha}/a.json", f"{sha}/sub/b.json"}
    assert not hub.log(contains="weights.safetensors") and not hub.log(contains="c.txt")
    assert hub.log("GET", f"/api/models/{repo_id}/tree/{sha}")


def test_revision_pinning_and_branches(hub, api, tmp_path):
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    old, new = payload("old"), payload("new")
    first = api.upload_file(path_or_fileobj=old, path_in_repo="w.safetensors", repo_id=repo_id)
    second = api.upload_file(path_or_fileobj=new, path_in_repo="w.safetensors", repo_id=repo_id)
    assert first.oid != second.oid

    assert Path(hf_hub_download(repo_id, "w.safetensors", revision=first.oid, cache_dir=tmp_path)).read_bytes() == old
    assert Path(hf_hub_download(repo_id, "w.safetensors", cache_dir=tmp_path)).read_bytes() == new
    assert api.model_info(repo_id, revision=first.oid).sha == first.oid

    api.create_branch(repo_id, branch="v1", revision=first.oid)
    api.create_branch(repo_id, branch="v1", exist_ok=True)
    assert Path(hf_hub_download(repo_id, "w.safetensors", revision="v1", cache_dir=tmp_path)).read_bytes() == old
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main", "v1"}


def test_local_files_only_makes_zero_requests(hub, tmp_path):
    repo_id = new_repo_id()
    data = payload("local")
    hub.add_files(repo_id, {"model.safetensors": data, "config.json": b"{}"})
    first = hf_hub_download(repo_id, "model.safetensors", cache_dir=tmp_path)
    snapshot_download(repo_id, cache_dir=tmp_path)
    hub.clear_log()

    again = hf_hub_download(repo_id, "model.safetensors", cache_dir=tmp_path, local_files_only=True)
    folder = snapshot_download(repo_id, cache_dir=tmp_path, local_files_only=True)
    assert again == first and Path(again).read_bytes() == data
    assert (Path(folder) / "config.json").read_bytes() == b"{}"
    assert hub.log() == []


def test_missing_repo_file_and_revision(hub, api, tmp_path):
    repo_id = new_repo_id()
    hub.add_files(repo_id, {"config.json": b"{}"})

    with pytest.raises(RepositoryNotFoundError) as info:
        hf_hub_download(new_repo_id("missing"), "config.json", cache_dir=tmp_path)
    assert not isinstance(info.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(new_repo_id("missing"))
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "absent.json", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch", cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="f" * 40)


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repo(hub, tmp_path, status):
    repo_id = new_repo_id("gated")
    hub.add_files(repo_id, {"config.json": b"{}"})
    hub.set_gated(repo_id, status)
    with pytest.raises(GatedRepoError) as info:
        hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)
    assert info.value.response.status_code == status
    with pytest.raises(GatedRepoError):
        snapshot_download(repo_id, cache_dir=tmp_path / "snap")
    hub.set_gated(repo_id, None)
    assert Path(hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)).read_bytes() == b"{}"


def test_read_only_and_require_auth(hub, api, tmp_path):
    repo_id = new_repo_id()
    hub.add_files(repo_id, {"config.json": b"{}"})
    hub.set_read_only(repo_id)
    with pytest.raises(HfHubHTTPError) as info:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert info.value.response.status_code == 403
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id  # 403, then repo_info finds it

    hub.require_auth = True
    try:
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_id, "config.json", cache_dir=tmp_path, token=False)
        assert hf_hub_download(repo_id, "config.json", cache_dir=tmp_path)  # HF_TOKEN is sent
    finally:
        hub.require_auth = False


def test_hostile_listing_is_served(hub, api):
    repo_id = new_repo_id("hostile")
    hub.add_files(repo_id, {"../x": b"evil", "ok.json": b"{}"})
    assert "../x" in api.list_repo_files(repo_id)
    assert "../x" in [s.rfilename for s in api.model_info(repo_id).siblings]


def _check_blobs(cache: Path) -> list[Path]:
    """Every blob in the cache is named after its content's hash; no partial download is left."""
    blobs = [p for p in cache.rglob("blobs/*") if p.is_file()]
    for blob in blobs:
        data = blob.read_bytes()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert blob.name in (hashlib.sha256(data).hexdigest(), git_sha1)
    assert not list(cache.rglob("*.incomplete"))
    return blobs


def test_dropped_connection_never_corrupts_the_cache(hub, tmp_path):
    repo_id = new_repo_id()
    data = payload("drop", 256 * 1024)
    hub.add_files(repo_id, {"model.safetensors": data})
    hub.drop_connection_once("model.safetensors")
    try:
        path = hf_hub_download(repo_id, "model.safetensors", cache_dir=tmp_path)
    except Exception:  # giving up is fine too, as long as nothing corrupt is cached
        assert _check_blobs(tmp_path) == []
    else:
        assert Path(path).read_bytes() == data
        assert len(_check_blobs(tmp_path)) == 1
    gets = hub.log("GET", "/resolve/")
    assert len(gets) >= 1


def test_gives_up_cleanly_when_every_attempt_is_cut(hub, tmp_path):
    repo_id = new_repo_id()
    hub.add_files(repo_id, {"model.safetensors": payload("cut", 64 * 1024)})
    hub.drop_connection_once("model.safetensors", times=100, keep=0.0)  # no byte ever arrives
    with pytest.raises(httpx2.TransportError):  # huggingface_hub re-raises the last transport error
        hf_hub_download(repo_id, "model.safetensors", cache_dir=tmp_path)
    assert _check_blobs(tmp_path) == []
    assert len(hub.log("GET", "/resolve/")) == 6  # first try + 5 retries


def test_range_requests(hub):
    repo_id = new_repo_id()
    data = payload("range", 1000)
    hub.add_files(repo_id, {"model.safetensors": data})
    url = f"{hub.url}/{repo_id}/resolve/main/model.safetensors"

    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as r:
        assert r.status == 206 and r.read() == data[100:]
        assert r.headers["Content-Range"] == "bytes 100-999/1000"
        assert r.headers["X-Repo-Commit"] == hub.head(repo_id)
        assert r.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=10-19"})) as r:
        assert r.status == 206 and r.read() == data[10:20]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=1000-"}))
    assert info.value.code == 416
    info.value.close()
