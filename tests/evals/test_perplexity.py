"""Sliding-window perplexity against naive computations, token accounting, bits per byte, bad inputs."""

import json
import math

import pytest
import torch

from mixerswap.evals.loading import load_model
from mixerswap.evals.perplexity import perplexity, read_documents, sequence_nll, windows
from mixerswap.evals.text_tasks import bundled_text

TEXT = bundled_text()[:700]


@pytest.mark.parametrize("num_tokens, context, stride", [(1, 8, 4), (2, 8, 4), (8, 8, 4), (9, 8, 7), (50, 8, 3),
                                                         (63, 16, 15), (100, 16, 1)])
def test_windows_score_every_token_once_with_enough_context(num_tokens, context, stride):
    targets = []
    for begin, first, end in windows(num_tokens, context, stride):
        assert end - begin <= context and begin <= first - 1 < end
        targets += range(first, end)
        if begin > 0:
            assert first - begin >= context - stride  # every scored token sees that much context
    assert targets == list(range(1, num_tokens))


def naive_nll(model, ids: torch.Tensor) -> float:
    """One forward over the whole sequence, summed in float64."""
    with torch.no_grad():
        logp = model(ids[None].to(model.device)).logits[0].double().log_softmax(-1).cpu()
    return -logp[:-1].gather(-1, ids[1:, None]).sum().item()


@pytest.fixture(scope="module")
def models(stories_dir, stories_student):
    return {"teacher": load_model(stories_dir), "student": load_model(stories_student)}


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_full_context_matches_naive_full_sequence(models, which):
    model, tokenizer = models[which]
    ids = torch.tensor([tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    result = perplexity(model, tokenizer, TEXT, context=len(ids) + 8)
    assert result.windows == 1 and result.tokens == len(ids) - 1
    reference = naive_nll(model, ids)
    assert result.nll == pytest.approx(reference, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(reference / (len(ids) - 1)), rel=1e-4)
    assert result.bytes == len(TEXT.encode()) and result.tokens_per_s > 0
    assert result.bits_per_byte == pytest.approx(reference / math.log(2) / len(TEXT.encode()), rel=1e-4)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_sliding_window_matches_a_naive_forward_per_window(models, which):
    model, tokenizer = models[which]
    ids = torch.tensor([tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    context, stride = 48, 20
    expected = 0.0
    for begin, first, end in windows(len(ids), context, stride):
        with torch.no_grad():
            logp = model(ids[None, begin:end].to(model.device)).logits[0].double().cpu().log_softmax(-1)
        positions = torch.arange(first, end)
        expected -= logp[positions - 1 - begin, ids[positions]].sum().item()
    nll, tokens, _ = sequence_nll(model, ids, context=context, stride=stride, batch_size=3)
    assert tokens == len(ids) - 1
    assert nll == pytest.approx(expected, rel=1e-4)
    if which == "teacher":  # a trained transformer does worse with less context than the full sequence
        assert nll > naive_nll(model, ids)


def test_jsonl_documents_are_scored_separately(models, tmp_path):
    model, tokenizer = models["teacher"]
    docs = [line for line in bundled_text().splitlines()[:3]]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    together = perplexity(model, tokenizer, read_documents(path), context=64, stride=32)
    parts = [perplexity(model, tokenizer, d, context=64, stride=32) for d in docs]
    assert together.documents == 3
    assert together.nll == pytest.approx(sum(p.nll for p in parts), rel=1e-9)
    assert together.tokens == sum(p.tokens for p in parts)
    assert together.bytes == sum(len(d.encode()) for d in docs)


def test_bad_inputs(models, tmp_path):
    model, tokenizer = models["teacher"]
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokenizer, TEXT, context=32, stride=32)
    with pytest.raises(ValueError, match="exceeds the model's limit of 512"):
        perplexity(model, tokenizer, TEXT, context=1024)
    with pytest.raises(FileNotFoundError, match="no such text file"):
        read_documents(tmp_path / "absent.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        read_documents(bad)
