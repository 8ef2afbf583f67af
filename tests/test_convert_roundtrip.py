"""Round trips and bytes: our PEFT output for PEFT-made tensors is byte-identical to what PEFT
wrote; A -> B -> A is byte-identical for tensors across every pair of layouts that can hold the
content (dtype kept); the name tables are bijections that agree with torchtune's own; bad input is
refused with typed errors; inputs are never modified.
"""

import dataclasses
import hashlib
import itertools
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
from lora_ckpt.families import FAMILIES, NameMap
from lora_ckpt.layouts import LAYOUTS, detect_layout, load_adapter
from lora_ckpt.rope import interleaved_to_rotate_half, rotate_half_to_interleaved

pytestmark = pytest.mark.filterwarnings("ignore")


# one torch thread for the whole suite: tests/conftest.py

ALL = ["native", "peft", "torchtune", "mistral", "loralib", "llmbook"]
PEFT_FIX = P.FIX / "peft"
FAMILY_OF = {"gpt2-lora": "gpt2", "qwen2-lora": "qwen2", "mistral-lora": "mistral", "gemma-lora": "gemma"}
PEFT_FIXTURES = sorted(p.name for p in PEFT_FIX.iterdir())


def family_of(fixture: str) -> str:
    return FAMILY_OF.get(fixture, "llama")


