"""Round trips and bytes: our PEFT output for PEFT-made tensors is byte-identical to what PEFT
wrote; A -> B -> A is byte-identical for tensors across every pair of layouts that can hold the
content (dtype kept); the name tables are bijections that agree with torchtune's own. Bad input:
test_convert_refusals.py.
"""

import hashlib
import itertools
import json
import os
import shutil
from typing import get_args

import pytest
import torch
from safetensors.torch import load_file

import peers as P
from lora_ckpt.conversion import compare_adapters, convert
from lora_ckpt.families import FAMILIES, is_embedding, template_regex
from lora_ckpt.layouts import LAYOUTS, ScalePolicy, load_adapter
from lora_ckpt.layouts.spec import Feature
from lora_ckpt.rope import interleaved_to_rotate_half, rotate_half_to_interleaved

pytestmark = pytest.mark.filterwarnings("ignore")


# one torch thread for the whole suite: tests/conftest.py

ALL = list(LAYOUTS)  # every registered layout: one added later joins every matrix below
PEFT_FIX = P.FIX / "peft"
FAMILY_OF = {"gpt2-lora": "gpt2", "qwen2-lora": "qwen2", "mistral-lora": "mistral", "gemma-lora": "gemma"}
PEFT_FIXTURES = sorted(p.name for p in PEFT_FIX.iterdir())


def family_of(fixture: str) -> str:
    return FAMILY_OF.get(fixture, "llama")


def weight_file(d, layout):
    return next(d / n for n in LAYOUTS[layout].weight_files if (d / n).exists())


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Independent of lora_ckpt: safetensors, GGUF (gguf-py's reader), or a torch pickle with weights_only."""
    path = str(path)
    if path.endswith(".gguf"):
        import gguf

        kinds = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        return {t.name: torch.frombuffer(bytearray(t.data.tobytes()), dtype=kinds[t.tensor_type.name])
                .reshape([int(d) for d in reversed(t.shape)]) for t in gguf.GGUFReader(path).tensors}
    if path.endswith(".metadata"):  # a torch.distributed.checkpoint directory: its tensors, by torch's reader
        import torch.distributed.checkpoint as dcp

        reader = dcp.FileSystemReader(os.path.dirname(path))
        entries = reader.read_metadata().state_dict_metadata
        dcp_out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items() if hasattr(m, "chunks")}
        dcp.load(dcp_out, storage_reader=reader, no_dist=True)
        return dcp_out
    out = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    if set(out) == {"model"} and isinstance(out["model"], dict):  # LitGPT's {"model": lora tensors}
        out = out["model"]
    return out


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
#: what each fixture needs beyond plain Linear LoRA (a layout's ``features``); the embedding fixture
#: also carries the full embedding copy PEFT saves with it ("extra")
NEEDS = {"llama-dora": {"dora"}, "llama-lora-bias": {"bias"}, "llama-modules-to-save": {"extra"},
         "llama-embedding": {"embedding", "extra"}, "gpt2-lora": {"fan_in_fan_out"}}


def holds(fixture: str) -> list[str]:
    """The registered layouts that can hold the fixture: its features, and names for its family."""
    family = FAMILIES[family_of(fixture)]
    return [name for name, lay in LAYOUTS.items() if NEEDS.get(fixture, set()) <= lay.features
            and (lay.scheme == "hf" or lay.scheme in family.maps)]


HOLDS = {f: holds(f) for f in PEFT_FIXTURES}
FIXED_SCALE = [name for name, lay in LAYOUTS.items() if lay.scale_policy is ScalePolicy.FIXED]
#: via these, tensors cannot stay byte-identical: one rank/scale (patterns padded and folded) or
#: llmbook's fixed scale 1 (alpha/r = 2 folded into B)
FUNCTION_ONLY = {("llama-rslora-patterns", v) for v in ALL
                 if LAYOUTS[v].one_rank or LAYOUTS[v].scale_policy is ScalePolicy.ALPHA_OVER_RANK} | {
    (f, v) for f in HOLDS for v in FIXED_SCALE}
#: layouts that keep PEFT's whole adapter_config.json (so its bytes can come back; loralib and llmbook in
#: lora_config.json)
KEEPS_PEFT_CONFIG = {name for name, lay in LAYOUTS.items() if lay.keeps_peft_config}



@pytest.fixture(scope="module")
def no_base_id(tmp_path_factory) -> set[str]:
    """The layouts with nowhere to keep the base model id (base_model_name_or_path), found by writing
    the llama-lora fixture in each and reading it back. Without PEFT's README card: gguf takes the
    base model from a model card (as convert_lora_to_gguf.py does), and lora-ckpt's own outputs have none."""
    root = tmp_path_factory.mktemp("base-id")
    src = shutil.copytree(PEFT_FIX / "llama-lora", root / "src", ignore=shutil.ignore_patterns("README.md"))
    out = set()
    for name in ALL:
        convert(src, root / name, to=name, base_config=P.hf_config_path("llama"))
        if load_adapter(root / name, base_config=P.hf_config_path("llama")).meta.base_model is None:
            out.add(name)
    return out
#: the config key a layout keeps the base model id under
BASE_ID_KEYS = ("base_model_name_or_path", "model")


def test_holds_table_covers_every_peft_fixture():
    assert set(NEEDS) <= set(PEFT_FIXTURES)
    lossless = [name for name, lay in LAYOUTS.items() if lay.features == frozenset(get_args(Feature))]
    assert lossless and all(set(lossless) <= set(held) for held in HOLDS.values())


