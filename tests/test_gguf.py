"""The gguf layout against llama.cpp's own converter (golden files it wrote: fixtures/gguf/, commands in
fixtures/README.md), gguf-py's reader as an independent check, and real PEFT for the scale rules."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_ckpt import errors as E
from lora_ckpt.check import check_source
from lora_ckpt.cli import main
from lora_ckpt.conversion import compare_adapters, convert, verify
from lora_ckpt.io.gguf import FLOAT64, GgufValue, read_gguf_header, write_gguf
from lora_ckpt.layouts import detect_layout, load_adapter
from lora_ckpt.layouts.gguf import llamacpp_rules
from lora_ckpt.rope import rotate_half_to_interleaved

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
G = FIX / "gguf"
# golden -> (source adapter, base dir, convert kwargs); every golden was written by convert_lora_to_gguf.py
GOLDEN = {
    "llama-lora": ("peft/llama-lora", "hf/llama", {}),
    "llama-lora-f16": ("peft/llama-lora", "hf/llama", {"dtype": torch.float16}),
    "llama-lora-bf16": ("peft/llama-lora", "hf/llama", {"dtype": torch.bfloat16}),
    "qwen2-lora": ("peft/qwen2-lora", "hf/qwen2", {}),
    "mistral-lora": ("peft/mistral-lora", "hf/mistral", {}),
    "gemma-lora": ("peft/gemma-lora", "hf/gemma", {}),
    "llama-embedding": ("peft/llama-embedding", "hf/llama", {}),
    "llama-dora-lossy": ("peft/llama-dora", "hf/llama", {"allow_lossy": True}),
    "llama-modules-to-save-lossy": ("peft/llama-modules-to-save", "hf/llama", {"allow_lossy": True}),
    "qwen3-lora": ("gguf/src/qwen3-lora", "gguf/src/hf-qwen3", {}),
    "phi3-lora": ("gguf/src/phi3-lora", "gguf/src/hf-phi3", {}),
    "mixtral-moe": ("gguf/src/mixtral-moe", "gguf/src/hf-mixtral", {}),
    "qwen3moe-moe": ("gguf/src/qwen3moe-moe", "gguf/src/hf-qwen3moe", {}),
}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the goldens record base_model paths relative to the repo root


def tensors_of(path: Path) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
    """name -> (shape, ggml type, bytes), in file order, read with gguf-py's own reader."""
    r = gguf.GGUFReader(path)
    return {t.name: (tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), t.data.tobytes()) for t in r.tensors}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_convert_writes_what_convert_lora_to_gguf_writes(tmp_path, name):
    src, base, kw = GOLDEN[name]
    out = tmp_path / f"{name}.gguf"
    res = convert(FIX / src, out, to="gguf", base_config=FIX / base / "config.json", **kw)
    assert res.verification is not None and res.verification.ok
    assert out.read_bytes() == (G / f"{name}.gguf").read_bytes()  # KV, names, shapes, dtypes, order, bytes


def test_alpha_is_float32_and_kv_match_the_reference():
    r = gguf.GGUFReader(G / "llama-lora.gguf")
    alpha = r.fields["adapter.lora.alpha"]
    assert alpha.types == [gguf.GGUFValueType.FLOAT32] and alpha.contents() == 8.0
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_reading_a_reference_gguf_gives_the_source_adapter(name):
    src, base, kw = GOLDEN[name]
    ours = load_adapter(G / f"{name}.gguf", base_config=FIX / base / "config.json")
    peft = load_adapter(FIX / src, base_config=FIX / base / "config.json")
    if kw.get("allow_lossy"):
        peft = detect_layout(G / f"{name}.gguf").layout.drop_unsupported(peft, allow_lossy=True)
    peft.extra = {}  # PEFT's base-embedding copy is not part of the GGUF (the converter skips it)
    rep = compare_adapters(peft, ours)
    assert rep.ok, rep.summary()
    if "dtype" not in kw:  # float32: the un-permuted q/k rows are the source's, bit for bit
        assert rep.worst == 0.0
        for n, m in peft.modules.items():
            assert torch.equal(ours.modules[n].B, m.B) and torch.equal(ours.modules[n].A, m.A), n


