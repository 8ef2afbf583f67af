"""``merge``: fold an adapter into a (sharded) base checkpoint, streaming tensor by tensor.

The output is planned from the safetensors headers alone (names, dtypes, shapes: every byte
offset is known before any data is read), then each shard file is written front to back: our
own safetensors header, then each tensor's bytes. A tensor the adapter does not touch is copied
file-to-file by the kernel (``os.copy_file_range``). A merged one is read through a private
memory map in row blocks of 1M elements, ``W + scale·B@A`` is computed in float32 (DoRA:
``m / ‖W+ΔW‖_row ⊙ (W+ΔW)``, as PEFT's merge; embeddings and GPT-2 ``Conv1D`` receive ``ΔWᵀ``),
cast once to the output dtype into a 16 MB write unit that a writer thread writes while the
next unit is computed. Each block's mapped pages are released as soon as it is done
(``MADV_DONTNEED``: they stay in the page cache, not in this process), and the next tensor is
prefetched (``MADV_WILLNEED``), so peak memory is the adapter plus a few write units whatever
the model size, and disk reads overlap the arithmetic.

Output schemes (``to``):

- ``hf``: ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``
  (``metadata.total_size``, ``weight_map``), split at ``max_shard_size`` as ``save_pretrained`` does.
- ``torchtune``: torchtune parameter names (``layers.0.attn.q_proj.weight``, norms ``.scale``), q/k rows
  interleaved for Llama/Mistral/Gemma (not Qwen), one file ``model-00001-of-00001.safetensors``:
  torchtune 0.6.1's ``FullModelTorchTuneCheckpointer`` reads exactly one checkpoint file (through
  ``safe_torch_load``, which accepts safetensors), so ``max_shard_size`` does not apply.
- ``meta``: Meta/Mistral names (``layers.0.attention.wq.weight``), interleaved q/k rows, one file
  ``consolidated.safetensors`` plus ``params.json`` (mistral-inference, torchtune's
  ``FullModelMetaCheckpointer``: one file too).

Every target also gets the base directory's non-weight files (config, tokenizer, generation
config, licence; not ``README.md``, which describes the base).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from .adapter import Adapter, ModuleLoRA
from .conversion import one_thread
from .dtypes import DtypeLike, parse_dtype
from .errors import CheckpointFormatError, ConversionError, LoraCkptError, MissingConfigError, UsageError, quote_list
from .experts import ExpertLoRA, join_experts, split_experts
from .families import ModelConfig, load_model_config, model_config_from_dict
from .hub.client import fetch_model_config
from .io import DTYPES, WEIGHT_SUFFIXES, PathLike, atomic_output, checkpoint_files, read_json, read_safetensors_header
from .layouts import load_adapter
from .layouts.mistral import params_json
from .stream import BaseTensor, OutTensor, Streamer, plan_shards, write_shard

__all__ = ["MergeResult", "merge_checkpoint", "parse_size"]

logger = logging.getLogger(__name__)

Target = Literal["hf", "torchtune", "meta"]
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_CODE = {getattr(torch, name): code for code, (_, name) in DTYPES.items()}
#: input-embedding keys an ``lm_head`` may be tied to, most common first
EMBED_KEYS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.language_model.embed_tokens.weight",
              "model.decoder.embed_tokens.weight", "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight")
HEAD_KEY = "lm_head.weight"
CONV1D_MODEL_TYPES = ("gpt2",)  # weights stored (in, out): PEFT forces fan_in_fan_out for them
#: weight files of a base model directory that are not copied: the ones lora-ckpt reads, and other frameworks'
NOT_COPIED_SUFFIXES = (*WEIGHT_SUFFIXES, ".gguf", ".h5", ".msgpack", ".ckpt")
SKIPPED_FILES = ("README.md",)


@dataclass
class MergeResult:
    """What :func:`merge_checkpoint` wrote."""

    output: Path
    to: str
    modules_merged: int
    tensors_replaced: int
    tensors: int
    bytes: int
    files: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: tensors merged, bytes, time, output."""
        rate = _size(self.bytes / self.seconds) + "/s" if self.seconds > 0 else "-"
        replaced = f" + {self.tensors_replaced} replaced" if self.tensors_replaced else ""
        return (f"merged {self.modules_merged} module(s){replaced} into {self.tensors} tensors ({self.to} names), "
                f"{_size(self.bytes)} in {len(self.files)} file(s), {self.seconds:.1f} s ({rate}) -> {self.output}")


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def parse_size(size: int | str) -> int:
    """``5GB`` -> 5_000_000_000 (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary, B, or a plain int)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise UsageError(f"max_shard_size {size!r} is not a size; expected e.g. 5GB, 500MB, 2GiB or bytes")
        unit = (m[2] or "B").upper().replace("IB", "iB")
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
        value = int(float(m[1]) * mult)
    if value <= 0:
        raise UsageError(f"max_shard_size {size!r} must be positive")
    return value


# ------------------------------------------------------------------------------ planning
def _base_sources(base: Path) -> dict[str, BaseTensor]:
    """Every base tensor, from the safetensors headers (no data read)."""
    files = checkpoint_files(base)
    other = [f.name for f in files if f.suffix != ".safetensors"]
    if other:
        raise CheckpointFormatError(
            f"{base}: weights are torch pickles ({quote_list(other)}), expected safetensors; merge streams "
            "safetensors only: re-save the base with save_pretrained(safe_serialization=True)", path=base)
    sources: dict[str, BaseTensor] = {}
    for f in files:
        for name, info in read_safetensors_header(f).tensors.items():
            if name in sources:
                raise CheckpointFormatError(f"{base}: tensor {name!r} is in two shards ({Path(sources[name].path).name}"
                                            f" and {f.name}); the checkpoint is inconsistent", path=base)
            sources[name] = BaseTensor(str(f), info)
    return sources


def _base_config(base: Path, base_config: PathLike | ModelConfig | None) -> tuple[dict[str, Any] | None,
                                                                                   ModelConfig | None]:
    """(config.json dict to copy/edit, model config for head counts and family)."""
    root = base if base.is_dir() else base.parent
    raw = None
    if base.is_dir() and (base / "config.json").is_file():
        raw = read_json(base / "config.json", what="config.json")
    if isinstance(base_config, ModelConfig):
        cfg: ModelConfig | None = base_config
    elif base_config is not None:
        cfg = load_model_config(base_config)
    elif raw is not None:
        cfg = model_config_from_dict(raw, source=str(root / "config.json"))
    else:
        cfg = None
    if raw is None and cfg is not None and "model_type" in cfg.raw:
        raw = dict(cfg.raw)  # a single-file base: the given HF config becomes the output's config.json
    return raw, cfg


class _Planner:
    """Turns (base headers, adapter, config, options) into the list of output tensors, or refuses
    with every problem at once."""

    def __init__(self, sources: dict[str, BaseTensor], adapter: Adapter, raw: dict[str, Any] | None,
                 cfg: ModelConfig | None, *, to: Target, dtype: torch.dtype | None, untie: bool) -> None:
        self.sources, self.adapter, self.raw, self.cfg = sources, adapter, raw or {}, cfg
        self.to, self.dtype, self.untie = to, dtype, untie
        self.problems: dict[str, list[str]] = {}  # what is wrong -> where
        self.untied = False
        self.replaced = 0

    def _problem(self, what: str, where: str) -> None:
        self.problems.setdefault(what, []).append(where)

    def _resolve(self, key: str) -> str | None:
        if key in self.sources:
            return key
        short = key.split(".", 1)[-1]  # a base saved without its prefix (old GPT-2: "h.0..." for "transformer.h.0...")
        return short if short in self.sources else None

    def build(self) -> list[OutTensor]:
        outs = {k: OutTensor(k, k, s.dtype, s.info.shape, src=s) for k, s in self.sources.items()}
        embed_key = next((k for k in EMBED_KEYS if k in self.sources), None)
        if embed_key is not None and (HEAD_KEY not in self.sources or self.raw.get("tie_word_embeddings") is True):
            self._tied(outs, embed_key)
        for key, t in self.adapter.extra.items():  # modules_to_save / saved (or resized) embeddings
            plain = key.replace(".base_layer.", ".")
            target = self._resolve(plain) or (plain if plain in outs else None)
            if target is None:
                self._problem("full adapter tensors (modules_to_save) replace no base tensor", repr(key))
            elif tuple(t.shape) != outs[target].shape:
                self._problem("full adapter tensors differ in shape from the base's",
                              f"{key!r} {tuple(t.shape)} vs {outs[target].shape}")
            else:
                outs[target].tensor, outs[target].src = t, None
                self.replaced += 1
        conv1d = self.raw.get("model_type") in CONV1D_MODEL_TYPES
        modules = dict(self.adapter.modules)
        experts = self._experts(modules)
        for name, m in modules.items():
            self._module(outs, name, m, conv1d)
        for name, x in experts.items():
            self._expert(outs, name, x)
        if self.problems:
            found = "; ".join(f"{what}: {quote_list(where, 3)}" for what, where in self.problems.items())
            raise ConversionError(f"cannot merge this adapter into this base: {found}; expected an adapter "
                                  "trained on this base model")
        plan = list(outs.values())
        for o in plan:
            if self.dtype is not None and o.dtype in FLOAT_CODES:
                o.dtype = _CODE[self.dtype]
        if self.to != "hf":
            self._rename(plan)
        return plan

    def _tied(self, outs: dict[str, OutTensor], embed_key: str) -> None:
        embed_mod = embed_key[: -len(".weight")]
        touched = [n for n in self.adapter.modules if n in ("lm_head", embed_mod)]
        touched += [k for k in self.adapter.extra if k in (HEAD_KEY, embed_key)]
        if not touched:
            return
        if not self.untie:
            raise ConversionError(
                f"the base ties lm_head to {embed_key!r} (tie_word_embeddings) and the adapter changes "
                f"{quote_list(touched)}: merged into the shared weight, it would change both, unlike the adapter "
                "(PEFT runs them untied); pass --untie (untie=True) to write both tensors and set "
                "tie_word_embeddings false")
        src = outs[embed_key]
        outs[HEAD_KEY] = OutTensor(HEAD_KEY, HEAD_KEY, src.dtype, src.shape, src=src.src)
        if any(k.endswith(".base_layer.weight") and k.replace(".base_layer.", ".") == embed_key
               for k in self.adapter.extra):  # the shared weight the adapter was trained on: both get it
            outs[HEAD_KEY].tensor, outs[HEAD_KEY].src = self.adapter.extra[
                embed_key.replace(".weight", ".base_layer.weight")], None
        self.untied = True

    def _module(self, outs: dict[str, OutTensor], name: str, m: ModuleLoRA, conv1d: bool) -> None:
        key = self._resolve(f"{name}.weight") or (f"{name}.weight" if f"{name}.weight" in outs else None)
        if key is None:
            self._problem("adapter modules have no base weight", f"{name}.weight")
            return
        o = outs[key]
        if o.lora is not None:
            self._problem("several adapter modules target one weight", key)
            return
        src_dtype = o.src.dtype if o.src is not None else None if o.tensor is None else _CODE.get(o.tensor.dtype)
        if src_dtype not in FLOAT_CODES:
            self._problem("targets are not float tensors (a quantised base? merge needs a float one)",
                          f"{key} ({o.dtype})")
            return
        out_f, in_f = m.B.shape[0], m.A.shape[1]
        transposed = m.kind == "embedding" or m.fan_in_fan_out or (conv1d and m.kind == "linear")
        if conv1d and not m.fan_in_fan_out and m.kind == "linear":
            logger.info("%s: GPT-2 Conv1D weight stored (in, out): merged with fan_in_fan_out (as PEFT does)", name)
        expected = (in_f, out_f) if transposed else (out_f, in_f)
        if o.shape != expected:
            self._problem("base weights differ in shape from the adapter's update", f"{key} {o.shape} vs {expected}")
            return
        if m.magnitude is not None and m.kind == "embedding":
            self._problem("DoRA on an embedding is not supported by merge", name)
            return
        o.lora, o.transposed = m, transposed
        if m.bias is not None:
            bias_key = self._resolve(f"{name}.bias")
            if bias_key is None:
                self._problem("modules have lora_B.bias but the base has no bias there, so the merged architecture "
                              "cannot hold it (PEFT refuses this merge too)", f"{name}.bias")
            else:
                outs[bias_key].add = m.bias.float() * m.scale

    def _experts(self, modules: dict[str, ModuleLoRA]) -> dict[str, ExpertLoRA]:
        """The fused expert LoRA to merge into 3-D base tensors; the rest goes into ``modules`` as
        per-expert modules (HF checkpoints store experts one per expert on disk, formats.md §16).
        Per-expert adapter modules whose base is fused 3-D are joined (exactly)."""
        family = self.cfg.family if self.cfg else None
        fused = {k: x for k, x in self.adapter.experts.items() if k in self.sources}
        on_disk = {k: x for k, x in self.adapter.experts.items() if k not in self.sources}
        if on_disk:
            try:
                modules.update(split_experts(on_disk, family, layout="merge"))
            except LoraCkptError as e:
                self._problem(f"expert LoRA has no base tensor ({e})", quote_list(on_disk, 2))
        joined, used = join_experts({n: m for n, m in modules.items() if f"{n}.weight" not in self.sources},
                                    family, n_experts=self.cfg.n_experts if self.cfg else None)
        if not joined or not all(k in self.sources for k in joined):  # a per-expert base: merged module by module
            return fused
        for n in used:
            del modules[n]
        return {**fused, **joined}

    def _expert(self, outs: dict[str, OutTensor], key: str, x: ExpertLoRA) -> None:
        o = outs[key]
        if o.dtype not in FLOAT_CODES:
            self._problem("targets are not float tensors (a quantised base? merge needs a float one)",
                          f"{key} ({o.dtype})")
        elif o.shape != x.param_shape:
            self._problem("base weights differ in shape from the adapter's update", f"{key} {o.shape} vs "
                          f"{x.param_shape}")
        else:
            o.experts = x

    def _rename(self, plan: list[OutTensor]) -> None:
        if self.cfg is None or self.cfg.family is None:
            raise MissingConfigError(
                f"--to {self.to} needs the base model's family and head counts; no usable config.json "
                f"({'unknown model_type ' + repr(self.raw.get('model_type')) if self.raw else 'none found'}); "
                "pass --base-config")
        fam = self.cfg.family
        names = fam.names(self.to)
        missing = []
        for o in plan:
            new = names.to_other(o.hf_key)
            if new is None:
                missing.append(o.hf_key)
                continue
            o.key = new
            module, _, leaf = o.hf_key.rpartition(".")
            heads = self.cfg.heads(module)
            if heads and fam.interleaved(self.to) and leaf in ("weight", "bias"):
                o.permute = heads
        if missing:
            raise ConversionError(f"{len(missing)} base tensor(s) have no {self.to} name for family "
                                  f"{fam.name!r}: {quote_list(missing)}; expected a stock {fam.name} checkpoint")


def merge_checkpoint(base: PathLike, adapter: PathLike | Adapter, out: PathLike, *,
                     dtype: DtypeLike | None = None, max_shard_size: int | str = "5GB", to: Target = "hf",
                     base_config: PathLike | ModelConfig | None = None, alpha: float | None = None,
                     force: bool = False, untie: bool = False, progress: bool = True) -> MergeResult:
    """Merge ``adapter`` into the base checkpoint ``base``, streaming, and write the result to ``out``.

    Memory stays at about the adapter plus a few row blocks of one tensor, whatever the model
    size. Updates are computed and added in float32 and cast once. The output directory is
    written beside ``out`` and renamed into place only when complete.

    Args:
        base: an HF model directory (``model.safetensors`` or shards + index, ``config.json``,
            tokenizer files) or a single ``.safetensors`` file.
        adapter: an adapter directory/file in any supported layout, or an :class:`Adapter`.
        out: the output directory.
        dtype: output dtype of floating tensors, or its name (``"bf16"``; default: each keeps the base's).
        max_shard_size: largest shard (``"5GB"``, ``"500MB"``, ``"2GiB"``, bytes); ``to="hf"`` only.
        to: parameter names of the output: ``"hf"``, ``"torchtune"`` or ``"meta"`` (module docstring).
        base_config: the base's ``config.json``/``params.json`` (default: ``config.json`` in ``base``).
        alpha: LoRA alpha for adapter layouts that do not record it.
        force: replace an existing ``out``.
        untie: when the base ties ``lm_head`` to the input embedding and the adapter changes one of
            them, write both tensors and set ``tie_word_embeddings`` false (otherwise refused).
        progress: show a progress bar (bytes written) on stderr.

    Returns:
        A :class:`MergeResult` (``.summary()`` is one line).

    Raises:
        ConversionError: the adapter does not fit the base (missing modules, shapes, a LoRA bias
            the base has no bias for, tied embeddings without ``untie``...), all problems at once.
        MissingConfigError: ``to`` is torchtune/meta and no model config is known.
        CheckpointFormatError: the base is not safetensors.
        OutputExistsError: ``out`` exists and not ``force``.
        OutputPathError: ``out`` overlaps an input.

    Example:
        >>> merge_checkpoint("llama-3-8b/", "adapter/", "merged/", max_shard_size="2GB")
    """
    t0 = time.perf_counter()
    if to not in ("hf", "torchtune", "meta"):
        raise UsageError(f"to={to!r}; expected one of hf, torchtune, meta")
    dtype = parse_dtype(dtype)  # "bf16", "float16", torch.bfloat16, ...
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
                              or dtype not in _CODE):
        raise UsageError(f"dtype {dtype!r} is not a floating-point dtype safetensors can hold; expected e.g. "
                         "torch.bfloat16, torch.float16 or torch.float32")
    limit = parse_size(max_shard_size)
    base_path = Path(base)
    sources = _base_sources(base_path)
    raw, cfg = _base_config(base_path, base_config)
    inputs: tuple[PathLike, ...]
    if isinstance(adapter, Adapter):
        ad, inputs = adapter, (base,)
    else:
        ad = load_adapter(adapter, base_config=cfg, alpha=alpha, resolve_base_config=fetch_model_config)
        inputs = (base, adapter)
    for note in ad.meta.notes:
        logger.info("adapter: %s", note)
    planner = _Planner(sources, ad, raw, cfg, to=to, dtype=dtype, untie=untie)
    plan = planner.build()
    total = sum(o.nbytes for o in plan)
    if to != "hf" and total > limit:
        logger.info("%s output is one file (%.2f GB): its checkpointers read exactly one; max_shard_size ignored",
                    to, total / 1e9)
    shards = plan_shards(plan, limit if to == "hf" else None)
    names = _file_names(len(shards), to)
    with atomic_output(out, force=force, inputs=inputs) as tmp:
        tmp.mkdir()
        with ExitStack() as stack:
            stack.enter_context(one_thread())
            bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc="merge", disable=not progress, leave=False))
            streamer = Streamer(bar)
            stack.callback(streamer.close)
            for shard, name in zip(shards, names, strict=True):
                write_shard(tmp / name, shard, streamer)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total,
                                  "total_parameters": sum(math.prod(o.shape) for o in plan)},
                     "weight_map": {o.key: name for shard, name in zip(shards, names, strict=True) for o in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _companions(base_path, tmp, raw, dtype=dtype, untied=planner.untied)
        if to == "meta" and cfg is not None:  # (a rename without a config was refused by the planner)
            (tmp / "params.json").write_text(json.dumps(params_json(cfg), indent=4))
    merged = sum(o.lora is not None or o.experts is not None for o in plan)
    res = MergeResult(Path(out), to, merged, planner.replaced, len(plan), total,
                      names, time.perf_counter() - t0, list(ad.meta.notes))
    logger.info("%s", res.summary())
    return res


def _file_names(n: int, to: Target) -> list[str]:
    if to == "meta":
        return ["consolidated.safetensors"]
    if to == "torchtune":
        return ["model-00001-of-00001.safetensors"]
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _companions(base: Path, out: Path, raw: dict[str, Any] | None, *, dtype: torch.dtype | None,
                untied: bool) -> None:
    """Copy the base's non-weight files; write config.json edited for ``untie`` / ``dtype``."""
    if base.is_dir():
        for p in sorted(base.iterdir()):
            if p.name.startswith(".") or p.name in SKIPPED_FILES or p.name == "config.json":
                continue
            if not p.is_file():
                logger.info("not copied: %s (a directory)", p.name)
            elif not p.name.endswith(NOT_COPIED_SUFFIXES) and not p.name.endswith(".index.json"):
                shutil.copyfile(p, out / p.name)
    if raw is None:
        return
    cfg = dict(raw)
    if untied:
        cfg["tie_word_embeddings"] = False
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = str(dtype).removeprefix("torch.")
    if cfg == raw and base.is_dir() and (base / "config.json").is_file():
        shutil.copyfile(base / "config.json", out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

