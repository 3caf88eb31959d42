"""``export``: student folder → a stock ``transformers`` architecture that loads with no custom code.

Serving engines (vLLM, SGLang) load architectures they know; a student is the teacher's class with
mixers swapped in, which only ``trust_remote_code`` loads. Each module here writes students of some
kinds as one stock class (:data:`FORMATS`); the format is chosen from the student's mixer kinds, or
given. A format that cannot express some part of the student exactly names it, and the export is
refused in one line unless ``allow_approximate`` asks for the closest format anyway.

Streaming and atomic like ``convert``: the student's shards are read one at a time, tensors that keep
their bytes are copied as byte ranges, each layer is rebuilt once all of its tensors have been read,
and everything goes to a temporary folder renamed into place at the end (output locked; an ``out``
that is or holds the student is refused). After writing, both models are loaded on CPU in fp32 and
their logits compared on a fixed input: the maximum difference goes to the model card and the result.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from .. import __version__
from ..architectures import ATTENTION, MixerSwapConfig, describe_plan
from ..convert.checkpoint_io import (
    CheckpointError,
    SafetensorsShard,
    ShardedWriter,
    atomic_output_dir,
    check_output,
    list_shards,
    parse_size,
)
from ..convert.pipeline import COPIED_FILES
from ..progress import progress_bar
from .base import ExportError, Issue, StockFormat
from .deepseek_v3 import DeepseekV3Format
from .granitemoehybrid import GraniteMoeHybridFormat

logger = logging.getLogger(__name__)

FORMATS: dict[str, type[StockFormat]] = {f.name: f for f in (DeepseekV3Format, GraniteMoeHybridFormat)}
# Kinds no stock architecture of transformers 5.17 has, and why (the refusal's reason).
UNEXPRESSED = {
    "gdn": "a gated delta rule with biased output gate and write strength (g_proj.bias, b_proj.bias): the gated "
           "delta layers of qwen3_next and olmo_hybrid have no such biases, and their attention layers are not "
           "Llama's (qwen3_next: output-gated with q/k norms; olmo_hybrid: post-norm)",
    "swa": "a sliding window with attention sinks in a model whose other layers are the teacher's",
    "gla": "gated linear attention",
    "linear": "LoLCATs-style linear attention (feature maps)",
}
VERIFY_SHAPE = (2, 24)  # the fixed input the written model is checked on: batch x tokens
EXACT_TOLERANCE = 1e-3  # an export whose format claims exactness but misses by more than this is a bug


@dataclass
class ExportResult:
    out: Path
    format: str
    exact: bool
    max_logit_diff: float | None
    issues: list[str] = field(default_factory=list)


def student_config(student_dir: Path) -> MixerSwapConfig:
    """The student's config, or a clear error for a folder that is not a mixerswap student."""
    path = Path(student_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {student_dir}")
    if json.loads(path.read_text()).get("model_type") != MixerSwapConfig.model_type:
        raise ExportError(f"{student_dir} is not a mixerswap student (model_type is not 'mixerswap'); it may "
                          "already be a stock architecture")
    return MixerSwapConfig.from_pretrained(student_dir)


def choose_format(config: MixerSwapConfig, names: set[str], format: str | None = None,
                  allow_approximate: bool = False) -> tuple[StockFormat, list[Issue]]:
    """The format a student is written in and what it cannot express (empty: exact); see the module docstring."""
    kinds = config.layer_kinds()
    replaced = [(i, k) for i, k in enumerate(kinds) if k != ATTENTION]
    if format is not None and format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; available: {', '.join(FORMATS)}")
    if format is None:
        if not replaced:
            raise ExportError("the student replaces no attention layer: it is its teacher's architecture; load the "
                              "teacher, or pass --format to write it as another one")
        fitting = [f for f in FORMATS.values() if {k for _, k in replaced} <= f.kinds]
        if not fitting:
            i, kind = next((i, k) for i, k in replaced if not any(k in f.kinds for f in FORMATS.values()))
            closest = "; ".join(f"--format {f.name} --allow-approximate writes {f.summary}" for f in FORMATS.values())
            why = UNEXPRESSED.get(kind, f"the {kind} mixer")
            if kind in {k for f in FORMATS.values() for k in f.kinds}:
                why = f"mixed with {', '.join(sorted({k for _, k in replaced} - {kind}))} layers"
            raise ExportError(f"layer {i} is {kind} ({why}): no stock architecture in transformers "
                              f"{transformers.__version__} expresses it exactly; closest: none for {kind} ({closest})")
        format = fitting[0].name
    chosen = FORMATS[format](config, names)
    issues = chosen.issues()
    if issues and not allow_approximate:
        fixed = [i for i in issues if not i.approximable]
        hint = "" if fixed else f"; --format {format} --allow-approximate writes it anyway and reports the error"
        raise ExportError(f"{format} cannot express this student exactly: {(fixed or issues)[0].message}{hint}")
    if any(not i.approximable for i in issues):
        raise ExportError(f"{format} cannot express this student, even approximately: "
                          f"{next(i for i in issues if not i.approximable).message}")
    return chosen, issues


def export_student(
    student_dir: str | Path,
    out: str | Path,
    *,
    format: str | None = None,
    allow_approximate: bool = False,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    verify: bool = True,
    progress: bool = True,
    command: str | None = None,
) -> ExportResult:
    """Write the student at ``student_dir`` as a stock architecture in ``out``; see the module docstring.

    Args:
        format: a key of :data:`FORMATS`; ``None`` picks the one for the student's mixer kinds.
        allow_approximate: write the format even where it cannot express the student exactly (the
            measured error is reported); parts no format can approximate are still refused.
        verify: load both models after writing and measure the logit difference (fp32, CPU).
    """
    student_dir = Path(student_dir)
    out = check_output(out, overwrite=overwrite, inputs=(student_dir,))
    config = student_config(student_dir)
    shards = [SafetensorsShard(p) for p in list_shards(student_dir)]
    names = {n for s in shards for n in s.entries}
    stock, issues = choose_format(config, names, format, allow_approximate)
    stock_config = stock.stock_config()
    routes = {n: stock.route(n) for n in sorted(names)}
    unknown = [n for n, (action, _) in routes.items() if action == "unknown"]
    if unknown:
        raise ExportError(f"{stock.name} has no place for the student's tensor {unknown[0]}"
                          f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}")
    groups: dict[str, set[str]] = {}
    for n, (action, key) in routes.items():
        if action == "group":
            groups.setdefault(key, set()).add(n)
    logger.info("exporting %s (%s) as %s%s", student_dir, describe_plan(config.plan), stock.architecture,
                "" if not issues else " (approximate)")

    pending: dict[str, dict[str, torch.Tensor]] = {}
    with atomic_output_dir(out, overwrite=overwrite, inputs=(student_dir,)) as tmp:
        writer = ShardedWriter(tmp, parse_size(max_shard_size))
        total = sum(e.end - e.begin for s in shards for e in s.entries.values())
        with progress_bar(total=total, unit="B", unit_scale=True, desc="export", enabled=progress) as bar:
            for shard in shards:
                for name, entry in shard.entries.items():
                    bar.update(entry.end - entry.begin)
                    action, target = routes[name]
                    if action == "copy":
                        writer.copy(shard, name, target)
                    elif action == "group":
                        pending.setdefault(target, {})[name] = shard.read(name)
                        if len(pending[target]) == len(groups[target]):
                            for new_name, tensor in stock.build(target, pending.pop(target)).items():
                                writer.add(new_name, tensor)
        writer.close()
        stock_config.architectures = [stock.architecture]
        stock_config.dtype = config.dtype
        stock_config.save_pretrained(tmp)
        for file in COPIED_FILES:
            if (student_dir / file).exists():
                shutil.copy2(student_dir / file, tmp / file)
        diff = logit_difference(student_dir, tmp) if verify else None
        exact = not issues
        if exact and diff is not None and diff > EXACT_TOLERANCE:
            raise CheckpointError(f"the {stock.name} export should reproduce the student but its logits differ by "
                                  f"{diff:.3g}; nothing was written (please report this)")
        (tmp / "README.md").write_text(model_card(student_dir, config, stock, issues, diff, command))
    if issues:
        logger.warning("approximate export: %s; max |logit difference| %s", "; ".join(i.message for i in issues),
                       "not measured" if diff is None else f"{diff:.3g}")
    return ExportResult(out, stock.name, exact, diff, [i.message for i in issues])


@torch.no_grad()
def logit_difference(student_dir: Path, exported_dir: Path) -> float:
    """Max |logit difference| of the two models on :data:`VERIFY_SHAPE` fixed token ids, fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, student.config.vocab_size, VERIFY_SHAPE, generator=torch.Generator().manual_seed(0))
    reference = student(ids, use_cache=False).logits
    del student
    exported = AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.float32).eval()
    return (exported(ids, use_cache=False).logits - reference).abs().max().item()


def model_card(student_dir: Path, config: MixerSwapConfig, stock: StockFormat, issues: list[Issue],
               diff: float | None, command: str | None) -> str:
    teacher = (config.conversion or {}).get("teacher", "unknown")
    measured = ("not measured" if diff is None else
                f"max |logit difference| vs the student {diff:.3g} (fp32, CPU, {VERIFY_SHAPE[0]} x {VERIFY_SHAPE[1]} "
                "fixed token ids)")
    lines = [
        "---", "library_name: transformers", f"tags: [mixerswap, {stock.name}]", "---", "",
        f"# `{student_dir.name}` as {stock.architecture}", "",
        f"Exported by mixerswap {__version__} from the student `{student_dir}` (teacher `{teacher}`; plan: "
        f"{describe_plan(config.plan)}) to the stock `{stock.architecture}` of transformers "
        f"{transformers.__version__}: it loads with `AutoModelForCausalLM.from_pretrained` and no remote code.", "",
        f"- Exactness: {'exact' if not issues else 'APPROXIMATE'}; {measured}.",
        *[f"- Not expressed: {i.message}." for i in issues],
        *[f"- {note}" for note in stock.notes()],
        *([f"- Command: `{command}`"] if command else []), "",
        "```python", "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('<this folder>')", "```", "",
        f"<sub>python {platform.python_version()}, torch {torch.__version__}</sub>", "",
    ]
    return "\n".join(lines)


__all__ = ["FORMATS", "ExportError", "ExportResult", "choose_format", "export_student"]
