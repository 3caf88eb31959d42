"""``convert``: teacher HF folder (or hub id) → student HF folder, streamed and atomic.

Every check that can fail (family, plan, shards, output folder) runs before anything is written.
Tensors of kept layers and of the rest of the model are copied byte for byte; each replaced
layer's attention weights are read (they may span shards), handed to the mixer's converter, and
its tensors written. The written names and shapes are checked against the student model built on
the meta device before the output folder is renamed into place.
"""

from __future__ import annotations

import logging
import platform
import shutil
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import torch
import transformers
import yaml
from pydantic import ValidationError
from transformers import AutoConfig

from .. import __version__
from ..architectures import MixerSwapConfig, MixerSwapForCausalLM, describe_plan, family_for
from ..architectures.mixers import mixer_kind, registered_kinds
from ..architectures.modeling import AUTO_MAP, write_remote_code
from ..architectures.plan import ATTENTION, PlanError, describe_validation_error, parse_layer
from ..progress import progress_bar
from .adapters import AttentionShape, attention_tensor_names, read_attention
from .checkpoint_io import (
    CheckpointError,
    SafetensorsShard,
    ShardedWriter,
    atomic_output_dir,
    check_output,
    list_shards,
    parse_size,
    resolve_model_dir,
    teacher_fingerprint,
)
from .calibration import (
    TEACHER_SAMPLES,
    collect_layer_stats,
    describe_calibration,
    output_match,
    read_calibration_text,
    refit_output_projection,
    replay_mixer,
)
from .converters import AttentionLayout, LayerStats
from .kv_report import MLA, held_out_perplexity, kv_cache_report, log_report, report_lines
from .plan_file import read_plan_file, shorthand_plan
from .selection import select_attention_layers

logger = logging.getLogger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                "chat_template.json")


@dataclass
class ConversionResult:
    out: Path
    plan: list[dict]
    attention_layers: list[int]
    shards: list[str]
    bytes_written: int
    dropped: list[str] = field(default_factory=list)


