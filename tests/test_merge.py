"""``merge_checkpoint`` against the real peers: PEFT (``PeftModel`` logits, ``merge_and_unload``
weights), transformers (loading the output), torchtune (loading the torchtune/Meta output strict)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora_ckpt.stream as stream_mod
from lora_ckpt.cli import main
from lora_ckpt.errors import ConversionError, OutputExistsError, OutputPathError, UsageError
from lora_ckpt.io import read_safetensors_header
from lora_ckpt.merge import merge_checkpoint, parse_size

FIX = Path(__file__).resolve().parent.parent / "fixtures"
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
EXACT = 1e-5  # relative logits difference accepted (fp32)


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


@cache
def _base(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def load_model(path, dtype=torch.float32):
    """A fresh model (PEFT wraps in place; merge_and_unload mutates)."""
    return copy.deepcopy(_base(str(path), dtype))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    out = model(INPUT_IDS)
    return (out.logits if hasattr(out, "logits") else out).float()


def peft_model(base, adapter, dtype=torch.float32):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base, dtype), str(adapter)).eval()


def make_adapter(family: str, path: Path, seed: int, **lora_kw) -> Path:
    """A PEFT adapter on fixtures/hf/<family>, written by PEFT, every trainable tensor re-drawn."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(load_model(FIX / "hf" / family), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if not p.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * (torch.rand(p.shape, generator=g) - 0.5))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:  # modules_to_save copies
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(path))
    return path


