"""A small teacher-vs-student table for ``mixerswap demo``: perplexity, MQAR, speed and cache, in seconds."""

from __future__ import annotations

import torch

from .lengths import position_limit
from .perplexity import perplexity, sequence_nll
from .probes import MQARSpec, mqar_accuracy
from .speed import bench
from .tables import format_table


def _held_out_perplexity(model, tokenizer, held_out: torch.Tensor | str, context: int) -> float:
    if isinstance(held_out, str):
        return perplexity(model, tokenizer, held_out, context=context).perplexity
    ids = held_out.flatten().long()
    if len(ids) < 2:
        raise ValueError("held-out text is shorter than two tokens")
    context = max(2, min(context, len(ids)))
    nll, tokens, _ = sequence_nll(model, ids, context=context, stride=max(1, context // 2))
    return float(torch.tensor(nll / tokens).exp())


def demo_eval_report(teacher, student, tokenizer, held_out: torch.Tensor | str | None, *,
                     contexts: tuple[int, ...] = (64, 192), decode_tokens: int = 8,
                     mqar_lengths: tuple[int, ...] = (32, 64), seed: int = 0) -> str:
    """Markdown table comparing ``student`` with ``teacher`` (model objects on one device).

    Args:
        held_out: token ids ``[T]`` or text, scored with a sliding window (context: the model's limit, at most
            256); ``None`` leaves perplexity out (when the caller reports it already).
        contexts: bench context lengths (batch 1), clipped to the model's limit; speeds are medians of 3 repeats.
    """
    limit = position_limit(teacher) or 256
    contexts = [c for c in contexts if c + decode_tokens <= limit] or [max(2, limit - decode_tokens)]
    ppl_context = min(limit, 256)
    spec = MQARSpec(vocab_size=teacher.config.vocab_size, num_pairs=4)
    lengths = [n for n in mqar_lengths if n <= limit]
    models = {"teacher": teacher, "student": student}
    report = bench(models, contexts=contexts, batches=[1], decode_tokens=decode_tokens, reference="teacher",
                   repeats=3, seed=seed)
    values: dict[str, dict[str, float | None]] = {}
    for name, model in models.items():
        column = {}
        if held_out is not None:
            column["held-out perplexity"] = _held_out_perplexity(model, tokenizer, held_out, ppl_context)
        for result in mqar_accuracy(model, lengths, spec=spec, samples=32, seed=seed):
            column[f"MQAR accuracy @ {result.length} ({spec.num_pairs} pairs)"] = result.accuracy
        for context in contexts:
            run = report.run(name, 1, context)
            column[f"prefill tokens/s @ {context}"] = run.prefill_tokens_per_s
            column[f"decode tokens/s @ {context}"] = run.decode_tokens_per_s
            cache_kib = None if run.cache_bytes is None else run.cache_bytes / 1024
            column[f"cache KiB @ {context}+{decode_tokens}"] = cache_kib
        values[name] = column
    rows = []
    for measure in values["teacher"]:
        t, s = values["teacher"][measure], values["student"][measure]
        rows.append([measure, t, s, s / t if t and s is not None else None])
    table = format_table(["measure", "teacher", "student", "student / teacher"], rows)
    return "\n".join([table, *report.notes()])
