"""lora_ckpt.hub through the real huggingface_hub client, over HTTP, against the loopback Hub
(tests/hub_server.py): push with a model card, pull by revision, offline re-reads, hf:// sources in
the CLI, typed errors with exit code 4, dropped connections, hostile listings, invalid ids."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from lora_ckpt import hub as lhub
from lora_ckpt.cli import main
from lora_ckpt.conversion import verify
from lora_ckpt.errors import (
    EntryNotFoundError,
    HubError,
    HubPermissionError,
    InvalidRepoIdError,
    NotCachedError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafeRepoError,
)
from lora_ckpt.hub import client as hub_client
from lora_ckpt.layouts import load_adapter

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
PEFT_LORA = FIX / "peft" / "llama-lora"
PEFT_DORA = FIX / "peft" / "llama-dora"
LLAMA_CONFIG = FIX / "hf" / "llama" / "config.json"


def new_repo_id(name: str = "repo") -> str:
    return f"tester/{name}-{uuid.uuid4().hex[:10]}"


def peft_files(src: Path = PEFT_LORA, base: str | None = None) -> dict[str, bytes]:
    """The PEFT fixture's two files, with ``base_model_name_or_path`` rewritten to ``base``."""
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    return {"adapter_model.safetensors": (src / "adapter_model.safetensors").read_bytes(),
            "adapter_config.json": json.dumps(cfg, indent=2, sort_keys=True).encode()}


def seed_base(hub) -> str:
    """A base-model repo holding the tiny Llama config.json (and a big weight file nobody should fetch)."""
    repo_id = new_repo_id("base")
    hub.add_files(repo_id, {"config.json": LLAMA_CONFIG.read_bytes(), "model.safetensors": b"\0" * 300_000})
    return repo_id


