"""A catalogue of broken and hostile inputs. Every case must give: a typed error from
``lora_ckpt.errors`` (checked through the CLI with ``--debug``), a one-line CLI message and a
non-zero exit without ``--debug``, no output left behind, and the input's bytes unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_ckpt import errors as E
from lora_ckpt.cli import main
from lora_ckpt.io import read_safetensors_header

FIX = Path(__file__).resolve().parent.parent / "fixtures"
LLAMA_CFG = FIX / "hf/llama/config.json"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _st_bytes(tensors: dict[str, torch.Tensor], path: Path) -> bytes:
    save_file(tensors, path)
    return path.read_bytes()


def _raw_safetensors(path: Path, header: object, data: bytes = b"", hlen: int | None = None) -> None:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(h) if hlen is None else hlen) + h + data)


def _peft_dir(d: Path, tensors: dict[str, torch.Tensor] | None = None, cfg: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIX / "peft/llama-lora/adapter_config.json", d / "adapter_config.json")
    if cfg is not None:
        full = json.loads((d / "adapter_config.json").read_text())
        full.update(cfg)
        (d / "adapter_config.json").write_text(json.dumps(full))
    if tensors is None:
        shutil.copy(FIX / "peft/llama-lora/adapter_model.safetensors", d / "adapter_model.safetensors")
    else:
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
    return d


def _q(r_a=4, r_b=4, out=64, inn=64) -> dict[str, torch.Tensor]:
    return {f"{Q}.lora_A.weight": torch.randn(r_a, inn), f"{Q}.lora_B.weight": torch.randn(out, r_b)}


@dataclass
class Case:
    id: str
    make: Callable[[Path], list[str]]  # builds inputs under tmp/in, returns argv (OUT = tmp/out)
    error: type[Exception]
    phrase: str


def convert_to(layout: str, *extra: str) -> Callable[[Path], list[str]]:
    def argv(src: Path) -> list[str]:
        return ["convert", str(src), "--to", layout, "-o", "{OUT}", *extra]
    return argv


TO_PEFT = convert_to("peft")


def case(id: str, error: type[Exception], phrase: str, cmd: Callable[[Path], list[str]] = TO_PEFT):
    def deco(fn: Callable[[Path], Path]) -> Case:
        return Case(id, lambda tmp: cmd(fn(tmp)), error, phrase)
    return deco


CASES: list[Case] = []


def add(c: Case) -> Case:
    CASES.append(c)
    return c


INSPECT = lambda src: ["inspect", str(src)]  # noqa: E731


# ---------------------------------------------------------------- safetensors files
@add
@case("truncated-safetensors", E.CheckpointFormatError, "truncated", INSPECT)
def _(tmp):
    data = _st_bytes(_q(), tmp / "x.safetensors")
    (tmp / "x.safetensors").write_bytes(data[:-100])
    return tmp / "x.safetensors"


@add
@case("header-length-beyond-file", E.CheckpointFormatError, "exceeds the file", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                     b"\0" * 4, hlen=10_000)
    return tmp / "x.safetensors"


@add
@case("header-claims-gigabytes", E.CheckpointFormatError, "exceeds the file", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", b"{}", hlen=1 << 40)
    return tmp / "x.safetensors"


@add
@case("invalid-header-json", E.CheckpointFormatError, "not valid UTF-8 JSON", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", b'{"a": {"dtype": "F32",')
    return tmp / "x.safetensors"


@add
@case("non-utf8-header", E.CheckpointFormatError, "not valid UTF-8 JSON", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", b'{"\xff\xfe": 1}')
    return tmp / "x.safetensors"


@add
@case("header-not-an-object", E.CheckpointFormatError, "expected an object", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", [1, 2, 3])
    return tmp / "x.safetensors"


@add
@case("overlapping-offsets", E.CheckpointFormatError, "overlap", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    return tmp / "x.safetensors"


@add
@case("out-of-range-offsets", E.CheckpointFormatError, "data section has", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    return tmp / "x.safetensors"


@add
@case("shape-offsets-disagree", E.CheckpointFormatError, "needs", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", {"a": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 8]}},
                     b"\0" * 8)
    return tmp / "x.safetensors"


@add
@case("unknown-dtype", E.CheckpointFormatError, "unknown dtype", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    return tmp / "x.safetensors"


@add
@case("empty-file", E.CheckpointFormatError, "too short", INSPECT)
def _(tmp):
    (tmp / "x.safetensors").write_bytes(b"")
    return tmp / "x.safetensors"


@add
@case("metadata-not-strings", E.CheckpointFormatError, "__metadata__", INSPECT)
def _(tmp):
    _raw_safetensors(tmp / "x.safetensors", {"__metadata__": {"a": 1}})
    return tmp / "x.safetensors"


# ---------------------------------------------------------------------- adapters
@add
@case("rank-mismatch-A-B", E.ShapeMismatchError, "disagree on the rank")
def _(tmp):
    return _peft_dir(tmp / "a", _q(r_a=4, r_b=3))


@add
@case("config-r-disagrees", E.ConfigError, "config r=8, tensors rank 4")
def _(tmp):
    return _peft_dir(tmp / "a", _q(), cfg={"r": 8})


@add
@case("unprefixed-duplicate-keys", E.LayoutError, "without the peft key prefix")
def _(tmp):
    t = _q()
    t.update({k.removeprefix("base_model.model."): v for k, v in _q().items()})
    return _peft_dir(tmp / "a", t)


@add
@case("module-not-in-base-config", E.ConfigError, "layer 7 but the model has 2 layers",
      convert_to("torchtune", "--base-config", str(LLAMA_CFG)))
def _(tmp):
    return _peft_dir(tmp / "a", {k.replace("layers.0", "layers.7"): v for k, v in _q().items()})


@add
@case("base-config-of-another-model", E.ConfigError, "does not fit the base config",
      convert_to("torchtune", "--base-config", str(FIX / "hf/gemma/config.json")))
def _(tmp):
    return _peft_dir(tmp / "a")


@add
@case("empty-adapter", E.UnknownLayoutError, "no known adapter layout")
def _(tmp):
    d = tmp / "a"
    d.mkdir()
    save_file({}, d / "adapter.safetensors")
    return d


@add
@case("empty-peft-adapter", E.LayoutError, "the adapter is empty")
def _(tmp):
    return _peft_dir(tmp / "a", {})


@add
@case("two-candidate-weight-files", E.AmbiguousCheckpointError, "candidate weight files", INSPECT)
def _(tmp):
    save_file({"w": torch.zeros(2)}, tmp / "one.safetensors")
    save_file({"w": torch.zeros(2)}, tmp / "two.safetensors")
    return tmp


@add
@case("ambiguous-layout", E.AmbiguousLayoutError, "pass --from")
def _(tmp):
    d = tmp / "a"
    d.mkdir()
    torch.save({"m.lora_A": torch.zeros(2, 4), "m.lora_B": torch.zeros(4, 2)}, d / "lora_state_dict.pt")
    torch.save({"m.A.weight": torch.zeros(2, 4), "m.B.weight": torch.zeros(4, 2)}, d / "lora_weights.pt")
    return d


@add
@case("non-utf8-config", E.ConfigError, "not UTF-8")
def _(tmp):
    d = _peft_dir(tmp / "a")
    (d / "adapter_config.json").write_bytes(b'{"peft_type": "\xff"}')
    return d


@add
@case("config-not-an-object", E.ConfigError, "expected an object")
def _(tmp):
    d = _peft_dir(tmp / "a")
    (d / "adapter_config.json").write_text("[1, 2]")
    return d


@add
@case("base-config-not-json", E.ConfigError, "not valid JSON", convert_to("torchtune", "--base-config", "{CFG}"))
def _(tmp):
    (tmp / "config.json").write_text("{nope")
    return _peft_dir(tmp / "a")


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@add
@case("pickle-that-runs-code", E.UnsafeCheckpointError, "refusing to unpickle",
      convert_to("peft", "--from", "loralib", "--alpha", "8"))
def _(tmp):
    d = tmp / "a"
    d.mkdir()
    torch.save({"m.lora_A": torch.zeros(2, 4), "m.lora_B": Evil()}, d / "lora_state_dict.pt")
    return d


@add
@case("adalora", E.UnsupportedAdapterError, "not LoRA")
def _(tmp):
    return _peft_dir(tmp / "a", cfg={"peft_type": "ADALORA"})


@add
@case("merged-linear-3d-lora-B", E.UnsupportedAdapterError, "stacked")
def _(tmp):
    return _peft_dir(tmp / "a", {f"{Q}.lora_A.weight": torch.randn(4, 64), f"{Q}.lora_B.weight": torch.randn(3, 64, 4)})


@add
@case("half-an-adapter", E.IncompleteAdapterError, "has lora_A.weight but no lora_B.weight")
def _(tmp):
    return _peft_dir(tmp / "a", {f"{Q}.lora_A.weight": torch.randn(4, 64)})


@add
@case("lossy-without-allow-lossy", E.LossyConversionError, "--allow-lossy",
      convert_to("mistral", "--base-config", str(LLAMA_CFG)))
def _(tmp):
    d = tmp / "a"
    shutil.copytree(FIX / "peft/llama-dora", d)
    return d


@add
@case("loralib-without-alpha", E.MissingConfigError, "pass --alpha", convert_to("peft", "--from", "loralib"))
def _(tmp):
    d = tmp / "a"
    d.mkdir()
    torch.save({"m.lora_A": torch.zeros(2, 4), "m.lora_B": torch.zeros(4, 2)}, d / "lora_state_dict.pt")
    return d


@add
@case("torchtune-needs-head-counts", E.MissingConfigError, "--base-config", convert_to("torchtune"))
def _(tmp):
    return _peft_dir(tmp / "a", _q(), cfg={"base_model_name_or_path": None})


@add
@case("unknown-layout", E.UnknownLayoutError, "no known adapter layout")
def _(tmp):
    d = tmp / "a"
    d.mkdir()
    save_file({"model.norm.weight": torch.ones(4)}, d / "model.safetensors")
    return d


@add
@case("output-inside-input", E.OutputPathError, "overlaps the input",
      lambda src: ["convert", str(src), "--to", "peft", "-o", str(src / "out")])
def _(tmp):
    return _peft_dir(tmp / "a")


@add
@case("output-exists", E.OutputExistsError, "pass --force")
def _(tmp):
    (tmp.parent / "out").mkdir()
    (tmp.parent / "out" / "keep.txt").write_text("mine")
    return _peft_dir(tmp / "a")


@add
@case("output-under-a-file", E.OutputPathError, "cannot write here",
      lambda src: ["convert", str(src), "--to", "peft", "-o", str(src.parent.parent / "afile" / "x")])
def _(tmp):
    (tmp.parent / "afile").write_text("a file, not a directory")
    return _peft_dir(tmp / "a")


@add
@case("bad-dtype", E.UsageError, "not a floating-point dtype", convert_to("peft", "--dtype", "float33"))
def _(tmp):
    return _peft_dir(tmp / "a")


@add
@case("missing-input", E.CheckpointNotFoundError, "no such file", convert_to("peft"))
def _(tmp):
    return tmp / "nothing-here"


# ------------------------------------------------------------------------- merge
def merge_into(base: str, *extra: str) -> Callable[[Path], list[str]]:
    def argv(adapter: Path) -> list[str]:
        b = base.replace("{IN}", str(adapter.parent))
        return ["merge", b, str(adapter), "-o", "{OUT}", *extra]
    return argv


@add
@case("merge-base-of-another-model", E.ConfigError, "does not fit the base config",
      merge_into(str(FIX / "hf/gemma")))
def _(tmp):
    return _peft_dir(tmp / "a")


@add
@case("merge-tied-embeddings", E.ConversionError, "--untie", merge_into(str(FIX / "hf/gemma")))
def _(tmp):
    d = tmp / "a"
    shutil.copytree(FIX / "peft/gemma-lora", d)
    from safetensors.torch import load_file

    t = load_file(d / "adapter_model.safetensors")
    t["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 64)
    t["base_model.model.lm_head.lora_B.weight"] = torch.randn(128, 4)
    save_file(t, d / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = [*cfg["target_modules"], "lm_head"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@add
@case("merge-truncated-base-shard", E.CheckpointFormatError, "truncated", merge_into("{IN}/base"))
def _(tmp):
    (tmp / "base").mkdir()
    shutil.copy(FIX / "hf/llama/config.json", tmp / "base")
    data = (FIX / "hf/llama/model.safetensors").read_bytes()
    (tmp / "base/model.safetensors").write_bytes(data[: len(data) - 1000])
    return _peft_dir(tmp / "a")


@add
@case("merge-missing-base", E.CheckpointNotFoundError, "no such file", merge_into("{IN}/nothing"))
def _(tmp):
    return _peft_dir(tmp / "a")


@add
@case("merge-bad-shard-size", E.UsageError, "is not a size",
      merge_into(str(FIX / "hf/llama"), "--max-shard-size", "12XB"))
def _(tmp):
    return _peft_dir(tmp / "a")


@add
@case("merge-output-exists", E.OutputExistsError, "pass --force", merge_into(str(FIX / "hf/llama")))
def _(tmp):
    (tmp.parent / "out").mkdir()
    (tmp.parent / "out" / "model.safetensors").write_text("an older merge")
    return _peft_dir(tmp / "a")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_catalogue_is_large_enough():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    argv = [a.replace("{OUT}", str(tmp_path / "out")).replace("{CFG}", str(tmp_path / "in" / "config.json"))
            for a in c.make(tmp_path / "in")]
    before = _hashes(tmp_path / "in")
    out_before = _hashes(tmp_path / "out") if (tmp_path / "out").exists() else None

    with pytest.raises(c.error) as e:  # the typed error, through --debug
        main(["--debug", *argv])
    assert isinstance(e.value, E.LoraCkptError)
    assert c.phrase in str(e.value), str(e.value)
    capsys.readouterr()

    rc = main(argv)  # the one-line message and exit code
    err = capsys.readouterr().err
    assert rc == e.value.exit_code != 0
    assert err.count("\n") == 1 and err.startswith("lora-ckpt ") and "Traceback" not in err

    assert _hashes(tmp_path / "in") == before  # inputs untouched
    if out_before is None:
        assert not (tmp_path / "out").exists()
    else:
        assert _hashes(tmp_path / "out") == out_before
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no temporaries left
    assert not (tmp_path / "PWNED").exists()


def test_header_claiming_gigabytes_allocates_nothing(tmp_path):
    _raw_safetensors(tmp_path / "x.safetensors", b"{}", hlen=(1 << 40))
    tracemalloc.start()
    with pytest.raises(E.CheckpointFormatError):
        read_safetensors_header(tmp_path / "x.safetensors")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_nan_adapter_inspect_warns_and_convert_keeps_the_bytes(tmp_path, capsys):
    t = _q()
    t[f"{Q}.lora_B.weight"][3, 1] = float("nan")
    t[f"{Q}.lora_A.weight"][0, 0] = float("inf")
    src = _peft_dir(tmp_path / "a", t)
    assert main(["inspect", str(src)]) == 0
    assert "hold NaN/Inf" in capsys.readouterr().out
    assert main(["convert", str(src), "--to", "peft", "-o", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "hold NaN/Inf" in out and "verified" in out
    a = (src / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "o/adapter_model.safetensors").read_bytes()
    assert a == b


def test_disk_full_leaves_nothing(tmp_path):
    """A file-size rlimit makes every write past 16 KB fail (EFBIG), as a full disk would."""
    src = FIX / "peft/llama-lora"
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
from lora_ckpt.cli import main
sys.exit(main(["convert", {str(src)!r}, "--to", "torchtune", "-o", {str(tmp_path / "out")!r},
               "--base-config", {str(LLAMA_CFG)!r}]))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and "writing the output failed" in p.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
