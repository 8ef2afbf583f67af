"""``torch.distributed.checkpoint`` (DCP) directories: ``.metadata`` + ``*.distcp`` shard files.

A DCP directory is a container; the adapter inside is named in one of three dialects, chosen by
its keys:

- lora-ckpt's (``model.layers.0.self_attn.q_proj.lora_A.weight``: what ``adapter_state_dict`` of an
  ``inject_lora`` model holds), top level or under a ``"model"`` entry; ``--to dcp`` writes it at
  top level with per-module scales in a ``lora_ckpt.meta`` tensor, so a sharded run resumes with
  ``dcp.load(adapter_state_dict(model), checkpoint_id=DIR)``;
- torchtitan's (``torchtitan/components/lora.py``: ``lora_a``/``lora_b`` under the LoRA Linear;
  model keys flattened at top level by its ``ModelWrapper``: ``layers.0.attention.qkv_linear.wq.lora_a.weight``),
  q/k rows in Meta (interleaved) order;
- torchtune's (``DistributedCheckpointer``: ``{"model": model.state_dict(), "optimizer": ...}``,
  ``model.layers.0.attn.q_proj.lora_a.weight``).

Only the adapter tensors are read, one at a time, chunk by chunk; base weights, optimizer state
and the rest are never loaded. ``.metadata`` is parsed with an allow-list unpickler (no torch, no
code from the file: torch's own reader unpickles it freely), and tensor chunks are loaded with
``torch.load(weights_only=True)``. torchtitan and torchtune do not record alpha in the checkpoint:
pass ``--alpha``.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..adapter import Adapter
from ..errors import CheckpointFormatError, CheckpointNotFoundError, MissingConfigError, UnsafeCheckpointError
from ..families import FAMILIES, NameMap
from ..io import TensorMeta
from .base import Layout
from .native import NativeLayout
from .source import ReadOptions, Source, WriteOptions
from .spec import Detection, Role

if TYPE_CHECKING:
    import torch

META_KEY = "lora_ckpt"  # lora-ckpt's JSON (scales, flags, extra tensors), a non-tensor entry
_MODULE = "torch.distributed.checkpoint.metadata"


class _Obj:
    """A stand-in for one of DCP's metadata dataclasses: keeps its state, runs nothing."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "float8_e4m3fn", "float8_e5m2", "complex64", "complex128", "uint16", "uint32", "uint64")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _MODULE and name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                          "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta"):
            return _Obj
        if module == _MODULE and name == "_MEM_FORMAT_ENCODING":
            return lambda v: v
        if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
            return _Obj
        if module == "torch" and name in _DTYPES:
            return name
        if (module, name) == ("torch", "Size"):
            return tuple
        if (module, name) == ("torch.serialization", "_get_layout"):
            return lambda s: s
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            return lambda *parts: "/".join(parts)
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise UnsafeCheckpointError(f"{module}.{name}", path="")


