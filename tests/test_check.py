"""``check --for TARGET``: every target, with fixtures; the suggested fixes are followed and re-checked."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lora_ckpt.check import check_adapter, check_source
from lora_ckpt.cli import main
from lora_ckpt.conversion import compare_adapters, convert
from lora_ckpt.errors import UsageError
from lora_ckpt.layouts import load_adapter

FIX = Path(__file__).resolve().parent.parent / "fixtures"
LLAMA_CFG = FIX / "hf/llama/config.json"


def copy_peft(tmp_path, fixture, name="a", **config):
    """A copy of a PEFT fixture with adapter_config.json fields replaced."""
    out = tmp_path / name
    shutil.copytree(FIX / "peft" / fixture, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(config)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def errors(rep):
    return " | ".join(f.what for f in rep.errors)


@pytest.mark.parametrize("target", ["peft", "vllm", "llama.cpp"])
def test_plain_peft_adapter_is_ok_for_peft_consumers(target):
    rep = check_source(FIX / "peft/llama-lora", target=target)
    assert rep.ok, rep.format()


def test_peft_config_that_disowns_tensors(tmp_path):
    rep = check_source(copy_peft(tmp_path, "llama-dora", use_dora=False), target="peft")
    assert not rep.ok and "use_dora is false" in errors(rep)
    rep = check_source(copy_peft(tmp_path, "llama-lora", "b", target_modules=["q_proj", "v_proj"]), target="peft")
    assert "does not select 10 module(s)" in errors(rep)
    rep = check_source(copy_peft(tmp_path, "llama-lora", "c", init_lora_weights="pissa"), target="peft")
    assert "modifies the base" in errors(rep)
    rep = check_source(copy_peft(tmp_path, "llama-lora", "d", layers_to_transform=[1]), target="vllm")
    assert "excludes 7 module(s)" in errors(rep)


def test_vllm_refusals_and_silent_rescaling():
    assert "DoRA" in errors(check_source(FIX / "peft/llama-dora", target="vllm"))
    rep = check_source(FIX / "peft/llama-modules-to-save", target="vllm")
    assert "modules_to_save" in errors(rep) and "--allow-lossy" in rep.errors[0].fix
    rep = check_source(FIX / "peft/llama-rslora-patterns", target="vllm")
    assert "rank_pattern/alpha_pattern are not applied" in errors(rep)
    assert "lora_B.bias" in errors(check_source(FIX / "peft/llama-lora-bias", target="vllm"))


def test_prefix_mismatch_serves_the_base_model(tmp_path):
    out = copy_peft(tmp_path, "llama-lora")
    t = load_file(out / "adapter_model.safetensors")
    t = {k.replace("base_model.model.model.layers.", "base_model.model.model.language_model.layers."): v
         for k, v in t.items()}
    save_file(t, out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    rep = check_source(out, target="vllm", base_config=LLAMA_CFG)
    assert "silently serve the base model" in errors(rep)


def test_torchtune_dir_is_judged_by_its_own_peft_export():
    rep = check_source(FIX / "torchtune/llama-dora/epoch_0", target="vllm")
    assert "disagrees with adapter_model.pt" in errors(rep) and "use_dora is false" in errors(rep)
    assert "disagrees" in errors(check_source(FIX / "torchtune/qwen2-lora/epoch_0", target="peft"))
    assert check_source(FIX / "torchtune/llama-lora/epoch_0", target="peft").ok


def test_llama_cpp_rslora_fix_is_alpha_times_sqrt_r(tmp_path):
    src = copy_peft(tmp_path, "llama-lora", use_rslora=True)  # r 4, alpha 8: scale 4
    rep = check_source(src, target="llama.cpp")
    assert not rep.ok and "alpha*sqrt(r) = 16" in rep.errors[0].fix
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(lora_alpha=16, use_rslora=False)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    assert check_source(src, target="llama.cpp").ok


def test_llama_cpp_pattern_fold_recipe_works(tmp_path):
    src = FIX / "peft/llama-rslora-patterns"
    rep = check_source(src, target="llama.cpp")
    assert not rep.ok and "--to loralib" in rep.errors[0].fix
    convert(src, tmp_path / "tmp", to="loralib")  # the suggested two steps
    convert(tmp_path / "tmp", tmp_path / "out", to="peft")
    assert check_source(tmp_path / "out", target="llama.cpp").ok
    assert check_source(tmp_path / "out", target="vllm").ok
    assert compare_adapters(load_adapter(src), load_adapter(tmp_path / "out")).ok


def test_other_layouts_need_converting_and_then_pass(tmp_path):
    rep = check_source(FIX / "mistral/lora", target="vllm")
    assert [f.what for f in rep.errors] == ["vllm reads peft adapters; this one is mistral"]
    convert(FIX / "mistral/lora", tmp_path / "peft", to="peft")
    assert check_source(tmp_path / "peft", target="vllm").ok


def test_torchtune_target(tmp_path):
    assert check_source(FIX / "torchtune/llama-lora/epoch_0", target="torchtune").ok
    rep = check_source(FIX / "peft/llama-modules-to-save", target="torchtune")
    assert "cannot hold full tensors" in errors(rep)
    rep = check_source(FIX / "peft/llama-lora", target="torchtune")
    assert "family is unknown" not in errors(rep)  # base_model_name_or_path gives the config
    assert any("resuming" in f.what for f in rep.findings)


def test_mlx_target(tmp_path):
    convert(FIX / "peft/llama-dora", tmp_path / "mlx", to="mlx", base_config=LLAMA_CFG)
    assert check_source(tmp_path / "mlx", target="mlx", base_config=LLAMA_CFG).ok
    cfg = json.loads((tmp_path / "mlx/adapter_config.json").read_text())
    cfg.update(fine_tune_type="lora", num_layers=1)
    (tmp_path / "mlx/adapter_config.json").write_text(json.dumps(cfg))
    rep = check_source(tmp_path / "mlx", target="mlx", base_config=LLAMA_CFG)
    assert "fine_tune_type 'lora'" in errors(rep) and "num_layers 1" in errors(rep)
    ad = load_adapter(FIX / "peft/llama-dora")
    ad.modules["model.layers.0.self_attn.q_proj"].magnitude = None
    assert "DoRA on some modules only" in errors(check_adapter(ad, target="mlx"))
    ad = load_adapter(FIX / "peft/llama-lora")
    for n in [n for n in ad.modules if ".layers.1." in n]:
        del ad.modules[n]
    ad.meta.source_layout = "mlx"
    rep = check_adapter(ad, target="mlx")
    assert rep.ok and any("num_layers -1" in f.what for f in rep.findings)  # block 0 of 2: not trailing


def test_cli_exit_codes_and_json(capsys):
    assert main(["check", str(FIX / "peft/llama-lora"), "--for", "vllm"]) == 0
    assert capsys.readouterr().out.startswith("OK: vllm will load")
    assert main(["check", str(FIX / "peft/llama-dora"), "--for", "llama.cpp", "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] is False and rep["findings"][0]["level"] == "error" and "merge" in rep["findings"][0]["fix"]
    with pytest.raises(UsageError):
        check_source(FIX / "peft/llama-lora", target="tgi")
