"""``check``: will a consumer load this adapter and compute the same function? What to change if not.

Pure functions over the canonical :class:`~lora_ckpt.adapter.Adapter` and the source's own config
(``adapter.meta.config``). Each rule is a known failure of the consumer (formats.md §1, §4, §9, §10,
§14): refused files, and — worse — files that load and silently compute something else.

Targets and the layout each reads: ``peft``, ``vllm`` and ``llama.cpp`` read PEFT directories
(llama.cpp through ``convert_lora_to_gguf.py``, or a ``.gguf`` directly: ``llamacpp_rules``),
``torchtune`` its epoch directory, ``mlx`` mlx-lm's adapter directory.

Example:
    >>> report = check_source("adapter/", target="vllm")
    >>> report.ok, [f.what for f in report.errors]
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .adapter import Adapter, alpha_for
from .errors import ConversionError, LoraCkptError, UsageError, quote_list
from .families import FAMILIES, parse_layer
from .hub.client import fetch_model_config
from .io import PathLike
from .keys import matches_target
from .layouts import LAYOUTS, WriteOptions, detect_layout, load_adapter
from .layouts.gguf import llamacpp_rules
from .layouts.mlx import blocks, num_layers_refused, partial_dora, placement
from .layouts.peft import peft_config_for
from .tt_export import torchtune_export

if TYPE_CHECKING:
    from .conversion import VerifyReport

__all__ = ["TARGETS", "CheckReport", "Finding", "check_adapter", "check_source", "misnamed_modules"]

Target = Literal["peft", "vllm", "llama.cpp", "torchtune", "mlx"]
#: target -> the layout it reads
TARGETS: dict[str, str] = {"peft": "peft", "vllm": "peft", "llama.cpp": "peft", "torchtune": "torchtune", "mlx": "mlx"}
_REINIT = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva", "orthogonal")
#: block lists a module path may sit in (GPT-2 and LitGPT name theirs ``h``)
_BLOCK_LISTS = ("layers", "h")


@dataclass(frozen=True)
class Finding:
    """One reason the target would refuse the adapter or compute something else (``error``), or a
    thing worth knowing that does not change the function (``warning``)."""

    level: Literal["error", "warning"]
    what: str
    fix: str = ""


@dataclass
class CheckReport:
    """The outcome of :func:`check_adapter`."""

    source: str
    source_layout: str
    target: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        """The target loads it and computes the same function."""
        return not self.errors

    def format(self) -> str:
        head = (f"OK: {self.target} will load {self.source} ({self.source_layout}) and compute the same function"
                if self.ok else f"NO: {self.target} will not load {self.source} ({self.source_layout}) as it is, or "
                f"will compute another function ({len(self.errors)} problem(s))")
        lines = [head]
        for f in self.findings:
            lines.append(f"{f.level}: {f.what}")
            if f.fix:
                lines.append(f"  fix: {f.fix}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "source_layout": self.source_layout, "target": self.target,
                "findings": [asdict(f) for f in self.findings]}


def check_source(source: PathLike, *, target: str, layout: str | None = None, base_config: PathLike | None = None,
                 alpha: float | None = None) -> CheckReport:
    """Read ``source`` (any layout) and :func:`check_adapter` it for ``target``.

    Raises:
        UsageError: unknown target.
        LoraCkptError: the source cannot be read at all (its own message says why).
    """
    _target(target)
    adapter = load_adapter(source, layout=layout, base_config=base_config, alpha=alpha,
                           resolve_base_config=fetch_model_config)
    root = Path(source) if Path(source).is_dir() else Path(source).parent
    if adapter.meta.source_layout == "torchtune" and TARGETS[target] == "peft":
        export = torchtune_export(root, adapter)
        if export is not None:
            return _judge_torchtune_export(export, target=target, source=str(source))
    keys = detect_layout(source, layout=adapter.meta.source_layout).source.keys()
    return check_adapter(adapter, target=target, source=str(source), file_keys=keys)


def check_adapter(adapter: Adapter, *, target: str, source: str = "SRC",
                  file_keys: Collection[str] = ()) -> CheckReport:
    """Whether ``target`` loads ``adapter`` (as read from ``source``) and computes its function.

    Args:
        adapter: the canonical adapter; ``adapter.meta`` carries the source layout and config.
        target: one of :data:`TARGETS`.
        source: the path, for the suggested commands.
        file_keys: the source file's tensor names (what a reader may have set aside, such as DoRA
            magnitudes a PEFT config disowns).
    """
    _target(target)
    src_layout = adapter.meta.source_layout or "?"
    report = CheckReport(source=source, source_layout=src_layout, target=target)
    add = report.findings.append
    needs = TARGETS[target]
    if target == "llama.cpp" and src_layout == "gguf":  # llama.cpp reads its own format directly
        return _gguf(adapter, report, source)
    if src_layout != needs:
        add(Finding("error", f"{target} reads {needs} adapters; this one is {src_layout}",
                    f"lora-ckpt convert {source} --to {needs} -o OUT (exact, verified); the other findings apply to "
                    "the converted adapter"))
    if needs == "peft":
        cfg = adapter.meta.config if src_layout == "peft" else _written_peft_config(adapter)
        if src_layout == "peft":
            _peft_config(adapter, cfg, add, source, file_keys)
        _prefix(adapter, add)
        if target == "vllm":
            _vllm(adapter, cfg, add, source, file_keys)
        elif target == "llama.cpp":
            _llamacpp(adapter, cfg, add, source, file_keys)  # peft: everything the canonical form holds, PEFT holds
    elif target == "torchtune":
        _torchtune(adapter, add, source)
    else:
        _mlx(adapter, add, source)
    return report


def _target(target: str) -> None:
    if target not in TARGETS:
        raise UsageError(f"unknown check target {target!r}; expected one of {', '.join(TARGETS)}")


def _written_peft_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json ``lora-ckpt convert --to peft`` would write."""
    try:
        quiet = replace(adapter, meta=replace(adapter.meta, notes=[]))  # its notes are convert's, not check's
        return peft_config_for(quiet, WriteOptions(base_config=adapter.meta.model_config), layout="peft")
    except LoraCkptError:
        return {}


