"""Bad input to convert and detection: refused with typed errors and one-line messages (found,
expected, what to do); lossy content refused unless allowed; outputs never overwritten or placed
inside the input; inputs never modified. (Split from test_convert_roundtrip.py.)
"""

import dataclasses
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import peers as P
from lora_ckpt.conversion import compare_adapters, convert, verify
from lora_ckpt.errors import (
    AmbiguousLayoutError,
    ConfigError,
    ConversionError,
    IncompleteAdapterError,
    LayoutError,
    LoraCkptError,
    LossyConversionError,
    MissingConfigError,
    OutputExistsError,
    OutputPathError,
    ShapeMismatchError,
    UnknownLayoutError,
    UnsupportedAdapterError,
    UsageError,
)
from lora_ckpt.layouts import LAYOUTS, detect_layout, load_adapter
from test_convert_roundtrip import PEFT_FIXTURES, family_of, tree_hash

pytestmark = pytest.mark.filterwarnings("ignore")

ALL = list(LAYOUTS)
PEFT_FIX = P.FIX / "peft"


# =============================================================== bad input
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _raises(cls, phrase, fn):
    with pytest.raises(cls) as ei:
        fn()
    assert isinstance(ei.value, LoraCkptError)
    assert phrase.lower() in str(ei.value).lower(), str(ei.value)
    return ei.value


def test_unknown_layout_name(tmp_path):
    _raises(UsageError, "unknown layout 'nope'", lambda: convert(PEFT_FIX / "llama-lora", tmp_path / "o", to="nope"))
    _raises(UsageError, "unknown layout", lambda: convert(PEFT_FIX / "llama-lora", tmp_path / "o", to="peft",
                                                          from_="nope"))
    assert not (tmp_path / "o").exists()


def test_unknown_layout_input(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    _raises(UnknownLayoutError, "no known adapter layout", lambda: convert(d, tmp_path / "o", to="peft"))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, d / "adapter.safetensors")
    _raises(UnknownLayoutError, "no known adapter layout", lambda: detect_layout(d / "adapter.safetensors"))


def test_ambiguous_file_resolved_by_from(tmp_path):
    """Mistral-finetune keys saved as adapter_model.safetensors beside a PEFT config fit both the
    peft layout (config with peft_type beside PEFT's file name) and the mistral layout (Meta keys)."""
    d = tmp_path / "amb"
    d.mkdir()
    save_file(load_file(P.FIX / "mistral" / "lora" / "lora.safetensors"), d / "adapter_model.safetensors")
    shutil.copy(PEFT_FIX / "mistral-lora" / "adapter_config.json", d / "adapter_config.json")
    err = _raises(AmbiguousLayoutError, "--from", lambda: convert(d / "adapter_model.safetensors",
                                                                   tmp_path / "o", to="peft"))
    assert set(err.candidates) == {"peft", "mistral"}
    convert(d / "adapter_model.safetensors", tmp_path / "o", to="peft", from_="mistral",
            base_config=P.hf_config_path("mistral"), alpha=8)
    assert verify(tmp_path / "o", P.FIX / "mistral" / "lora-as-peft").ok
    # the same through the CLI: exit 1 with the candidates named, then --from resolves it
    from lora_ckpt.cli import main

    f = str(d / "adapter_model.safetensors")
    assert main(["-q", "convert", f, "--to", "peft", "-o", str(tmp_path / "c")]) == 1
    assert not (tmp_path / "c").exists()
    assert main(["-q", "convert", f, "--from", "mistral", "--base-config", str(P.hf_config_path("mistral")),
                 "--alpha", "8", "--to", "peft", "-o", str(tmp_path / "c")]) == 0
    assert verify(tmp_path / "c", P.FIX / "mistral" / "lora-as-peft").ok


def test_ambiguous_directory_resolved_by_from(tmp_path):
    """A directory holding a loralib file and an LLMBook file."""
    d = tmp_path / "amb"
    d.mkdir()
    sd = load_file(PEFT_FIX / "llama-lora" / "adapter_model.safetensors")
    bare = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    torch.save({k.removesuffix(".weight"): v for k, v in bare.items()}, d / "lora_state_dict.pt")
    torch.save({k.replace("lora_A", "A").replace("lora_B", "B"): v * 2 if "lora_B" in k else v  # scale 1
                for k, v in bare.items()}, d / "lora_weights.pt")
    err = _raises(AmbiguousLayoutError, "matches 2 layouts", lambda: convert(d, tmp_path / "o", to="peft"))
    assert set(err.candidates) == {"loralib", "llmbook"}
    convert(d, tmp_path / "lb", to="peft", from_="llmbook")
    convert(d, tmp_path / "ll", to="peft", from_="loralib", alpha=8)
    for out in ("lb", "ll"):  # both are the llama-lora adapter (llmbook: scale 2 folded into B)
        rep = verify(tmp_path / out, PEFT_FIX / "llama-lora")
        assert rep.ok and rep.worst == 0.0


