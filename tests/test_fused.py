"""Fused <-> split as one mechanism (lora_ckpt/fused.py + the Fused table in families.py).

Real peers: HF Phi-3's fused ``qkv_proj``/``gate_up_proj`` under PEFT <-> torchtune 0.6.1's split
``q/k/v_proj`` and ``w1``/``w3`` (``lora_phi3`` built with torchtune's own builder, base weights by
torchtune's own ``phi3_hf_to_tune``); GPT-2 ``Conv1D`` (``fan_in_fan_out``) with fused ``c_attn``
through PEFT. LitGPT's grouped ``attn.qkv`` uses the same code (tests/test_litgpt.py).
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_ckpt.adapter import ModuleLoRA
from lora_ckpt.conversion import convert
from lora_ckpt.errors import UnsupportedAdapterError
from lora_ckpt.families import FAMILIES, Fused, NameMap
from lora_ckpt.fused import fuse, group, split, ungroup
from lora_ckpt.layouts import load_adapter

FIX = Path(__file__).resolve().parent.parent / "fixtures"
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
DIMS = {"vocab_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64,
        "intermediate_dim": 128, "max_seq_len": 64, "norm_eps": 1e-5, "rope_base": 10000}


def rel(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """A tiny HF Phi-3 (GQA: 4 heads, 2 kv heads) saved with save_pretrained."""
    from transformers import Phi3Config, Phi3ForCausalLM

    root = tmp_path_factory.mktemp("phi3")
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Phi3ForCausalLM(cfg).eval()
    model.save_pretrained(root / "hf")
    return root, model


def _tt_model(root, adapter_sd, *, rank=4, alpha=8):
    from torchtune.models.phi3._component_builders import lora_phi3
    from torchtune.models.phi3._convert_weights import phi3_hf_to_tune

    model = lora_phi3(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=rank,
                      lora_alpha=alpha, **DIMS).eval()
    base = phi3_hf_to_tune(load_file(root / "hf/model.safetensors"), num_heads=4, num_kv_heads=2, dim=64)
    missing, unexpected = model.load_state_dict({**base, **adapter_sd}, strict=False)
    assert not unexpected and (not missing or not adapter_sd), (missing, unexpected)
    return model


def test_phi3_peft_fused_to_torchtune_split_runs_in_real_torchtune(phi3, tmp_path):
    from peft import LoraConfig, get_peft_model

    root, base = phi3
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    _randomize(pm, 5)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = pm(INPUT_IDS).logits
    res = convert(tmp_path / "peft", tmp_path / "tt", to="torchtune", base_config=root / "hf/config.json")
    assert res.verification.ok
    sd = torch.load(tmp_path / "tt/adapter_model.pt", weights_only=True)
    assert sd["layers.0.attn.k_proj.lora_b.weight"].shape == (32, 4)  # qkv rows split by head counts (GQA)
    assert sd["layers.0.mlp.w3.lora_b.weight"].shape == (128, 4)  # gate_up rows split in halves
    assert rel(_tt_model(root, sd)(INPUT_IDS), ref) <= 1e-5


def test_phi3_torchtune_split_to_peft_fused_runs_in_real_peft(phi3, tmp_path):
    from peft import PeftModel
    from torchtune.modules.peft import get_adapter_state_dict

    root, base = phi3
    tt = _tt_model(root, {})  # base weights only
    _randomize(tt, 6)  # q, k, v get different A's: fusing them needs A stacked, B block-diagonal
    with torch.no_grad():
        ref = tt(INPUT_IDS)
    epoch = tmp_path / "epoch_0"
    epoch.mkdir()
    torch.save(get_adapter_state_dict(tt.state_dict()), epoch / "adapter_model.pt")
    (epoch / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA",
                                                           "target_modules": ["q_proj", "k_proj", "v_proj"]}))
    (epoch / "config.json").write_bytes((root / "hf/config.json").read_bytes())  # torchtune copies it
    res = convert(epoch, tmp_path / "peft", to="peft")
    assert res.verification.ok
    ad = load_adapter(tmp_path / "peft")
    assert ad.modules["model.layers.0.self_attn.qkv_proj"].rank == 12  # 3 x 4, exact
    assert ad.modules["model.layers.0.mlp.gate_up_proj"].rank == 8
    assert ad.modules["model.layers.0.self_attn.o_proj"].rank == 4
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        assert rel(model(INPUT_IDS).logits, ref) <= 1e-5
    # and back to torchtune: the block-diagonal fuse splits back to rank 4 (no padding to 12)
    convert(tmp_path / "peft", tmp_path / "tt2", to="torchtune", base_config=root / "hf/config.json")
    back = torch.load(tmp_path / "tt2/adapter_model.pt", weights_only=True)
    orig = torch.load(epoch / "adapter_model.pt", weights_only=True)
    assert set(back) == set(orig)
    assert all(torch.allclose(back[k], orig[k], atol=1e-7) for k in orig)


def test_gpt2_conv1d_fused_c_attn_peft_native_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = FIX / "peft/gpt2-lora"
    ad = load_adapter(src)
    assert all(m.fan_in_fan_out for m in ad.modules.values())
    assert ad.modules["transformer.h.0.attn.c_attn"].B.shape == (192, 4)  # q, k, v stay one fused module
    convert(src, tmp_path / "native", to="native")
    assert all(m.fan_in_fan_out for m in load_adapter(tmp_path / "native").modules.values())
    res = convert(tmp_path / "native", tmp_path / "peft", to="peft")
    assert res.verification.ok
    cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    base = AutoModelForCausalLM.from_pretrained(FIX / "hf/gpt2").eval()
    outs = []
    for d in (src, tmp_path / "peft"):
        with torch.no_grad():
            outs.append(PeftModel.from_pretrained(copy.deepcopy(base), d).eval()(INPUT_IDS).logits)
    assert rel(outs[1], outs[0]) == 0.0


# ------------------------------------------------------------------------ the math
def _m(out, inn, r, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return ModuleLoRA(A=torch.randn(r, inn, generator=g), B=torch.randn(out, r, generator=g), scale=2.0, **kw)


def test_fuse_split_are_exact_inverses():
    parts = [_m(8, 6, 2, 1), None, _m(4, 6, 3, 2)]
    fused = fuse(parts, (8, 4, 4))
    assert fused.rank == 5 and fused.B.shape == (16, 5)
    assert torch.allclose(fused.delta()[:8], parts[0].delta()) and not fused.delta()[8:12].any()
    back = split(fused, (8, 4, 4))
    assert back[0].rank == 2 and back[2].rank == 3  # zero columns dropped: original ranks
    assert torch.allclose(back[2].delta(), parts[2].delta())
    shared = _m(8, 6, 2, 3)
    same_a = fuse([shared, ModuleLoRA(A=shared.A, B=torch.ones(8, 2), scale=2.0)], (8, 8))
    assert same_a.rank == 2  # identical A's: B's concatenated, rank unchanged


def test_fuse_folds_scales_and_concatenates_dora():
    a, b = _m(4, 6, 2, 1, magnitude=torch.rand(4)), _m(4, 6, 2, 2, magnitude=torch.rand(4))
    b.scale = 0.5
    fused = fuse([a, b], (4, 4))
    assert torch.allclose(fused.delta()[4:], b.delta(), atol=1e-6)
    assert torch.equal(fused.magnitude, torch.cat([a.magnitude, b.magnitude]))
    with pytest.raises(UnsupportedAdapterError, match="DoRA magnitudes on only some parts"):
        fuse([a, None], (4, 4))


def test_group_ungroup_round_trip():
    q, v = _m(8, 6, 2, 1), _m(4, 6, 2, 2)
    A, B = group([q, v], 6)
    assert A.shape == (4, 6) and B.shape == (12, 2)
    q2, k2, v2 = ungroup(A, B, (8, 4, 4), (True, False, True), 2.0)
    assert k2 is None and torch.equal(q2.B, q.B) and torch.equal(v2.A, v.A)


def test_fused_tables_are_consistent():
    with pytest.raises(ValueError):
        Fused(hf=("a",), other=("b",), rows="equal")
    for fam in FAMILIES.values():
        for scheme, entries in fam.fused.items():
            one_to_one = NameMap(fam.maps[scheme]).modules
            for fe in entries:
                for t in fe.hf:  # a fused/split HF module has no one-to-one name as well
                    assert one_to_one.to_other(t.replace("{}", "0")) is None, (fam.name, t)
                for t in fe.other:
                    assert one_to_one.to_hf(t.replace("{}", "0")) is None, (fam.name, t)