def fetched(hub, method: str | None = "GET") -> set[str]:
    """Repo paths downloaded (GET resolve; any method with None) since the log was cleared."""
    return {p.split("/resolve/", 1)[1].split("/", 1)[1] for _, p in hub.log(method, "/resolve/")}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def check_blobs(cache: Path) -> list[Path]:
    """Every cached blob is named after its content's hash; no partial download is left."""
    blobs = [p for p in cache.rglob("blobs/*") if p.is_file()]
    for blob in blobs:
        data = blob.read_bytes()
        assert blob.name in (hashlib.sha256(data).hexdigest(),
                             hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    assert not list(cache.rglob("*.incomplete"))
    return blobs


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["-q", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


# --------------------------------------------------------------------------- push
def test_push_uploads_adapter_card_and_config_in_one_commit(hub):
    base, repo = seed_base(hub), new_repo_id("pushed")
    hub.clear_log()
    summary = lhub.push(PEFT_DORA, repo, base_model=base, quiet=True)

    sha = hub.head(repo)
    assert summary.startswith(f"pushed 14 module(s) (peft -> peft) to {repo}: ") and summary.endswith(sha)
    weights = hub.read_file(repo, "adapter_model.safetensors")
    assert hub.files(repo)["adapter_model.safetensors"].lfs
    assert hub.log("POST", f"/{repo}.git/info/lfs/objects/batch")
    assert hub.log("PUT", "/__lfs/" + hashlib.sha256(weights).hexdigest())
    assert len(hub.log("POST", f"/api/models/{repo}/commit/")) == 1
    assert set(hub.files(repo)) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert fetched(hub) == {"config.json"}  # the base's config, for the conversion; never its weights

    raw = hub.read_file(repo, "adapter_config.json").decode()
    cfg = json.loads(raw)
    assert raw == json.dumps(cfg, indent=2, sort_keys=True)  # PEFT's formatting, no trailing newline
    assert cfg["base_model_name_or_path"] == base and cfg["task_type"] == "CAUSAL_LM" and cfg["use_dora"]

    card = hub.read_file(repo, "README.md").decode()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == base
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == sorted(meta["tags"]) == [f"base_model:adapter:{base}", "lora", "transformers"]
    assert "- DoRA: yes; rsLoRA: no" in card and "rank: 4 (14 module(s))" in card
    assert "converted from the peft layout at" in card and "verification: 14 module(s) compared" in card
    assert f'PeftModel.from_pretrained(base, "{repo}")' in card
    body_end = card.rstrip().split("### Framework versions", 1)[1]
    assert "- PEFT 0.21.2" in body_end and "- lora-ckpt " in body_end

    from huggingface_hub import HfApi
    info = HfApi().model_info(repo)
    assert info.library_name == "peft" and info.card_data.base_model == base
    assert load_adapter(PEFT_DORA).modules.keys() == load_adapter(
        lhub.resolve_source(f"hf://{repo}", layout="peft")).modules.keys()


def test_push_from_hf_source_to_branch_without_base_model_warns(hub, caplog):
    src, name = new_repo_id("src"), f"pushed-{uuid.uuid4().hex[:8]}"
    sha = hub.add_files(src, {f"run/{k}": v for k, v in peft_files(base=None).items()})
    summary = lhub.push(f"hf://{src}/run", name, branch="v1", private=True, commit_message="first", quiet=True)
    repo = f"{hub.user}/{name}"  # no namespace given: the token's user
    assert f"to {repo}@v1: " in summary and summary.endswith(hub.head(repo, "v1"))
    assert hub.head(repo, "main") != hub.head(repo, "v1")
    assert "no base model recorded" in caplog.text
    card = hub.read_file(repo, "README.md", "v1").decode()
    assert f"converted from the peft layout at `hf://{src}@{sha}/run`" in card and f'"{repo}"' in card
    meta = front_matter(hub.read_file(repo, "README.md", "v1").decode())
    assert "base_model" not in meta and meta["tags"] == ["lora", "transformers"]
    assert json.loads(hub.read_file(repo, "adapter_config.json", "v1"))["base_model_name_or_path"] is None


# --------------------------------------------------------------------------- pull
def test_pull_pins_revisions_and_copies_atomically(hub, tmp_path):
    repo = new_repo_id()
    first = hub.add_files(repo, peft_files(PEFT_LORA))
    second = hub.add_files(repo, peft_files(PEFT_DORA))
    old = peft_files(PEFT_LORA)["adapter_model.safetensors"]
    new = peft_files(PEFT_DORA)["adapter_model.safetensors"]

    out = lhub.pull(repo, str(tmp_path / "old"), revision=first, quiet=True)
    assert (out / "adapter_model.safetensors").read_bytes() == old
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (lhub.pull(f"hf://{repo}@{first}") / "adapter_model.safetensors").read_bytes() == old
    cached = lhub.pull(f"hf://{repo}", layout="peft")
    assert cached.name == second and (cached / "adapter_model.safetensors").read_bytes() == new

    with pytest.raises(FileExistsError):
        lhub.pull(repo, str(out), revision=second)
    assert (out / "adapter_model.safetensors").read_bytes() == old
    lhub.pull(repo, str(out), force=True)
    assert (out / "adapter_model.safetensors").read_bytes() == new
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_offline_rereads_the_cache_with_zero_requests(hub, tmp_path, monkeypatch):
    repo, other = new_repo_id(), new_repo_id("never-pulled")
    hub.add_files(repo, peft_files())
    hub.add_files(other, peft_files())
    online = lhub.resolve_source(f"hf://{repo}", quiet=True)
    sha = online.name

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # is_offline_mode() reads it at call time
    hub.clear_log()
    assert lhub.resolve_source(f"hf://{repo}") == online
    assert lhub.resolve_source(f"hf://{repo}@{sha}", layout="peft") == online
    out = lhub.pull(repo, str(tmp_path / "copy"))
    assert (out / "adapter_config.json").read_bytes() == (online / "adapter_config.json").read_bytes()
    with pytest.raises(NotCachedError, match=f"{other}.*HF_HUB_OFFLINE=1"):
        lhub.resolve_source(f"hf://{other}")
    assert hub.log() == []


def test_hf_source_in_cli_convert_downloads_only_the_needed_files(hub, tmp_path, capsys):
    repo, base = new_repo_id(), seed_base(hub)
    files = {f"run1/{k}": v for k, v in peft_files().items()}
    files.update({"run1/README.md": b"# card\n", "run1/optimizer.pt": b"\0" * 200_000,
                  "model.safetensors": b"\0" * 300_000, "run1/adapter_model.bin": b"\0" * 1000})
    hub.add_files(repo, files)
    hub.clear_log()
    rc, out, err = cli(capsys, "convert", f"hf://{repo}/run1", "--to", "torchtune", "-o", tmp_path / "tt",
                       "--base-config", f"hf://{base}")
    assert rc == 0, err
    assert "verified: 14 module(s) compared" in out
    # HEAD or GET: only what the layouts read; never optimizer.pt, README.md, adapter_model.bin, the base's weights
    assert fetched(hub, None) == {"run1/adapter_model.safetensors", "run1/adapter_config.json", "config.json"}
    assert (tmp_path / "tt" / "adapter_model.pt").is_file()


def test_base_config_fetched_from_the_hub_when_needed(hub, tmp_path, monkeypatch):
    base = seed_base(hub)
    src = tmp_path / "adapter"
    src.mkdir()
    for name, data in peft_files(base=base).items():
        (src / name).write_bytes(data)

    def read():
        return load_adapter(src, resolve_base_config=lhub.fetch_model_config)

    hub.clear_log()
    no_resolver = load_adapter(src)  # the layout registry itself never reaches the network
    assert no_resolver.meta.model_config is None and hub.log() == []
    adapter = read()
    assert adapter.meta.model_config is not None and adapter.meta.family == "llama"
    assert any("fetched from the Hub" in n for n in adapter.meta.notes)
    assert fetched(hub) == {"config.json"}
    hub.clear_log()
    assert any("Hugging Face cache" in n for n in read().meta.notes)
    assert hub.log() == []  # second time: from the cache, no request

    missing = new_repo_id("no-base")
    (src / "adapter_config.json").write_bytes(peft_files(base=missing)["adapter_config.json"])
    adapter = read()  # a note, not an error
    assert adapter.meta.model_config is None
    assert any(missing in n and "not fetched" in n and "repo not found" in n for n in adapter.meta.notes)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.clear_log()
    assert any("HF_HUB_OFFLINE=1" in n for n in read().meta.notes) and hub.log() == []


def test_unreachable_hub_is_a_quick_note_not_twenty_seconds_of_retries(hub, monkeypatch):
    import time

    dead = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_client, "_UNREACHABLE", set())
    start = time.monotonic()
    path, note = lhub.fetch_model_config(new_repo_id("base"))
    assert path is None and "unreachable" in note and dead in note
    assert lhub.fetch_model_config(new_repo_id("base"))[0] is None  # remembered: no second probe
    assert time.monotonic() - start < 5 and hub.log() == []
    assert lhub.fetch_model_config("fixtures/hf/llama") == (None, None)  # a local path is not a repo id


# --------------------------------------------------------------------------- round trip
def test_round_trip_pull_convert_push_in_three_commands(hub, tmp_path, capsys):
    base, repo, dest = seed_base(hub), new_repo_id("src"), new_repo_id("dest")
    hub.add_files(repo, peft_files(PEFT_DORA, base=base))
    pulled, tt = tmp_path / "pulled", tmp_path / "epoch_0"

    rc, out, err = cli(capsys, "pull", repo, "-o", pulled)
    assert rc == 0 and f"pulled {repo} to {pulled}" in out, err
    rc, out, err = cli(capsys, "convert", pulled, "--to", "torchtune", "-o", tt)  # base config: from the Hub
    assert rc == 0, err
    assert "fetched from the Hub" in out and "verified: 14 module(s)" in out
    rc, out, err = cli(capsys, "push", tt, dest)
    assert rc == 0, err
    assert out.startswith(f"pushed 14 module(s) (torchtune -> peft) to {dest}: ")

    cfg = json.loads(hub.read_file(dest, "adapter_config.json"))
    assert cfg["base_model_name_or_path"] == base and cfg["use_dora"] and cfg["task_type"] == "CAUSAL_LM"
    card = hub.read_file(dest, "README.md").decode()
    assert front_matter(card)["base_model"] == base and "converted from the torchtune layout" in card
    rep = verify(PEFT_DORA, lhub.resolve_source(f"hf://{dest}"))
    assert rep.ok and rep.worst < 1e-6, rep.summary()


# --------------------------------------------------------------------------- errors
def _one_line_hub_error(capsys, args, repo_id, code=4, text=""):
    rc, _out, err = cli(capsys, *args)
    assert rc == code, err
    assert err.count("\n") == 1 and "Traceback" not in err and repo_id in err and text in err, err
    return err


def test_missing_repo_file_and_revision_are_typed(hub, capsys):
    repo, missing = new_repo_id(), new_repo_id("missing")
    hub.add_files(repo, {"README.md": b"# only a card\n", "sub/config.json": b"{}"})

    with pytest.raises(RepoNotFoundError) as info:
        lhub.pull(missing)
    assert info.value.repo_id == missing and isinstance(info.value, FileNotFoundError)
    _one_line_hub_error(capsys, ["pull", missing], missing, text="repo not found")

    with pytest.raises(EntryNotFoundError, match="no peft weight file"):
        lhub.pull(repo, layout="peft")
    _one_line_hub_error(capsys, ["inspect", f"hf://{repo}"], repo, text="'README.md', 'sub/config.json'")
    _one_line_hub_error(capsys, ["pull", f"hf://{repo}/nope"], repo, text="no file or folder 'nope'")
    assert lhub.resolve_source(f"hf://{repo}/sub").name == "sub"  # a base-config folder is fine

    with pytest.raises(RevisionNotFoundError) as info:
        lhub.pull(repo, revision="no-such-branch")
    assert info.value.revision == "no-such-branch"
    _one_line_hub_error(capsys, ["pull", repo, "--revision", "f" * 40], repo, text="not found")


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repo_is_a_permission_error(hub, capsys, status):
    repo = new_repo_id("gated")
    hub.add_files(repo, peft_files())
    hub.set_gated(repo, status)
    with pytest.raises(HubPermissionError) as info:
        lhub.pull(repo)
    assert info.value.repo_id == repo and info.value.status == status and isinstance(info.value, PermissionError)
    _one_line_hub_error(capsys, ["convert", f"hf://{repo}", "--to", "peft", "-o", "unused"], repo, text="gated")
    check_blobs(Path(constants.HF_HUB_CACHE))


def test_missing_token_and_read_only_repo(hub, capsys, monkeypatch):
    repo = new_repo_id("ro")
    hub.add_files(repo, peft_files())
    hub.set_read_only(repo)
    with pytest.raises(HubPermissionError, match="may not write") as info:
        lhub.push(PEFT_LORA, repo, quiet=True)
    assert info.value.status == 403
    _one_line_hub_error(capsys, ["push", PEFT_LORA, repo], repo, text="HTTP 403")

    anon = new_repo_id("private")
    hub.add_files(anon, peft_files())
    hub.require_auth = True  # without a token the server answers 401, as the Hub does for private repos
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepoNotFoundError, match=r"HTTP 401.*log in"):
        lhub.pull(anon)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback_dummy_token")
    assert lhub.pull(anon).is_dir()


