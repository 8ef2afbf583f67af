"""LitGPT layout.

Real peer: ``fixtures/litgpt/llama-lora`` was written by the real LitGPT 0.5.13
(``fixtures/make_litgpt_fixture.py``: ``litgpt.lora.GPT`` on fixtures/hf/llama, q and v enabled,
k not, GQA) with the LitGPT model's own logits; reading it must give those logits in PEFT. Writing
is checked by exact round trips (read is verified against LitGPT, write is its inverse) and, when
``LORA_CKPT_LITGPT=1`` and litgpt is importable (it is not in the test extra: its
huggingface-hub<1.4 pin conflicts with ours; importing lightning takes ~10 s), by loading our
output into the real ``litgpt.lora.GPT`` with ``strict=True``.
"""

import copy
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_ckpt.conversion import compare_adapters, convert
from lora_ckpt.errors import LayoutError, MissingConfigError
from lora_ckpt.layouts import load_adapter, save_adapter
from lora_ckpt.layouts.litgpt import read_yaml_scalars
from lora_ckpt.report import inspect_source

FIX = Path(__file__).resolve().parent.parent / "fixtures"
LIT = FIX / "litgpt/llama-lora/final"
LLAMA = FIX / "hf/llama"
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
_BASE = {}


def rel(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def peft_logits(adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if "m" not in _BASE:
        _BASE["m"] = AutoModelForCausalLM.from_pretrained(LLAMA).eval()
    model = PeftModel.from_pretrained(copy.deepcopy(_BASE["m"]), adapter_dir).eval()
    with torch.no_grad():
        return model(INPUT_IDS).logits


def test_real_litgpt_adapter_to_peft_gives_litgpt_logits(tmp_path):
    res = convert(LIT, tmp_path / "peft", to="peft")  # head geometry from LitGPT's model_config.yaml
    assert res.source_layout == "litgpt" and res.verification.ok and res.modules == 13
    ad = load_adapter(tmp_path / "peft")
    assert "model.layers.0.self_attn.k_proj" not in ad.modules  # lora_key: false
    assert ad.modules["model.layers.0.self_attn.v_proj"].B.shape == (32, 4)  # n_query_groups * head_size
    assert "lm_head" in ad.modules and set(ad.scales()) == {2.0}
    ref = load_file(FIX / "litgpt/llama-lora/logits.safetensors")["logits"]
    assert rel(peft_logits(tmp_path / "peft"), ref) <= 1e-4


def test_split_is_the_grouped_block_diagonal_math():
    """Part i = (A rows of group i, B rows of part i): the update LitGPT's conv1d + zero_pad computes."""
    raw = torch.load(LIT / "lit_model.pth.lora", weights_only=True)["model"]
    A, B = raw["transformer.h.1.attn.qkv.lora_A"], raw["transformer.h.1.attn.qkv.lora_B"]
    ad = load_adapter(LIT)
    q, v = ad.modules["model.layers.1.self_attn.q_proj"], ad.modules["model.layers.1.self_attn.v_proj"]
    assert torch.equal(q.A, A[:4]) and torch.equal(q.B, B[:64])
    assert torch.equal(v.A, A[4:]) and torch.equal(v.B, B[64:])
    fused = torch.zeros(128, 64)  # rows [Q (64); K (32); V (32)], K not adapted
    fused[:64], fused[96:] = B[:64] @ A[:4], B[64:] @ A[4:]
    ours = torch.cat([q.delta() / 2.0, torch.zeros(32, 64), v.delta() / 2.0])
    assert torch.allclose(ours, fused, atol=1e-6)


def test_old_attn_attn_name_is_read(tmp_path):
    (tmp_path / "old").mkdir()
    for f in ("hyperparameters.yaml", "model_config.yaml"):
        (tmp_path / "old" / f).write_bytes((LIT / f).read_bytes())
    raw = torch.load(LIT / "lit_model.pth.lora", weights_only=True)["model"]
    torch.save({"model": {k.replace(".attn.qkv.", ".attn.attn."): v for k, v in raw.items()}},
               tmp_path / "old/lit_model.pth.lora")
    assert compare_adapters(load_adapter(LIT), load_adapter(tmp_path / "old")).worst == 0.0


@pytest.mark.parametrize("fixture", ["llama-lora", "qwen2-lora", "llama-rslora-patterns"])
def test_peft_to_litgpt_round_trip_is_exact(tmp_path, fixture):
    family = fixture.split("-")[0]
    cfg = FIX / f"hf/{family}/config.json"
    res = convert(FIX / "peft" / fixture, tmp_path / "lit", to="litgpt", base_config=cfg)
    assert res.verification.ok
    raw = torch.load(tmp_path / "lit/lit_model.pth.lora", weights_only=True)
    r = 8 if "patterns" in fixture else 4  # one rank: padded to the largest
    assert raw["model"]["transformer.h.0.attn.qkv.lora_A"].shape == (3 * r, 64)
    assert raw["model"]["transformer.h.0.attn.qkv.lora_B"].shape == (64 + 32 + 32, r)
    hp = read_yaml_scalars(tmp_path / "lit/hyperparameters.yaml")
    assert hp["lora_r"] == r and isinstance(hp["lora_alpha"], int)  # LitGPT types lora_alpha as int
    assert hp["lora_query"] and hp["lora_key"] and hp["lora_value"] and hp["lora_mlp"] and not hp["lora_head"]
    back = convert(tmp_path / "lit", tmp_path / "peft", to="peft", base_config=cfg)
    assert compare_adapters(load_adapter(FIX / "peft" / fixture), load_adapter(tmp_path / "peft")).ok
    assert back.verification.ok


def test_uneven_coverage_is_zero_filled_and_read_back_as_absent(tmp_path):
    ad = load_adapter(FIX / "peft/llama-lora")
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj",
                 "model.layers.1.self_attn.o_proj"):
        del ad.modules[name]
    save_adapter(ad, tmp_path / "lit", layout="litgpt", base_config=LLAMA / "config.json")
    raw = torch.load(tmp_path / "lit/lit_model.pth.lora", weights_only=True)["model"]
    assert raw["transformer.h.1.attn.proj.lora_A"].abs().sum() == 0  # LitGPT's strict load needs it
    assert raw["transformer.h.0.attn.qkv.lora_B"][64:96].abs().sum() == 0  # k of block 0
    back = load_adapter(tmp_path / "lit", base_config=LLAMA / "config.json")
    assert compare_adapters(ad, back).ok and any("all-zero" in n for n in back.meta.notes)


def test_enabled_parts_without_hyperparameters(tmp_path):
    raw = torch.load(LIT / "lit_model.pth.lora", weights_only=True)
    (tmp_path / "a").mkdir()
    torch.save(raw, tmp_path / "a/lit_model.pth.lora")
    (tmp_path / "a/model_config.yaml").write_bytes((LIT / "model_config.yaml").read_bytes())
    # with GQA the 96 lora_B rows can only be q + one of k/v (64 + 32) -- ambiguous between k and v
    with pytest.raises(LayoutError, match="lora_query/lora_key/lora_value"):
        load_adapter(tmp_path / "a", alpha=8)
    (tmp_path / "a/hyperparameters.yaml").write_text("lora_r: 4\nlora_alpha: 8\nlora_query: true\n"
                                                     "lora_key: false\nlora_value: true\n")
    assert compare_adapters(load_adapter(LIT), load_adapter(tmp_path / "a")).ok
    (tmp_path / "a/model_config.yaml").unlink()
    with pytest.raises(MissingConfigError, match="base-config"):
        load_adapter(tmp_path / "a")


def test_yaml_subset_reader(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text("# comment\nlora_r: 16   # rank\nlora_alpha: 32\nlora_query: True\nname: 'x: y'\n"
                 "data:\n  class_path: litgpt.data.Alpaca\n  lora_r: 99\ntrain:\n- 1\nlr: 3.0e-4\nq: null\n")
    assert read_yaml_scalars(p) == {"lora_r": 16, "lora_alpha": 32, "lora_query": True, "name": "x: y",
                                    "lr": 3.0e-4, "q": None}


def test_inspect_reads_litgpt_without_tensor_data():
    rep = inspect_source(LIT)
    assert rep.layout == "litgpt" and len(rep.modules) == 13 and rep.ranks == {4: 13}


@pytest.mark.skipif(os.environ.get("LORA_CKPT_LITGPT") != "1", reason="set LORA_CKPT_LITGPT=1 (real litgpt, ~15 s)")
def test_real_litgpt_loads_our_output_strictly(tmp_path):
    litgpt_lora = pytest.importorskip("litgpt.lora")
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama

    convert(FIX / "peft/llama-lora", tmp_path / "lit", to="litgpt", base_config=LLAMA / "config.json")
    hp = read_yaml_scalars(tmp_path / "lit/hyperparameters.yaml")
    config = litgpt_lora.Config(
        name="tiny", block_size=64, vocab_size=128, padded_vocab_size=128, n_layer=2, n_head=4, n_query_groups=2,
        n_embd=64, head_size=16, intermediate_size=128, bias=False, mlp_class_name="LLaMAMLP",
        norm_class_name="RMSNorm", norm_eps=1e-6, rotary_percentage=1.0, parallel_residual=False, rope_base=10000,
        **{k: v for k, v in hp.items() if k.startswith("lora_")})
    model = litgpt_lora.GPT(config).eval()
    state: dict = {}
    copy_weights_hf_llama(config, {}, state, load_file(LLAMA / "model.safetensors"))
    state = {k.replace(".qkv.", ".qkv.linear.").replace("attn.proj.", "attn.proj.linear.")
             .replace("mlp.fc_1.", "mlp.fc_1.linear.").replace("mlp.fc_2.", "mlp.fc_2.linear.")
             .replace("mlp.proj.", "mlp.proj.linear.").replace("lm_head.", "lm_head.linear."): v
             for k, v in state.items()}
    state.update(torch.load(tmp_path / "lit/lit_model.pth.lora", weights_only=True)["model"])
    model.load_state_dict(state, strict=True)  # as litgpt's merge_lora does
    with torch.no_grad():
        out = model(INPUT_IDS)
    assert rel(out, peft_logits(FIX / "peft/llama-lora")) <= 1e-4