def test_torchtune_module_mapping_to_no_model_module(tmp_path):
    d = _copy(P.FIX / "torchtune" / "llama-lora" / "epoch_0", tmp_path / "tt")
    sd = torch.load(d / "adapter_model.pt", weights_only=True)
    torch.save({k.replace("layers.0.attn.v_proj", "layers.0.attn.bogus_proj"): v for k, v in sd.items()},
               d / "adapter_model.pt")
    err = _raises(LayoutError, "'layers.0.attn.bogus_proj' maps to no llama model module",
                  lambda: convert(d, tmp_path / "o", to="peft"))
    assert err.layout == "torchtune"
    (d / "config.json").unlink()  # without a config the family is guessed from the names: none fits
    _raises(LayoutError, "no model family", lambda: convert(d, tmp_path / "o", to="peft"))


def _peft_copy(tmp_path, fixture="llama-lora"):
    return _copy(PEFT_FIX / fixture, tmp_path / "in")


def test_a_b_rank_disagreement(tmp_path):
    d = _peft_copy(tmp_path)
    sd = load_file(d / "adapter_model.safetensors")
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    sd[k] = sd[k][:, :3].contiguous()
    save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})
    err = _raises(ShapeMismatchError, "disagree on the rank", lambda: convert(d, tmp_path / "o", to="torchtune",
                                                                               base_config=P.hf_config_path("llama")))
    assert "q_proj" in err.key


def test_lora_a_without_lora_b(tmp_path):
    d = _peft_copy(tmp_path)
    sd = load_file(d / "adapter_model.safetensors")
    del sd["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})
    _raises(IncompleteAdapterError, "but no lora_B.weight", lambda: convert(d, tmp_path / "o", to="native"))


def test_config_rank_disagrees_with_tensors(tmp_path):
    d = _peft_copy(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    _raises(ConfigError, "disagree with the tensors", lambda: convert(d, tmp_path / "o", to="native"))
    t = _copy(P.FIX / "torchtune" / "llama-lora" / "epoch_0", tmp_path / "tt")
    cfg = json.loads((t / "adapter_config.json").read_text())
    (t / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    _raises(ConfigError, "r=8 but the tensors have rank 4", lambda: convert(t, tmp_path / "o", to="peft"))


def test_adalora_refused(tmp_path):
    d = _peft_copy(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "ADALORA"}))
    _raises(UnsupportedAdapterError, "AdaLoRA", lambda: convert(d, tmp_path / "o", to="native"))
    (d / "adapter_config.json").write_text(json.dumps(cfg))  # LORA config, but AdaLoRA's lora_E in the file
    sd = load_file(d / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_E"] = torch.zeros(4, 1)
    save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})
    _raises(UnsupportedAdapterError, "lora_E", lambda: convert(d, tmp_path / "o", to="native"))


def test_3d_lora_b_refused(tmp_path):
    d = _peft_copy(tmp_path)
    sd = load_file(d / "adapter_model.safetensors")
    k = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    sd[k] = sd[k].reshape(2, 16, 4).contiguous()
    save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})
    _raises(UnsupportedAdapterError, "3-D", lambda: convert(d, tmp_path / "o", to="native"))


def test_missing_head_counts_and_alpha(tmp_path):
    t = _copy(P.FIX / "torchtune" / "llama-lora" / "epoch_0", tmp_path / "tt")
    (t / "config.json").unlink()
    _raises(MissingConfigError, "head counts", lambda: convert(t, tmp_path / "o", to="peft"))
    (t / "adapter_config.json").unlink()  # Meta/TorchTune checkpointers write only adapter_model.pt
    _raises(MissingConfigError, "lora_alpha", lambda: convert(t, tmp_path / "o", to="peft",
                                                              base_config=P.hf_config_path("llama")))
    convert(t, tmp_path / "o", to="peft", base_config=P.hf_config_path("llama"), alpha=8)
    assert verify(tmp_path / "o", P.FIX / "torchtune" / "llama-lora" / "epoch_0").ok
    lb = tmp_path / "lb"
    lb.mkdir()
    torch.save({"model.layers.0.self_attn.v_proj.lora_A": torch.ones(4, 64),
                "model.layers.0.self_attn.v_proj.lora_B": torch.ones(32, 4)}, lb / "lora_state_dict.pt")
    _raises(MissingConfigError, "--alpha", lambda: convert(lb, tmp_path / "o2", to="peft"))


def test_family_without_target_names(tmp_path):
    _raises(ConversionError, "no meta parameter names", lambda: convert(
        PEFT_FIX / "qwen2-lora", tmp_path / "o", to="mistral", base_config=P.hf_config_path("qwen2")))


LOSSY = [("llama-modules-to-save", "lm_head.weight"), ("llama-embedding", "embed_tokens"),
         ("llama-dora", "DoRA magnitudes"), ("llama-lora-bias", "lora_B.bias")]