# ------------------------------------------------------------------------ PEFT family
def _peft_config(adapter: Adapter, cfg: dict[str, Any], add: Any, source: str, keys: Collection[str]) -> None:
    """What a PEFT adapter_config.json gets wrong silently (formats.md §1)."""
    convert = f"lora-ckpt convert {source} --to peft -o OUT (writes a config that matches the tensors)"
    magnitudes = adapter.uses_dora or _has(keys, ".lora_magnitude_vector")
    biases = adapter.uses_bias or _has(keys, ".lora_B.bias")
    if magnitudes and not cfg.get("use_dora"):
        convert = ("set use_dora: true in adapter_config.json if the magnitudes are meant (torchtune exports: "
                   "convert its adapter_model.pt with lora-ckpt convert DIR --to peft -o OUT instead)")
        add(Finding("error", "DoRA magnitudes in the file but use_dora is false: PEFT and vLLM run it as plain LoRA "
                    "(a different function; torchtune 0.6.1 exports look like this)", convert))
    if biases and not cfg.get("lora_bias"):
        add(Finding("error", "lora_B.bias in the file but lora_bias is false: PEFT ignores the biases",
                    "set lora_bias: true in adapter_config.json if the biases are meant"))
    convert = f"lora-ckpt convert {source} --to peft -o OUT (writes a config that matches the tensors)"
    targets = cfg.get("target_modules")
    if targets not in (None, "all-linear"):
        missed = [n for n in adapter.modules if not matches_target(n, targets)]
        if missed:
            add(Finding("error", f"target_modules {targets!r} does not select {len(missed)} module(s) in the file "
                        f"({quote_list(missed, 3)}): their tensors are dropped silently", convert))
    layers = cfg.get("layers_to_transform")
    if layers is not None:
        keep = {layers} if isinstance(layers, int) else set(layers)
        out = [n for n in adapter.modules if (b := parse_layer(n, containers=_BLOCK_LISTS)) and b.number not in keep]
        if out:
            add(Finding("error", f"layers_to_transform {sorted(keep)} excludes {len(out)} module(s) in the file "
                        f"({quote_list(out, 3)}): dropped silently", convert))
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REINIT):
        add(Finding("error", f"init_lora_weights {init!r} re-runs its initialisation on load and modifies the base "
                    "weights", "set init_lora_weights to true in adapter_config.json"))
    declared = set(cfg.get("modules_to_save") or [])
    present = {k.rsplit(".", 1)[0] for k in adapter.extra}
    absent = sorted(d for d in declared if not any(p.endswith(d) for p in present))
    if absent:
        add(Finding("error", f"modules_to_save declares {quote_list(absent)} but the file has no such weights: PEFT "
                    "raises KeyError", "remove them from modules_to_save"))
    if not cfg.get("task_type"):
        add(Finding("warning", "no task_type: AutoPeftModelForCausalLM fails (PeftModel.from_pretrained works)",
                    'add "task_type": "CAUSAL_LM"'))


