"""Conversions proven exact against the REAL peers: PEFT on transformers models, torchtune's own
LoRA/DoRA models (built by its component builders, base weights by its own ``hf_to_tune``), and the
mistral-finetune layout.

"Relative" logit difference everywhere: ``max|out - ref| / max|ref|`` over all logits of the
fixtures' input (peers.rel_diff); exact conversions must be <= 1e-5 (fp32), broken ones >= 1e-2.
Measured values are printed as ``REL <case> <value>`` (run with ``-s`` to see them).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import peers as P
from lora_ckpt.conversion import convert, verify
from lora_ckpt.rope import interleaved_to_rotate_half, rotate_half_to_interleaved

pytestmark = pytest.mark.filterwarnings("ignore")  # peers' deprecation chatter; key warnings are captured


# one torch thread for the whole suite: tests/conftest.py

def report(case: str, value: float) -> float:
    print(f"\nREL {case} {value:.3e}")
    return value


def no_key_trouble(cap: P.Captured) -> None:
    """PEFT's loader said nothing about missing/unexpected keys or shapes."""
    assert cap.about_keys() == [], cap.about_keys()


def tt_args_from_targets(targets):
    """torchtune builder placement for HF ``target_modules`` (leaf or full names; one flag per
    projection type for every layer, MLP all three or none, output on or off)."""
    t = {x.rsplit(".", 1)[-1] for x in targets}
    attn = [{"o_proj": "output_proj"}.get(x, x) for x in ("q_proj", "k_proj", "v_proj", "o_proj") if x in t]
    return attn, bool(t & {"gate_proj", "up_proj", "down_proj"}), "lm_head" in t


def load_tt_output(family, out, *, use_dora=False):
    """Our torchtune output loaded strictly into torchtune's own model with the dims it declares."""
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg.get("use_dora", False) == use_dora
    attn, mlp, output = tt_args_from_targets(cfg["target_modules"])
    return P.tt_model(family, P.tt_adapter_file(out), rank=cfg["r"], alpha=cfg["lora_alpha"],
                      use_dora=use_dora, attn=attn, mlp=mlp, output=output)


def test_key_trouble_detectors_see_missing_and_unexpected_keys(tmp_path):
    """Negative control for no_key_trouble / peft_set_state_dict: a PEFT dir missing one lora_B and
    carrying one stray key is caught by both."""
    d = tmp_path / "bad"
    shutil.copytree(P.FIX / "peft" / "llama-lora", d)
    sd = load_file(d / "adapter_model.safetensors")
    del sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    save_file(sd, d / "adapter_model.safetensors", metadata={"format": "pt"})
    _, cap = P.peft_logits("llama", d)
    assert any("missing adapter keys" in m.lower() for m in cap.about_keys())
    missing, unexpected = P.peft_set_state_dict("llama", d)
    assert any("q_proj.lora_B" in k for k in missing) and any("lora_C" in k for k in unexpected)


# ------------------------------------------------------------------ PEFT -> torchtune (fixtures)
PEFT_TO_TT = [
    # fixture, family, DoRA
    ("llama-lora", "llama", False),  # GQA: k/v 32 rows, q/k permuted into Meta order
    ("llama-bin", "llama", False),  # pickled adapter_model.bin
    ("qwen2-lora", "qwen2", False),  # rotate-half in torchtune: renamed only
    ("mistral-lora", "mistral", False),
    ("gemma-lora", "gemma", False),  # head_dim 32 != hidden/heads 16, tied embeddings
    ("llama-dora", "llama", True),  # magnitudes permuted with q/k B
    ("llama-rslora-patterns", "llama", False),  # ranks 2/4/8 zero-padded to 8, alpha/sqrt(r) folded into B
]


