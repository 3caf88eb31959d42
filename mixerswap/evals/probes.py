"""Long-context probes: passkey retrieval, needle in a haystack, multi-query associative recall.

- **Passkey** (Mohtashami & Jaggi, "Landmark Attention", 2023): a five-digit key hidden at a
  random depth in repeated filler sentences; the model must complete "The pass key is".
- **Needle in a haystack** (Kamradt, 2023): "The special magic number is N." inserted at chosen
  depths into real text (the bundled stories unless given), asked for at the end.
- **MQAR** (Arora et al., "Zoology", 2023): ``K`` key-value token pairs, then the ``K`` keys again
  in random order, each followed by its value; filler tokens between them set the length.
  Scored teacher-forced, as in Zoology: the argmax after each queried key must be its value.

Passkey and needle prompts are exactly ``length`` tokens long, built from separately tokenized
sentences, and answered by greedy ``generate`` through the model's cache; the first number in the
answer must equal the key. All generators are deterministic in ``(seed, length, sample)``.
Exact match hides partial retrieval (a student that answers "730" for the key "73042" has found
the needle and lost the copy), so they also report ``key_digits``: the mean share of the key's
digits the first number of the answer reproduces, in order from its first, before the first wrong one.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import asdict, dataclass

import torch

from ..generation import pad_token_id
from .lengths import check_lengths

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = [" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
                  " There and back again."]
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
NEEDLE = " The special magic number is {key}."
NEEDLE_QUESTION = " What is the special magic number? The special magic number is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEW_TOKENS = {"passkey": 10, "needle": 12}  # greedy tokens generated per answer: the key's digits and some slack


@dataclass(frozen=True)
class ProbeResult:
    """Accuracy of one probe at one length (and depth, for the needle); ``key_digits`` (passkey and
    needle): the mean share of the key's leading digits answered correctly (see the module docstring)."""

    probe: str
    length: int
    accuracy: float
    samples: int
    depth: float | None = None
    key_digits: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RetrievalSample:
    input_ids: list[int]  # exactly ``length`` tokens
    key: str
    depth: float


def _rng(kind: str, seed: int, length: int, index: int) -> random.Random:
    return random.Random(f"{kind}/{seed}/{length}/{index}")  # str seeds hash with SHA-512: stable across runs


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _assemble(tokenizer, length: int, intro: str, sentences: list[str], needle: str, question: str,
              depth: float) -> list[int]:
    """BOS + intro + haystack with ``needle`` at ``depth`` (snapped to a sentence start) + question."""
    head = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _encode(tokenizer, intro)
    needle_ids, question_ids = _encode(tokenizer, needle), _encode(tokenizer, question)
    budget = length - len(head) - len(needle_ids) - len(question_ids)
    if budget < 0:
        raise ValueError(f"length {length} is too short for this probe's prompt "
                         f"(needs at least {length - budget} tokens)")
    chunks = [_encode(tokenizer, s) for s in sentences]
    haystack, starts, i = [], [0], 0
    while len(haystack) < budget:
        haystack += chunks[i % len(chunks)]
        starts.append(len(haystack))
        i += 1
    haystack = haystack[:budget]
    starts = [s for s in starts if s < budget] + [budget]  # the truncated end is a place too (depth 1)
    cut = min(starts, key=lambda s: abs(s - depth * budget))
    return head + haystack[:cut] + needle_ids + haystack[cut:] + question_ids


def passkey_sample(tokenizer, length: int, *, seed: int = 0, index: int = 0) -> RetrievalSample:
    """One passkey prompt of exactly ``length`` tokens; key and depth drawn from ``(seed, length, index)``."""
    rng = _rng("passkey", seed, length, index)
    key, depth = str(rng.randint(10000, 99999)), rng.random()
    ids = _assemble(tokenizer, length, PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_NEEDLE.format(key=key),
                    PASSKEY_QUESTION, depth)
    return RetrievalSample(ids, key, depth)