def misnamed_modules(adapter: Adapter) -> tuple[list[str], str] | None:
    """The modules named otherwise than the base model (known from ``adapter.meta.model_config``) names
    them, and how it names them; None when the base model is unknown. PEFT, vLLM and transformers
    match module names exactly and skip the others silently (e.g. a VLM's ``language_model.`` prefix)."""
    cfg = adapter.meta.model_config
    if cfg is None or cfg.family is None:
        return None
    blocks_at = cfg.family.module_prefixes[0] + ("h" if cfg.family.name == "gpt2" else "layers")
    wrong = sorted(n for n in adapter.modules if not n.startswith(cfg.family.module_prefixes)
                   or ((b := parse_layer(n, containers=_BLOCK_LISTS)) is not None and b.container != blocks_at))
    expected = f"{quote_list(cfg.family.module_prefixes)} ({blocks_at}.N...)"
    return wrong, expected


def _prefix(adapter: Adapter, add: Any) -> None:
    """Module paths must be the base model's own: consumers skip unknown names silently."""
    found = misnamed_modules(adapter)
    if found is not None and found[0]:
        add(Finding("error", f"module paths {quote_list(found[0], 3)} are not the base model's {found[1]}: PEFT "
                    "and vLLM match names exactly and silently serve the base model (e.g. a VLM's "
                    "'language_model.' prefix)", "rename the modules to the base model's paths"))
    elif found is None:
        prefixes = {b.container for n in adapter.modules if (b := parse_layer(n, containers=_BLOCK_LISTS))}
        if len(prefixes) > 1:
            add(Finding("warning", f"module paths use several prefixes {quote_list(sorted(prefixes))}; pass "
                        "--base-config to check them against the base model"))


def _vllm(adapter: Adapter, cfg: dict[str, Any], add: Any, source: str, keys: Collection[str]) -> None:
    merge = f"merge it into the base model and serve that: lora-ckpt merge BASE {source} -o MERGED"
    if adapter.uses_dora or _has(keys, ".lora_magnitude_vector"):
        add(Finding("error", "DoRA: vLLM refuses use_dora (and lora_magnitude_vector is an unsupported LoRA weight)",
                    merge))
    if adapter.extra:
        add(Finding("error", f"full tensors {quote_list(adapter.extra, 3)} (modules_to_save / saved embeddings): vLLM "
                    "refuses them ('unsupported LoRA weight')",
                    f"lora-ckpt convert {source} --to peft --allow-lossy -o OUT drops them (the same function only if "
                    f"they equal the base weights, as PEFT's unchanged embedding copies do); otherwise {merge}"))
    if adapter.uses_bias or _has(keys, ".lora_B.bias"):
        add(Finding("error", "lora_B.bias: current vLLM has no LoRA bias (the bias is refused or ignored)", merge))
    if cfg.get("bias", "none") != "none":
        add(Finding("error", f"bias={cfg['bias']!r}: vLLM accepts only 'none'", "train without bias, or merge"))
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0:
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)  # vLLM's one scale: no rank/alpha patterns
        _scales(adapter, lambda m: scale, add, "vLLM computes one scale lora_alpha/r "
                "(lora_alpha/sqrt(r) with use_rslora) for every module; rank_pattern/alpha_pattern are not applied",
                source)
    top = max(adapter.ranks(), default=0)
    if top > 16:
        add(Finding("warning", f"rank {top}: start vLLM with --max-lora-rank {top} or more (default 16)"))
    if any(m.kind == "embedding" for m in adapter.modules.values()):
        add(Finding("warning", "embedding LoRA: vLLM applies it only for models whose embedding supports LoRA"))
    if not cfg.get("base_model_name_or_path"):
        add(Finding("warning", "no base_model_name_or_path: vLLM does not check the adapter belongs to the served "
                    "model"))
    _vllm_experts(adapter, add, source)