@dataclass
class Chunk:
    """One stored piece of a tensor: where it sits in the tensor and in which file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass
class DcpEntry:
    """One entry of the checkpoint: a tensor (shape, dtype, chunks) or an opaque object (``dtype`` None)."""

    fqn: str
    path: tuple[str, ...]
    shape: tuple[int, ...] = ()
    dtype: str | None = None
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(c.length for c in self.chunks)


def read_metadata(root: Path) -> dict[str, DcpEntry]:
    """Every entry of the DCP directory ``root``, from its ``.metadata`` (no torch, no code run).

    Raises:
        CheckpointFormatError: ``.metadata`` is not DCP metadata.
        UnsafeCheckpointError: it references anything but DCP's metadata classes.
    """
    path = root / ".metadata"
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: refusing to unpickle: it references {e} (not DCP metadata); expected "
                                    "torch.distributed.checkpoint's metadata classes only", path=path) from e
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: no such file", path=path) from e
    except Exception as e:  # anything odd in a hostile or truncated file
        raise CheckpointFormatError(f"{path}: not readable DCP metadata ({type(e).__name__}: {str(e)[:120]})",
                                    path=path) from e
    try:
        storage = {(k.fqn, tuple(getattr(k, "offset", None) or ())): v for k, v in (meta.storage_data or {}).items()}
        planner = getattr(meta, "planner_data", None) or {}
        out = {}
        for fqn, md in meta.state_dict_metadata.items():
            entry = DcpEntry(fqn, tuple(planner.get(fqn) or (fqn,)))
            if hasattr(md, "chunks"):
                entry.shape, entry.dtype = tuple(md.size), md.properties.state[0]
                places = [(tuple(c.offsets), tuple(c.sizes), storage[(fqn, tuple(c.offsets))]) for c in md.chunks]
            else:  # an object (torch.save'd bytes): located, never unpickled here
                places = [((), (), storage[(fqn, ())])] if (fqn, ()) in storage else []
            for offsets, sizes, info in places:
                transforms = tuple(getattr(info, "transform_descriptors", ()) or ())
                entry.chunks.append(Chunk(offsets, sizes, info.relative_path, int(info.offset), int(info.length),
                                          transforms))
            out[fqn] = entry
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        raise CheckpointFormatError(f"{path}: DCP metadata without the expected fields ({type(e).__name__}: {e}); "
                                    "the directory is corrupt or from an unsupported torch version", path=path) from e
    return out


def model_entries(entries: dict[str, DcpEntry]) -> dict[str, DcpEntry]:
    """Tensors of the model, by model key: top-level entries (torchtitan, ``--to dcp``) and those under
    a ``"model"`` entry (torchtune, ``dcp.save({"model": ...})``)."""
    out = {}
    for e in entries.values():
        if e.dtype is None or e.fqn == META_KEY:
            continue
        if len(e.path) == 1:
            out[e.path[0]] = e
        elif e.path[0] == "model":
            out[".".join(e.path[1:])] = e
    return out


def load_entry(root: Path, entry: DcpEntry) -> torch.Tensor:
    """One tensor, assembled from its chunks (each a ``torch.save`` blob, loaded with ``weights_only=True``)."""
    import torch

    full = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype or "float32"))
    for c in entry.chunks:
        where = root / c.file
        if c.transforms:
            raise CheckpointFormatError(f"{where}: {entry.fqn} is stored with transforms {list(c.transforms)}; only "
                                        "plain torch.save chunks are supported", path=where)
        with open(where, "rb") as f:
            f.seek(c.offset)
            data = f.read(c.length)
        if len(data) != c.length:
            raise CheckpointFormatError(f"{where}: {entry.fqn} needs bytes {c.offset}..{c.offset + c.length}, the file "
                                        "ends first; it is truncated", path=where)
        try:
            piece = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointFormatError(f"{where}: chunk of {entry.fqn} is not a tensor ({type(e).__name__}); the "
                                        "file is corrupt", path=where) from e
        if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != c.sizes:
            raise CheckpointFormatError(f"{where}: chunk of {entry.fqn} has shape {getattr(piece, 'shape', None)}, "
                                        f"metadata says {c.sizes}", path=where)
        if c.sizes == entry.shape:
            return piece.to(full.dtype)
        full[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))] = piece
    return full


class _StrUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeCheckpointError(f"{module}.{name}", path="")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("a tensor", path="")


def _meta_json(root: Path, entry: DcpEntry) -> dict[str, Any]:
    """lora-ckpt's ``lora_ckpt`` entry, read without torch and without running code: a ``torch.save``
    zip whose ``data.pkl`` holds one str (anything else is refused), which is JSON."""
    import zipfile

    where = root / (entry.chunks[0].file if entry.chunks else ".metadata")
    try:
        c = entry.chunks[0]
        with open(where, "rb") as f:
            f.seek(c.offset)
            blob = f.read(c.length)
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
            text = _StrUnpickler(io.BytesIO(z.read(pkl[0]))).load()
        meta = json.loads(text)
        if entry.dtype is not None or not isinstance(meta, dict) or not isinstance(meta.get("scales"), dict):
            raise ValueError("not lora-ckpt's metadata")
    except (OSError, IndexError, KeyError, ValueError, TypeError, UnsafeCheckpointError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        raise CheckpointFormatError(f"{where}: the {META_KEY!r} entry is not lora-ckpt's JSON ({type(e).__name__}); "
                                    "the checkpoint is corrupt", path=where) from e
    return meta


@dataclass
class DcpSource(Source):
    """A DCP directory restricted to the keys one dialect reads (``wanted``)."""

    wanted: dict[str, DcpEntry] = field(default_factory=dict)
    extra_meta: dict[str, Any] | None = None

    @property
    def index(self) -> dict[str, TensorMeta]:
        return {k: TensorMeta(e.shape, e.dtype or "float32") for k, e in self.wanted.items()}

    @property
    def tensors(self) -> dict[str, Any]:
        if self.shapes_only:
            return self.index
        if self._tensors is None:
            self._tensors = {k: load_entry(self.root, e) for k, e in self.wanted.items()}
        return self._tensors


class _DcpName:
    """The name the dialect readers report (a mixin: the registry lists only classes naming themselves)."""

    name = "dcp"


class _DcpKeys(_DcpName, Layout):
    """The generic reader over one dialect's keys; scales come from ``lora_ckpt.meta`` or ``--alpha``."""

    dialect: ClassVar[str] = ""

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:
        meta = src.extra_meta if isinstance(src, DcpSource) else None
        if meta is not None and opts.alpha is None:
            fifo = set(meta.get("fan_in_fan_out", []))
            for name, m in adapter.modules.items():
                if name not in meta["scales"]:
                    raise CheckpointFormatError(f"{src.root}: no scale recorded for {name!r}", path=src.root)
                m.scale = float(meta["scales"][name])
                m.fan_in_fan_out = name in fifo
            adapter.meta.base_model = meta.get("base_model")
            adapter.meta.family = adapter.meta.family or meta.get("family")
            adapter.meta.task_type = meta.get("task_type")
            adapter.meta.config = meta.get("source_config") or {}
            adapter.meta.source_layout = meta.get("source_layout") or "dcp"
            return
        if opts.alpha is None:
            raise MissingConfigError(
                f"{src.root}: a {self.dialect} DCP checkpoint does not record lora_alpha; pass --alpha with the "
                "run's alpha (scale = alpha / rank)")
        for m in adapter.modules.values():
            m.scale = opts.alpha / m.rank

    def knows(self, module: str) -> bool:
        """Whether the Llama names of this dialect's scheme (current or legacy) know ``module``."""
        if self.scheme == "hf":
            return True
        names = FAMILIES["llama"].names(self.scheme).modules
        return names.to_hf(module) is not None or any(
            NameMap({now: old}).to_hf(module) is not None for now, old in self.legacy_names.items())


