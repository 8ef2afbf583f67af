"""Bounded fuzzing of the readers hostile files reach first: safetensors headers, the safe pickle
index, JSON configs and key parsing. Each may only succeed or raise a typed lora-ckpt error.
(fuzz/ has the long-running harness.)"""

import contextlib
import io
import json
import os
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ckpt.errors import LoraCkptError
from lora_ckpt.families import model_config_from_dict
from lora_ckpt.io import read_json, read_safetensors_header, tensor_index
from lora_ckpt.keys import split_key
from lora_ckpt.layouts import LAYOUTS
from lora_ckpt.layouts.peft import module_scale

# fuzz/fuzz_readers.py raises the example count through this variable for long runs
SETTINGS = settings(max_examples=int(os.environ.get("LORA_CKPT_FUZZ_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


def _valid_file() -> bytes:
    buf = io.BytesIO()
    from safetensors.torch import save

    buf.write(save({"a.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                    "a.lora_B.weight": torch.ones(4, 2, dtype=torch.bfloat16)}))
    return buf.getvalue()


VALID = _valid_file()


@SETTINGS
@given(data=st.binary(max_size=256))
def test_header_reader_random_bytes(tmp_path, data):
    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    with contextlib.suppress(LoraCkptError):
        read_safetensors_header(p)


@SETTINGS
@given(pos=st.integers(0, len(VALID) - 1), byte=st.integers(0, 255), cut=st.integers(0, len(VALID)))
def test_header_reader_mutated_files(tmp_path, pos, byte, cut):
    data = bytearray(VALID)
    data[pos] = byte
    p = tmp_path / "x.safetensors"
    p.write_bytes(bytes(data[:cut]))
    try:
        h = read_safetensors_header(p)
    except LoraCkptError:
        return
    for t in h.tensors.values():  # whatever parses lies inside the file
        assert 0 <= t.begin <= t.end <= len(data[:cut])


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=6), json_values, max_size=4), extra=st.binary(max_size=64))
def test_header_reader_structured_json(tmp_path, header, extra):
    raw = json.dumps(header).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + extra)
    with contextlib.suppress(LoraCkptError):
        read_safetensors_header(p)


def _pickle_zip() -> bytes:
    buf = io.BytesIO()
    torch.save({"m.lora_a.weight": torch.zeros(2, 3)}, buf)
    return buf.getvalue()


PICKLE = _pickle_zip()


@SETTINGS
@given(pos=st.integers(0, len(PICKLE) - 1), byte=st.integers(0, 255))
def test_pickle_index_mutated(tmp_path, pos, byte):
    data = bytearray(PICKLE)
    data[pos] = byte
    p = tmp_path / "x.pt"
    p.write_bytes(bytes(data))
    with contextlib.suppress(LoraCkptError):  # anything else (zipfile.BadZipFile...) fails the test
        tensor_index(p)


@SETTINGS
@given(data=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_json_reader(tmp_path, data):
    p = tmp_path / "c.json"
    p.write_bytes(data)
    with contextlib.suppress(LoraCkptError):
        assert isinstance(read_json(p), dict)


@SETTINGS
@given(cfg=st.dictionaries(st.sampled_from(["model_type", "num_attention_heads", "hidden_size", "num_key_value_heads",
                                            "head_dim", "n_heads", "dim", "n_kv_heads", "text_config", "moe"]),
                           json_values, max_size=6))
def test_model_config_reader(cfg):
    with contextlib.suppress(LoraCkptError):
        model_config_from_dict(cfg)


@SETTINGS
@given(cfg=st.dictionaries(st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"]),
                           json_values, max_size=5), name=st.text(max_size=20))
def test_peft_config_scale(cfg, name):
    with contextlib.suppress(LoraCkptError):
        module_scale(cfg, name)


@SETTINGS
@given(key=st.text(max_size=40))
def test_key_parsers_never_raise(key):
    split_key(key)
    for lay in LAYOUTS.values():
        lay.split(key)


@SETTINGS
@given(module=st.from_regex(r"[a-z_]{1,6}(\.[a-z0-9_]{1,6}){0,4}", fullmatch=True), data=st.data())
def test_layout_keys_round_trip(module, data):
    lay = data.draw(st.sampled_from(list(LAYOUTS.values())))
    role = data.draw(st.sampled_from(list(lay.leaves)))
    # a leaf two roles share (mlx names Linear and Embedding factors alike) parses as one of them,
    # chosen by the module's name
    same_leaf = {r for r, leaf in lay.leaves.items() if leaf == lay.leaves[role]}
    parsed = lay.split(lay.key(module, role))
    assert parsed is not None and parsed[0] == module and parsed[1] in same_leaf
