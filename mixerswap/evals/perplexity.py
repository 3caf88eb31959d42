"""Perplexity and bits per byte of a text file, with a sliding window.

Each token is scored exactly once. The first window scores all of its tokens; every later
window ends ``stride`` tokens further on, is ``context`` tokens long, and scores only its last
``stride`` tokens, so each of them sees at least ``context - stride`` tokens before it (the
Hugging Face "perplexity of fixed-length models" recipe). ``context >= len(text)`` is a plain
full-sequence forward. Documents (lines of a jsonl file) are scored separately, each starting
from BOS when the tokenizer has one, so every byte of the text is predicted and

    perplexity    = exp(total NLL / scored tokens)
    bits_per_byte = total NLL / (ln 2 * UTF-8 bytes of the scored text)

Windows of equal length are batched; logits are kept only where they are scored.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..text_files import data_file_kind, not_utf8
from .lengths import check_lengths


@dataclass(frozen=True)
class PerplexityResult:
    """Totals over all documents. ``tokens``: scored tokens; ``bytes``: UTF-8 bytes of the text."""

    perplexity: float
    bits_per_byte: float
    nll: float
    tokens: int
    bytes: int
    documents: int
    windows: int
    context: int
    stride: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_documents(path: str | Path) -> list[str]:
    """A JSON lines file gives one document per line (its ``text`` field); a plain text file is one document.
    Which of the two a file is follows from its content, as for ``distill --data``
    (:func:`mixerswap.text_files.data_file_kind`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    kind = data_file_kind(path)
    if kind == "parquet":
        raise ValueError(f"{path} is a parquet file; --perplexity reads plain text or JSON lines with a 'text' field")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None
    if kind == "text":
        return [text]
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{number}: expected a JSON object with a string 'text' field")
        docs.append(row["text"])
    if not docs:
        raise ValueError(f"{path} has no documents")
    return docs


def windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, first_target, end)`` per window: input ``ids[begin:end]`` scores ``ids[first_target:end]``."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 0 < stride < context:
        raise ValueError(f"stride must be in [1, context - 1] = [1, {context - 1}], got {stride} (each window scores "
                         f"tokens its own earlier positions predict: --ppl-stride {context - 1} gives windows that "
                         "do not overlap)")
    spans, target = [], 1
    end = min(context, num_tokens)
    while target < num_tokens:
        spans.append((max(0, end - context), target, end))
        target, end = end, min(end + stride, num_tokens)
    return spans


@torch.inference_mode()
def sequence_nll(model, ids: torch.Tensor, *, context: int, stride: int, batch_size: int = 1) -> tuple[float, int, int]:
    """Summed NLL (nats, float64) of ``ids[1:]`` given the windows; returns ``(nll, tokens, windows)``.

    Args:
        ids: ``[T]`` token ids of one document (BOS included if wanted).
    """
    spans = windows(len(ids), context, stride)
    total = torch.zeros((), dtype=torch.float64)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:  # batch windows of the same input length
        groups.setdefault(span[2] - span[0], []).append(span)
    for length, group in groups.items():
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            inputs = torch.stack([ids[b:e] for b, _, e in batch]).to(model.device)
            keep = max(e - t for _, t, e in batch) + 1  # logits at [t-1, e-1) predict ids[t:e]
            logits = model(inputs, use_cache=False, logits_to_keep=keep).logits
            for row, (_, t, e) in enumerate(batch):
                scored = logits[row, keep - 1 - (e - t) : keep - 1].float().log_softmax(-1)
                targets = ids[t:e].to(scored.device)
                total -= scored.gather(-1, targets[:, None]).sum().double().cpu()
    return total.item(), len(ids) - 1, len(spans)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def perplexity(model, tokenizer, documents: str | list[str], *, context: int | None = None,
               stride: int | None = None, batch_size: int = 1) -> PerplexityResult:
    """Perplexity and bits per byte of ``documents`` (see the module docstring).

    ``context`` defaults to the model's ``max_position_embeddings`` (capped at 4096) and ``stride``
    to half of it.
    """
    docs = [documents] if isinstance(documents, str) else list(documents)
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    context = context or min(limit, 4096)
    stride = stride or max(1, context // 2)
    check_lengths(model, [context], what="perplexity context")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    nll = tokens = num_bytes = num_windows = 0
    _synchronize(model.device)
    started = time.perf_counter()
    for doc in docs:
        ids = torch.tensor(bos + tokenizer(doc, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if len(ids) < 2:
            continue
        doc_nll, doc_tokens, doc_windows = sequence_nll(model, ids, context=context, stride=stride,
                                                        batch_size=batch_size)
        nll, tokens, num_windows = nll + doc_nll, tokens + doc_tokens, num_windows + doc_windows
        num_bytes += len((doc if bos else tokenizer.decode(ids[1:])).encode("utf-8"))
    _synchronize(model.device)
    seconds = time.perf_counter() - started
    if tokens == 0:
        raise ValueError("the text has fewer than two tokens; nothing to score")
    return PerplexityResult(
        perplexity=math.exp(nll / tokens), bits_per_byte=nll / (math.log(2) * max(num_bytes, 1)), nll=nll,
        tokens=tokens, bytes=num_bytes, documents=len(docs), windows=num_windows, context=context, stride=stride,
        seconds=seconds, tokens_per_s=tokens / seconds if seconds > 0 else float("inf"),
    )
