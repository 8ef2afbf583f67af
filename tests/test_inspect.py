"""inspect: layout detection with reasons, warnings for silent-failure classes, torch-free reading."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_ckpt.cli import LAYOUT_NAMES, main
from lora_ckpt.io import TensorMeta, tensor_index
from lora_ckpt.layouts import LAYOUTS
from lora_ckpt.report import AdapterReport, inspect_source

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def test_cli_layout_choices_and_help_come_from_the_registry(capsys):
    assert list(LAYOUTS) == LAYOUT_NAMES
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in LAYOUTS)
    with pytest.raises(SystemExit):
        main(["convert", str(FIX / "peft/llama-lora"), "--to", "no-such-layout", "-o", "x"])
    err = capsys.readouterr().err
    assert all(name in err for name in LAYOUTS)


@pytest.mark.parametrize("path, layout, family", [
    ("peft/llama-lora", "peft", "llama"), ("peft/llama-bin", "peft", "llama"),  # base_model_name_or_path
    ("torchtune/llama-lora/epoch_0", "torchtune", "llama"), ("torchtune/qwen2-lora/epoch_0", "torchtune", "qwen2"),
    ("mistral/lora", "mistral", "mistral"), ("mistral/lora/lora.safetensors", "mistral", "mistral"),
])
def test_detects_each_fixture_with_a_reason(path, layout, family, monkeypatch):
    monkeypatch.chdir(FIX.parent)  # the PEFT fixtures name their base "fixtures/hf/<family>"
    rep = inspect_source(FIX / path)
    assert isinstance(rep, AdapterReport)
    assert rep.layout == layout and rep.reason and rep.family == family
    assert len(rep.modules) == 14 and rep.ranks == {4: 14}


def test_pickle_index_reads_shapes_without_torch_and_matches_torch_load():
    path = FIX / "torchtune/llama-dora/epoch_0/adapter_model.pt"
    idx = tensor_index(path)
    real = torch.load(path, weights_only=True)
    assert set(idx) == set(real)
    for k, t in real.items():
        assert isinstance(idx[k], TensorMeta) and idx[k].shape == tuple(t.shape)
        assert idx[k].dtype == str(t.dtype).removeprefix("torch.")
    code = ("import sys; from lora_ckpt.io import tensor_index; tensor_index(sys.argv[1]); "
            "assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code, str(path)]).returncode == 0


def test_inspect_adapter_does_not_import_torch(tmp_path):
    code = ("import sys; from lora_ckpt.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    for path in ("peft/llama-dora", "torchtune/qwen2-lora/epoch_0/adapter_model.pt", "mistral/lora"):
        p = subprocess.run([sys.executable, "-c", code, "inspect", str(FIX / path)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("fixture", ["torchtune/llama-dora/epoch_0", "torchtune/qwen2-lora/epoch_0"])
def test_flags_torchtunes_wrong_peft_export(fixture):
    rep = inspect_source(FIX / fixture)
    assert any("disagrees with adapter_model.pt" in w for w in rep.warnings)


def test_correct_torchtune_export_is_not_flagged():
    rep = inspect_source(FIX / "torchtune/llama-lora/epoch_0")
    assert not any("disagrees" in w for w in rep.warnings)


def test_warns_dora_without_use_dora_and_full_tensors(tmp_path):
    src = FIX / "peft/llama-dora"
    (tmp_path / "a").mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "a/adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    rep = inspect_source(tmp_path / "a")
    assert any("use_dora is false" in w for w in rep.warnings)
    rep = inspect_source(FIX / "peft/llama-modules-to-save")
    assert any("vLLM and llama.cpp refuse" in w for w in rep.warnings)
    rep = inspect_source(FIX / "peft/llama-rslora-patterns")
    assert any("llama.cpp ignores use_rslora" in w for w in rep.warnings)
    assert rep.scales[4.0] == 8 and sorted(rep.ranks) == [2, 4, 8]


def test_stock_checkpoint_falls_back_to_tensor_report():
    rep = inspect_source(FIX / "hf/llama")
    assert not isinstance(rep, AdapterReport) and rep.tensors > 0


def test_loralib_without_alpha_reports_shapes_and_says_scale_unknown(tmp_path):
    torch.save({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(4, 8),
                "model.layers.0.self_attn.q_proj.lora_B": torch.zeros(8, 4)}, tmp_path / "lora_state_dict.pt")
    rep = inspect_source(tmp_path)
    assert rep.layout == "loralib" and any("scale unknown" in w for w in rep.warnings)
    rep = inspect_source(tmp_path, alpha=8)
    assert rep.scales == {2.0: 1}


def test_cli_inspect_json_and_text(capsys):
    assert main(["inspect", str(FIX / "torchtune/llama-dora/epoch_0"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["layout"] == "torchtune" and rep["dora"] and rep["family"] == "llama"
    assert main(["inspect", str(FIX / "peft/llama-lora")]) == 0
    out = capsys.readouterr().out
    assert "layout      peft" in out and "model.layers.0.self_attn.q_proj" in out


def test_cli_convert_and_verify_exit_codes(tmp_path, capsys):
    out = tmp_path / "tt"
    assert main(["convert", str(FIX / "peft/llama-dora"), "--to", "torchtune", "-o", str(out),
                 "--base-config", str(FIX / "hf/llama/config.json")]) == 0
    assert "verified: 14 module(s) compared, worst relative difference 0.00e+00" in capsys.readouterr().out
    assert main(["verify", str(out), str(FIX / "peft/llama-dora")]) == 0
    # torchtune's own PEFT export of a DoRA adapter is wrong: verify says so with exit code 3
    tt = FIX / "torchtune/llama-dora/epoch_0"
    assert main(["verify", str(tt), str(tt / "adapter_model.safetensors")]) == 3
    assert "DIFFERENT" in capsys.readouterr().out
    # existing output without --force: one line, exit 1, untouched
    before = sorted(p.name for p in out.iterdir())
    assert main(["convert", str(FIX / "peft/llama-lora"), "--to", "peft", "-o", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_warns_when_module_prefix_does_not_match_the_base_class(tmp_path):
    from safetensors.torch import load_file

    src = FIX / "peft/llama-lora"
    (tmp_path / "a").mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(FIX / "hf/llama")
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(cfg))
    t = {k.replace("base_model.model.model.", "base_model.model.language_model.model."): v
         for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(t, tmp_path / "a/adapter_model.safetensors")
    rep = inspect_source(tmp_path / "a")
    assert any("skip them silently" in w and "LlamaForCausalLM" in w for w in rep.warnings)
    assert rep.family == "llama"
    rep = inspect_source(src, base_config=FIX / "hf/llama/config.json")
    assert not any("skip them silently" in w for w in rep.warnings)


def test_convert_refuses_output_its_reader_does_not_reproduce(tmp_path, monkeypatch):
    """A writer/reader disagreement (simulated: the PEFT reader doubles every B) is caught by the
    read-back before the rename: VerificationError, and no output."""
    from lora_ckpt.conversion import convert
    from lora_ckpt.errors import VerificationError
    from lora_ckpt.layouts.peft import PeftLayout

    original = PeftLayout.read_meta

    def skewed(self, src, adapter, opts):
        original(self, src, adapter, opts)
        for m in adapter.modules.values():
            m.B = m.B * 2

    monkeypatch.setattr(PeftLayout, "read_meta", skewed)
    with pytest.raises(VerificationError, match="does not reproduce the source") as info:
        convert(FIX / "torchtune/llama-lora/epoch_0", tmp_path / "out", to="peft")
    assert list(tmp_path.iterdir()) == []
    # a defect found at run time: RuntimeError, not AssertionError
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, AssertionError)