@pytest.mark.parametrize("fixture,family,dora", PEFT_TO_TT, ids=[c[0] for c in PEFT_TO_TT])
def test_peft_fixture_to_torchtune_matches_peft_logits(tmp_path, fixture, family, dora):
    src = P.FIX / "peft" / fixture
    out = tmp_path / "tt"
    res = convert(src, out, to="torchtune", base_config=P.hf_config_path(family))
    assert res.verification.ok
    ref, cap = P.peft_logits(family, src)
    no_key_trouble(cap)
    got = P.tt_logits(load_tt_output(family, out, use_dora=dora))
    assert P.rel_diff(ref, P.hf_logits(P.load_hf(family))) > P.BROKEN  # the adapter does something
    assert report(f"peft/{fixture} -> torchtune", P.rel_diff(got, ref)) <= P.EXACT


def test_rslora_patterns_into_torchtune_are_padded_and_folded(tmp_path):
    """One rank (the largest, 8) and one alpha in torchtune: smaller ranks zero-padded, each
    module's alpha/sqrt(r) folded into lora_b relative to the common scale."""
    src = P.FIX / "peft" / "llama-rslora-patterns"
    out = tmp_path / "tt"
    convert(src, out, to="torchtune", base_config=P.hf_config_path("llama"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    tt = P.tt_adapter_file(out)
    assert {t.shape[0] for k, t in tt.items() if k.endswith("lora_a.weight")} == {8}
    peft = load_file(src / "adapter_model.safetensors")
    # v_proj had rank 2: rows 2.. of A and columns 2.. of B are zero, the rest is A itself
    a = tt["layers.0.attn.v_proj.lora_a.weight"]
    assert torch.equal(a[:2], peft["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"])
    assert not a[2:].any() and not tt["layers.0.attn.v_proj.lora_b.weight"][:, 2:].any()
    # v_proj: alpha 8, r 2 -> scale 8/sqrt(2); common scale cfg lora_alpha / 8
    scale = cfg["lora_alpha"] / cfg["r"]
    b_peft = peft["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    torch.testing.assert_close(tt["layers.0.attn.v_proj.lora_b.weight"][:, :2], b_peft * (8 / 2 ** 0.5) / scale,
                               rtol=1e-6, atol=0)


# ------------------------------------------------------------------ PEFT -> torchtune (made here)
MADE_PEFT = [
    # id, family, seed, LoraConfig kwargs
    ("gemma-dora", "gemma", 501, dict(use_dora=True)),  # magnitudes permuted with head_dim 32
    ("qwen2-dora", "qwen2", 502, dict(use_dora=True)),  # magnitudes NOT permuted
    ("llama-qv-r8", "llama", 503, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    ("mistral-rslora", "mistral", 504, dict(r=8, lora_alpha=5, use_rslora=True)),  # alpha/sqrt(8) in B
]


@pytest.mark.parametrize("case,family,seed,kw", MADE_PEFT, ids=[c[0] for c in MADE_PEFT])
def test_made_peft_adapter_to_torchtune_matches_peft_logits(tmp_path, case, family, seed, kw):
    src = tmp_path / "peft"
    live = P.make_peft_adapter(family, src, seed=seed, **kw)
    ref, cap = P.peft_logits(family, src)
    no_key_trouble(cap)
    assert P.rel_diff(ref, live) == 0.0
    out = tmp_path / "tt"
    convert(src, out, to="torchtune", base_config=P.hf_config_path(family))
    got = P.tt_logits(load_tt_output(family, out, use_dora=bool(kw.get("use_dora"))))
    assert report(f"made peft {case} -> torchtune", P.rel_diff(got, ref)) <= P.EXACT


# ------------------------------------------------------------------ torchtune -> PEFT
def check_peft_output(family, out, ref, case):
    """Our PEFT output: no missing/unexpected keys either way PEFT can load it; logits match."""
    got, cap = P.peft_logits(family, out)
    no_key_trouble(cap)
    missing, unexpected = P.peft_set_state_dict(family, out)
    assert missing == [] and unexpected == []
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    return report(case, P.rel_diff(got, ref))


TT_FIXTURES = [("llama-lora", "llama", False), ("llama-dora", "llama", True), ("qwen2-lora", "qwen2", False)]


@pytest.mark.parametrize("fixture,family,dora", TT_FIXTURES, ids=[c[0] for c in TT_FIXTURES])
def test_torchtune_fixture_to_peft_matches_torchtune_logits(tmp_path, fixture, family, dora):
    src = P.FIX / "torchtune" / fixture / "epoch_0"
    cfg = json.loads((src / "adapter_config.json").read_text())
    # torchtune's forward with its own adapter_model.pt; a loaded magnitude is NOT re-initialised
    ref = P.tt_logits(P.tt_model(family, P.tt_adapter_file(src), rank=cfg["r"], alpha=cfg["lora_alpha"],
                                 use_dora=dora))
    out = tmp_path / "peft"
    res = convert(src, out, to="peft")  # the config.json torchtune copied supplies the head counts
    assert res.source_layout == "torchtune" and res.verification.ok
    assert json.loads((out / "adapter_config.json").read_text()).get("use_dora", False) is dora
    assert check_peft_output(family, out, ref, f"torchtune/{fixture} -> peft") <= P.EXACT


MADE_TT = [
    # id, family, seed, DoRA, rank, alpha, apply_lora_to_output
    ("mistral-lora-r8", "mistral", 601, False, 8, 16.0, False),
    ("gemma-dora", "gemma", 602, True, 4, 8.0, False),  # head_dim 32: magnitude permutation with hd 32
    ("qwen2-dora", "qwen2", 603, True, 4, 8.0, False),
    ("llama-dora-a3", "llama", 604, True, 8, 3.0, False),  # alpha/rank 0.375
    ("llama-output", "llama", 605, False, 4, 8.0, True),  # LoRA on output -> lm_head
]


@pytest.mark.parametrize("case,family,seed,dora,rank,alpha,output", MADE_TT, ids=[c[0] for c in MADE_TT])
def test_made_torchtune_adapter_to_peft_matches_torchtune_logits(tmp_path, case, family, seed, dora, rank, alpha,
                                                                  output):
    epoch = tmp_path / "epoch_0"
    model, _ = P.make_tt_adapter(family, epoch, seed=seed, rank=rank, alpha=alpha, use_dora=dora, output=output)
    ref = P.tt_logits(model)
    # reloading what was saved (strict, magnitude as trained) gives torchtune's own logits back
    reloaded = P.tt_model(family, P.tt_adapter_file(epoch), rank=rank, alpha=alpha, use_dora=dora, output=output)
    assert torch.equal(P.tt_logits(reloaded), ref)
    out = tmp_path / "peft"
    convert(epoch, out, to="peft")
    assert check_peft_output(family, out, ref, f"made torchtune {case} -> peft") <= P.EXACT
    back = tmp_path / "tt"  # and back into torchtune: the same model again
    convert(out, back, to="torchtune", base_config=P.hf_config_path(family))
    again = P.tt_model(family, P.tt_adapter_file(back), rank=rank, alpha=alpha, use_dora=dora, output=output)
    assert P.rel_diff(P.tt_logits(again), ref) == 0.0


PARTIAL = [
    ("layer-0-only", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0])),
    ("mlp-without-down", dict(target_modules=["q_proj", "gate_proj", "up_proj"])),
]


# torchtune places LoRA per projection type in every layer (and w1/w2/w3 together): the missing modules are
# written as zeros (exact), so its strict load works; converting back drops the zero fillers.
@pytest.mark.parametrize("case,kw", PARTIAL, ids=[c[0] for c in PARTIAL])
def test_peft_subset_placement_into_torchtune_loads_exactly(tmp_path, case, kw):
    src = tmp_path / "peft"
    P.make_peft_adapter("llama", src, seed=510, **kw)
    ref, _ = P.peft_logits("llama", src)
    out = tmp_path / "tt"
    convert(src, out, to="torchtune", base_config=P.hf_config_path("llama"))
    got = P.tt_logits(load_tt_output("llama", out))
    assert P.rel_diff(got, ref) <= P.EXACT
    back = tmp_path / "back"
    convert(out, back, to="peft")  # the zero fillers are read as absent: the original placement returns
    assert (back / "adapter_model.safetensors").read_bytes() == (src / "adapter_model.safetensors").read_bytes()


def test_dora_subset_placement_into_torchtune_is_refused(tmp_path):
    from lora_ckpt.errors import ConversionError

    src = tmp_path / "peft"
    P.make_peft_adapter("llama", src, seed=511, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                        use_dora=True)
    with pytest.raises(ConversionError, match="zeros are not a no-op for DoRA"):
        convert(src, tmp_path / "tt", to="torchtune", base_config=P.hf_config_path("llama"))
    assert not (tmp_path / "tt").exists()


def test_reinitialising_a_loaded_dora_magnitude_would_be_wrong(tmp_path):
    """Guard for the tests above: torchtune's initialize_dora_magnitude() after loading a trained
    adapter overwrites the trained magnitude, so the tests must not call it (and don't)."""
    src = P.FIX / "torchtune" / "llama-dora" / "epoch_0"
    model = P.tt_model("llama", P.tt_adapter_file(src), rank=4, alpha=8, use_dora=True)
    ref = P.tt_logits(model)
    for m in model.modules():
        if hasattr(m, "initialize_dora_magnitude"):
            m.initialize_dora_magnitude()
    assert P.rel_diff(P.tt_logits(model), ref) > P.BROKEN


# ------------------------------------------------------------------ torchtune's own exports (bugs)
def test_qwen2_torchtune_adapter_is_renamed_not_permuted_B3(tmp_path):
    """torchtune's Qwen2 is rotate-half: a correct conversion only renames. torchtune 0.6.1's own
    exporter permutes q/k lora_B anyway (B3): its safetensors gives wrong logits in PEFT."""
    src = P.FIX / "torchtune" / "qwen2-lora" / "epoch_0"
    tt = P.tt_adapter_file(src)
    ref = P.tt_logits(P.tt_model("qwen2", tt, rank=4, alpha=8))
    out = tmp_path / "peft"
    convert(src, out, to="peft")
    ours = load_file(out / "adapter_model.safetensors")
    theirs = load_file(src / "adapter_model.safetensors")
    for i in range(2):
        for p in ("q", "k"):
            b = tt[f"layers.{i}.attn.{p}_proj.lora_b.weight"]
            key = f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_B.weight"
            assert torch.equal(ours[key], b)  # renamed only
            n = 4 if p == "q" else 2
            assert torch.equal(theirs[key], interleaved_to_rotate_half(b, n, 16))  # what B3 does
    got, _ = P.peft_logits("qwen2", out)
    their_logits, _ = P.peft_logits("qwen2", src)
    assert report("torchtune/qwen2-lora -> peft (ours)", P.rel_diff(got, ref)) <= P.EXACT
    assert report("torchtune/qwen2-lora own export (B3)", P.rel_diff(their_logits, ref)) > P.BROKEN
    rep = verify(src, src / "adapter_model.safetensors")  # torchtune's .pt vs torchtune's own export
    assert not rep.ok and rep.worst > P.BROKEN
    assert rep.worst_module.endswith(("q_proj", "k_proj"))
    assert verify(src, out).ok


def test_llama_dora_torchtune_export_is_wrong_B1_B2_ours_is_right(tmp_path):
    src = P.FIX / "torchtune" / "llama-dora" / "epoch_0"
    ref = P.tt_logits(P.tt_model("llama", P.tt_adapter_file(src), rank=4, alpha=8, use_dora=True))
    out = tmp_path / "peft"
    convert(src, out, to="peft")
    got, _ = P.peft_logits("llama", out)
    assert report("torchtune/llama-dora -> peft (ours)", P.rel_diff(got, ref)) <= P.EXACT
    # torchtune's export as written: B2 (no use_dora: PEFT runs it as LoRA) + B1 (q/k magnitudes interleaved)
    theirs_cfg = json.loads((src / "adapter_config.json").read_text())
    assert "use_dora" not in theirs_cfg
    theirs, _ = P.peft_logits("llama", src)
    assert report("torchtune/llama-dora own export (B1+B2)", P.rel_diff(theirs, ref)) > P.BROKEN
    # B1 alone: use_dora forced, still wrong
    from peft import LoraConfig

    forced = LoraConfig(r=4, lora_alpha=8, target_modules=theirs_cfg["target_modules"], use_dora=True)
    theirs_b1, _ = P.peft_logits("llama", src, config=forced)
    assert report("torchtune/llama-dora own export, use_dora forced (B1)", P.rel_diff(theirs_b1, ref)) > P.BROKEN
    # verify sees both: torchtune's .pt (read correctly) vs torchtune's own export as PEFT runs it (B2:
    # magnitudes not applied) ...
    rep = verify(src, src / "adapter_model.safetensors")
    assert not rep.ok and any("magnitude" in p for p in rep.problems), rep.summary()
    assert not verify(out, src / "adapter_model.safetensors").ok
    # ... and, with use_dora added to its config, B1: q/k magnitudes in the wrong row order
    b1 = tmp_path / "b1"
    shutil.copytree(src, b1, ignore=shutil.ignore_patterns("adapter_model.pt"))
    (b1 / "adapter_config.json").write_text(json.dumps({**theirs_cfg, "use_dora": True}))
    rep = verify(src, b1 / "adapter_model.safetensors")
    assert not rep.ok and rep.worst > P.BROKEN and rep.worst_module.endswith(("q_proj", "k_proj"))
    assert not rep.problems
    assert all(v <= P.EXACT for k, v in rep.modules.items() if not k.endswith(("q_proj", "k_proj")))
    assert verify(src, out).ok


def test_llama_lora_torchtune_export_is_fine_and_agrees_with_ours(tmp_path):
    """For plain Llama LoRA torchtune's exporter is right; ours gives the same tensors."""
    src = P.FIX / "torchtune" / "llama-lora" / "epoch_0"
    out = tmp_path / "peft"
    convert(src, out, to="peft")
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(src / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert verify(src, src / "adapter_model.safetensors").ok


def test_verify_reports_a_dropped_dora_flag_B2_alone(tmp_path):
    """torchtune's DoRA export with B1 repaired (q/k magnitudes permuted correctly) but the
    config still without ``use_dora`` (B2): PEFT computes plain LoRA. formats.md §0 lists a dropped
    DoRA flag among what validation must catch."""
    src = P.FIX / "torchtune" / "llama-dora" / "epoch_0"
    ref = P.tt_logits(P.tt_model("llama", P.tt_adapter_file(src), rank=4, alpha=8, use_dora=True))
    b2 = tmp_path / "b2"
    b2.mkdir()
    sd = load_file(src / "adapter_model.safetensors")
    for k in list(sd):
        if k.endswith("lora_magnitude_vector") and ("q_proj" in k or "k_proj" in k):
            n = 4 if "q_proj" in k else 2  # undo torchtune's missing permutation (B1)
            sd[k] = interleaved_to_rotate_half(sd[k], n, 16).contiguous()
    save_file(sd, b2 / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "adapter_config.json", b2 / "adapter_config.json")
    logits, _ = P.peft_logits("llama", b2)
    assert P.rel_diff(logits, ref) > P.BROKEN  # PEFT: wrong (runs as LoRA)
    assert not verify(src, b2, base_config=P.hf_config_path("llama")).ok


# ------------------------------------------------------------------ mistral-finetune
def test_mistral_layout_to_peft_matches_ground_truth(tmp_path):
    """fixtures/mistral/lora (Meta names, interleaved q/k, bf16, scaling 2.0) -> PEFT gives the same
    logits in PEFT as the ground truth fixtures/mistral/lora-as-peft."""
    out = tmp_path / "peft"
    res = convert(P.FIX / "mistral" / "lora", out, to="peft", base_config=P.hf_config_path("mistral"))
    assert res.source_layout == "mistral"
    truth = load_file(P.FIX / "mistral" / "lora-as-peft" / "adapter_model.safetensors")
    ours = load_file(out / "adapter_model.safetensors")
    assert ours.keys() == truth.keys()
    assert all(v.dtype == torch.bfloat16 for v in ours.values())  # dtype kept
    assert all(torch.equal(ours[k].float(), truth[k]) for k in ours)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] / cfg["r"] == 2.0
    ref, _ = P.peft_logits("mistral", P.FIX / "mistral" / "lora-as-peft")
    got, cap = P.peft_logits("mistral", out)
    no_key_trouble(cap)
    assert report("mistral/lora -> peft vs lora-as-peft", P.rel_diff(got, ref)) <= P.EXACT


def test_peft_mistral_to_mistral_layout_runs_in_torchtune_lora_mistral(tmp_path):
    """PEFT mistral adapter -> mistral layout -> torchtune's lora_mistral (interleaved, Meta order;
    the keys renamed by the test's own table, no permutation) == PEFT's logits."""
    src = P.FIX / "peft" / "mistral-lora"
    out = tmp_path / "mistral"
    convert(src, out, to="mistral", base_config=P.hf_config_path("mistral"))
    params = json.loads((out / "params.json").read_text())
    rank, scaling = params["lora"]["rank"], params["lora"]["scaling"]
    assert (params["dim"], params["n_heads"], params["n_kv_heads"], params["head_dim"]) == (64, 4, 2, 16)
    model = P.tt_model("mistral", P.mistral_to_tt(load_file(out / "lora.safetensors")), rank=rank,
                       alpha=scaling * rank)
    ref, _ = P.peft_logits("mistral", src)
    assert report("peft/mistral-lora -> mistral -> torchtune lora_mistral", P.rel_diff(P.tt_logits(model), ref)) \
        <= P.EXACT


def test_mistral_layout_to_torchtune_runs_in_lora_mistral(tmp_path):
    out = tmp_path / "tt"
    convert(P.FIX / "mistral" / "lora", out, to="torchtune", base_config=P.hf_config_path("mistral"))
    got = P.tt_logits(load_tt_output("mistral", out))
    ref, _ = P.peft_logits("mistral", P.FIX / "mistral" / "lora-as-peft")
    assert report("mistral/lora -> torchtune vs lora-as-peft", P.rel_diff(got, ref)) <= P.EXACT


def test_mistral_fixture_is_meta_order():
    """The q B of the mistral fixture is the HF one in Meta order (sanity for the two tests above)."""
    m = load_file(P.FIX / "mistral" / "lora" / "lora.safetensors")
    truth = load_file(P.FIX / "mistral" / "lora-as-peft" / "adapter_model.safetensors")
    hf_b = truth["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(m["layers.0.attention.wq.lora_B.weight"].float(), rotate_half_to_interleaved(hf_b, 4, 16))


# ------------------------------------------------------------------ PEFT's own writer
def test_bin_fixture_to_peft_equals_what_peft_writes_with_safetensors(tmp_path):
    """peft/llama-bin is a pickle; our PEFT output is safetensors. PEFT itself, loading the .bin and
    saving with the default safe_serialization, writes exactly our bytes."""
    src = P.FIX / "peft" / "llama-bin"
    out = tmp_path / "ours"
    convert(src, out, to="peft")
    model, _ = P.peft_model("llama", src)
    model.save_pretrained(str(tmp_path / "peft-resaved"))
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "peft-resaved" / "adapter_model.safetensors").read_bytes()
    assert (out / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()


def test_peft_fixtures_other_families_load_cleanly_after_native_round_trip(tmp_path):
    """gpt2 (Conv1D, fan_in_fan_out) and embedding LoRA through native and back: PEFT logits equal."""
    for fixture, family in (("gpt2-lora", "gpt2"), ("llama-embedding", "llama"), ("llama-lora-bias", "llama"),
                            ("llama-modules-to-save", "llama")):
        src = P.FIX / "peft" / fixture
        convert(src, tmp_path / f"{fixture}-n", to="native")
        convert(tmp_path / f"{fixture}-n", tmp_path / f"{fixture}-p", to="peft")
        ref, _ = P.peft_logits(family, src)
        got, cap = P.peft_logits(family, tmp_path / f"{fixture}-p")
        no_key_trouble(cap)
        assert report(f"peft/{fixture} -> native -> peft", P.rel_diff(got, ref)) == 0.0