#: model types vLLM's model classes mark ``is_3d_moe_weight = True`` (they load PEFT's fused 3-D expert LoRA);
#: every other MoE model (Qwen2/3-MoE, Mixtral, DeepSeek ...) takes per-expert 2-D expert LoRA only
VLLM_3D_MOE = ("gpt_oss", "qwen3_5_moe", "qwen3_vl_moe", "glm4_moe_lite", "interns1_pro")


def _vllm_experts(adapter: Adapter, add: Any, source: str) -> None:
    """vLLM's MoE LoRA rules (``FusedMoEWithLoRA``, ``PackedLoRALayerWeights.pack_moe``, ``is_3d_moe_weight``,
    ``--enable-mixed-moe-lora-format`` / ``is_3d_lora_weight``): per-expert 2-D keys with all three
    projections for every expert, or fused 3-D keys for models marked 3-D; no expert parallelism."""
    cfg = adapter.meta.model_config
    model_type = cfg.raw.get("model_type") if cfg else None
    experts = {n: m for n, m in adapter.modules.items() if re.search(r"\.experts\.\d+\.", n)}
    if adapter.experts and model_type not in VLLM_3D_MOE:
        add(Finding("error", f"fused MoE expert LoRA (PEFT target_parameters: {len(adapter.experts)} parameter(s)): "
                    f"vLLM loads 3-D expert LoRA only for models it marks is_3d_moe_weight ({', '.join(VLLM_3D_MOE)})"
                    f"{'' if model_type is None else f', not {model_type}'}, or with --enable-mixed-moe-lora-format "
                    "and is_3d_lora_weight: true declared for this adapter (trusted, unchecked: a wrong declaration "
                    "computes garbage); other MoE models take per-expert keys experts.{e}.gate_proj/up_proj/down_proj",
                    f"lora-ckpt convert {source} --to peft --experts per-expert -o OUT (exact, verified per expert)"))
    if experts and model_type in VLLM_3D_MOE:
        add(Finding("error", f"per-expert expert LoRA ({len(experts)} module(s)) on {model_type}, which vLLM loads as "
                    "3-D fused expert LoRA (is_3d_moe_weight)",
                    f"lora-ckpt convert {source} --to peft --experts fused -o OUT, or serve with "
                    "--enable-mixed-moe-lora-format and is_3d_lora_weight: false"))
    elif experts:
        by_layer: dict[str, dict[str, set[str]]] = {}
        for n in experts:
            head, e, proj = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)", n).groups()  # type: ignore[union-attr]
            by_layer.setdefault(head, {}).setdefault(proj, set()).add(e)
        projs = {p for d in by_layer.values() for p in d}
        gaps = [h for h, d in by_layer.items() if len(d) < 3 or len({frozenset(v) for v in d.values()}) > 1]
        if gaps or len(projs) < 3:
            add(Finding("error", f"per-expert LoRA without all three projections of every expert in "
                        f"{quote_list(sorted(gaps) or sorted(by_layer), 2)}: vLLM's pack_moe packs gate/up/down of "
                        "each expert together (all present, one rank)",
                        f"train LoRA on all expert projections, or {source}: merge it into the base instead"))
    if adapter.experts or experts:
        add(Finding("warning", "MoE expert LoRA: vLLM serves it without expert parallelism only (FusedMoE LoRA has "
                    "no EP support); check --max-lora-rank covers the expert rank"))


