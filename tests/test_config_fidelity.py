"""Config fidelity: what an adapter's adapter_config.json says comes back as its author wrote it,
through every layout that keeps a PEFT config (native, torchtune, loralib, LLMBook: the registry's
``keeps_peft_config``); only the fields the written tensors need (ranks padded, scales folded) are
re-derived, and a conversion note says so. Over every PEFT fixture and adapters made with the real
PEFT the way trainers make them (tests/trainer_adapters.py)."""

import json

import pytest
from peft import LoraConfig

import peers as P
import trainer_adapters as T
from lora_ckpt.conversion import compare_adapters, convert
from lora_ckpt.errors import LossyConversionError
from lora_ckpt.layouts import LAYOUTS, load_adapter
from lora_ckpt.layouts.peft_config import TENSOR_FIELDS

pytestmark = pytest.mark.filterwarnings("ignore")

CARRIERS = [n for n, lay in LAYOUTS.items() if lay.keeps_peft_config and n != "peft"]
FIXTURES = sorted(p.name for p in (P.FIX / "peft").iterdir())
FAMILY = {"gpt2-lora": "gpt2", "qwen2-lora": "qwen2", "mistral-lora": "mistral", "gemma-lora": "gemma"}
#: (fixture, layout) pairs refused because the layout cannot hold the content (asserted to be refused)
CANNOT = {("llama-dora", "loralib"), ("llama-dora", "llmbook"), ("llama-lora-bias", "torchtune"),
          ("llama-lora-bias", "loralib"), ("llama-lora-bias", "llmbook"), ("llama-modules-to-save", "torchtune"),
          ("llama-modules-to-save", "llmbook"), ("llama-embedding", "torchtune"), ("llama-embedding", "loralib"),
          ("llama-embedding", "llmbook"), ("gpt2-lora", "torchtune"), ("gpt2-lora", "loralib"),
          ("gpt2-lora", "llmbook")}


def semantics(d) -> dict:
    """PEFT's own reading of adapter_config.json (its LoraConfig), target_modules as a set."""
    c = LoraConfig.from_pretrained(str(d)).to_dict()
    c.pop("peft_version", None)
    if not isinstance(c.get("target_modules"), str):
        c["target_modules"] = sorted(c["target_modules"] or [])
    return c


def round_trip(src, via, tmp_path, base_config):
    """src -> via -> peft; (the back dir, the first hop's notes)."""
    r1 = convert(src, tmp_path / "mid", to=via, base_config=base_config)
    convert(tmp_path / "mid", tmp_path / "back", to="peft", base_config=base_config)
    return tmp_path / "back", r1.notes


