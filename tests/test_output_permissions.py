"""What convert, merge, pull and save_adapter create gets the permissions the process umask gives
ordinary files and directories (as ``cp`` or ``save_pretrained`` would), never the 0600/0700 of the
temp files they are written through (safetensors' own temp file, mkstemp, mkdtemp)."""

import json
import os
import stat
import uuid

import pytest

import lora_ckpt
import peers as P
from lora_ckpt import hub as lhub
from lora_ckpt.conversion import convert
from lora_ckpt.io.output import process_umask
from lora_ckpt.layouts import load_adapter, save_adapter
from lora_ckpt.merge import merge_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

LLAMA = P.FIX / "hf" / "llama"
PEFT_LORA = P.FIX / "peft" / "llama-lora"


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root):
    """(path relative to root, mode) of root and everything under it."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def assert_ordinary(root, mask):
    got = modes(root)
    want = {k: (0o777 if (root / k).is_dir() else 0o666) & ~mask for k in got}
    assert got == want and len(got) > 1


def test_process_umask_reads_without_changing_it(umask):
    assert process_umask() == umask
    assert os.umask(umask) == umask


@pytest.mark.parametrize("to", ["peft", "torchtune", "native", "loralib"])
def test_convert_output_has_ordinary_permissions(tmp_path, umask, to):
    out = tmp_path / "out"
    convert(PEFT_LORA, out, to=to, base_config=LLAMA / "config.json")
    assert_ordinary(out, umask)
    convert(PEFT_LORA, out, to=to, base_config=LLAMA / "config.json", force=True)  # the replace path too
    assert_ordinary(out, umask)


def test_merge_output_has_ordinary_permissions(tmp_path, umask):
    out = tmp_path / "merged"
    merge_checkpoint(LLAMA, PEFT_LORA, out, max_shard_size="200KB")  # shards and an index
    assert len(list(out.glob("*.safetensors"))) > 1
    assert_ordinary(out, umask)


def test_save_adapter_output_has_ordinary_permissions(tmp_path, umask):
    out = tmp_path / "saved"
    save_adapter(load_adapter(PEFT_LORA), out, layout="peft")
    assert_ordinary(out, umask)
    lora_ckpt.save_adapter(load_adapter(PEFT_LORA), tmp_path / "top", layout="torchtune", dtype="bf16",
                           base_config=LLAMA / "config.json")  # the training bridge's, through the same writer
    assert_ordinary(tmp_path / "top", umask)


def test_pull_output_has_ordinary_permissions(hub, tmp_path, umask):
    repo = f"tester/perm-{uuid.uuid4().hex[:10]}"
    hub.add_files(repo, {"adapter_model.safetensors": (PEFT_LORA / "adapter_model.safetensors").read_bytes(),
                         "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}).encode()})
    out = lhub.pull(repo, str(tmp_path / "pulled"), quiet=True)
    assert_ordinary(out, umask)