def _llamacpp(adapter: Adapter, cfg: dict[str, Any], add: Any, source: str, keys: Collection[str]) -> None:
    """convert_lora_to_gguf.py on a PEFT directory, judged by the rule set ``convert --to gguf`` uses."""
    gguf, refused = f"lora-ckpt convert {source} --to gguf -o OUT.gguf", {**llamacpp_rules(adapter).refused}
    for what, suffix in (("DoRA magnitudes", ".lora_magnitude_vector"), ("LoRA biases (lora_B.bias)", ".lora_B.bias")):
        refused.setdefault(what, [k for k in keys if k.endswith(suffix)])  # in the file, though the config disowns
    for what, names in ((w, n) for w, n in refused.items() if n):
        add(Finding("error", f"{what} ({quote_list(names, 3)}): llama.cpp cannot apply them (convert_lora_to_gguf.py "
                    "aborts on them)", f"{gguf} --allow-lossy drops them (the same function only if they equal the "
                    "base weights)" if what.startswith("full") else f"merge it instead: lora-ckpt merge BASE {source} "
                    "-o MERGED"))
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, (int, float)):
        ranks = adapter.ranks()
        if cfg.get("use_rslora") and len(ranks) == 1 and not cfg.get("alpha_pattern"):
            r = next(iter(ranks))
            fix = (f"llama.cpp ignores use_rslora: set lora_alpha to alpha*sqrt(r) = "
                   f"{alpha_for(alpha / math.sqrt(r), r)} and use_rslora to false")
        else:
            fix = (f"fold the per-module scales into lora_B under one rank and alpha: lora-ckpt convert {source} --to "
                   "loralib -o TMP && lora-ckpt convert TMP --to peft -o OUT (exact up to float32 rounding, verified)")
        fix += f"; or write the GGUF directly: {gguf} (folds them into lora_b, verified)"
        bad = [n for n, m in adapter.modules.items() if not _close(alpha / m.rank, m.scale)]
        if bad:
            add(Finding("error", f"llama.cpp scales every tensor by lora_alpha/rank and ignores use_rslora and "
                        f"alpha_pattern: {len(bad)} module(s) would get another scale ({quote_list(bad, 3)})", fix))
    if not cfg.get("base_model_name_or_path"):
        add(Finding("warning", "no base_model_name_or_path: pass --base BASE_DIR to convert_lora_to_gguf.py"))


def _gguf(adapter: Adapter, report: CheckReport, source: str) -> CheckReport:
    """A GGUF adapter, by the rule set its writer applies (what llama.cpp's loader computes)."""
    folded = llamacpp_rules(adapter).folded
    whats = [n for n in adapter.meta.notes if "FLOAT32" in n] + (
        [f"{len(folded)} module(s) have a scale other than alpha/rank ({quote_list(folded, 3)})"] if folded else [])
    report.findings += [Finding("error", w, f"lora-ckpt convert {source} --to gguf -o OUT.gguf") for w in whats]
    return report


def _scales(adapter: Adapter, scale_of: Any, add: Any, why: str, source: str) -> None:
    bad = [n for n, m in adapter.modules.items() if not _close(scale_of(m), m.scale)]
    if bad:
        add(Finding("error", f"{why}: {len(bad)} module(s) would get another scale ({quote_list(bad, 3)})",
                    f"fold them into one rank and alpha: lora-ckpt convert {source} --to loralib -o TMP && "
                    "lora-ckpt convert TMP --to peft -o OUT (exact up to float32 rounding, verified)"))


def _has(keys: Collection[str], suffix: str) -> bool:
    return any(k.endswith(suffix) for k in keys)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-12)


