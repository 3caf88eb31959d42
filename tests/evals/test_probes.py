"""Probe generators are deterministic and well formed; MQAR separates a solver from a non-solver."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerswap.evals.probes import (
    MQARSpec,
    haystack_sentences,
    key_digits,
    mqar_accuracy,
    mqar_batch,
    needle_sample,
    passkey_accuracy,
    passkey_sample,
)
from mixerswap.evals.text_tasks import bundled_text

from ..conftest import build_teacher


@pytest.fixture(scope="module")
def tokenizer(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.mark.parametrize("length", [160, 400])
def test_passkey_prompts_are_deterministic_and_exact(tokenizer, length):
    first = passkey_sample(tokenizer, length, seed=3, index=1)
    again = passkey_sample(tokenizer, length, seed=3, index=1)
    assert first == again
    assert len(first.input_ids) == length
    assert f"The pass key is {first.key}" in tokenizer.decode(first.input_ids)
    others = {passkey_sample(tokenizer, length, seed=s, index=1).key for s in range(4, 9)}
    assert others - {first.key}


def test_needle_prompts_place_the_needle_at_the_depth(tokenizer):
    haystack = haystack_sentences(bundled_text())
    start = needle_sample(tokenizer, 300, 0.0, haystack, seed=0)
    end = needle_sample(tokenizer, 300, 1.0, haystack, seed=0)
    assert start == needle_sample(tokenizer, 300, 0.0, haystack, seed=0)
    assert len(start.input_ids) == len(end.input_ids) == 300
    text_start, text_end = tokenizer.decode(start.input_ids), tokenizer.decode(end.input_ids)
    needle = "The special magic number is"
    assert text_start.index(needle) < 20 < len(text_end) - 120 < text_end.index(needle)
    with pytest.raises(ValueError, match="too short"):
        needle_sample(tokenizer, 10, 0.5, haystack)


def test_mqar_batches_are_deterministic_and_answerable():
    spec = MQARSpec(vocab_size=64, num_pairs=5)
    ids, positions, answers = mqar_batch(spec, 48, 8, seed=1)
    again = mqar_batch(spec, 48, 8, seed=1)
    assert torch.equal(ids, again[0]) and torch.equal(answers, again[2])
    assert not torch.equal(ids, mqar_batch(spec, 48, 8, seed=2)[0])
    for row, answer in zip(ids.tolist(), answers.tolist()):
        pairs = dict(zip(row[0:10:2], row[1:10:2]))
        assert len(pairs) == 5 and all(spec.first_key <= k < spec.first_value for k in pairs)
        assert [pairs[row[p]] for p in positions.tolist()] == answer
        assert [row[p + 1] for p in positions.tolist()] == answer
    with pytest.raises(ValueError, match="shorter than"):
        mqar_batch(spec, 12, 1)


def test_mqar_is_solved_by_an_induction_circuit_and_kept_by_an_all_attention_student(induction_dirs):
    teacher_dir, student_dir = induction_dirs
    spec = MQARSpec(vocab_size=32, num_pairs=6)
    lengths = [32, 128, 400]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    solved = mqar_accuracy(teacher, lengths, spec=spec, samples=32)
    assert [r.accuracy for r in solved] == [1.0] * len(lengths)
    assert mqar_accuracy(student, lengths, spec=spec, samples=32) == solved
    random_llama = build_teacher("llama")  # same probe, a model with no recall circuit
    chance = mqar_accuracy(random_llama, [32, 128], spec=MQARSpec(vocab_size=128, num_pairs=6), samples=32)
    assert all(r.accuracy < 0.5 for r in chance)


def test_passkey_of_an_all_attention_student_equals_its_teacher(stories_dir, tmp_path):
    from mixerswap.convert import convert

    convert(stories_dir, tmp_path / "student", keep_attention=1.0, progress=False)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    teacher = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    prompt = torch.tensor([passkey_sample(tok, 200).input_ids])
    continuations = [m.generate(prompt, max_new_tokens=8, do_sample=False) for m in (teacher, student)]
    assert torch.equal(*continuations)
    ours = passkey_accuracy(student, tok, [200, 320], samples=2)
    assert ours == passkey_accuracy(teacher, tok, [200, 320], samples=2)
    assert [(r.probe, r.length, r.samples) for r in ours] == [("passkey", 200, 2), ("passkey", 320, 2)]
    with pytest.raises(ValueError, match="exceeds the model's limit of 512"):
        passkey_accuracy(student, tok, [512], samples=1)


@pytest.mark.parametrize("answer, key, expected", [
    (" 73042. The", "73042", 1.0), (" is 730.", "73042", 0.6), (" 734", "73042", 0.4), (" 730421", "73042", 1.0), (" 83042", "73042", 0.0),
    (" the grass", "73042", 0.0), (" 7 then 73042", "73042", 0.2)])
def test_key_digits_counts_the_leading_digits_of_the_first_number(answer, key, expected):
    assert key_digits(answer, key) == pytest.approx(expected)


class _CopiesPartOfTheKey:
    """Answers every passkey prompt with the first ``digits`` digits of its key (greedy, as generate)."""

    device = torch.device("cpu")
    config = None

    def __init__(self, tokenizer, digits: int):
        self.tokenizer, self.digits = tokenizer, digits

    def generate(self, ids, **_):
        rows = []
        for row in ids.tolist():
            key = re.search(r"pass key is (\d+)", self.tokenizer.decode(row)).group(1)
            answer = self.tokenizer(f" {key[: self.digits]}. The grass", add_special_tokens=False)["input_ids"]
            rows.append(row + answer[:10] + [0] * (10 - len(answer[:10])))
        return torch.tensor(rows)


def test_passkey_reports_partial_retrieval_beside_exact_match(tokenizer, monkeypatch):
    """Exact match scores a key missing its last digits 0; ``key_digits`` shows how much was retrieved, and
    eval's probe table lists it under ``passkey key digits``."""
    from mixerswap.evals.evaluate import probe_table

    monkeypatch.setattr("mixerswap.evals.probes.check_lengths", lambda *a, **k: None)
    partial = passkey_accuracy(_CopiesPartOfTheKey(tokenizer, 3), tokenizer, [200], samples=4)
    whole = passkey_accuracy(_CopiesPartOfTheKey(tokenizer, 5), tokenizer, [200], samples=4)
    assert (partial[0].accuracy, partial[0].key_digits) == (0.0, pytest.approx(0.6))
    assert (whole[0].accuracy, whole[0].key_digits) == (1.0, 1.0)
    table = probe_table({"student": partial, "teacher": whole})
    assert "| passkey key digits | 200" in table and "0.6" in table