@pytest.mark.parametrize("name", ["llama-lora", "llama-lora-f16", "llama-embedding", "mixtral-moe", "phi3-lora"])
def test_gguf_to_peft_to_gguf_is_byte_identical_for_tensors(tmp_path, name):
    src, cfg = G / f"{name}.gguf", FIX / GOLDEN[name][1] / "config.json"
    convert(src, tmp_path / "peft", to="peft", base_config=cfg)
    convert(tmp_path / "peft", tmp_path / "back.gguf", to="gguf", base_config=cfg,
            dtype=torch.float16 if name.endswith("f16") else None)
    assert tensors_of(tmp_path / "back.gguf") == tensors_of(src)
    convert(src, tmp_path / "same.gguf", to="gguf", base_config=cfg)  # GGUF -> GGUF keeps its KV: the same file
    assert (tmp_path / "same.gguf").read_bytes() == src.read_bytes()


def test_rslora_and_alpha_pattern_are_folded_so_llama_cpp_computes_peft(tmp_path):
    """llama.cpp's rule is alpha/rank(lora_b) per tensor pair; PEFT's module.scaling (rsLoRA,
    alpha_pattern, rank_pattern) must come out of it. The reference converter gets this wrong."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = FIX / "peft/llama-rslora-patterns"
    out = tmp_path / "a.gguf"
    convert(src, out, to="gguf", base_config=FIX / "hf/llama/config.json")
    ref, ours = tensors_of(G / "llama-rslora-patterns.gguf"), tensors_of(out)
    assert list(ours) == list(ref)
    for k in ref:  # same names, shapes (per-module ranks kept: 8 and 2 where rank_pattern says), lora_a bytes
        assert ours[k][:2] == ref[k][:2] and (k.endswith("lora_b") or ours[k] == ref[k]), k
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(FIX / "hf/llama"), src)
    alpha = gguf.GGUFReader(out).fields["adapter.lora.alpha"].contents()
    cfg = json.loads((FIX / "hf/llama/config.json").read_text())
    folded = 0
    for name, mod in model.named_modules():
        if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
            continue
        peft_delta = mod.get_delta_weight("default").double()
        blk, rest = name.split("layers.")[1].split(".", 1)
        leaf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[rest.rsplit(".", 1)[-1]]
        t = f"blk.{blk}.{leaf}.weight"
        (sa, _, a), (sb, _, b) = ours[t + ".lora_a"], ours[t + ".lora_b"]
        A = torch.frombuffer(bytearray(a), dtype=torch.float32).reshape(sa).double()
        B = torch.frombuffer(bytearray(b), dtype=torch.float32).reshape(sb).double()
        delta = (alpha / B.shape[1]) * (B @ A)  # what llama.cpp adds
        if leaf in ("attn_q", "attn_k"):  # GGUF rows are Meta order
            n = cfg["num_attention_heads"] if leaf == "attn_q" else cfg["num_key_value_heads"]
            peft_delta = rotate_half_to_interleaved(peft_delta, n, peft_delta.shape[0] // n)
        assert torch.allclose(delta, peft_delta, rtol=1e-6, atol=1e-7), t
        folded += ours[t + ".lora_b"] != ref[t + ".lora_b"]
    assert folded == len(llamacpp_rules(load_adapter(src)).folded) == 6


def test_dora_and_full_tensors_are_refused_and_dropped_by_name_with_allow_lossy(tmp_path, caplog):
    for name, what in (("llama-dora", "DoRA magnitudes"), ("llama-modules-to-save", "full tensors"),
                       ("llama-lora-bias", "LoRA biases")):
        with pytest.raises(E.LossyConversionError, match=what):
            convert(FIX / "peft" / name, tmp_path / f"{name}.gguf", to="gguf")
        assert not (tmp_path / f"{name}.gguf").exists() and not list(tmp_path.iterdir())
    with caplog.at_level(logging.WARNING):
        convert(FIX / "peft/llama-modules-to-save", tmp_path / "x.gguf", to="gguf", allow_lossy=True)
    assert "lm_head.weight" in caplog.text


def test_check_for_llama_cpp_and_convert_to_gguf_agree(tmp_path):
    for src in sorted((FIX / "peft").iterdir()):
        if src.name == "gpt2-lora":
            continue
        refused = bool(llamacpp_rules(load_adapter(src)).refused)
        rep = check_source(src, target="llama.cpp")
        llama_errors = [f for f in rep.errors if "llama.cpp" in f.what and "scales every tensor" not in f.what]
        assert bool(llama_errors) == refused, src.name
        if refused:
            with pytest.raises(E.LossyConversionError):
                convert(src, tmp_path / f"{src.name}.gguf", to="gguf")
        else:
            convert(src, tmp_path / f"{src.name}.gguf", to="gguf")
            assert check_source(tmp_path / f"{src.name}.gguf", target="llama.cpp").ok


def test_gguf_path_is_detected_and_inspected_torch_free(tmp_path):
    det = detect_layout(G / "llama-lora.gguf")
    assert det.layout.name == "gguf" and "adapter" in det.reason
    shutil.copy(G / "qwen2-lora.gguf", tmp_path / "x.gguf")
    assert detect_layout(tmp_path).layout.name == "gguf"  # a folder with one .gguf
    code = ("import sys, json; from lora_ckpt.cli import main; rc = main(['inspect', sys.argv[1], '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(G / "mixtral-moe.gguf")], capture_output=True, text=True,
                       check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["layout"] == "gguf" and rep["family"] == "mixtral" and len(rep["modules"]) == 8 + 12
    assert "pickle" not in r.stdout + r.stderr


def test_verify_across_gguf_and_peft():
    assert verify(G / "qwen2-lora.gguf", FIX / "peft/qwen2-lora").ok
    assert main(["verify", str(G / "llama-lora.gguf"), str(FIX / "peft/llama-lora")]) == 0
    assert not verify(G / "llama-lora.gguf", FIX / "peft/mistral-lora").ok


def test_q_k_rows_need_head_counts(tmp_path):
    h = read_gguf_header(G / "mistral-lora.gguf")
    kv = {k: v for k, v in h.kv.items() if not k.startswith("general.base_model")}  # no way to the base config
    out = _rewrite(G / "mistral-lora.gguf", tmp_path / "x.gguf", kv)
    with pytest.raises(E.MissingConfigError, match="head counts"):
        load_adapter(out)
    assert load_adapter(out, base_config=FIX / "hf/mistral/config.json").modules


def _rewrite(src: Path, out: Path, kv, keep=None) -> Path:
    h = read_gguf_header(src)
    raw = src.read_bytes()
    write_gguf(out, kv, [(t.name, t.shape, t.ggml_type, t.nbytes, raw[t.begin:t.begin + t.nbytes])
                         for t in h.tensors.values() if keep is None or keep(t.name)])
    return out


def _kv(src: Path, **changes):
    kv = dict(read_gguf_header(src).kv)
    for k, v in changes.items():
        key = k.replace("__", ".")
        if v is None:
            kv.pop(key)
        else:
            kv[key] = v
    return kv


BAD = {
    "truncated": (lambda p, s: p.write_bytes(s.read_bytes()[: s.stat().st_size - 100]), E.CheckpointFormatError),
    "header cut": (lambda p, s: p.write_bytes(s.read_bytes()[:200]), E.CheckpointFormatError),
    "huge string": (lambda p, s: p.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 60) + b"x" * 64),
                    E.CheckpointFormatError),
    "a model, not an adapter": (lambda p, s: _rewrite(s, p, _kv(s, general__type=GgufValue("model", 8))),
                                E.UnsupportedAdapterError),
    "unknown architecture": (lambda p, s: _rewrite(s, p, _kv(s, general__architecture=GgufValue("falcon", 8))),
                             E.UnsupportedAdapterError),
    "no alpha": (lambda p, s: _rewrite(s, p, _kv(s, adapter__lora__alpha=None)), E.MissingConfigError),
    "half a pair": (lambda p, s: _rewrite(s, p, _kv(s), keep=lambda n: n != "blk.0.attn_q.weight.lora_b"),
                    E.IncompleteAdapterError),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_gguf_inputs_are_typed_one_line_errors_and_write_nothing(tmp_path, case, capsys):
    make, err = BAD[case]
    bad = tmp_path / "bad.gguf"
    make(bad, G / "llama-lora.gguf")
    before = bad.read_bytes()
    with pytest.raises(err) as info:
        convert(bad, tmp_path / "out", to="peft", base_config=FIX / "hf/llama/config.json")
    if case == "unknown architecture":
        assert "'falcon'" in str(info.value)
    assert main(["convert", str(bad), "--to", "peft", "-o", str(tmp_path / "out")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"] and bad.read_bytes() == before


def test_float64_alpha_is_read_and_rewritten_as_float32(tmp_path):
    src = G / "llama-lora.gguf"
    bad = _rewrite(src, tmp_path / "f64.gguf", _kv(src, adapter__lora__alpha=GgufValue(8.0, FLOAT64)))
    assert not check_source(bad, target="llama.cpp").ok  # llama.cpp aborts on a FLOAT64 alpha
    convert(bad, tmp_path / "ok.gguf", to="gguf")
    assert (tmp_path / "ok.gguf").read_bytes() == src.read_bytes()


def test_an_architecture_lora_ckpt_cannot_name_is_a_typed_error(tmp_path):
    with pytest.raises(E.LossyConversionError, match="fan_in_fan_out"):
        convert(FIX / "peft/gpt2-lora", tmp_path / "x.gguf", to="gguf")
    with pytest.raises(E.UnsupportedAdapterError, match="'gpt2'"):
        convert(FIX / "peft/gpt2-lora", tmp_path / "x.gguf", to="gguf", allow_lossy=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not os.environ.get("LORA_CKPT_LLAMA_CPP"), reason="set LORA_CKPT_LLAMA_CPP to a llama.cpp "
                    "checkout (the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp) to run the real converter")
def test_the_real_converter_agrees_here(tmp_path):
    script = Path(os.environ["LORA_CKPT_LLAMA_CPP"]) / "convert_lora_to_gguf.py"
    for name in ("llama-lora", "qwen2-lora", "mixtral-moe"):
        src, base, _ = GOLDEN[name]
        subprocess.run([sys.executable, str(script), "--base", f"fixtures/{base}", "--outfile",
                        str(tmp_path / "ref.gguf"), f"fixtures/{src}"], check=True, capture_output=True)
        convert(FIX / src, tmp_path / "ours.gguf", to="gguf", base_config=FIX / base / "config.json", force=True)
        assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes(), name


CONSUMER = ("LORA_CKPT_LLAMA_CPP", "LORA_CKPT_LIBLLAMA", "LORA_CKPT_LLAMA_CPP_PYTHON")


@pytest.mark.skipif(not all(os.environ.get(k) for k in CONSUMER), reason="llama.cpp as the consumer: set "
                    + ", ".join(CONSUMER) + " (see tests/llama_cpp_consumer.py)")
def test_llama_cpp_applies_our_gguf_as_peft_and_the_merged_model_compute(tmp_path):
    """llama.cpp (libllama) loads the adapter on the base model; its logits equal PEFT's on the same
    tokens and llama.cpp's own on the merged model; the rsLoRA/alpha_pattern fold makes llama.cpp
    compute PEFT's function where the reference converter's file does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_ckpt.merge import merge_checkpoint

    tokens = [1, 5, 9, 17, 33, 65, 100, 127, 3, 7]
    for family, adapters in (("llama", ("llama-lora", "llama-rslora-patterns")), ("qwen2", ("qwen2-lora",))):
        base = FIX / "hf" / family
        ours = {a: tmp_path / f"{a}.gguf" for a in adapters}
        for a, p in ours.items():
            convert(FIX / "peft" / a, p, to="gguf", base_config=base / "config.json")
        merged = tmp_path / f"{adapters[0]}-merged"
        merge_checkpoint(base, FIX / "peft" / adapters[0], merged, progress=False)
        files = [*ours.values(), G / "llama-rslora-patterns.gguf"] if family == "llama" else list(ours.values())
        got = {}
        for hf_dir, extra in ((base, files), (merged, [])):
            out = tmp_path / f"{hf_dir.name}.json"
            subprocess.run([sys.executable, str(ROOT / "tests/llama_cpp_consumer.py"), str(hf_dir), str(out),
                            *map(str, extra)], check=True, capture_output=True,
                           env={**os.environ, "TOKENS": json.dumps(tokens), "PYTHONPATH": ""})
            got[hf_dir.name] = json.loads(out.read_text())
        hf = AutoModelForCausalLM.from_pretrained(base)
        ids = torch.tensor([tokens])
        with torch.no_grad():
            ref_base = hf(ids).logits[0]
        cpp_base = torch.tensor(got[base.name]["base"])
        assert (cpp_base - ref_base).abs().max() < 1e-4
        for a, p in ours.items():
            with torch.no_grad():
                model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), FIX / "peft" / a)
                peft = model(ids).logits[0]
            cpp = torch.tensor(got[base.name]["adapters"][str(p)])
            assert (peft - ref_base).abs().max() > 1.0  # the adapter matters
            assert (cpp - peft).abs().max() < 1e-4, a
        cpp_merged = torch.tensor(got[merged.name]["base"])
        assert (cpp_merged - torch.tensor(got[base.name]["adapters"][str(ours[adapters[0]])])).abs().max() < 1e-4
        if family == "llama":  # the reference's file ignores use_rslora / alpha_pattern: another function
            with torch.no_grad():
                peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                                 FIX / "peft/llama-rslora-patterns")(ids).logits[0]
            theirs = torch.tensor(got[base.name]["adapters"][str(G / "llama-rslora-patterns.gguf")])
            assert (theirs - peft).abs().max() > 0.1


def test_push_and_pull_a_gguf_adapter(hub, tmp_path):
    from lora_ckpt import hub as lhub

    repo = f"tester/gguf-{os.urandom(5).hex()}"
    summary = lhub.push(FIX / "peft/llama-lora", repo, to="gguf", base_config=FIX / "hf/llama/config.json",
                        quiet=True)
    assert "(peft -> gguf)" in summary
    assert set(hub.files(repo)) == {".gitattributes", "README.md", "adapter_model.gguf"}
    assert tensors_of(G / "llama-lora.gguf") == tensors_of(lhub.pull(f"hf://{repo}", layout="gguf")
                                                           / "adapter_model.gguf")
    other = f"tester/gguf-{os.urandom(5).hex()}"  # a repo as people publish them: the reference's file name
    hub.add_files(other, {"Llama-Lora-F32-LoRA.gguf": (G / "llama-lora.gguf").read_bytes(),
                          "notes.txt": b"x" * 10})
    hub.clear_log()
    out = lhub.pull(other, str(tmp_path / "got"), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["Llama-Lora-F32-LoRA.gguf"]
    assert verify(out, FIX / "peft/llama-lora", base_config=FIX / "hf/llama/config.json").ok