BYTE_CASES = [(f, v) for f in PEFT_FIXTURES for v in HOLDS.get(f, [])]


@pytest.mark.parametrize("fixture,via", BYTE_CASES, ids=[f"{f}-via-{v}" for f, v in BYTE_CASES])
def test_peft_output_is_byte_identical_to_what_peft_wrote(tmp_path, no_base_id, fixture, via):
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
        if via in FIXED_SCALE and fixture != "llama-rslora-patterns":  # scale 2 folded into B: exactly 2·B, alpha = r
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
        if via in no_base_id:
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
    "lora-scale1": (None, ALL),  # alpha == r: llmbook's fixed scale 1 needs no fold, so its pairs are exact
    "dora": ("llama-dora", HOLDS["llama-dora"]),
    "bias": ("llama-lora-bias", HOLDS["llama-lora-bias"]),
    "embedding": ("llama-embedding", HOLDS["llama-embedding"]),
    "modules-to-save": ("llama-modules-to-save", HOLDS["llama-modules-to-save"]),
    "gpt2-conv1d": ("gpt2-lora", HOLDS["gpt2-lora"]),
    "qwen2": ("qwen2-lora", HOLDS["qwen2-lora"]),
    "gemma": ("gemma-lora", HOLDS["gemma-lora"]),
    "mistral": ("mistral-lora", ALL),
}
DTYPES = {"lora": [None, torch.bfloat16], "dora": [None, torch.bfloat16]}
#: bf16 is kept by every layout's reader and writer alike: each layout once against peft is enough
BF16_VIA = "peft"
#: only the pairs that exercise what the content is about (the rest is the same code as "lora"): the
#: family-specific layouts (names by family), and llmbook's fixed scale
FOCUS = {c: {lay for lay in ALL if LAYOUTS[lay].scheme != "hf"} for c in ("qwen2", "gemma", "mistral")}
FOCUS["lora-scale1"] = {lay for lay in ALL if LAYOUTS[lay].scale_policy is ScalePolicy.FIXED}
RT_CASES = [(c, dt, a, b) for c, (_, lays) in CONTENT.items() for dt in DTYPES.get(c, [None])
            for a, b in itertools.permutations(lays, 2) if (c not in FOCUS or FOCUS[c] & {a, b})
            and (dt is None or BF16_VIA in (a, b))]


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
def test_round_trip_a_b_a(tmp_path, sources, no_base_id, content, dtype, a, b):
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
    if b in FIXED_SCALE and content != "lora-scale1":  # scale 2 folded into B (exactly: a power of 2) and back
        assert rep.ok and rep.worst == 0.0, rep.summary()
        return
    assert blobs(weight_file(back, a)) == blobs(weight_file(src, a))  # every tensor, byte for byte
    assert rep.ok and rep.worst == 0.0 and rep.modules
    if not LAYOUTS[a].pickle and a not in ("native", "gguf"):  # safetensors: the whole file, header included
        # (native's header records the layout the adapter came from, GGUF's KV the folder it was written from)
        assert weight_file(back, a).read_bytes() == weight_file(src, a).read_bytes()
    # configs keep their meaning: a PEFT adapter_config.json (peft's, torchtune's) as PEFT reads it, and
    # byte for byte where B keeps the PEFT config; every other JSON file (mlx's adapter_config.json,
    # params.json, lora_config.json, config.json) as is, less the PEFT config copy B cannot keep
    peft_config = a in KEEPS_PEFT_CONFIG and LAYOUTS[a].config_file == "adapter_config.json"
    for f in sorted(src.iterdir()):
        if f.suffix != ".json":
            continue
        if peft_config and f.name == "adapter_config.json":
            x, y = semantic_peft_config(src), semantic_peft_config(back)
            if b in KEEPS_PEFT_CONFIG:
                assert (back / f.name).read_bytes() == f.read_bytes()
        else:
            x = json.loads(f.read_text())
            y = json.loads((back / f.name).read_text()) if (back / f.name).exists() or b in KEEPS_PEFT_CONFIG else {}
        if b not in KEEPS_PEFT_CONFIG:  # only the base id of the PEFT config copy can come back
            for d in (x, y):
                base_id = (d.pop("peft_config", None) or {}).get("base_model_name_or_path")
                if base_id:
                    d.setdefault("base_model_name_or_path", base_id)
        if b in no_base_id:
            for key in BASE_ID_KEYS:
                x.pop(key, None), y.pop(key, None)
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
        fwd = [template_regex(k) for k in tab]
        rev = [template_regex(v) for v in tab.values()]
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
           "meta": ["layers.0.attention.wq", "layers.12.feed_forward.experts.3.w1"],
           "litgpt": ["transformer.h.0.attn.qkv", "transformer.h.3.mlp.fc_1", "lm_head", "transformer.wte"]}


@pytest.mark.parametrize("layout", ALL)
def test_layout_leaves_are_a_bijection(layout):
    lay = LAYOUTS[layout]
    roles_of: dict[str, list[str]] = {}
    for role, leaf in lay.leaves.items():
        roles_of.setdefault(leaf, []).append(role)
    # a leaf names one role, or (mlx-lm) one Linear and one Embedding role: the module's kind decides
    assert all(len(r) == 1 or sorted(x.startswith("emb_") for x in r) == [False, True] for r in roles_of.values())
    for module in MODULES[lay.scheme]:
        for role in lay.leaves:
            if len(roles_of[lay.leaves[role]]) > 1 and role.startswith("emb_") != is_embedding(module):
                continue
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