class _NativeKeys(_DcpKeys):
    dialect, scheme, leaves, features = "lora-ckpt", "hf", NativeLayout.leaves, NativeLayout.features


class _TorchtitanKeys(_DcpKeys):
    dialect, scheme = "torchtitan", "torchtitan"
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_a.weight", "B": "lora_b.weight"}
    legacy_names: ClassVar[dict[str, str]] = {
        "layers.{}.attention.qkv_linear.wq": "layers.{}.attention.wq",
        "layers.{}.attention.qkv_linear.wk": "layers.{}.attention.wk",
        "layers.{}.attention.qkv_linear.wv": "layers.{}.attention.wv", "lm_head": "output"}


class _TorchtuneKeys(_DcpKeys):
    dialect, scheme = "torchtune", "torchtune"
    leaves: ClassVar[dict[Role, str]] = {"A": "lora_a.weight", "B": "lora_b.weight", "magnitude": "magnitude"}
    features = frozenset({"dora"})
    every_layer = True


_DIALECTS: tuple[_DcpKeys, ...] = (_NativeKeys(), _TorchtitanKeys(), _TorchtuneKeys())


def _dialect(keys: list[str]) -> tuple[_DcpKeys | None, dict[str, str]]:
    """Which dialect names the adapter keys, and each key's module: lora-ckpt's leaves, else the
    lora_a/lora_b scheme (torchtitan or torchtune) whose Llama names know every module."""
    for lay in _DIALECTS:
        mods = {k: p[0] for k in keys if (p := lay.split(k))}
        if mods and all(lay.knows(m) for m in mods.values()):
            return lay, mods
    return None, {}