# ---------------------------------------------------------------- torchtune and mlx
def _layout_limits(adapter: Adapter, layout: str, add: Any, source: str) -> None:
    lay = LAYOUTS[layout]
    for part in lay.lossy_parts(adapter):
        add(Finding("error", f"{layout} cannot hold {part}",
                    f"merge the adapter instead (lora-ckpt merge BASE {source} -o MERGED); --allow-lossy drops it, "
                    "which changes the function"))
    cfg = adapter.meta.model_config
    family = cfg.family if cfg else None
    if lay.scheme != "hf":
        if family is None:
            add(Finding("error", f"{layout} names modules by model family and the family is unknown",
                        "pass --base-config with the base model's config.json"))
            return
        try:
            lay.from_hf(adapter.modules, family, cfg)
        except (ConversionError, LoraCkptError) as e:
            add(Finding("error", f"{layout} cannot name every module: {e}"))


def _torchtune(adapter: Adapter, add: Any, source: str) -> None:
    _layout_limits(adapter, "torchtune", add, source)
    if len(adapter.ranks()) > 1 or len(adapter.scales()) > 1:
        add(Finding("warning", f"ranks {sorted(adapter.ranks())} / scales {sorted(adapter.scales())}: torchtune has "
                    "one rank and alpha; the conversion zero-pads ranks and folds scales into lora_b (exact)"))
    if adapter.uses_dora:
        add(Finding("warning", "DoRA: torchtune's distributed recipe re-initialises magnitudes when resuming"))
    add(Finding("warning", "torchtune loads an adapter only when resuming its run (recipe_state.pt beside "
                "adapter_model.pt); to fine-tune further from scratch, merge it into the base first"))


def _mlx(adapter: Adapter, add: Any, source: str) -> None:
    _layout_limits(adapter, "mlx", add, source)
    if partial_dora(adapter):
        add(Finding("error", "DoRA on some modules only: mlx-lm runs DoRA on every adapted module or none",
                    "convert to peft or native instead, or merge"))
    cfg = adapter.meta.model_config
    family = cfg.family if cfg else FAMILIES.get(adapter.meta.family or "")
    experts = [n for n in adapter.modules if re.search(r"\.experts\.\d+\.", n)]
    if experts and (family is None or not family.stacked_experts):
        add(Finding("error", f"per-expert modules ({quote_list(experts, 2)}): mlx-lm stacks experts in switch_mlp and "
                    "lora-ckpt knows that stacking only for mixtral, qwen2_moe, qwen3_moe",
                    "pass --base-config of one of those families, or merge"))
    num_layers, note = placement(blocks(adapter.modules), cfg.n_layers if cfg else None)
    if note:
        add(Finding("warning", note))
    if adapter.meta.source_layout == "mlx":
        mcfg = adapter.meta.config or {}
        ftype = mcfg.get("fine_tune_type") or ("dora" if mcfg.get("use_dora") else "lora")
        if adapter.uses_dora and ftype != "dora":
            add(Finding("error", f"DoRA magnitudes (m) but fine_tune_type {ftype!r}: mlx-lm refuses the file "
                        "('not an adapter parameter')", 'set "fine_tune_type": "dora"'))
        refused = num_layers_refused(adapter)
        if refused:
            add(Finding("error", f"{refused}: mlx-lm refuses it", f'set "num_layers": {num_layers}'))


def _judge_torchtune_export(found: tuple[Path, Adapter, VerifyReport], *, target: str, source: str) -> CheckReport:
    """Check torchtune's PEFT export, and whether it says what adapter_model.pt says (bugs B1-B3)."""
    export, theirs, diff = found
    keys = detect_layout(export, layout="peft").source.keys()
    report = check_adapter(theirs, target=target, source=str(export), file_keys=keys)
    report.source, report.source_layout = source, "torchtune"
    if not diff.ok:
        report.findings.insert(0, Finding(
            "error", f"{target} would read {export.name}, torchtune's own PEFT export, which disagrees with "
            f"adapter_model.pt (worst relative difference {diff.worst:.2g}"
            f"{'; ' + diff.problems[0] if diff.problems else ''}): torchtune 0.6.1's export bugs (DoRA magnitudes and "
            "use_dora, Qwen rows)",
            f"lora-ckpt convert {source} --to peft -o OUT"))
    return report