def merged_model(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def assert_weights_equal_peft(out: Path, peft, *, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """The written tensors equal PEFT's merge_and_unload() within a few fp32 ulps (our update is one fused
    addmm, PEFT's mm, mul, add: bit-identical when the scale is a power of two)."""
    with torch.no_grad():
        ref = {k: v for k, v in peft.merge_and_unload().state_dict().items()}
    ours = {}
    for f in out.glob("*.safetensors"):
        ours.update(load_file(str(f)))  # safetensors' own (strict) reader
    tied = [k for k in ref if k not in ours]
    assert tied in ([], ["lm_head.weight"]), tied
    for k, v in ours.items():
        torch.testing.assert_close(v, ref[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- parity with PEFT
PEFT_FIXTURES = [("llama", "llama-lora"), ("llama", "llama-dora"), ("llama", "llama-embedding"),
                 ("llama", "llama-modules-to-save"), ("llama", "llama-rslora-patterns"), ("llama", "llama-bin"),
                 ("gpt2", "gpt2-lora"), ("qwen2", "qwen2-lora"), ("mistral", "mistral-lora"), ("gemma", "gemma-lora")]


@pytest.mark.parametrize("family,adapter", PEFT_FIXTURES, ids=[a for _, a in PEFT_FIXTURES])
def test_merge_matches_peft(tmp_path, family, adapter):
    base, ad = FIX / "hf" / family, FIX / "peft" / adapter
    res = merge_checkpoint(base, ad, tmp_path / "m", progress=False)
    assert res.modules_merged > 0 and res.files == ["model.safetensors"]
    assert "merged" in res.summary() and str(tmp_path / "m") in res.summary()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.safetensors"]
    ref = peft_model(base, ad)
    assert rel(logits(merged_model(tmp_path / "m")), logits(ref)) <= EXACT
    assert_weights_equal_peft(tmp_path / "m", ref)


def test_small_row_blocks_agree(tmp_path, monkeypatch):
    """Row blocks (DoRA per-row norms, embedding ΔWᵀ rows) change nothing beyond fp32 rounding
    (a block's matmul may round its last bit differently)."""
    for ad in ("llama-dora", "llama-embedding"):
        merge_checkpoint(FIX / "hf/llama", FIX / "peft" / ad, tmp_path / f"{ad}-big", progress=False)
    monkeypatch.setattr(stream_mod, "BLOCK_ELEMENTS", 100)
    for ad in ("llama-dora", "llama-embedding"):
        merge_checkpoint(FIX / "hf/llama", FIX / "peft" / ad, tmp_path / f"{ad}-small", progress=False)
        big, small = (load_file(str(tmp_path / f"{ad}-{s}/model.safetensors")) for s in ("big", "small"))
        assert big.keys() == small.keys()
        for k in big:
            torch.testing.assert_close(small[k], big[k], rtol=2.5e-7, atol=1e-7)


def test_dora_fan_in_fan_out_two_pass(tmp_path, monkeypatch):
    """GPT-2 Conv1D (weights (in, out)) with DoRA: the norm per output is a column norm over all row blocks."""
    ad = make_adapter("gpt2", tmp_path / "ad", 7, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                      use_dora=True)
    monkeypatch.setattr(stream_mod, "BLOCK_ELEMENTS", 200)
    merge_checkpoint(FIX / "hf/gpt2", ad, tmp_path / "m", progress=False)
    ref = peft_model(FIX / "hf/gpt2", ad)
    assert rel(logits(merged_model(tmp_path / "m")), logits(ref)) <= EXACT
    assert_weights_equal_peft(tmp_path / "m", ref, atol=1e-6, rtol=1e-6)  # column norm summed in another order


def test_lora_bias(tmp_path):
    """b' = b + s·lora_B.bias on Qwen2's biased q/k/v."""
    ad = make_adapter("qwen2", tmp_path / "ad", 3, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    assert any(k.endswith("lora_B.bias") for k in load_file(str(ad / "adapter_model.safetensors")))
    merge_checkpoint(FIX / "hf/qwen2", ad, tmp_path / "m", progress=False)
    ref = peft_model(FIX / "hf/qwen2", ad)
    assert rel(logits(merged_model(tmp_path / "m")), logits(ref)) <= EXACT
    assert_weights_equal_peft(tmp_path / "m", ref)


def test_lora_bias_without_base_bias_is_refused(tmp_path):
    with pytest.raises(ConversionError, match=r"lora_B\.bias.*no bias.*'model\.layers\.0\.mlp\.down_proj\.bias'"):
        merge_checkpoint(FIX / "hf/llama", FIX / "peft/llama-lora-bias", tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_adapter_for_another_model_is_refused_with_every_problem(tmp_path):
    from lora_ckpt.layouts import load_adapter

    adapter = load_adapter(FIX / "peft/llama-lora")  # an Adapter object: no base config check on reading
    shapes = r"differ in shape.*q_proj.weight \(128, 64\) vs \(64, 64\).*and \d+ more"
    with pytest.raises(ConversionError, match=shapes):
        merge_checkpoint(FIX / "hf/gemma", adapter, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------ shards and dtypes
def test_sharded_base_and_sharded_output(tmp_path):
    base = tmp_path / "base"
    load_model(FIX / "hf/llama").save_pretrained(str(base), max_shard_size="100KB")
    assert len(list(base.glob("model-*.safetensors"))) > 2
    res = merge_checkpoint(base, FIX / "peft/llama-dora", tmp_path / "m", max_shard_size="64KB", progress=False)
    out = tmp_path / "m"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert [p.name for p in shards] == res.files and len(shards) == len(res.files) > 3
    assert res.files == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    sizes, keys = 0, set()
    for p in shards:
        h = read_safetensors_header(p)
        with safe_open(str(p), framework="pt") as f:  # safetensors validates the layout itself
            assert set(f.keys()) == set(h.tensors) and f.metadata() == {"format": "pt"}
        assert h.nbytes <= 64_000 or len(h.tensors) == 1
        assert all(index["weight_map"][k] == p.name for k in h.tensors)
        sizes += h.nbytes
        keys |= set(h.tensors)
    assert keys == set(index["weight_map"]) and index["metadata"]["total_size"] == sizes == res.bytes
    ref = peft_model(FIX / "hf/llama", FIX / "peft/llama-dora")
    assert rel(logits(merged_model(out)), logits(ref)) <= EXACT
    assert_weights_equal_peft(out, ref)


def test_bf16_base(tmp_path):
    base = tmp_path / "base"
    load_model(FIX / "hf/llama").to(torch.bfloat16).save_pretrained(str(base))
    merge_checkpoint(base, FIX / "peft/llama-lora", tmp_path / "m", progress=False)
    h = read_safetensors_header(tmp_path / "m/model.safetensors")
    assert {t.dtype for t in h.tensors.values()} == {"BF16"}
    # PEFT on the bf16 base (fp32 adapter): delta in fp32, one rounding to bf16, as ours
    ref = peft_model(base, FIX / "peft/llama-lora", torch.bfloat16)
    with torch.no_grad():
        ref_sd = ref.merge_and_unload().state_dict()
    ours = load_file(str(tmp_path / "m/model.safetensors"))
    for k, v in ours.items():
        diff = (v.float() - ref_sd[k].float()).abs()
        assert (diff <= 2 ** -7 * ref_sd[k].float().abs()).all(), k  # at most one bf16 ulp
        assert (diff == 0).float().mean() > 0.999, k


def test_dtype_option_upcasts_before_rounding(tmp_path):
    base = tmp_path / "base"
    load_model(FIX / "hf/llama").to(torch.bfloat16).save_pretrained(str(base))
    merge_checkpoint(base, FIX / "peft/llama-lora", tmp_path / "m", dtype=torch.float32, progress=False)
    assert json.loads((tmp_path / "m/config.json").read_text())["dtype"] == "float32"
    ours = load_file(str(tmp_path / "m/model.safetensors"))
    assert {v.dtype for v in ours.values()} == {torch.float32}
    ad = load_file(str(FIX / "peft/llama-lora/adapter_model.safetensors"))
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    w = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].float()
    expect = w + (ad[f"{pre}.lora_B.weight"] @ ad[f"{pre}.lora_A.weight"]) * 2.0
    torch.testing.assert_close(ours["model.layers.0.self_attn.q_proj.weight"], expect, rtol=2.5e-7, atol=1e-7)


# ---------------------------------------------------------------------------- tied embeddings
TIED = {"lora_lm_head": dict(target_modules=["q_proj", "lm_head"]),
        "save_lm_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "lora_embed": dict(target_modules=["q_proj", "embed_tokens"])}


@pytest.mark.parametrize("kind", list(TIED))
def test_tied_embeddings_refused_then_untied(tmp_path, kind):
    ad = make_adapter("gemma", tmp_path / "ad", 11, **TIED[kind])
    with pytest.raises(ConversionError, match="--untie"):
        merge_checkpoint(FIX / "hf/gemma", ad, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    merge_checkpoint(FIX / "hf/gemma", ad, tmp_path / "m", untie=True, progress=False)
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    ours = load_file(str(tmp_path / "m/model.safetensors"))
    base = load_file(str(FIX / "hf/gemma/model.safetensors"))
    assert "lm_head.weight" in ours and "lm_head.weight" not in base
    unchanged = "model.embed_tokens.weight" if kind != "lora_embed" else "lm_head.weight"
    assert torch.equal(ours[unchanged], base["model.embed_tokens.weight"])
    # the adapter as PEFT runs it (unmerged): embedding and head are separate there
    assert rel(logits(merged_model(tmp_path / "m")), logits(peft_model(FIX / "hf/gemma", ad))) <= EXACT


# ------------------------------------------------------------------------ torchtune / Meta
def _torchtune_model(family: str):
    cfg = json.loads((FIX / "hf" / family / "config.json").read_text())
    kw = dict(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
              num_kv_heads=cfg["num_key_value_heads"], embed_dim=cfg["hidden_size"],
              intermediate_dim=cfg["intermediate_size"], max_seq_len=cfg["max_position_embeddings"],
              norm_eps=cfg["rms_norm_eps"], rope_base=cfg["rope_parameters"]["rope_theta"])
    if family == "qwen2":
        from torchtune.models.qwen2._component_builders import qwen2

        return qwen2(**kw, tie_word_embeddings=False).eval()
    if family == "mistral":
        from torchtune.models.mistral._component_builders import mistral

        return mistral(**kw).eval()
    from torchtune.models.llama3._component_builders import llama3

    return llama3(**kw).eval()


@pytest.mark.parametrize("family,adapter", [("llama", "llama-lora"), ("llama", "llama-dora"),
                                            ("qwen2", "qwen2-lora")])
def test_to_torchtune_loads_strict_in_torchtune(tmp_path, monkeypatch, family, adapter):
    monkeypatch.setattr(stream_mod, "BLOCK_ELEMENTS", 100)  # q/k permutation across head-aligned row blocks
    res = merge_checkpoint(FIX / "hf" / family, FIX / "peft" / adapter, tmp_path / "m", to="torchtune",
                           progress=False)
    assert res.files == ["model-00001-of-00001.safetensors"]
    sd = load_file(str(tmp_path / "m" / res.files[0]))
    assert "layers.0.sa_norm.scale" in sd and "output.weight" in sd
    model = _torchtune_model(family)
    model.load_state_dict(sd, strict=True)
    assert rel(logits(model), logits(peft_model(FIX / "hf" / family, FIX / "peft" / adapter))) <= EXACT
    assert (tmp_path / "m/config.json").is_file()


def test_to_meta_consolidated_with_params(tmp_path):
    from torchtune.models import convert_weights

    res = merge_checkpoint(FIX / "hf/mistral", FIX / "peft/mistral-lora", tmp_path / "m", to="meta", progress=False)
    assert res.files == ["consolidated.safetensors"]
    params = json.loads((tmp_path / "m/params.json").read_text())
    assert (params["dim"], params["n_heads"], params["n_kv_heads"], params["head_dim"]) == (64, 4, 2, 16)
    sd = load_file(str(tmp_path / "m/consolidated.safetensors"))
    assert "layers.0.attention.wq.weight" in sd and "layers.0.attention_norm.weight" in sd
    model = _torchtune_model("mistral")
    model.load_state_dict(convert_weights.meta_to_tune(sd), strict=True)  # as FullModelMetaCheckpointer does
    assert rel(logits(model), logits(peft_model(FIX / "hf/mistral", FIX / "peft/mistral-lora"))) <= EXACT


def test_to_torchtune_needs_a_family_with_torchtune_names(tmp_path):
    with pytest.raises(ConversionError, match="no torchtune parameter names"):
        merge_checkpoint(FIX / "hf/gpt2", FIX / "peft/gpt2-lora", tmp_path / "m", to="torchtune", progress=False)


# ------------------------------------------------------------------ atomicity and safety
def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_existing_output_needs_force_and_inputs_untouched(tmp_path):
    before = _digest(FIX / "hf/llama"), _digest(FIX / "peft/llama-lora")
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputExistsError):
        merge_checkpoint(FIX / "hf/llama", FIX / "peft/llama-lora", out, progress=False)
    assert (out / "keep").read_text() == "x"
    merge_checkpoint(FIX / "hf/llama", FIX / "peft/llama-lora", out, force=True, progress=False)
    assert not (out / "keep").exists() and (out / "model.safetensors").is_file()
    assert (_digest(FIX / "hf/llama"), _digest(FIX / "peft/llama-lora")) == before


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = stream_mod.Streamer.write

    def failing(self, f, o):
        calls.append(o.key)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(self, f, o)

    monkeypatch.setattr(stream_mod.Streamer, "write", failing)
    with pytest.raises(RuntimeError, match="killed"):
        merge_checkpoint(FIX / "hf/llama", FIX / "peft/llama-lora", tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary sibling


def test_disk_full_in_writer_thread_leaves_nothing(tmp_path, monkeypatch):
    real, calls = stream_mod._write_all, []

    def full(f, t):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(f, t)

    monkeypatch.setattr(stream_mod, "_write_all", full)
    monkeypatch.setattr(stream_mod, "WRITE_BYTES", 4096)  # many write units
    with pytest.raises(OutputPathError, match="No space left"):
        merge_checkpoint(FIX / "hf/llama", FIX / "peft/llama-lora", tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_output_inside_input_refused(tmp_path):
    base = tmp_path / "base"
    load_model(FIX / "hf/llama").save_pretrained(str(base))
    with pytest.raises(OutputPathError):
        merge_checkpoint(base, FIX / "peft/llama-lora", base / "merged", progress=False)
    with pytest.raises(OutputPathError):
        merge_checkpoint(base / "model.safetensors", FIX / "peft/llama-lora", base, force=True, progress=False)
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_single_file_base_with_base_config(tmp_path):
    merge_checkpoint(FIX / "hf/llama/model.safetensors", FIX / "peft/llama-lora", tmp_path / "m",
                     base_config=FIX / "hf/llama/config.json", progress=False)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    ref = peft_model(FIX / "hf/llama", FIX / "peft/llama-lora")
    assert rel(logits(merged_model(tmp_path / "m")), logits(ref)) <= EXACT


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1.5kb", 1500), (123, 123), ("4096", 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["5 parsecs", "", "-1GB", 0])
def test_parse_size_refuses(bad):
    with pytest.raises(UsageError):
        parse_size(bad)


def test_progress_bar_only_when_asked(tmp_path, capsys):
    merge_checkpoint(FIX / "hf/llama", FIX / "peft/llama-lora", tmp_path / "a", progress=False)
    assert capsys.readouterr().err == ""
    merge_checkpoint(FIX / "hf/llama", FIX / "peft/llama-lora", tmp_path / "b", progress=True)
    assert "merge" in capsys.readouterr().err


def test_cli_merge(tmp_path, capsys):
    rc = main(["-q", "merge", str(FIX / "hf/llama"), str(FIX / "peft/llama-lora"), "-o", str(tmp_path / "m"),
               "--max-shard-size", "100KB"])
    assert rc == 0
    out = capsys.readouterr()
    assert out.out.startswith("merged 14 module(s)") and out.err == ""
    assert (tmp_path / "m/model.safetensors.index.json").is_file()


def test_merge_needs_no_numpy(tmp_path):
    """numpy is not a dependency: the streaming writer's byte views must not go through it."""
    code = ("import sys; sys.modules['numpy'] = None\n"  # any `import numpy` now raises ImportError
            "from lora_ckpt import merge_checkpoint\n"
            f"merge_checkpoint({str(FIX / 'hf/llama')!r}, {str(FIX / 'peft/llama-lora')!r}, {str(tmp_path / 'm')!r},"
            " progress=False)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(FIX.parent)})
    assert run.returncode == 0, run.stderr[-2000:]
    ref = tmp_path / "ref"
    merge_checkpoint(FIX / "hf/llama", FIX / "peft/llama-lora", ref, progress=False)
    assert (tmp_path / "m/model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