def haystack_sentences(text: str) -> list[str]:
    sentences = [" " + s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
    if not sentences:
        raise ValueError("the haystack text is empty")
    return sentences


def needle_sample(tokenizer, length: int, depth: float, haystack: list[str], *, seed: int = 0,
                  index: int = 0) -> RetrievalSample:
    """One needle prompt of ``length`` tokens with the needle at ``depth`` (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be within [0, 1], got {depth}")
    rng = _rng(f"needle{depth}", seed, length, index)
    key = str(rng.randint(1000000, 9999999))
    offset = rng.randrange(len(haystack))  # each sample reads the haystack from a different sentence
    sentences = haystack[offset:] + haystack[:offset]
    ids = _assemble(tokenizer, length, "", sentences, NEEDLE.format(key=key), NEEDLE_QUESTION, depth)
    return RetrievalSample(ids, key, depth)


def first_number(answer: str) -> str:
    """The first run of digits in ``answer`` ("" if none): what the probes read as the model's answer."""
    found = re.search(r"\d+", answer)
    return found.group() if found else ""


def key_digits(answer: str, key: str) -> float:
    """Share of ``key``'s digits that the first number in ``answer`` reproduces, from the first digit up
    to the first wrong one: ``key_digits("is 730.", "73042") == 0.6``."""
    return len(os.path.commonprefix([first_number(answer), key])) / len(key)


@torch.inference_mode()
def _answer_accuracy(model, tokenizer, samples: list[RetrievalSample], batch_size: int,
                     new_tokens: int) -> tuple[float, float]:
    """``(exact, digits)``: the fraction of samples whose greedy continuation (cached decoding) has the key
    as its first number, and the mean :func:`key_digits`."""
    correct, digits = 0, 0.0
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        ids = torch.tensor([s.input_ids for s in batch], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_token_id(tokenizer))
        for sample, row in zip(batch, out[:, ids.shape[1] :].tolist()):
            answer = tokenizer.decode(row, skip_special_tokens=True)
            correct += first_number(answer) == sample.key
            digits += key_digits(answer, sample.key)
    return correct / len(samples), digits / len(samples)


def _need_tokenizer(tokenizer, probe: str) -> None:
    if tokenizer is None:
        raise ValueError(f"the {probe} probe needs a tokenizer, and the model folder has none")


def passkey_accuracy(model, tokenizer, lengths: list[int], *, samples: int = 5, seed: int = 0,
                     batch_size: int = 4) -> list[ProbeResult]:
    """Passkey accuracy per length."""
    _need_tokenizer(tokenizer, "passkey")
    check_lengths(model, lengths, extra=NEW_TOKENS["passkey"], what="passkey length")
    results = []
    for length in lengths:
        batch = [passkey_sample(tokenizer, length, seed=seed, index=i) for i in range(samples)]
        accuracy, digits = _answer_accuracy(model, tokenizer, batch, batch_size, NEW_TOKENS["passkey"])
        results.append(ProbeResult("passkey", length, accuracy, samples, key_digits=digits))
    return results


def needle_accuracy(model, tokenizer, lengths: list[int], *, haystack_text: str, depths=DEFAULT_DEPTHS,
                    samples: int = 1, seed: int = 0, batch_size: int = 4) -> list[ProbeResult]:
    """Needle accuracy per (length, depth); ``samples`` prompts per cell."""
    _need_tokenizer(tokenizer, "needle")
    check_lengths(model, lengths, extra=NEW_TOKENS["needle"], what="needle length")
    haystack = haystack_sentences(haystack_text)
    results = []
    for length in lengths:
        for depth in depths:
            batch = [needle_sample(tokenizer, length, depth, haystack, seed=seed, index=i) for i in range(samples)]
            accuracy, digits = _answer_accuracy(model, tokenizer, batch, batch_size, NEW_TOKENS["needle"])
            results.append(ProbeResult("needle", length, accuracy, samples, depth=depth, key_digits=digits))
    return results


@dataclass(frozen=True)
class MQARSpec:
    """Token layout of MQAR within a model's vocabulary.

    Ids below ``first_token`` (special tokens) are never used; ``first_token`` is the filler;
    keys and values come from two disjoint ranges above it, ``num_symbols`` ids each.
    """

    vocab_size: int
    num_pairs: int = 4
    first_token: int = 4
    max_symbols: int = 1024

    @property
    def num_symbols(self) -> int:
        return min(self.max_symbols, (self.vocab_size - self.first_token - 1) // 2)

    @property
    def filler(self) -> int:
        return self.first_token

    @property
    def first_key(self) -> int:
        return self.first_token + 1

    @property
    def first_value(self) -> int:
        return self.first_key + self.num_symbols

    def check(self, length: int) -> None:
        if self.num_symbols < self.num_pairs:
            raise ValueError(f"vocabulary of {self.vocab_size} is too small for {self.num_pairs} MQAR key-value pairs")
        if length < 4 * self.num_pairs:
            raise ValueError(f"MQAR length {length} is shorter than 4 x {self.num_pairs} pairs")


def mqar_batch(spec: MQARSpec, length: int, batch: int, *, seed: int = 0):
    """``(input_ids [B, L], query_positions [K], answers [B, K])``, deterministic in ``(seed, length)``.

    Layout: ``k1 v1 ... kK vK  filler...  q1 a1 ... qK aK``; the logits at ``query_positions``
    (the queried keys) must predict ``answers``.
    """
    spec.check(length)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    K, n = spec.num_pairs, spec.num_symbols
    keys = torch.stack([torch.randperm(n, generator=gen)[:K] for _ in range(batch)]) + spec.first_key
    values = torch.randint(0, n, (batch, K), generator=gen) + spec.first_value
    order = torch.stack([torch.randperm(K, generator=gen) for _ in range(batch)])
    ids = torch.full((batch, length), spec.filler, dtype=torch.long)
    ids[:, 0 : 2 * K : 2], ids[:, 1 : 2 * K : 2] = keys, values
    q0 = length - 2 * K
    ids[:, q0::2], ids[:, q0 + 1 :: 2] = keys.gather(1, order), values.gather(1, order)
    return ids, torch.arange(q0, length, 2), values.gather(1, order)


@torch.inference_mode()
def mqar_accuracy(model, lengths: list[int], *, spec: MQARSpec | None = None, samples: int = 64, seed: int = 0,
                  batch_size: int = 16) -> list[ProbeResult]:
    """MQAR accuracy per length: the share of queried keys whose value is the argmax prediction."""
    spec = spec or MQARSpec(vocab_size=model.config.vocab_size)
    check_lengths(model, lengths, what="MQAR length")
    results = []
    for length in lengths:
        ids, positions, answers = mqar_batch(spec, length, samples, seed=seed)
        correct = 0
        for start in range(0, samples, batch_size):
            chunk = ids[start : start + batch_size].to(model.device)
            logits = model(chunk, use_cache=False).logits[:, positions]
            correct += (logits.argmax(-1).cpu() == answers[start : start + batch_size]).sum().item()
        results.append(ProbeResult("mqar", length, correct / answers.numel(), answers.numel()))
    return results


def summarize(results: list[ProbeResult], measure: str = "accuracy") -> dict[tuple[str, int], float]:
    """Mean ``measure`` (``accuracy`` or ``key_digits``) per ``(probe, length)``, the needle's depths
    averaged, weighted by samples; results without the measure are left out."""
    sums: dict[tuple[str, int], list[float]] = {}
    for r in results:
        value = getattr(r, measure)
        if value is None:
            continue
        acc = sums.setdefault((r.probe, r.length), [0.0, 0.0])
        acc[0] += value * r.samples
        acc[1] += r.samples
    return {key: total / count for key, (total, count) in sums.items()}