def test_dropped_connection_retries_or_fails_cleanly(hub, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = new_repo_id()
    files = peft_files()
    files["adapter_model.safetensors"] += b"\0" * (256 * 1024)  # big enough to be cut mid-body
    hub.add_files(repo, files)
    hub.drop_connection_once("adapter_model.safetensors")
    try:
        path = lhub.pull(repo, str(tmp_path / "out"))
    except HubError:  # giving up is fine, as long as nothing corrupt is cached
        assert check_blobs(cache) == []
    else:
        assert (path / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
        assert len(check_blobs(cache)) == 2

    repo = new_repo_id("cut")
    hub.add_files(repo, files)
    hub.drop_connection_once("adapter_model.safetensors", times=100, keep=0.0)
    with pytest.raises(HubError, match=f"{repo}.*connection") as info:
        lhub.pull(repo, quiet=True)
    assert type(info.value) is HubError and info.value.exit_code == 4
    weights_oid = hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
    cut_blobs = check_blobs(cache / ("models--" + repo.replace("/", "--")))
    assert weights_oid not in {b.name for b in cut_blobs}  # only whole files are ever cached
    hub.reset_faults()


@pytest.mark.parametrize("hostile", ["../x", "sub/../../x", "/abs/x"])
def test_path_traversal_listing_is_refused_before_any_download(hub, tmp_path, monkeypatch, hostile):
    cache = tmp_path / "home" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    repo = new_repo_id("hostile")
    hub.add_files(repo, {**peft_files(), hostile: b"evil"})
    hub.clear_log()
    with pytest.raises(UnsafeRepoError, match="escape") as info:
        lhub.pull(f"hf://{repo}", str(tmp_path / "out"))
    assert hostile in info.value.paths and info.value.repo_id == repo
    assert hub.log("GET", "/resolve/") == [] and hub.log("HEAD", "/resolve/") == []
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(cache in p.parents for p in written) and not any(p.read_bytes() == b"evil" for p in written)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["org/na me", "org/a--b", "org/x..y", "org/" + "n" * 97, "hf://org/name@../../evil",
                                 "hf://org/name/../../x", "hf://datasets/org/name", "hf://org/name@"])
def test_invalid_repo_ids_are_refused_without_any_request(hub, capsys, bad):
    with pytest.raises(InvalidRepoIdError):
        lhub.pull(bad)
    rc, _, err = cli(capsys, "pull", bad)
    assert rc == 2 and err.count("\n") == 1, err
    with pytest.raises(InvalidRepoIdError):
        lhub.push(PEFT_LORA, bad.removeprefix("hf://").split("@")[0] + " x")
    assert hub.log() == []


def test_parse_hf_url():
    assert lhub.parse_hf_url("hf://org/name") == lhub.HubSource("org/name")
    assert lhub.parse_hf_url("hf://org/name@v1/a/b") == lhub.HubSource("org/name", "v1", "a/b")
    assert lhub.parse_hf_url("hf://org/name@refs/pr/3/epoch_0") == lhub.HubSource("org/name", "refs/pr/3", "epoch_0")
    assert lhub.parse_hf_url("hf://org/name@refs%2Fpr%2F3") == lhub.HubSource("org/name", "refs/pr/3")
    assert lhub.parse_hf_url("gpt2") == lhub.HubSource("gpt2")
    assert str(lhub.parse_hf_url("org/name@abc/sub/")) == "hf://org/name@abc/sub"


# --------------------------------------------------------------------------- live (opt-in)
@pytest.mark.skipif(os.environ.get("LORA_CKPT_LIVE_HUB") != "1", reason="set LORA_CKPT_LIVE_HUB=1 (needs internet)")
def test_live_hub_pull_and_inspect(tmp_path):
    """Against huggingface.co in a fresh process (this one's huggingface_hub points at the loopback Hub).
    Pulls a small public PEFT adapter; with LORA_CKPT_LIVE_REPO=ORG/NAME and a write token in
    LORA_CKPT_LIVE_TOKEN also pushes it back (Xet uploads included)."""
    repo = os.environ.get("LORA_CKPT_LIVE_SOURCE", "ybelkada/opt-350m-lora")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    if os.environ.get("LORA_CKPT_LIVE_TOKEN"):
        env["HF_TOKEN"] = os.environ["LORA_CKPT_LIVE_TOKEN"]
    run = [sys.executable, "-m", "lora_ckpt", "-q"]
    p = subprocess.run([*run, "pull", repo, "-o", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([*run, "inspect", f"hf://{repo}"], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "lora" in p.stdout, p.stderr
    dest = os.environ.get("LORA_CKPT_LIVE_REPO")
    if dest and env.get("HF_TOKEN"):
        p = subprocess.run([*run, "push", str(tmp_path / "a"), dest, "--private"], env=env, capture_output=True,
                           text=True)
        assert p.returncode == 0 and "/commit/" in p.stdout, p.stderr
    shutil.rmtree(tmp_path / "hf", ignore_errors=True)


def test_progress_bars_are_huggingface_hubs_and_quiet_silences_them(hub, monkeypatch, capfd):
    import importlib

    from huggingface_hub.utils import are_progress_bars_disabled

    hf_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not the class of that name

    monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # as if the env var were unset
    monkeypatch.setattr(hf_tqdm, "progress_bar_states", {"_global": True})
    loud, quiet = new_repo_id("loud"), new_repo_id("quiet")
    for repo in (loud, quiet):
        hub.add_files(repo, peft_files())
    capfd.readouterr()
    lhub.pull(quiet, quiet=True)
    assert capfd.readouterr().err == "" and not are_progress_bars_disabled()  # restored afterwards
    lhub.pull(loud)
    assert "Fetching 2 files" in capfd.readouterr().err
