"""The streaming safetensors writer (lora_ckpt.io.writing) against safetensors' own: the same bytes as
``safetensors.torch.save_file`` for the same tensors and metadata, whatever the names, dtypes, shapes,
strides and storage sharing; typed errors and nothing left behind on failure."""

import contextlib
import json
import os
import resource
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_ckpt.adapter import stacked_view
from lora_ckpt.errors import OutputPathError, StateDictError, UsageError
from lora_ckpt.io import (
    DATA_ORDER,
    DTYPES,
    byte_view,
    load_safetensors,
    read_safetensors_header,
    release_file_pages,
    save_tensors,
    write_safetensors,
)

TORCH_DTYPES = [getattr(torch, name) for _, name in DTYPES.values()]
names = st.text(max_size=10).filter(lambda s: s != "__metadata__")  # any unicode, quotes, control characters
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)  # () is 0-d; a 0 anywhere is empty


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes of every pattern (NaN payloads included); bool only 0/1."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).bool().reshape(shape)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


@st.composite
def tensor_dicts(draw):
    """name -> tensor: fresh contiguous tensors, non-contiguous views (transposed, strided), and
    views of one stacked tensor (disjoint rows, and the same rows under two names)."""
    out: dict[str, torch.Tensor] = {}
    for name in draw(st.lists(names, max_size=7, unique=True)):
        dtype = draw(st.sampled_from(TORCH_DTYPES))
        shape = draw(shapes)
        kind = draw(st.sampled_from(["plain", "transposed", "strided", "stacked"]))
        seed = draw(st.integers(0, 2**31))
        if kind == "transposed" and len(shape) >= 2:
            t = _random(shape[::-1], dtype, seed).transpose(0, -1)
        elif kind == "strided":
            t = _random((2 * shape[0], *shape[1:]) if shape else (3,), dtype, seed)[::2]
        elif kind == "stacked" and out:  # a view of an earlier tensor's storage (save_file refuses overlaps)
            t = next(iter(out.values()))
            t = t[: max(1, t.shape[0] // 2)] if t.dim() else t
        else:
            t = _random(shape, dtype, seed)
        out[name] = t
    return out


metadatas = st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)


def _reference(tensors, path, metadata):
    """safetensors' own writer on distinct contiguous copies (it refuses views that overlap)."""
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, path, metadata=metadata)


def _bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()  # kept alive while viewed
    return byte_view(t).tobytes()


def _split(raw: bytes) -> tuple[dict, bytes, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8:8 + n], raw[8 + n:]


