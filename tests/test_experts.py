"""MoE expert LoRA (PEFT ``target_parameters`` on transformers-5 fused experts) against the real
peers: tiny Qwen3-MoE and Mixtral models built from config by transformers 5, LoRA by PEFT."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_ckpt import convert, load_adapter, merge_checkpoint, verify
from lora_ckpt.check import check_source
from lora_ckpt.errors import LossyConversionError
from lora_ckpt.experts import from_peft, to_peft
from lora_ckpt.report import inspect_source

E, R = 4, 2
TARGET_PARAMETERS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]  # config order != nesting order
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def _config(family: str):
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=8, num_experts=E, **common)
    return MixtralConfig(intermediate_size=8, num_local_experts=E, **common)


def _base(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, tmp_path_factory):
    """(family, adapter dir, base model dir, PEFT model): attention target_modules + expert target_parameters."""
    from peft import LoraConfig, get_peft_model

    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = _base(family)
    base.save_pretrained(root / "base")  # experts one per expert on disk (transformers splits them on save)
    cfg = LoraConfig(r=R, lora_alpha=5, target_modules=["q_proj", "v_proj"], target_parameters=TARGET_PARAMETERS,
                     task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(_base(family), cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(root / "adapter")
    return family, root / "adapter", root / "base", peft_model


def _peft_logits(family: str, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_base(family), str(adapter)).eval()
    with torch.no_grad():
        return model(IDS).logits


def _files_equal(a: Path, b: Path) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes()
               for n in ("adapter_model.safetensors", "adapter_config.json"))


# ---------------------------------------------------------------------- the formula
def test_per_expert_update_and_logits_equal_real_peft(moe):
    family, adapter_dir, _, peft_model = moe
    adapter = load_adapter(adapter_dir)
    assert sorted(adapter.experts) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                       for p in ("down_proj", "gate_up_proj")]
    for layer in peft_model.base_model.model.model.layers:
        outer = layer.mlp.experts  # PEFT nests in registration order: gate_up_proj innermost
        for wrapper in (outer, outer.base_layer):
            x = adapter.experts[f"model.layers.{layer.self_attn.layer_idx}.mlp.experts.{wrapper.parameter_name}"]
            peft_delta = wrapper.get_delta_weight("default")
            assert x.num_experts == E and x.rank == R and x.scale == 5 / R
            for e in range(E):  # expert by expert: A_e = A[e*r:(e+1)*r], B_e = B[:, e::E]
                torch.testing.assert_close(x.delta(e), peft_delta[e], rtol=1e-6, atol=1e-7)
    # the logits of a plain transformers model with each expert's update (and the attention LoRA) added by hand
    plain = _base(family)
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, x in adapter.experts.items():
            for e in range(E):
                params[name][e] += x.delta(e)
        for name, m in adapter.modules.items():
            params[f"{name}.weight"] += m.delta()
        ours, theirs = plain(IDS).logits, peft_model(IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_contiguous_b_blocks_are_the_trap(moe):
    """Reading B in contiguous rank blocks (expert-major) gives other updates: the flattening matters."""
    adapter = load_adapter(moe[1])
    x = adapter.experts["model.layers.0.mlp.experts.down_proj"]
    A, B = to_peft(x)
    wrong = B.reshape(B.shape[0], E, R).permute(1, 0, 2)  # B[:, e*r:(e+1)*r]
    assert all(not torch.allclose(wrong[e] @ x.A[e], x.B[e] @ x.A[e]) for e in range(E))
    back = from_peft(A, B, R, name="x", scale=x.scale)
    assert torch.equal(back.A, x.A) and torch.equal(back.B, x.B)


# ------------------------------------------------------------------ round trips
def test_peft_and_native_round_trips_are_byte_identical(moe, tmp_path):
    _, adapter_dir, _, _ = moe
    convert(adapter_dir, tmp_path / "peft", to="peft")
    assert _files_equal(adapter_dir, tmp_path / "peft")
    convert(adapter_dir, tmp_path / "native", to="native")
    convert(tmp_path / "native", tmp_path / "back", to="peft")
    assert _files_equal(adapter_dir, tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == TARGET_PARAMETERS and cfg["r"] == R and cfg["lora_alpha"] == 5


@pytest.mark.parametrize("to, kw", [("peft", {"experts": "per-expert"}), ("mlx", {}), ("mistral", {}),
                                    ("native", {"experts": "per-expert"})])
def test_every_expert_form_converts_exactly_and_back(moe, tmp_path, to, kw):
    family, adapter_dir, base_dir, _ = moe
    if to == "mistral" and family != "mixtral":
        pytest.skip("mistral-finetune's MoE layout is Mixtral's")
    cfg = base_dir / "config.json"
    res = convert(adapter_dir, tmp_path / "out", to=to, base_config=cfg, **kw)
    assert res.verification.ok and res.verification.worst == 0.0
    names = set(load_adapter(tmp_path / "out", base_config=cfg).modules)
    expert = "block_sparse_moe.experts.3.w3" if family == "mixtral" else "mlp.experts.3.up_proj"
    assert f"model.layers.1.{expert}" in names and "model.layers.1.self_attn.q_proj" in names
    if to == "mlx":  # stacked switch_mlp factors, (E, r, in) / (E, out, r)
        switch = "block_sparse_moe" if family == "mixtral" else "mlp"
        keys = load_file(tmp_path / "out" / "adapters.safetensors")
        assert tuple(keys[f"model.layers.0.{switch}.switch_mlp.up_proj.lora_a"].shape) == (E, R, 16)
    convert(tmp_path / "out", tmp_path / "back", to="peft", base_config=cfg, experts="fused")
    if to != "mistral":  # mistral's params.json keeps one scaling, folded into B: exact up to rounding
        assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == \
            (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert verify(tmp_path / "back", adapter_dir, base_config=cfg).ok
    torch.testing.assert_close(_peft_logits(family, tmp_path / "back"), _peft_logits(family, adapter_dir),
                               rtol=1e-5, atol=1e-5)


def test_verify_catches_a_swapped_expert(moe, tmp_path):
    _, adapter_dir, base_dir, _ = moe
    (tmp_path / "bad").mkdir()
    sd = load_file(adapter_dir / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"  # gate_up_proj
    B = sd[key].reshape(sd[key].shape[0], R, E).clone()
    B[:, :, [1, 2]] = B[:, :, [2, 1]]  # experts 1 and 2 swapped in the interleaved columns
    sd[key] = B.reshape(sd[key].shape).contiguous()
    save_file(sd, tmp_path / "bad" / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bad" / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    rep = verify(tmp_path / "bad", adapter_dir, base_config=base_dir / "config.json")
    assert not rep.ok
    bad = {n for n, d in rep.modules.items() if d > rep.tolerance}
    part = "block_sparse_moe.experts.{}.w1" if "mixtral" in str(base_dir) else "mlp.experts.{}.gate_proj"
    assert {f"model.layers.1.{part.format(e)}" for e in (1, 2)} <= bad
    assert not any(f".{e}." in n for n in bad for e in (0, 3))


def test_torchtune_refuses_naming_the_experts(moe, tmp_path):
    _, adapter_dir, base_dir, _ = moe
    with pytest.raises(LossyConversionError, match=r"torchtune cannot hold LoRA on MoE experts .*"
                       r"model\.layers\.0\.mlp\.experts\.down_proj' \(E=4, r=2\)"):
        convert(adapter_dir, tmp_path / "tt", to="torchtune", base_config=base_dir / "config.json")
    assert not (tmp_path / "tt").exists()


# ------------------------------------------------------------------- inspect, check
def test_inspect_shows_expert_parameters(moe):
    rep = inspect_source(moe[1])
    gate_up = next(x for x in rep.experts if x["parameter"] == "model.layers.0.mlp.experts.gate_up_proj")
    assert (gate_up["experts"], gate_up["rank"], gate_up["in"], gate_up["out"]) == (E, R, 16, 16)
    assert gate_up["projections"] == ["gate_proj", "up_proj"]
    assert len(rep.experts) == 4 and len(rep.modules) == 4  # q_proj, v_proj x 2 layers


def test_check_vllm_moe_rules(moe, tmp_path):
    _, adapter_dir, base_dir, _ = moe
    cfg = base_dir / "config.json"
    rep = check_source(adapter_dir, target="vllm", base_config=cfg)
    assert not rep.ok and any("is_3d_moe_weight" in f.what and "--experts per-expert" in f.fix for f in rep.errors)
    convert(adapter_dir, tmp_path / "2d", to="peft", base_config=cfg, experts="per-expert")
    rep = check_source(tmp_path / "2d", target="vllm", base_config=cfg)
    assert not any("expert" in f.what for f in rep.errors), rep.format()


# ------------------------------------------------------------------------- merge
def _ulps(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, terms: torch.Tensor | None) -> float:
    """max |a - b| in float32 ulps of the operands: the largest of |W|, |W + ΔW| and the update's terms
    ``s·|B|@|A|`` (a rounding depends on the operands; a cancelling sum has tiny ulps of its own)."""
    mag = torch.maximum(b.abs(), w.abs())
    if terms is not None:
        mag = torch.maximum(mag, terms)
    spacing = torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag
    return ((a - b).abs() / spacing).max().item()


@pytest.mark.parametrize("fused_base", [False, True])
def test_merge_equals_peft_merge_and_unload(moe, tmp_path, fused_base):
    family, adapter_dir, base_dir, _ = moe
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base_dir
    if fused_base:  # the in-memory (E, out, in) tensors as a checkpoint
        base = tmp_path / "fused"
        base.mkdir()
        save_file({k: v.contiguous() for k, v in _base(family).state_dict().items()}, base / "model.safetensors")
        (base / "config.json").write_bytes((base_dir / "config.json").read_bytes())
    merge_checkpoint(base, adapter_dir, tmp_path / "merged", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PeftModel.from_pretrained(_base(family), str(adapter_dir)).merge_and_unload().state_dict()
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert set(ours) == set(ref)
    plain = _base(family).state_dict()
    adapter = load_adapter(adapter_dir)
    terms = {f"{n}.weight": m.scale * (m.B.abs() @ m.A.abs()) for n, m in adapter.modules.items()}
    terms.update({n: x.scale * (x.B.abs() @ x.A.abs()) for n, x in adapter.experts.items()})
    assert max(_ulps(ours[k], ref[k], plain[k], terms.get(k)) for k in ref) <= 2
    keys = load_file(tmp_path / "merged" / "model.safetensors")
    on_disk = "model.layers.0.mlp.experts.gate_up_proj" if fused_base else (
        "model.layers.0.block_sparse_moe.experts.0.w1.weight" if family == "mixtral"
        else "model.layers.0.mlp.experts.0.gate_proj.weight")
    assert on_disk in keys  # the base's own names


def test_one_targeted_parameter_without_target_modules(tmp_path):
    """Only gate_up_proj targeted (no nesting: ``experts.lora_A.weight``), no target_modules."""
    from peft import LoraConfig, get_peft_model

    _base("qwen3_moe").save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_base("qwen3_moe"), LoraConfig(r=3, lora_alpha=6, target_parameters=["gate_up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    model.save_pretrained(tmp_path / "ad")
    adapter = load_adapter(tmp_path / "ad")
    assert not adapter.modules and sorted(adapter.experts) == [f"model.layers.{i}.mlp.experts.gate_up_proj"
                                                               for i in (0, 1)]
    x, wrapper = adapter.experts["model.layers.1.mlp.experts.gate_up_proj"], model.base_model.model.model.layers[1]
    torch.testing.assert_close(torch.stack([x.delta(e) for e in range(E)]),
                               wrapper.mlp.experts.get_delta_weight("default"), rtol=1e-6, atol=1e-7)
    cfg = tmp_path / "base" / "config.json"
    convert(tmp_path / "ad", tmp_path / "mlx", to="mlx", base_config=cfg)
    convert(tmp_path / "mlx", tmp_path / "back", to="peft", base_config=cfg, experts="fused")
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    written = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert written["target_parameters"] == ["mlp.experts.gate_up_proj"] and written["r"] == 3
    torch.testing.assert_close(_peft_logits("qwen3_moe", tmp_path / "back"), _peft_logits("qwen3_moe", tmp_path / "ad"))