def weight_file(d, layout):
    return next(d / n for n in LAYOUTS[layout].weight_files if (d / n).exists())


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Independent of lora_ckpt: safetensors, or a torch pickle with weights_only."""
    path = str(path)
    return load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)


def blobs(path) -> dict[str, tuple[torch.dtype, tuple, bytes]]:
    """Each tensor's dtype, shape and raw bytes."""
    return {k: (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
            for k, t in read_tensors(path).items()}


def tree_hash(root) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def semantic_peft_config(d) -> dict:
    """What PEFT itself makes of adapter_config.json (its LoraConfig), the fields that change what
    the adapter computes; target_modules compared as a set."""
    from peft import LoraConfig

    c = LoraConfig.from_pretrained(str(d))
    tm = c.target_modules
    return {"peft_type": str(c.peft_type), "task_type": str(c.task_type), "r": c.r, "lora_alpha": c.lora_alpha,
            "use_rslora": c.use_rslora, "use_dora": c.use_dora, "lora_bias": c.lora_bias,
            "fan_in_fan_out": c.fan_in_fan_out, "rank_pattern": dict(c.rank_pattern or {}),
            "alpha_pattern": dict(c.alpha_pattern or {}), "modules_to_save": sorted(c.modules_to_save or []),
            "target_modules": sorted(tm) if not isinstance(tm, str) else tm,
            "layers_to_transform": c.layers_to_transform, "bias": c.bias,
            "base_model_name_or_path": c.base_model_name_or_path}


# =============================================================== PEFT bytes
#: which layouts can carry each PEFT fixture through and back (the rest refuse: lossy)
HOLDS = {
    "llama-lora": ALL, "llama-bin": ALL, "mistral-lora": ALL,
    "qwen2-lora": [x for x in ALL if x != "mistral"], "gemma-lora": [x for x in ALL if x != "mistral"],
    "llama-dora": ["native", "peft", "torchtune"],
    "llama-rslora-patterns": ALL,
    "llama-lora-bias": ["native", "peft"], "llama-modules-to-save": ["native", "peft"],
    "llama-embedding": ["native", "peft"], "gpt2-lora": ["native", "peft"],
}
#: via these, tensors cannot stay byte-identical: one rank/scale (patterns padded and folded) or
#: llmbook's fixed scale 1 (alpha/r = 2 folded into B)
FUNCTION_ONLY = {("llama-rslora-patterns", v) for v in ("torchtune", "mistral", "loralib", "llmbook")} | {
    (f, "llmbook") for f in HOLDS}
#: layouts that keep PEFT's whole adapter_config.json (so its bytes can come back; loralib and llmbook in lora_config.json)
KEEPS_PEFT_CONFIG = {"peft", "native", "torchtune", "loralib", "llmbook"}
#: layouts with nowhere to keep the base model id (base_model_name_or_path)
NO_BASE_ID = {"mistral"}
#: layouts with nowhere to keep a PEFT config (loralib and llmbook keep it in lora_config.json)
NO_PEFT_CONFIG = {"mistral"}


def test_holds_table_covers_every_peft_fixture():
    assert set(HOLDS) == set(PEFT_FIXTURES)


BYTE_CASES = [(f, v) for f in PEFT_FIXTURES for v in HOLDS.get(f, [])]


@pytest.mark.parametrize("fixture,via", BYTE_CASES, ids=[f"{f}-via-{v}" for f, v in BYTE_CASES])
def test_peft_output_is_byte_identical_to_what_peft_wrote(tmp_path, fixture, via):
    """fixtures/peft/<x> -> [via] -> peft: adapter_model.safetensors and adapter_config.json are
    PEFT's own bytes. Where the intermediate cannot keep them (see FUNCTION_ONLY and
    KEEPS_PEFT_CONFIG) the meaning is asserted instead: PEFT's parsed config, and where the tensors
    change (padding / folding), compare_adapters and PEFT's logits."""
    src = PEFT_FIX / fixture
    cfg = P.hf_config_path(family_of(fixture))
    if via == "peft":
        out = tmp_path / "out"
        convert(src, out, to="peft", base_config=cfg)
    else:
        convert(src, tmp_path / "mid", to=via, base_config=cfg)
        out = tmp_path / "out"
        convert(tmp_path / "mid", out, to="peft", base_config=cfg)
    orig_st = src / "adapter_model.safetensors"
    ours_st = out / "adapter_model.safetensors"
    assert not (out / "adapter_model.bin").exists()  # always safetensors, PEFT's default
    if (fixture, via) in FUNCTION_ONLY:
        rep = compare_adapters(load_adapter(src), load_adapter(out))
        assert rep.ok and rep.worst <= 1e-6, rep.summary()
        assert semantic_peft_config(out)["use_dora"] == semantic_peft_config(src)["use_dora"]
        if via == "llmbook" and fixture != "llama-rslora-patterns":  # scale 2 folded into B: exactly 2·B, alpha = r
            theirs, ours = read_tensors(weight_file(src, "peft")), read_tensors(ours_st)
            assert theirs.keys() == ours.keys()
            assert all(torch.equal(ours[k], theirs[k] * (2 if "lora_B" in k else 1)) for k in ours)
            return
        ref, _ = P.peft_logits(family_of(fixture), src)
        got, cap = P.peft_logits(family_of(fixture), out)
        assert cap.about_keys() == []
        assert P.rel_diff(got, ref) <= P.EXACT
        return
    if orig_st.exists():
        assert ours_st.read_bytes() == orig_st.read_bytes()
    else:  # llama-bin: PEFT wrote a pickle; the same tensors (PEFT's resave is compared in test_convert_peers)
        theirs = blobs(src / "adapter_model.bin")
        assert blobs(ours_st) == theirs
    if via in KEEPS_PEFT_CONFIG:
        assert (out / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    else:  # the intermediate has its own config (torchtune's, params.json, lora_config.json)
        want, got = semantic_peft_config(src), semantic_peft_config(out)
        if via in NO_BASE_ID:
            want.pop("base_model_name_or_path"), got.pop("base_model_name_or_path")
        assert got == want


def test_peft_config_written_as_peft_writes_it(tmp_path):
    """A fresh config (torchtune source) is json.dumps(indent=2, sort_keys=True), no trailing newline."""
    out = tmp_path / "out"
    convert(P.FIX / "torchtune" / "llama-lora" / "epoch_0", out, to="peft")
    text = (out / "adapter_config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) and not text.endswith("\n")
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


# =============================================================== A -> B -> A
#: content -> (peft source maker, family, layouts that hold it)
CONTENT = {
    "lora": ("llama-lora", ALL),
    "lora-scale1": (None, ALL),  # alpha == r: llmbook's fixed scale 1 needs no fold, so all 30 pairs are exact
    "dora": ("llama-dora", ["native", "peft", "torchtune"]),
    "bias": ("llama-lora-bias", ["native", "peft"]),
    "embedding": ("llama-embedding", ["native", "peft"]),
    "modules-to-save": ("llama-modules-to-save", ["native", "peft"]),
    "gpt2-conv1d": ("gpt2-lora", ["native", "peft"]),
    "qwen2": ("qwen2-lora", ["native", "peft", "torchtune", "loralib", "llmbook"]),
    "gemma": ("gemma-lora", ["native", "peft", "torchtune", "loralib", "llmbook"]),
    "mistral": ("mistral-lora", ALL),
}
DTYPES = {"lora": [None, torch.bfloat16], "dora": [None, torch.bfloat16]}
#: family contents: only the pairs that exercise their family-specific layout (the rest is the same code)
FOCUS = {"qwen2": "torchtune", "gemma": "torchtune", "mistral": "mistral"}
RT_CASES = [(c, dt, a, b) for c, (_, lays) in CONTENT.items() for dt in DTYPES.get(c, [None])
            for a, b in itertools.permutations(lays, 2) if c not in FOCUS or FOCUS[c] in (a, b)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Each content written once in each layout that holds it (from the PEFT fixture), per dtype."""
    root = tmp_path_factory.mktemp("rt-src")
    scale1 = shutil.copytree(PEFT_FIX / "llama-lora", root / "peft-scale1")  # the same PEFT files with alpha = r
    cfg = json.loads((scale1 / "adapter_config.json").read_text())
    (scale1 / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": cfg["r"]}, indent=2, sort_keys=True))
    cache = {}

    def get(content, dtype, layout):
        key = (content, dtype, layout)
        if key not in cache:
            fixture, _ = CONTENT[content]
            src = scale1 if fixture is None else PEFT_FIX / fixture
            out = root / f"{content}-{str(dtype).split('.')[-1]}-{layout}"
            convert(src, out, to=layout, base_config=P.hf_config_path(family_of(fixture or "")), dtype=dtype)
            cache[key] = out
        return cache[key]

    return get


def _rt_id(c):
    return f"{c[0]}-{str(c[1]).split('.')[-1]}-{c[2]}-{c[3]}"


@pytest.mark.parametrize("content,dtype,a,b", RT_CASES, ids=[_rt_id(c) for c in RT_CASES])
def test_round_trip_a_b_a(tmp_path, sources, content, dtype, a, b):
    src = sources(content, dtype, a)
    cfg = P.hf_config_path(family_of(CONTENT[content][0] or ""))
    mid, back = tmp_path / "mid", tmp_path / "back"
    r1 = convert(src, mid, to=b, base_config=cfg)
    r2 = convert(mid, back, to=a, base_config=cfg)
    assert (r1.source_layout, r2.source_layout) == (a, b)
    want_dtype = dtype or torch.float32
    for d, lay in ((mid, b), (back, a)):  # dtype kept at every hop (PEFT's own default would be F32)
        assert {t.dtype for t in read_tensors(weight_file(d, lay)).values()} == {want_dtype}
    first, second = load_adapter(src, base_config=cfg), load_adapter(back, base_config=cfg)
    rep = compare_adapters(first, second)
    if b == "llmbook" and content != "lora-scale1":  # scale 2 folded into B (exactly: a power of 2) and back
        assert rep.ok and rep.worst == 0.0, rep.summary()
        return
    assert blobs(weight_file(back, a)) == blobs(weight_file(src, a))  # every tensor, byte for byte
    assert rep.ok and rep.worst == 0.0 and rep.modules
    if a in ("peft", "mistral"):  # safetensors: the whole file, header included
        assert weight_file(back, a).read_bytes() == weight_file(src, a).read_bytes()
    # configs keep their meaning: a PEFT adapter_config.json (peft's, torchtune's) as PEFT reads it, and
    # byte for byte where B carries the PEFT config; every other JSON file (params.json, lora_config.json,
    # config.json) as is, less the PEFT config copy that B cannot carry
    for f in sorted(src.iterdir()):
        if f.suffix != ".json":
            continue
        if f.name == "adapter_config.json":
            x, y = semantic_peft_config(src), semantic_peft_config(back)
            if b not in NO_PEFT_CONFIG:
                assert (back / f.name).read_bytes() == f.read_bytes()
        else:
            x = json.loads(f.read_text())
            y = json.loads((back / f.name).read_text()) if (back / f.name).exists() or b not in NO_PEFT_CONFIG else {}
        if b in NO_PEFT_CONFIG:
            for d in (x, y):
                d.pop("base_model_name_or_path", None), d.pop("peft_config", None)
        assert y == x, f.name
    if a == "native":
        assert {n: m.scale for n, m in second.modules.items()} == {n: m.scale for n, m in first.modules.items()}
        assert {n: m.fan_in_fan_out for n, m in second.modules.items()} == \
            {n: m.fan_in_fan_out for n, m in first.modules.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("to", ALL)
def test_dtype_argument_casts_everything(tmp_path, dtype, to):
    src = PEFT_FIX / "llama-lora"
    convert(src, tmp_path / "o", to=to, base_config=P.hf_config_path("llama"), dtype=dtype)
    assert {t.dtype for t in read_tensors(weight_file(tmp_path / "o", to)).values()} == {dtype}


def test_bf16_mistral_fixture_stays_bf16_everywhere(tmp_path):
    src = P.FIX / "mistral" / "lora"
    for to in ALL:
        convert(src, tmp_path / to, to=to, base_config=P.hf_config_path("mistral"))
        assert {t.dtype for t in read_tensors(weight_file(tmp_path / to, to)).values()} == {torch.bfloat16}


# =============================================================== bijections
TABLES = [(f.name, s) for f in FAMILIES.values() for s in f.maps]


def _instances(template_a: str, template_b: str):
    n = template_a.count("{}")
    assert template_b.count("{}") == n
    idx = [3, 11][:n]  # distinct indices: a swap of two placeholders would show
    return template_a.format(*idx), template_b.format(*idx)


@pytest.mark.parametrize("family,scheme", TABLES, ids=[f"{f}-{s}" for f, s in TABLES])
def test_name_table_is_a_bijection(family, scheme):
    table = FAMILIES[family].maps[scheme]
    assert table
    for nm, tab in ((FAMILIES[family].names(scheme), table), (FAMILIES[family].names(scheme).modules, None)):
        tab = tab or nm.table
        assert len(set(tab.values())) == len(tab), "two HF keys map to one target"
        fwd = [NameMap._regex(k) for k in tab]
        rev = [NameMap._regex(v) for v in tab.values()]
        for hf_t, other_t in tab.items():
            hf, other = _instances(hf_t, other_t)
            assert nm.to_other(hf) == other and nm.to_hf(other) == hf
            assert nm.to_hf(nm.to_other(hf)) == hf and nm.to_other(nm.to_hf(other)) == other
            assert sum(bool(r.fullmatch(hf)) for r in fwd) == 1  # no template shadows another
            assert sum(bool(r.fullmatch(other)) for r in rev) == 1
    assert nm.to_other("model.layers.0.self_attn.nonexistent.weight") is None


def _tt_table(family):
    from torchtune.models import convert_weights

    if family == "qwen2":
        from torchtune.models.qwen2._convert_weights import _FROM_HF
        return _FROM_HF
    if family == "gemma2":
        from torchtune.models.gemma2._convert_weights import _GEMMA2_FROM_HF
        return _GEMMA2_FROM_HF
    return convert_weights._FROM_HF


@pytest.mark.parametrize("family", [f.name for f in FAMILIES.values() if "torchtune" in f.maps])
def test_torchtune_names_agree_with_torchtunes_own_tables(family):
    """Every entry, full weights included (gemma2's final norm is 'norm.rms_norm.scale' in torchtune)."""
    from torchtune.models.convert_weights import get_mapped_key

    nm = FAMILIES[family].names("torchtune")
    for hf_t, tt_t in nm.table.items():
        hf, tt = _instances(hf_t, tt_t)
        assert get_mapped_key(hf, _tt_table(family)) == tt


@pytest.mark.parametrize("family", [f.name for f in FAMILIES.values() if {"meta", "torchtune"} <= set(f.maps)])
def test_meta_names_agree_with_torchtunes_meta_table(family):
    """HF -> Meta (ours) then Meta -> torchtune (torchtune's _FROM_META) == HF -> torchtune (ours)."""
    from torchtune.models.convert_weights import _FROM_META, get_mapped_key

    meta, tune = FAMILIES[family].names("meta"), FAMILIES[family].names("torchtune")
    for hf_t in meta.table:
        hf, _ = _instances(hf_t, hf_t)
        assert get_mapped_key(meta.to_other(hf), _FROM_META) == tune.to_other(hf)


MODULES = {"hf": ["model.layers.0.self_attn.q_proj", "model.layers.17.mlp.down_proj", "lm_head",
                  "model.embed_tokens", "transformer.h.1.attn.c_attn"],
           "torchtune": ["layers.0.attn.q_proj", "layers.3.mlp.w2", "output"],
           "meta": ["layers.0.attention.wq", "layers.12.feed_forward.experts.3.w1"]}


@pytest.mark.parametrize("layout", ALL)
def test_layout_leaves_are_a_bijection(layout):
    lay = LAYOUTS[layout]
    assert len(set(lay.leaves.values())) == len(lay.leaves)
    for module in MODULES[lay.scheme]:
        for role in lay.leaves:
            assert lay.split(lay.key(module, role)) == (module, role)
    assert lay.split(f"{lay.prefix}model.layers.0.self_attn.q_proj.weight") is None  # a base weight is no leaf


@pytest.mark.parametrize("n,hd", [(4, 16), (2, 16), (4, 32), (1, 2)])
def test_rope_permutations_are_inverse_and_match_torchtunes(n, hd):
    from torchtune.models import convert_weights

    t = torch.randn(n * hd, 5, generator=torch.Generator().manual_seed(n * hd))
    assert torch.equal(interleaved_to_rotate_half(rotate_half_to_interleaved(t, n, hd), n, hd), t)
    assert torch.equal(rotate_half_to_interleaved(interleaved_to_rotate_half(t, n, hd), n, hd), t)
    assert not torch.equal(rotate_half_to_interleaved(t, n, hd), t) or hd == 2
    key = "model.layers.0.self_attn.q_proj.weight"
    theirs = convert_weights.hf_to_tune({key: t}, num_heads=n, num_kv_heads=n, dim=5, head_dim=hd)
    assert torch.equal(theirs["layers.0.attn.q_proj.weight"], rotate_half_to_interleaved(t, n, hd))


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