@settings(max_examples=int(os.environ.get("LORA_CKPT_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tensors=tensor_dicts(), metadata=metadatas)
def test_bytes_equal_safetensors_save_file(tmp_path, tensors, metadata):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    before = {k: v.clone() for k, v in tensors.items()}
    write_safetensors(tensors, ours, metadata=metadata)
    _reference(tensors, theirs, metadata)
    a, b = ours.read_bytes(), theirs.read_bytes()
    if not tensors and metadata == {}:  # safetensors 0.8 writes '{},"__metadata__":{}}' (invalid JSON) here
        assert _split(a)[0] == {"__metadata__": {}}
    elif metadata is None or len(metadata) <= 1:
        assert a == b
    else:  # safetensors writes __metadata__ in its HashMap's per-process order; ours sorts the keys
        (ha, ra, da), (hb, rb, db) = _split(a), _split(b)
        assert ha == hb and len(ra) == len(rb) and da == db
        assert list(ha["__metadata__"]) == sorted(metadata)
    assert all(_bytes(v) == _bytes(before[k]) for k, v in tensors.items())  # inputs unchanged
    back = load_file(ours)
    assert set(back) == set(tensors)
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape for k, v in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "theirs.safetensors"]
    ours.unlink()
    theirs.unlink()


def test_data_order_is_safetensors_enum_order_not_itemsize_then_name(tmp_path):
    """Within one alignment safetensors orders by its Dtype enum, not by name: F32 before I32
    before ... even when the names sort the other way."""
    t = {"a": torch.zeros(1, dtype=torch.int32), "b": torch.zeros(1), "c": torch.zeros(1, dtype=torch.uint32),
         "d": torch.zeros(1, dtype=torch.bool), "e": torch.zeros(1, dtype=torch.uint8),
         "f": torch.zeros(1, dtype=torch.float8_e5m2), "g": torch.zeros(1, dtype=torch.float8_e4m3fn)}
    write_safetensors(t, tmp_path / "o.safetensors")
    _reference(t, tmp_path / "r.safetensors", None)
    assert (tmp_path / "o.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()
    order = sorted(read_safetensors_header(tmp_path / "o.safetensors").tensors.values(), key=lambda i: i.begin)
    assert [i.name for i in order] == ["b", "c", "a", "g", "f", "e", "d"]
    assert [i.dtype for i in order] == sorted((i.dtype for i in order), key=DATA_ORDER.index, reverse=True)


def test_save_tensors_defaults_and_shared_storage(tmp_path):
    """save_tensors: ``{"format": "pt"}`` by default; per-expert views of one stacked factor are
    written from the views (no clones) with the same bytes as save_file of copies."""
    stacked = torch.randn(4, 3, 5)
    t = {f"e{e}.A": stacked[e] for e in range(4)} | {"B": stacked.permute(2, 1, 0)}
    save_tensors(t, tmp_path / "o.safetensors")
    _reference(t, tmp_path / "r.safetensors", {"format": "pt"})
    assert (tmp_path / "o.safetensors").read_bytes() == (tmp_path / "r.safetensors").read_bytes()
    assert read_safetensors_header(tmp_path / "o.safetensors").metadata == {"format": "pt"}


def test_overwrite_a_file_the_inputs_map(tmp_path):
    """Writing over the file the tensors are mapped from: a new file is renamed over it, so the
    mapping is never truncated under the write."""
    p = tmp_path / "w.safetensors"
    save_file({"x": torch.arange(1 << 16, dtype=torch.float32), "y": torch.ones(3)}, p)
    mapped = load_safetensors(p)
    expected = {k: v.clone() for k, v in mapped.items()}
    save_tensors({"x": mapped["x"].flip(0), "y": mapped["y"]}, p)
    back = load_file(p)
    assert torch.equal(back["x"], expected["x"].flip(0)) and torch.equal(back["y"], expected["y"])
    assert [q.name for q in tmp_path.iterdir()] == ["w.safetensors"]


def test_pickle_path_is_torch_save_of_contiguous_tensors(tmp_path):
    t = {"a": torch.randn(3, 4).T, "b": torch.arange(3)}
    save_tensors(t, tmp_path / "o.pt", pickle=True)
    save_tensors({"model": t}, tmp_path / "n.pt", pickle=True)
    (tmp_path / "ref").mkdir()  # the archive's inner folder is named after the file: same name
    torch.save({k: v.contiguous() for k, v in t.items()}, tmp_path / "ref/o.pt")
    assert (tmp_path / "o.pt").read_bytes() == (tmp_path / "ref/o.pt").read_bytes()
    n = torch.load(tmp_path / "n.pt", weights_only=True)
    assert list(n) == ["model"] and all(torch.equal(n["model"][k], v) for k, v in t.items())


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """A real write failure from the kernel: writes past RLIMIT_FSIZE fail with EFBIG (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_failed_write_is_output_path_error_and_leaves_nothing(tmp_path):
    t = {"a": torch.zeros(1 << 16), "b": torch.ones(1 << 16)}
    with _file_size_limit(100_000), pytest.raises(OutputPathError, match="writing the output failed"):
        save_tensors(t, tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputPathError, match="writing the output failed"):
        save_tensors(t, tmp_path / "missing-dir" / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_refusals_are_typed_and_write_nothing(tmp_path):
    out = tmp_path / "o.safetensors"
    cases = [
        (StateDictError, "no safetensors code", {"c": torch.zeros(2, dtype=torch.complex128)}, None),
        (StateDictError, "'__metadata__'", {"__metadata__": torch.zeros(1)}, None),
        (StateDictError, "dense tensor with data", {"s": torch.zeros(2, 2).to_sparse()}, None),
        (StateDictError, "dense tensor with data", {"m": torch.empty(2, device="meta")}, None),
        (StateDictError, "dense tensor with data", {"x": [1.0]}, None),
        (UsageError, "strings to strings", {"a": torch.zeros(1)}, {"format": 1}),
    ]
    for err, match, tensors, metadata in cases:
        with pytest.raises(err, match=match):
            write_safetensors(tensors, out, metadata=metadata)
        assert list(tmp_path.iterdir()) == []


def test_stacked_view_is_the_stack_without_a_copy():
    """Per-expert views of one stacked factor re-stack as a view (mlx's switch_mlp from PEFT's fused
    experts, whose B is interleaved: a permuted view); anything else is left to a real stack."""
    A = torch.randn(6, 3, 5)
    B = torch.randn(4, 2 * 6).reshape(4, 2, 6).permute(2, 0, 1)  # PEFT's (out, r·E) -> (E, out, r)
    for stack in (A, B, B[:, :2], B[:, 2:]):
        parts = list(stack.unbind(0))
        v = stacked_view(parts)
        assert v is not None and torch.equal(v, torch.stack(parts)) and v.data_ptr() == stack.data_ptr()
    assert stacked_view([A[0], A[2], A[1]]) is None  # not evenly spaced upwards
    assert stacked_view([A[0], A[1].clone()]) is None  # two storages
    sq = torch.randn(2, 3, 3)
    assert stacked_view([sq[0], sq[1].T]) is None  # same shape, other strides
    one = stacked_view([A[3]])
    assert one is not None and torch.equal(one, A[3:4])


def test_released_pages_keep_in_place_changes(tmp_path):
    """release_file_pages drops a mapping's unmodified pages only: a page changed in place (a private
    copy-on-write page) would otherwise revert to the file's bytes."""
    p = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1 << 16)}, p)
    t = load_safetensors(p)["a"]
    t[5000:6000] += 1
    release_file_pages([t])
    assert t.sum().item() == 1000 and torch.equal(t[5000:6000], torch.ones(1000))