def assert_config_comes_back(src, back, notes, base_config):
    rederived = any("re-derived: r/lora_alpha" in n for n in notes)
    if not rederived:  # nothing needed re-deriving: the author's file, byte for byte
        assert (back / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    want, got = semantics(src), semantics(back)
    if rederived:  # one rank / one scale on the way: the function is kept, the rest of the config as written
        for k in TENSOR_FIELDS:
            want.pop(k, None), got.pop(k, None)
        rep = compare_adapters(load_adapter(src, base_config=base_config), load_adapter(back, base_config=base_config))
        assert rep.ok and rep.worst <= 1e-6, rep.summary()
    assert got == want


CASES = [(f, v) for f in FIXTURES for v in ("native", "torchtune")]


@pytest.mark.parametrize("fixture,via", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_peft_fixture_config_through_native_and_torchtune(tmp_path, fixture, via):
    src, cfg = P.FIX / "peft" / fixture, P.hf_config_path(FAMILY.get(fixture, "llama"))
    if (fixture, via) in CANNOT:
        with pytest.raises(LossyConversionError):
            convert(src, tmp_path / "mid", to=via, base_config=cfg)
        return
    back, notes = round_trip(src, via, tmp_path, cfg)
    assert_config_comes_back(src, back, notes, cfg)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainers")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = T.make(name, root)
        return cache[name]

    return get


#: heads (full tensors) do not fit torchtune or LLMBook; Conv1D fits none of the three
TRAINER_CANNOT = {(r, v) for r in ("roberta-seq-cls", "roberta-token-cls", "llama-sft-resized")
                  for v in ("torchtune", "llmbook")} | {("gpt2-conv1d", v) for v in ("torchtune", "loralib", "llmbook")}
TRAINER_CASES = [(r, v) for r in T.RECIPES for v in CARRIERS]


@pytest.mark.parametrize("recipe,via", TRAINER_CASES, ids=[f"{r}-{v}" for r, v in TRAINER_CASES])
def test_trainer_made_config_through_every_layout_that_keeps_it(tmp_path, made, recipe, via):
    base, src = made(recipe)
    cfg = base / "config.json"
    if (recipe, via) in TRAINER_CANNOT:  # a layout that cannot hold the content refuses, typed, and writes nothing
        with pytest.raises(LossyConversionError):
            convert(src, tmp_path / "mid", to=via, base_config=cfg)
        assert not (tmp_path / "mid").exists()
        return
    back, notes = round_trip(src, via, tmp_path, cfg)
    assert_config_comes_back(src, back, notes, cfg)


def test_trainer_configs_are_what_trainers_write(made):
    """The recipes exercise what they claim (so the round trips above test something)."""
    cfgs = {r: json.loads((made(r)[1] / "adapter_config.json").read_text()) for r in T.RECIPES}
    assert cfgs["roberta-seq-cls"]["modules_to_save"] == ["classifier", "score"]  # added by PEFT itself
    assert cfgs["roberta-token-cls"]["task_type"] == "TOKEN_CLS"
    assert cfgs["llama-sft-resized"]["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert cfgs["llama-layers"]["layers_to_transform"] == [1]
    assert isinstance(cfgs["llama-regex-target"]["target_modules"], str)
    assert cfgs["llama-regex-patterns"]["rank_pattern"] == {r"layers\.1\.\w+\.(q|v)_proj": 2}
    assert cfgs["gpt2-conv1d"]["fan_in_fan_out"] is True


def test_layout_without_a_peft_config_says_what_is_re_derived(tmp_path):
    res = convert(P.FIX / "peft" / "llama-lora", tmp_path / "m", to="mistral", base_config=P.hf_config_path("llama"))
    assert any("mistral keeps no PEFT adapter_config.json" in n for n in res.notes)


def test_re_derived_fields_are_named_in_the_notes(tmp_path):
    res = convert(P.FIX / "peft" / "llama-rslora-patterns", tmp_path / "t", to="torchtune",
                  base_config=P.hf_config_path("llama"))
    assert any("re-derived: r/lora_alpha/rank_pattern/alpha_pattern" in n for n in res.notes)
    kept = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    orig = json.loads((P.FIX / "peft" / "llama-rslora-patterns" / "adapter_config.json").read_text())
    assert {k: v for k, v in kept.items() if k not in TENSOR_FIELDS} == \
        {k: v for k, v in orig.items() if k not in TENSOR_FIELDS}


def test_what_allow_lossy_dropped_is_re_derived_with_a_note(tmp_path):
    """PEFT (embedding LoRA + PEFT's saved embedding) -> torchtune --allow-lossy -> PEFT: target_modules
    no longer names embed_tokens (PEFT would wrap it with no weights); both hops say what was re-derived."""
    src, cfg = P.FIX / "peft" / "llama-embedding", P.hf_config_path("llama")
    r1 = convert(src, tmp_path / "tt", to="torchtune", base_config=cfg, allow_lossy=True)
    assert any("re-derived: target_modules" in n for n in r1.notes)
    convert(tmp_path / "tt", tmp_path / "back", to="peft", base_config=cfg)
    want, got = semantics(src), semantics(tmp_path / "back")
    assert "embed_tokens" in want["target_modules"] and "embed_tokens" not in got["target_modules"]
    assert sorted(want["target_modules"]) == sorted([*got["target_modules"], "embed_tokens"])
    assert got["task_type"] == want["task_type"] and got["base_model_name_or_path"] == want["base_model_name_or_path"]


def test_modules_to_save_dropped_with_allow_lossy_is_not_declared(tmp_path):
    src, cfg = P.FIX / "peft" / "llama-modules-to-save", P.hf_config_path("llama")
    r1 = convert(src, tmp_path / "tt", to="torchtune", base_config=cfg, allow_lossy=True)
    assert any("re-derived: modules_to_save" in n for n in r1.notes)
    assert json.loads((tmp_path / "tt" / "adapter_config.json").read_text())["modules_to_save"] is None