def convert(
    teacher: str | Path,
    out: str | Path,
    *,
    to: str = "mamba2",
    plan: str | Path | None = None,
    keep_attention: float | None = None,
    attention_layers: list[int] | None = None,
    mixer_settings: dict | None = None,
    dtype: str = "auto",
    seed: int = 0,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    revision: str | None = None,
    progress: bool = True,
    command: str | None = None,
    calibration: str | Path | None = None,
    calibration_tokens: int = 2048,
    select: str | None = None,
    select_align_steps: int | None = None,
    select_device: str | None = None,
    output_refit: bool = False,
) -> ConversionResult:
    """Convert ``teacher`` into a student whose replaced layers use mixer ``to``; see the module docstring.

    Args:
        teacher: local HF folder or hub id.
        out: output folder (must be absent or empty unless ``overwrite``).
        to: mixer kind for replaced layers (any registered kind, e.g. ``mamba2``).
        plan: a plan YAML file (per-layer kinds and settings, see :mod:`.plan_file`); replaces ``to``,
            ``keep_attention``, ``attention_layers`` and ``mixer_settings``.
        keep_attention / attention_layers: which layers keep attention (see ``select_attention_layers``).
        mixer_settings: tunable mixer settings, e.g. ``{"chunk_size": 128}``.
        dtype: ``auto`` keeps each tensor's stored dtype; else ``float32``, ``bfloat16``, ``float16``.
        seed: seeds the parts of the mixers that attention does not determine.
        max_shard_size: e.g. ``"5GB"``; larger outputs are sharded with an index.
        calibration: a text file, or ``"teacher"`` for text the teacher samples itself (seeded); the
            teacher runs over ``calibration_tokens`` tokens of it and each
            converter fits what attention does not determine to the teacher (see :mod:`.calibration`);
            per-layer output match before/after goes to ``mixerswap.yaml`` and the model card.
        output_refit: with calibration, each mixer's output projection is then refitted to the teacher's
            attention output (:func:`~.calibration.refit_output_projection`): a much closer start, but
            distillation at the default stage rates does not keep the gain (measured in
            ``benchmarks/RESULTS.md``), hence off by default.
        select: ``"kl"`` chooses the ``keep_attention`` layers by measurement on the calibration text
            (see :mod:`.layer_scores`) instead of spacing them evenly; scores and choice are recorded.
        select_align_steps: alignment steps of each mixer before it is scored (default
            ``layer_scores.SELECT_ALIGN_STEPS``; 0 scores the calibrated conversion as it is).
        select_device: where ``select`` scores (default: CUDA when available, else the CPU).
    """
    if plan is None and to not in registered_kinds():
        raise ValueError(f"unknown target mixer {to!r}; available: {', '.join(registered_kinds())}")
    if plan is not None and (keep_attention is not None or attention_layers is not None or mixer_settings):
        raise ValueError("--plan gives every layer's kind and settings; drop --keep-attention, --attention-layers "
                         "and --set")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if select is not None:
        if select != "kl":
            raise ValueError(f"unknown layer selection {select!r}; use --select kl")
        if calibration is None or keep_attention is None or plan is not None or attention_layers is not None:
            raise ValueError("--select kl measures which layers keep attention: give --calibration FILE and "
                             "--keep-attention FRACTION (not --plan or --attention-layers)")
    out = check_output(out, overwrite=overwrite)  # before a hub download; inputs are known after it
    model_dir = resolve_model_dir(teacher, revision)
    if calibration is not None and str(calibration) != TEACHER_SAMPLES:
        read_calibration_text(calibration)  # a missing or empty file fails before anything else runs
    inputs = (model_dir, plan, calibration if str(calibration) != TEACHER_SAMPLES else None)
    check_output(out, overwrite=overwrite, inputs=inputs)
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"no config.json in {model_dir}")
    teacher_config = AutoConfig.from_pretrained(model_dir)
    family = family_for(teacher_config.model_type)
    shards = [SafetensorsShard(p) for p in list_shards(model_dir)]  # parses and checks every header now
    names = {name for shard in shards for name in shard.entries}
    num_layers = teacher_config.num_hidden_layers
    if plan is not None:
        requested = read_plan_file(plan, num_layers)
    elif select is not None:
        from .layer_scores import score_layers

        aligned = {} if select_align_steps is None else {"align_steps": select_align_steps}
        selection = score_layers(model_dir, to=to, text=calibration, keep_attention=keep_attention,
                                 mixer_settings=mixer_settings, calibration_tokens=calibration_tokens, seed=seed,
                                 **aligned, device=select_device, progress=progress)
        requested = shorthand_plan(num_layers, to, selection.keep, mixer_settings)
    else:
        kept = select_attention_layers(num_layers, keep_attention=keep_attention, attention_layers=attention_layers)
        requested = shorthand_plan(num_layers, to, kept, mixer_settings)
    layer_plan, layer_names, requests = _complete_plan(requested, teacher_config, family, names)
    kept = [i for i, entry in enumerate(layer_plan) if entry["kind"] == ATTENTION]

    replaced = [i for i, entry in enumerate(layer_plan) if entry["kind"] != ATTENTION]
    stats: dict[int, LayerStats] = {}
    if calibration is not None and replaced:
        stats = collect_layer_stats(model_dir, replaced, calibration, tokens=calibration_tokens, seed=seed)
    if requests:
        _allocate(layer_plan, requests, teacher_config, family, shards, stats)

    target_dtype = DTYPES[dtype]
    kinds = sorted({entry["kind"] for entry in layer_plan} - {ATTENTION})
    provenance = {
        "teacher": str(teacher), "to": to if plan is None else "+".join(kinds) or ATTENTION,
        "plan_file": str(plan) if plan is not None else None, "keep_attention": keep_attention,
        "attention_layers": kept, "mixer_settings": dict(mixer_settings or {}), "dtype": dtype, "seed": seed,
        "mixerswap_version": __version__, "transformers_version": transformers.__version__,
        "teacher_fingerprint": teacher_fingerprint(shards, teacher_config.model_type),
    }
    if select is not None:
        provenance["selection"] = {"method": select, **selection.to_dict()}
    if stats:
        provenance["calibration"] = {"text": describe_calibration(calibration),
                                     "tokens": int(next(iter(stats.values())).inputs.shape[:2].numel()),
                                     "output_refit": output_refit, "layers": {}}
    plan = layer_plan
    config = MixerSwapConfig(teacher_config=teacher_config, plan=plan, conversion=provenance)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MixerSwapForCausalLM"]
    expected = expected_tensors(config)
    embed = next((s.entries[n] for s in shards for n in s.entries if n.endswith("embed_tokens.weight")), None)
    config.dtype = target_dtype or (embed.torch_dtype if embed else torch.float32)
    logger.info("converting %s (%s): %s", teacher, family.name, describe_plan(plan))

    owner = {name: idx for idx, group in layer_names.items() for name in group}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    dropped = []
    with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        writer = ShardedWriter(tmp, parse_size(max_shard_size))
        total = sum(e.end - e.begin for s in shards for e in s.entries.values())
        with progress_bar(total=total, unit="B", unit_scale=True, desc="convert", enabled=progress) as bar:
            for shard in shards:
                for name, entry in shard.entries.items():
                    bar.update(entry.end - entry.begin)
                    shard.check_finite(name)
                    if name in owner:
                        idx = owner[name]
                        pending.setdefault(idx, {})[name] = shard.read(name)
                        if len(pending[idx]) == len(layer_names[idx]):
                            report = _write_mixer(writer, family, teacher_config, plan, idx, pending.pop(idx),
                                                  seed, target_dtype, stats.get(idx), output_refit)
                            if report:
                                provenance["calibration"]["layers"][idx] = report
                    elif name not in expected:
                        dropped.append(name)
                    elif target_dtype is None or entry.torch_dtype == target_dtype or not entry.torch_dtype.is_floating_point:
                        writer.copy(shard, name)
                    else:
                        writer.add(name, shard.read(name).to(target_dtype))
        _check_written(writer, expected)
        written = writer.close()

        config.save_pretrained(tmp)
        write_remote_code(tmp)
        if any(entry["kind"] == MLA for entry in plan):
            provenance["kv_cache"] = kv_cache_report(plan, teacher_config, config.dtype)
            if calibration is not None:
                provenance["held_out"] = held_out_perplexity(model_dir, tmp, calibration,
                                                             calibration_tokens=calibration_tokens, seed=seed)
            log_report(provenance["kv_cache"], provenance.get("held_out"))
        if not any((model_dir / file).exists() for file in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            logger.warning("%s has no tokenizer files, so neither has the student: copy the teacher's tokenizer into "
                           "%s before distill, eval or generate", teacher, out)
        for file in COPIED_FILES:
            if (model_dir / file).exists():
                shutil.copy2(model_dir / file, tmp / file)
        (tmp / "mixerswap.yaml").write_text(yaml.safe_dump({**provenance, "command": command}, sort_keys=False))
        (tmp / "README.md").write_text(model_card(teacher, family.name, plan, provenance, command))
    if dropped:
        logger.warning("dropped %d teacher tensors the student does not use: %s", len(dropped), ", ".join(dropped[:5]))
    logger.info("wrote %s (%d shard(s), %.1f MB)", out, len(written), writer.total_bytes / 1e6)
    return ConversionResult(out, plan, kept, [p.name for p in written], writer.total_bytes, dropped)


def _complete_plan(requested: list[tuple[str, dict]], teacher_config, family, names: set[str]):
    """Each layer's full plan entry (the converter completes the user's settings from the teacher),
    for replaced layers the checkpoint names of the attention tensors their converter reads, and the
    plan-wide requests (the converter's ``plan_wide`` overrides) per layer that makes one."""
    plan, layer_names, requests = [], {}, {}
    for idx, (kind, overrides) in enumerate(requested):
        if kind == ATTENTION:
            plan.append({"kind": ATTENTION})
            continue
        try:
            converter = mixer_kind(kind).load_converter()
        except KeyError as err:
            raise PlanError(f"layer {idx}: {err.args[0]}") from None
        roles = attention_tensor_names(family, idx)
        present = {role for role, name in roles.items() if name in names}
        layout = AttentionLayout(AttentionShape.from_config(teacher_config), layer_idx=idx,
                                 qkv_bias=bool(present & {"q_bias", "qkv_bias"}), out_bias="o_bias" in present,
                                 qk_norm="q_norm" in present)
        try:
            settings = converter.settings(teacher_config, layout, overrides)
        except ValidationError as err:
            raise PlanError(f"layer {idx} ({kind}): {describe_validation_error(err)}") from None
        except ValueError as err:
            raise PlanError(f"layer {idx} ({kind}): {' '.join(str(err).split())}") from None
        plan.append({"kind": kind, **settings.model_dump()})
        layer_names[idx] = {roles[r] for r in present}
        request = {k: v for k, v in overrides.items() if k in converter.plan_wide}
        if request:
            requests[idx] = request
    return plan, layer_names, requests


def _allocate(plan: list[dict], requests: dict[int, dict], teacher_config, family, shards, stats) -> None:
    """Settle plan-wide requests (e.g. ``kv_budget``) in ``plan``: per kind, the converter profiles each
    layer that asked (its attention weights read alone, then dropped) and allocates their settings."""
    where = {name: shard for shard in shards for name in shard.entries}
    shape = AttentionShape.from_config(teacher_config)
    for kind in sorted({plan[idx]["kind"] for idx in requests}):
        layers = [idx for idx in requests if plan[idx]["kind"] == kind]
        request = requests[layers[0]]
        if any(requests[idx] != request for idx in layers):
            raise PlanError(f"{kind} layers ask for different {', '.join(sorted(request))}: one value covers "
                            "all the layers that ask")
        converter = mixer_kind(kind).load_converter()
        profiles = {}
        for idx in layers:
            settings = parse_layer(plan[idx], idx)[1]
            attn = read_attention(family, shape, idx, lambda name: where[name].read(name) if name in where else None)
            profiles[idx] = (settings, converter.profile(attn, settings, teacher_config, stats=stats.get(idx),
                                                                layer_idx=idx))
            del attn
        try:
            chosen = converter.allocate(profiles, teacher_config, request)
        except ValueError as err:
            raise PlanError(f"{kind}: {' '.join(str(err).split())}") from None
        changed = {}
        for idx, settings in chosen.items():
            before, plan[idx] = plan[idx], {"kind": kind, **settings.model_dump()}
            changed[idx] = {k: v for k, v in plan[idx].items() if before.get(k) != v}
        logger.info("%s %s: per layer %s", kind, request, changed)


def _write_mixer(writer, family, teacher_config, plan, idx, tensors, seed, dtype, stats, output_refit) -> dict | None:
    """Convert and write one layer's mixer; with calibration statistics, returns how well its output
    matches the teacher's attention output before and after calibration (and the output refit's report)."""
    attn = read_attention(family, AttentionShape.from_config(teacher_config), idx, tensors.get)
    kind, settings = parse_layer(plan[idx], idx)
    module = mixer_kind(kind).module
    converter = mixer_kind(kind).load_converter()
    state = converter.from_attention(attn, settings, teacher_config, stats=stats, seed=seed + idx)
    report = None
    if stats is not None:
        refit = None
        if output_refit and module.output_projection:
            mixer = _loaded_mixer(module, settings, teacher_config, idx, state)
            weight, refit = refit_output_projection(mixer, stats, capture=module.output_projection)
            name = f"{module.output_projection}.weight"
            state = {**state, name: weight.to(state[name].dtype)}
        report = {"before": _output_match(module, settings, teacher_config, idx, stats,
                                          converter.from_attention(attn, settings, teacher_config, seed=seed + idx)),
                  "after": _output_match(module, settings, teacher_config, idx, stats, state),
                  **({"output_refit": refit} if refit else {})}
    dtype = dtype or attn.q.dtype  # "auto": the dtype the teacher stores its attention weights in
    prefix = family.attention_prefix(idx)
    for name, tensor in state.items():
        keep = tensor.is_floating_point() and any(fnmatch(name, p) for p in module.fp32_parameters)
        writer.add(prefix + name, tensor.float() if keep else tensor.to(dtype) if tensor.is_floating_point() else tensor)
    return report


def _loaded_mixer(module, settings, teacher_config, idx, state: dict):
    mixer = module(settings, teacher_config.hidden_size, idx)
    mixer.load_state_dict(state)
    return mixer


def _output_match(module, settings, teacher_config, idx, stats: LayerStats, state: dict) -> dict:
    mixer = _loaded_mixer(module, settings, teacher_config, idx, state)
    return output_match(replay_mixer(mixer, stats), stats.outputs)


def expected_tensors(config: MixerSwapConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the student's stored tensors (tied weights excluded), from a meta-device model."""
    with torch.device("meta"):
        model = MixerSwapForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _check_written(writer: ShardedWriter, expected: dict[str, tuple[int, ...]]) -> None:
    shapes = writer.written_shapes()
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(f"the teacher checkpoint lacks {len(missing)} tensor(s) the student needs: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for name, shape in shapes.items():
        if expected.get(name) != shape:
            raise CheckpointError(f"tensor {name} has shape {shape}, the model expects {expected.get(name)}")


def model_card(teacher, family_name: str, plan: list[dict], provenance: dict, command: str | None) -> str:
    kinds = [entry["kind"] for entry in plan]
    replaced = sum(k != ATTENTION for k in kinds)
    lines = [
        "---", "library_name: transformers", "tags: [mixerswap, hybrid, " + provenance["to"] + "]", "---", "",
        f"# {provenance['to']} student of `{teacher}`", "",
        f"Converted by mixerswap {provenance['mixerswap_version']} from a {family_name} teacher: "
        f"{replaced} of {len(kinds)} attention layers replaced by `{provenance['to']}` mixers initialized "
        "from the attention weights; everything else is the teacher's.", "",
        f"- Plan: {describe_plan(plan)}",
        "- Settings: `mixerswap.yaml` in this folder" + (f"; command: `{command}`" if command else ""),
        "", "The replaced layers start from an attention-derived initialization and need distillation "
        "(`mixerswap distill`) before the model is useful.", "",
        "```python", "import mixerswap  # or pass trust_remote_code=True", "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('<this folder>')", "```", "",
        *calibration_table(provenance.get("calibration")),
        *report_lines(provenance.get("kv_cache"), provenance.get("held_out")),
        *selection_lines(provenance.get("selection")),
        f"<sub>python {platform.python_version()}, transformers {provenance['transformers_version']}</sub>", "",
    ]
    return "\n".join(lines)


def calibration_table(calibration: dict | None) -> list[str]:
    """Markdown lines: per replaced layer, its output vs the teacher attention output, before/after (and the
    output refit, when the conversion did one)."""
    if not calibration or not calibration.get("layers"):
        return []
    refit = bool(calibration.get("output_refit"))
    lines = [f"Calibration on `{calibration['text']}` ({calibration['tokens']} tokens): each mixer's output "
             "against the attention output it replaces (RMS ratio, cosine, relative error; 1, 1, 0 is exact)"
             + (", and the refit of its output projection (ridge chosen on held-out calibration rows, or kept as "
                "converted)." if refit else "."), "",
             "| layer | RMS ratio before | after | cosine before | after | rel. error before | after |"
             + (" output refit |" if refit else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if refit else "")]
    for idx, r in sorted(calibration["layers"].items()):
        b, a, fit = r["before"], r["after"], r.get("output_refit")
        cell = "" if not refit else " kept |" if not fit or fit["ridge"] is None else \
            " ridge {ridge:g}: held-out error {0} → {1} |".format(*fit["held_out_rel_error"], **fit)
        lines.append(f"| {idx} | {b['rms_ratio']} | {a['rms_ratio']} | {b['cosine']} | {a['cosine']} | "
                     f"{b['rel_error']} | {a['rel_error']} |{cell}")
    return [*lines, ""]


def selection_lines(selection: dict | None) -> list[str]:
    """Markdown lines: the measured layer scores and the kept set (``convert --select``)."""
    if not selection:
        return []
    from .layer_scores import LayerScore, Selection, selection_table

    fields = {k: v for k, v in selection.items() if k != "method"}
    fields["scores"] = [LayerScore(**s) for s in fields["scores"]]
    return [f"Layers keeping attention chosen by `--select {selection['method']}`:", "",
            selection_table(Selection(**fields)), ""]


def load_conversion_settings(folder: str | Path) -> dict:
    """The settings a student folder was converted with (its ``mixerswap.yaml``)."""
    path = Path(folder) / "mixerswap.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a folder written by mixerswap convert")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
