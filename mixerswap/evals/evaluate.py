"""``mixerswap eval``: lm-eval tasks, perplexity and long-context probes for a model and, side by side, a reference.

Every input is checked (tasks exist, files exist, lengths fit the models) before the long work
starts. Models are loaded one at a time. Written to ``out``:

- ``results.json``: ``models`` (label → path, role, plan), ``lm_eval`` (label → lm-eval's result
  dict), ``perplexity`` (label → :class:`~mixerswap.evals.perplexity.PerplexityResult` fields),
  ``probes`` (label → list of :class:`~mixerswap.evals.probes.ProbeResult` fields), ``options``.
- ``summary.md``: the tables printed on the terminal.
- ``probes.png``: accuracy per length, when a probe ran.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..convert.checkpoint_io import check_output, write_whole
from ..convert.gguf import hf_model_path
from .harness import lm_eval_table, resolve_tasks, run_lm_eval
from .lengths import check_lengths, position_limit
from .loading import load_config, load_model, model_labels
from .perplexity import perplexity, read_documents
from .plots import plot_probes
from .probes import DEFAULT_DEPTHS, NEW_TOKENS, MQARSpec, mqar_accuracy, needle_accuracy, passkey_accuracy, summarize
from .tables import delta, format_table
from .text_tasks import bundled_text

DEFAULT_MQAR_LENGTHS = (64, 256, 1024)


class EvalOptions(BaseModel):
    """What to evaluate. ``mixerswap eval`` options set the fields of the same name (``--samples`` sets
    ``probe_samples``); ``bootstrap_iters`` is for Python callers."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(default_factory=list, description="lm-eval task names or task folders")
    include_path: list[Path] = Field(default_factory=list, description="extra lm-eval task folders")
    batch_size: int = Field(8, ge=1)
    limit: float | None = Field(None, gt=0, description="lm-eval documents per task (or a fraction)")
    num_fewshot: int | None = Field(None, ge=0)
    bootstrap_iters: int = Field(100000, ge=0, description="lm-eval's bootstrap for stderr of non-mean metrics")
    perplexity: Path | None = Field(None, description="text file, or jsonl with a 'text' field per line")
    ppl_context: int | None = Field(None, ge=2)
    ppl_stride: int | None = Field(None, ge=1)
    passkey: list[int] = Field(default_factory=list, description="passkey lengths in tokens")
    needle: list[int] = Field(default_factory=list, description="needle-in-a-haystack lengths in tokens")
    needle_depths: list[float] = Field(default_factory=lambda: list(DEFAULT_DEPTHS))
    haystack: Path | None = Field(None, description="haystack text for the needle (default: bundled stories)")
    mqar: bool = False
    mqar_lengths: list[int] | None = Field(None, description="default: 64, 256, 1024 within the model's limit")
    mqar_pairs: int = Field(8, ge=1)
    probe_samples: int = Field(5, ge=1, description="prompts per passkey length / needle cell; MQAR uses 64")
    seed: int = Field(0, description="seeds the probes; lm-eval keeps its own default seeds")
    dtype: str = "auto"
    device: str | None = None


@dataclass
class EvalReport:
    out: Path
    results: dict
    tables: dict[str, str] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)

    def text(self) -> str:
        return "\n\n".join(f"{title}\n{table}" for title, table in self.tables.items())


def _mqar_lengths(model, options: EvalOptions) -> list[int]:
    if options.mqar_lengths:
        return options.mqar_lengths
    limit = position_limit(model) or max(DEFAULT_MQAR_LENGTHS)
    lengths = [n for n in DEFAULT_MQAR_LENGTHS if n <= limit]
    return lengths or [limit]


def _check_model(path: str, options: EvalOptions, label: str) -> None:
    """Everything about one model that can fail, from its config and tokenizer files, before any long run."""
    from transformers import AutoTokenizer

    config = load_config(path)
    if options.tasks or options.perplexity or options.passkey or options.needle:
        try:
            AutoTokenizer.from_pretrained(hf_model_path(path))
        except (OSError, ValueError, TypeError):
            raise ValueError(f"{label} has no tokenizer files; lm-eval tasks, perplexity, passkey and needle "
                             "need one") from None
    if options.passkey:
        check_lengths(config, options.passkey, extra=NEW_TOKENS["passkey"], what="passkey length")
    if options.needle:
        check_lengths(config, options.needle, extra=NEW_TOKENS["needle"], what="needle length")
    if options.mqar:
        lengths = _mqar_lengths(config, options)
        check_lengths(config, lengths, what="MQAR length")
        for length in lengths:
            MQARSpec(vocab_size=config.vocab_size, num_pairs=options.mqar_pairs).check(length)
    if options.ppl_context:
        check_lengths(config, [options.ppl_context], what="perplexity context")