def test_save_adapter_after_in_place_changes(tmp_path):
    """An adapter loaded (memory-mapped) and changed in place is written with its changes, also where
    the layout writes lazy transposed views (mlx) after the source pages were released."""
    import lora_ckpt

    src, key = tmp_path / "src", "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    src.mkdir()
    save_file({key.format("A"): torch.randn(8, 64), key.format("B"): torch.zeros(4096, 8)},  # B: 32 pages
              src / "adapter_model.safetensors", metadata={"format": "pt"})
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                         "target_modules": ["q_proj"]}))
    ad = lora_ckpt.load_adapter(src)
    m = ad.modules["model.layers.0.self_attn.q_proj"]
    m.B.add_(0.5)
    for layout, name in (("peft", key.format("B")), ("mlx", "model.layers.0.self_attn.q_proj.lora_b")):
        lora_ckpt.save_adapter(ad, tmp_path / layout, layout=layout)
        got = load_file(next((tmp_path / layout).glob("*.safetensors")))[name]
        assert torch.equal(got.T if layout == "mlx" else got, torch.full((4096, 8), 0.5))


def test_convert_on_a_full_disk_leaves_nothing(tmp_path):
    """The callers keep their contract: a conversion whose write fails is an OutputPathError and
    leaves neither the output nor its temporary sibling."""
    import lora_ckpt

    fix = Path(__file__).resolve().parent.parent / "fixtures"
    (tmp_path / "out").mkdir()
    with _file_size_limit(2000), pytest.raises(OutputPathError, match="writing the output failed"):
        lora_ckpt.convert(fix / "peft/llama-lora", tmp_path / "out/mlx", to="mlx")
    assert list((tmp_path / "out").iterdir()) == []