class DcpLayout(Layout):
    name = "dcp"
    order = 90
    summary = "torch.distributed.checkpoint dir (.metadata + .distcp): lora-ckpt, torchtitan or torchtune keys"
    weight_files = (".metadata",)
    pickle = True  # chunks are torch.save blobs, not safetensors
    leaves = NativeLayout.leaves
    features = NativeLayout.features
    keeps_peft_config = True  # source_config in its metadata, as native

    def locate(self, path: Path) -> Source | None:
        root = path.parent if path.is_file() and path.name == ".metadata" else path
        if not (root.is_dir() and (root / ".metadata").is_file()):
            return None
        return DcpSource(path=path, root=root, weights=root / ".metadata")

    def _scan(self, src: Source) -> tuple[dict[str, DcpEntry], dict[str, DcpEntry], _DcpKeys | None, dict[str, str]]:
        entries = read_metadata(src.root)
        models = model_entries(entries)
        dialect, mods = _dialect(list(models))
        return entries, models, dialect, mods

    def detect(self, src: Source) -> Detection | None:
        entries, _, dialect, mods = self._scan(src)
        files = {c.file for e in entries.values() for c in e.chunks}
        if not dialect:
            return Detection(1, f"a DCP checkpoint ({len(entries)} entries, {len(files)} shard files), no adapter keys")
        return Detection(3, f"torch.distributed.checkpoint directory ({len(files)} shard file(s)), {dialect.dialect} "
                            f"adapter keys ({len(set(mods.values()))} modules)")

    def read(self, src: Source, opts: ReadOptions) -> Adapter:
        entries, models, dialect, mods = self._scan(src)
        missing = sorted({c.file for e in entries.values() for c in e.chunks if not (src.root / c.file).is_file()})
        notes = []
        if missing:
            if not src.shapes_only:
                raise CheckpointNotFoundError(
                    f"{src.root}: DCP metadata lists shard file(s) {missing} that are not in the directory; the "
                    "checkpoint is incomplete (copy every *.distcp file)", path=src.root / missing[0])
            notes.append(f"shard file(s) {missing} listed in .metadata are missing; convert will refuse it")
        if not dialect:
            from ..errors import LayoutError

            raise LayoutError(f"{src.root}: a DCP checkpoint with no LoRA adapter keys (lora_A/lora_B, lora_a/lora_b) "
                              f"among its {len(models)} model tensors", layout=self.name, path=str(src.root))
        meta_entry = entries.get(META_KEY)
        meta = _meta_json(src.root, meta_entry) if meta_entry is not None else None
        extra = [k for k in (meta or {}).get("extra", []) if k in models]  # full tensors lora-ckpt wrote
        sub = DcpSource(path=src.path, root=src.root, weights=src.weights, shapes_only=src.shapes_only,
                        wanted={k: models[k] for k in [*mods, *extra]}, extra_meta=meta)
        adapter = dialect.read(sub, opts)
        others = [e for k, e in models.items() if k not in mods and k not in extra]
        rest = [e for e in entries.values() if e.fqn not in {m.fqn for m in models.values()} and e.fqn != META_KEY]
        kinds = Counter(e.path[0] for e in rest)
        if others or kinds:
            held = ", ".join(f"{n} {k!r} entr{'y' if n == 1 else 'ies'}" for k, n in sorted(kinds.items()))
            notes.append(f"{dialect.dialect} keys; the checkpoint also holds {len(others)} other model tensor(s) "
                         f"({sum(e.nbytes for e in others) / 1e6:.1f} MB: base weights)"
                         + (f" and {held}" if held else "") + "; only the adapter tensors are read")
        adapter.meta.notes += notes
        if meta is None:
            adapter.meta.source_layout = self.name
        return adapter

    def write(self, adapter: Adapter, out: Path, opts: WriteOptions) -> Adapter:
        import torch.distributed.checkpoint as dcp

        adapter = self.prepare(adapter, opts)
        tensors: dict[str, Any] = dict(self.tensors_for(adapter, opts.base_config or adapter.meta.model_config))
        meta = {"version": 1, "scales": {n: m.scale for n, m in adapter.modules.items()},
                "fan_in_fan_out": sorted(n for n, m in adapter.modules.items() if m.fan_in_fan_out),
                "extra": sorted(self.prefix + k for k in adapter.extra),
                "base_model": adapter.meta.base_model, "family": adapter.meta.family,
                "task_type": adapter.meta.task_type, "source_layout": adapter.meta.source_layout,
                "source_config": adapter.meta.config}
        state = {**tensors, META_KEY: json.dumps(meta, sort_keys=True)}
        out.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": no_dist says so already
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out)), no_dist=True)
        return adapter

    def read_meta(self, src: Source, adapter: Adapter, opts: ReadOptions) -> None:  # read() handles scales
        raise NotImplementedError