def evaluate(model_path: str | Path, options: EvalOptions, *, vs: str | Path | None = None,
             out: str | Path = "eval-results", echo=print, progress: bool = True) -> EvalReport:
    """Run what ``options`` asks for on ``model_path`` and on ``vs``; write results (see module docstring).
    ``progress``: lm-eval's progress bars."""
    if not (options.tasks or options.perplexity or options.passkey or options.needle or options.mqar):
        raise ValueError("nothing to evaluate: give --tasks, --perplexity, --passkey, --needle or --mqar")
    # results go beside the inputs, never over them (the models, the text, task folders)
    check_output(out, overwrite=True, inputs=(model_path, vs, options.perplexity, options.haystack,
                                              *options.tasks, *options.include_path))
    selection = resolve_tasks(options.tasks, options.include_path) if options.tasks else None
    documents = read_documents(options.perplexity) if options.perplexity else None
    if options.haystack and not options.haystack.is_file():
        raise FileNotFoundError(f"no such haystack file: {options.haystack}")
    haystack = options.haystack.read_text(encoding="utf-8") if options.haystack else bundled_text()

    labels = model_labels(model_path, vs)
    for label, (path, _) in labels.items():
        _check_model(path, options, label)
    results = {"mixerswap_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "options": json.loads(options.model_dump_json()), "models": {}, "lm_eval": {}, "perplexity": {},
               "probes": {}}
    probe_rows = {}
    for label, (path, role) in labels.items():
        model, tokenizer = load_model(path, dtype=options.dtype, device=options.device)
        config = model.config
        results["models"][label] = {"path": path, "role": role,
                                    "plan": config.layer_kinds() if hasattr(config, "layer_kinds") else None}
        if selection:
            echo(f"{label}: lm-eval {', '.join(selection.names)}")
            results["lm_eval"][label] = run_lm_eval(
                model, tokenizer, selection, batch_size=options.batch_size, limit=options.limit,
                num_fewshot=options.num_fewshot, bootstrap_iters=options.bootstrap_iters, progress=progress)
        if documents is not None:
            echo(f"{label}: perplexity of {options.perplexity}")
            results["perplexity"][label] = perplexity(
                model, tokenizer, documents, context=options.ppl_context, stride=options.ppl_stride,
                batch_size=options.batch_size).to_dict()
        rows = []
        if options.passkey:
            echo(f"{label}: passkey")
            rows += passkey_accuracy(model, tokenizer, options.passkey, samples=options.probe_samples,
                                     seed=options.seed, batch_size=options.batch_size)
        if options.needle:
            echo(f"{label}: needle in a haystack")
            rows += needle_accuracy(model, tokenizer, options.needle, haystack_text=haystack,
                                    depths=options.needle_depths, samples=options.probe_samples, seed=options.seed,
                                    batch_size=options.batch_size)
        if options.mqar:
            echo(f"{label}: MQAR")
            spec = MQARSpec(vocab_size=config.vocab_size, num_pairs=options.mqar_pairs)
            rows += mqar_accuracy(model, _mqar_lengths(model, options), spec=spec, seed=options.seed,
                                  batch_size=options.batch_size)
        if rows:
            probe_rows[label] = rows
            results["probes"][label] = [r.to_dict() for r in rows]
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    report = EvalReport(Path(out), results)
    if results["lm_eval"]:
        report.tables["lm-eval"] = lm_eval_table(results["lm_eval"])
    if results["perplexity"]:
        report.tables["perplexity"] = perplexity_table(results["perplexity"])
    if probe_rows:
        report.tables["probes (accuracy)"] = probe_table(probe_rows)
    report.out.mkdir(parents=True, exist_ok=True)
    if probe_rows:
        report.plots.append(plot_probes(probe_rows, report.out / "probes.png"))
    write_whole(report.out / "results.json", json.dumps(results, indent=1))
    write_whole(report.out / "summary.md", report.text() + "\n")
    return report


def perplexity_table(by_model: dict[str, dict]) -> str:
    labels = list(by_model)
    rows = []
    for key in ("perplexity", "bits_per_byte", "tokens_per_s", "tokens"):
        values = [by_model[label][key] for label in labels]
        rows.append([key, *values] + ([delta(*values)] if len(labels) == 2 else []))
    return format_table(["measure", *labels] + (["delta"] if len(labels) == 2 else []), rows)


def probe_table(by_model: dict[str, list]) -> str:
    """One row per (probe, length), then per (probe, length) of the passkey and needle the share of the
    key's digits retrieved (``key digits``); needle depths averaged."""
    labels = list(by_model)
    rows = []
    for measure, suffix in (("accuracy", ""), ("key_digits", " key digits")):
        means = {label: summarize(results, measure) for label, results in by_model.items()}
        for probe, length in sorted({k for m in means.values() for k in m}):
            values = [means[label].get((probe, length)) for label in labels]
            rows.append([probe + suffix, length, *values] + ([delta(*values)] if len(labels) == 2 else []))
    return format_table(["probe", "length", *labels] + (["delta"] if len(labels) == 2 else []), rows)