@pytest.mark.parametrize("fixture,what", LOSSY, ids=[c[0] for c in LOSSY])
def test_lossy_into_mistral_refused(tmp_path, fixture, what):
    err = _raises(LossyConversionError, "--allow-lossy", lambda: convert(
        PEFT_FIX / fixture, tmp_path / "o", to="mistral", base_config=P.hf_config_path("llama")))
    assert what in str(err) and err.dropped
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def _allow_lossy(tmp_path, caplog, fixture):
    src = PEFT_FIX / fixture
    with caplog.at_level(logging.WARNING, logger="lora_ckpt"):
        convert(src, tmp_path / "o", to="mistral", base_config=P.hf_config_path("llama"), allow_lossy=True)
    assert any("dropping what mistral cannot hold" in r.getMessage() for r in caplog.records)
    got = load_adapter(tmp_path / "o")
    want = load_adapter(src)
    kept = {n: dataclasses.replace(m, magnitude=None, bias=None) for n, m in want.modules.items()
            if m.kind == "linear"}
    assert not got.extra and not got.uses_dora and not got.uses_bias
    rep = compare_adapters(dataclasses.replace(want, modules=kept, extra={}), got)
    assert rep.ok and rep.worst == 0.0, rep.summary()


@pytest.mark.parametrize("fixture", ["llama-modules-to-save", "llama-embedding"])
def test_allow_lossy_drops_full_tensors_and_embeddings_with_a_warning(tmp_path, caplog, fixture):
    _allow_lossy(tmp_path, caplog, fixture)


@pytest.mark.parametrize("fixture", ["llama-dora", "llama-lora-bias"])
def test_allow_lossy_drops_dora_and_bias_with_a_warning(tmp_path, caplog, fixture):
    _allow_lossy(tmp_path, caplog, fixture)


def test_output_exists_without_force(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _raises(OutputExistsError, "exists", lambda: convert(PEFT_FIX / "llama-lora", out, to="native"))
    assert isinstance(err, FileExistsError) and (out / "keep.txt").read_text() == "mine"
    convert(PEFT_FIX / "llama-lora", out, to="native", force=True)
    assert not (out / "keep.txt").exists() and (out / "lora_adapter.safetensors").exists()


def test_output_inside_input(tmp_path):
    d = _peft_copy(tmp_path)
    before = tree_hash(d)
    _raises(OutputPathError, "overlaps the input", lambda: convert(d, d / "out", to="native"))
    _raises(OutputPathError, "overlaps the input", lambda: convert(d, d, to="native", force=True))
    _raises(OutputPathError, "overlaps the input", lambda: convert(d, tmp_path, to="native", force=True))
    _raises(OutputPathError, "overlaps the input", lambda: convert(d / "adapter_model.safetensors", d,
                                                                   to="native", force=True))
    assert tree_hash(d) == before


INPUTS = [PEFT_FIX / f for f in PEFT_FIXTURES] + [P.FIX / "torchtune" / n / "epoch_0" for n in
                                                   ("llama-lora", "llama-dora", "qwen2-lora")] + [
    P.FIX / "mistral" / "lora", P.FIX / "mistral" / "lora-as-peft"]


def test_inputs_unchanged(tmp_path):
    """Every fixture converted to every layout (including refused conversions): not one byte or
    mtime of the inputs changes."""
    before = {str(d): tree_hash(d) for d in INPUTS}
    n_ok = 0
    for i, d in enumerate(INPUTS):
        fam = "mistral" if "mistral" in d.parts else family_of(d.name if d.name != "epoch_0" else d.parent.name)
        for to in ALL:
            try:
                convert(d, tmp_path / f"{i}-{to}", to=to, base_config=P.hf_config_path(fam))
                n_ok += 1
            except LoraCkptError:
                pass
    assert n_ok > 40
    assert {str(d): tree_hash(d) for d in INPUTS} == before


@pytest.mark.parametrize("to", [n for n, lay in LAYOUTS.items() if "fan_in_fan_out" not in lay.features
                                and n in ("mlx", "loralib")])
def test_conv1d_flag_refused_then_dropped_with_allow_lossy(tmp_path, to):
    """A layout with no fan_in_fan_out flag refuses GPT-2 Conv1D modules naming the flag; --allow-lossy keeps the
    factors (the update is the same (out, in) delta) without the flag, and the verification agrees."""
    src = PEFT_FIX / "gpt2-lora"
    cfg = P.FIX / "hf/gpt2/config.json"
    with pytest.raises(LossyConversionError, match="fan_in_fan_out"):
        convert(src, tmp_path / "refused", to=to, base_config=cfg)
    assert not (tmp_path / "refused").exists()
    convert(src, tmp_path / "out", to=to, base_config=cfg, allow_lossy=True)
    ours, back = load_adapter(src), load_adapter(tmp_path / "out", layout=to, base_config=cfg, alpha=None)
    assert set(back.modules) == set(ours.modules)
    for name, m in ours.modules.items():
        assert m.fan_in_fan_out and not back.modules[name].fan_in_fan_out
        assert torch.allclose(back.modules[name].delta(), m.delta(), rtol=1e-6, atol=0)
