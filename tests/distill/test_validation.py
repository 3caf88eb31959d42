"""Held-out perplexity: the rows scored, in batches, equal one forward over the same rows."""

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerswap.demo import demo_text
from mixerswap.distill.data import PackedLoader
from mixerswap.distill.validation import EVAL_BATCH_ROWS, HeldOutNLL, eval_rows, perplexity


def _documents():
    return [d for d in demo_text().splitlines() if d.strip()]


def test_eval_rows_are_the_first_rows_in_batches(stories_dir):
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    docs = _documents()
    rows = 2 * EVAL_BATCH_ROWS + 3
    batches = eval_rows(docs, tokenizer, seq_len=32, max_rows=rows)
    assert [len(b["input_ids"]) for b in batches] == [EVAL_BATCH_ROWS, EVAL_BATCH_ROWS, 3]
    whole = next(iter(PackedLoader(docs, tokenizer, seq_len=32, batch_size=rows, shuffle=False)))
    for key in whole:
        assert torch.equal(torch.cat([b[key] for b in batches]), whole[key]), key
    # the default is the one batch of 8 rows the trainer always scored
    (default,) = eval_rows(docs, tokenizer, seq_len=32)
    assert torch.equal(default["input_ids"], whole["input_ids"][:8])
    assert eval_rows([], tokenizer, seq_len=32) is None


def test_perplexity_over_batches_equals_one_forward(stories_dir):
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float64).eval()
    docs = _documents()
    batches = eval_rows(docs, tokenizer, seq_len=32, max_rows=20)
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    run = lambda objective, batch: objective(batch)  # noqa: E731
    split = perplexity(run, HeldOutNLL(model), batches, "cpu")
    one = perplexity(run, HeldOutNLL(model), [whole], "cpu")
    assert math.isclose(split, one, rel_tol=1e-6), (split, one)  # NLL sums in fp32
    # more rows is a different measurement: the first 8 rows alone score differently
    assert not math.isclose(perplexity(run, HeldOutNLL(model), batches[:1], "cpu"), split, rel_tol=1e-3)
