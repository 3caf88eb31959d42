"""Distillation data: every format reads the same documents, packing keeps every token once with
positions restarting at document starts, shuffling is seeded, budgets hold, resuming is exact,
and bad inputs fail early with a message that names the problem."""

import json
import math
import sys
from collections import Counter
from itertools import islice

import pytest
import torch
import transformers as T

from mixerswap.demo import build_tokenizer, demo_text
from mixerswap.distill.data import (
    Chat,
    Documents,
    PackedLoader,
    PromptResponse,
    chat_template_spans,
    check_seq_len,
    check_vocab,
    held_out_split,
    make_loader,
    read_documents,
)

SENTENCES = [s.strip() + "." for line in demo_text().splitlines() for s in line.split(".") if s.strip()]


def make_docs(n: int = 30) -> list[str]:
    """Documents of 1 to 5 sentences, one spanning several lines, one long enough for several rows."""
    docs, at = [], 0
    for i in range(n):
        k = 1 + i % 5
        docs.append(" ".join(SENTENCES[(at + j) % len(SENTENCES)] for j in range(k)))
        at += k
    docs[3] = "A first line.\nA second line of the same document."
    docs[7] = " ".join(SENTENCES[:12])
    docs[9] = "Hi"
    return docs


DOCS = make_docs()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(demo_text())


def stream_of(docs, tokenizer) -> list[int]:
    """The token stream a loader packs: [BOS] + tokens + [EOS] per document, in order."""
    out = []
    for doc in docs:
        out += [tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return out


def flat(batches, key="input_ids") -> list[int]:
    return [t for b in batches for row in b[key].tolist() for t in row]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def write_txt(path, docs):
    path.write_text("\n\n".join(docs) + "\n")


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def write_parquet(path, docs, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=7)


def write_source(kind, tmp_path):
    if kind == "txt":
        write_txt(tmp_path / "d.txt", DOCS)
        return tmp_path / "d.txt"
    if kind == "jsonl":
        write_jsonl(tmp_path / "d.jsonl", DOCS)
        return tmp_path / "d.jsonl"
    if kind == "parquet":
        write_parquet(tmp_path / "d.parquet", DOCS)
        return tmp_path / "d.parquet"
    if kind == "folder":  # sorted path order: a/, then b.jsonl, then c.parquet
        (tmp_path / "f" / "a").mkdir(parents=True)
        write_txt(tmp_path / "f" / "a" / "part.txt", DOCS[:10])
        write_jsonl(tmp_path / "f" / "b.jsonl", DOCS[10:20])
        write_parquet(tmp_path / "f" / "c.parquet", DOCS[20:])
        (tmp_path / "f" / ".hidden.txt").write_text("not a document\n")
        (tmp_path / "f" / "README.md").write_text("ignored\n")
        return tmp_path / "f"
    from datasets import Dataset, DatasetDict

    dataset = Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))})
    if kind == "datasets":
        dataset.save_to_disk(tmp_path / "ds")
    else:
        DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(tmp_path / "ds")
    return tmp_path / "ds"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "folder", "datasets", "datasetdict"])
def test_every_format_reads_the_same_documents(kind, tmp_path):
    docs = read_documents(write_source(kind, tmp_path))
    assert list(docs) == DOCS
    assert list(docs) == DOCS  # re-iterable: every pass reads again


@pytest.mark.parametrize("kind, name", [("txt", "wikitext2-test.raw"), ("jsonl", "corpus.json"),
                                        ("parquet", "shard-00000"), ("txt", "notes")])
def test_files_are_read_by_their_content_whatever_their_name(kind, name, tmp_path):
    """A name that says nothing (.raw, .json, none) is read as what it holds, as eval --perplexity reads it."""
    from mixerswap.evals.perplexity import read_documents as read_perplexity_text

    source = write_source(kind, tmp_path)
    path = source.rename(tmp_path / name)
    assert list(read_documents(path)) == DOCS
    if kind != "parquet":
        assert read_perplexity_text(path) == (DOCS if kind == "jsonl" else [path.read_text()])


def test_txt_documents_are_blank_line_separated_blocks(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"\n\n first doc, line 1\r\nline 2  \r\n\r\n  \t \n\n\nsecond doc\nthird? no, same doc\n\n\nlast")
    assert list(read_documents(path)) == [" first doc, line 1\nline 2  ", "second doc\nthird? no, same doc", "last"]


def test_a_text_without_blank_lines_holds_a_document_per_line(tmp_path):
    """wikitext's .raw files: a paragraph or heading per CRLF line, no blank line anywhere."""
    path = tmp_path / "wikitext2-test.raw"
    path.write_bytes(b" = Robert Boulter = \r\n Robert Boulter is an English actor . \r\n = = Career = = \r\n")
    assert list(read_documents(path)) == [" = Robert Boulter = ", " Robert Boulter is an English actor . ",
                                          " = = Career = = "]


def test_jsonl_field_is_configurable_and_empty_texts_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"content": "one"}\n\n{"content": "   "}\n{"content": ""}\n{"content": "two"}\n')
    assert list(read_documents(path, text_field="content")) == ["one", "two"]


def test_a_datasets_name_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        if name == "someone/broken":
            raise ConnectionError("offline")
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(read_documents("someone/corpus", split="validation")) == DOCS
    assert calls == [("someone/corpus", "validation", False)]
    with pytest.raises(ValueError, match="'someone/broken' is not a local file or folder.*offline"):
        read_documents("someone/broken")


def corrupt(tmp_path, name, content: bytes):
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


SOURCE_ERRORS = {
    "missing-file": (lambda p: p / "missing.jsonl", FileNotFoundError, "data not found: .*missing.jsonl"),
    "missing-relative": (lambda p: "./nowhere/data", FileNotFoundError, "data not found"),
    "binary": (lambda p: corrupt(p, "model.bin", b"\x08\x00\x00\x00{}\x00"), ValueError,
               "model.bin holds binary data, not plain text, JSON lines or parquet"),
    "raw-not-utf8": (lambda p: corrupt(p, "d.raw", b"fine\ncaf\xe9\n"), ValueError,
                     "cannot read data file .*d.raw: not UTF-8 text at line 2"),
    "empty-txt": (lambda p: corrupt(p, "empty.txt", b"\n\n  \n"), ValueError, "no documents in .*empty"),
    "empty-jsonl": (lambda p: corrupt(p, "e.jsonl", b'{"text": " "}\n'), ValueError, "no documents.*empty"),
    "jsonl-missing-field": (lambda p: corrupt(p, "d.jsonl", b'{"content": "x"}\n'), ValueError,
                            r"d.jsonl:1: no field 'text' \(found \['content'\]\); pass text_field"),
    "jsonl-invalid": (lambda p: corrupt(p, "d.jsonl", b"\n{not json\n"), ValueError, "d.jsonl:2: invalid JSON"),
    "jsonl-not-text": (lambda p: corrupt(p, "d.jsonl", b'{"text": 3}\n'), ValueError, "field 'text' is int, not text"),
    "txt-not-utf8": (lambda p: corrupt(p, "d.txt", b"caf\xe9 \xff\xfe\n"), ValueError,
                     "cannot read .*d.txt: not UTF-8"),
    "parquet-corrupt": (lambda p: corrupt(p, "d.parquet", b"PAR1 not really"), ValueError,
                        "cannot read data file .*d.parquet: not a parquet file"),
    "folder-without-data": (lambda p: corrupt(p, "notes.md", b"x").parent, ValueError,
                            "no .txt, .jsonl, .parquet files"),
}


@pytest.mark.parametrize("case", list(SOURCE_ERRORS))
def test_bad_sources_fail_with_a_clear_message(case, tmp_path):
    make, error, message = SOURCE_ERRORS[case]
    with pytest.raises(error, match=message):
        read_documents(make(tmp_path))


def test_missing_columns_and_splits_are_named(tmp_path):
    write_parquet(tmp_path / "d.parquet", DOCS, field="body")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body', 'id'\]\); pass text_field"):
        read_documents(tmp_path / "d.parquet")
    assert list(read_documents(tmp_path / "d.parquet", text_field="body")) == DOCS
    source = write_source("datasetdict", tmp_path)
    with pytest.raises(ValueError, match="no column 'content'"):
        read_documents(source, text_field="content")
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'dev'; pass split"):
        read_documents(source, split="dev")
    assert list(read_documents(source, split="test")) == DOCS[:2]


def test_a_bad_record_later_in_a_file_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"txt": "oops"}\n')
    docs = read_documents(path)  # the first record is checked up front; later ones when reached
    with pytest.raises(ValueError, match="d.jsonl:3: no field 'text'"):
        list(docs)


def test_optional_packages_are_asked_for_by_name(tmp_path, monkeypatch):
    parquet = write_source("parquet", tmp_path)
    saved = write_source("datasets", tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"reading .parquet files needs the 'pyarrow' package: "
                                          r"pip install 'mixerswap\[data\]'"):
        read_documents(parquet)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the 'datasets' package"):
        read_documents(saved)


def test_held_out_first_documents():
    train, held_out = held_out_split(DOCS, 4)
    assert held_out == DOCS[:4]
    assert list(train) == DOCS[4:] and list(train) == DOCS[4:]
    train, held_out = held_out_split(DOCS, 0)
    assert held_out == [] and list(train) == DOCS


def test_held_out_fraction_is_fixed_and_complementary(tmp_path):
    docs = [f"document number {i}" for i in range(400)]
    train, held_out = held_out_split(docs, 2, fraction=0.25)
    assert held_out[:2] == docs[:2]
    assert sorted(held_out + list(train)) == sorted(docs) and not set(held_out) & set(train)
    assert 0.15 < len(held_out) / len(docs) < 0.35
    assert held_out_split(docs, 2, fraction=0.25)[1] == held_out  # no seed: the same choice every time
    write_txt(tmp_path / "d.txt", docs)
    assert held_out_split(read_documents(tmp_path / "d.txt"), 2, fraction=0.25)[1] == held_out


def test_held_out_errors():
    with pytest.raises(ValueError, match="leaves none for training"):
        held_out_split(DOCS, len(DOCS))
    with pytest.raises(ValueError, match="fraction=1.5"):
        held_out_split(DOCS, fraction=1.5)


def expected_positions(stream_docs: list[list[int]], seq_len: int) -> list[int]:
    """Positions restart at each document start and each row start, else count up."""
    positions, at = [], 0
    for doc in stream_docs:
        for i in range(len(doc)):
            positions.append(0 if i == 0 or at % seq_len == 0 else positions[-1] + 1)
            at += 1
    return positions


@pytest.mark.parametrize("seq_len, batch_size", [(16, 3), (7, 1), (64, 4)])
def test_rows_hold_every_token_once_in_order_with_restarting_positions(tokenizer, seq_len, batch_size):
    batches = list(make_loader(DOCS, tokenizer, seq_len=seq_len, batch_size=batch_size, shuffle=False))
    docs = [stream_of([d], tokenizer) for d in DOCS]
    stream = [t for d in docs for t in d]
    ids = flat(batches)
    assert len(ids) % seq_len == 0 and 0 <= len(stream) - len(ids) < seq_len  # only a tail shorter than a row is left
    assert ids == stream[: len(ids)]
    assert flat(batches, "position_ids") == expected_positions(docs, seq_len)[: len(ids)]
    assert all(b["input_ids"].shape[1] == seq_len and b["input_ids"].dtype == torch.long for b in batches)
    assert [b["input_ids"].shape[0] for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert set(batches[0]) == {"input_ids", "position_ids"}  # plain text: every token is learned, no labels


def test_long_documents_continue_in_the_next_row_from_position_zero(tokenizer):
    long_doc = " ".join(SENTENCES[:8])
    batches = list(make_loader([long_doc, "Hi"], tokenizer, seq_len=16, batch_size=2, shuffle=False))
    rows = [row for b in batches for row in b["position_ids"].tolist()]
    n = len(stream_of([long_doc], tokenizer))
    assert rows[0] == list(range(16)) and rows[1] == list(range(16))  # the continuation starts again at 0
    assert len(rows) == (n + len(stream_of(["Hi"], tokenizer))) // 16


def test_tokenizer_special_tokens_are_not_doubled(stories_dir):
    tokenizer = T.AutoTokenizer.from_pretrained(stories_dir)  # its template adds BOS on its own
    batch = next(iter(PackedLoader(["Once upon a time.", "The end."], tokenizer, seq_len=8, batch_size=1,
                                   shuffle=False)))
    first = [1, *tokenizer("Once upon a time.", add_special_tokens=False)["input_ids"], 2]
    assert batch["input_ids"][0].tolist() == (first + [1])[:8]


class CharTokenizer:
    """Minimal tokenizer: a token per character; optional BOS/EOS."""

    def __init__(self, bos=1, eos=2, empty=False):
        self.bos_token_id, self.eos_token_id, self.empty = bos, eos, empty

    def __call__(self, texts, add_special_tokens, verbose):
        return {"input_ids": [[] if self.empty else [3 + ord(c) % 50 for c in text] for text in texts]}


def test_without_bos_or_eos_documents_are_marked_by_positions_only():
    tokenizer = CharTokenizer(bos=None, eos=None)
    batch = next(iter(PackedLoader(["abc", "de"], tokenizer, seq_len=5, batch_size=1, shuffle=False)))
    assert batch["input_ids"][0].tolist() == tokenizer(["abcde"], False, False)["input_ids"][0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]


def documents_of(batches, bos) -> list[tuple[int, ...]]:
    """Split a packed stream back into documents at BOS tokens."""
    docs, current = [], []
    for token in flat(batches):
        if token == bos and current:
            docs.append(tuple(current))
            current = []
        current.append(token)
    return docs + [tuple(current)]


@pytest.mark.parametrize("buffer", [4, 10_000], ids=["buffer4", "full"])
def test_shuffling_is_a_seeded_permutation_of_documents(tokenizer, buffer):
    options = dict(seq_len=16, batch_size=2, shuffle_buffer=buffer)
    a = list(make_loader(DOCS, tokenizer, seed=1, **options))
    assert same_batches(a, list(make_loader(DOCS, tokenizer, seed=1, **options)))
    assert not same_batches(a, list(make_loader(DOCS, tokenizer, seed=2, **options)))
    expected = Counter(tuple(stream_of([d], tokenizer)) for d in DOCS)
    *complete, tail = documents_of(a, tokenizer.bos_token_id)
    assert complete != [tuple(stream_of([d], tokenizer)) for d in DOCS[: len(complete)]]  # really reordered
    rest = expected - Counter(complete)
    assert sum(expected.values()) - len(complete) == 1 and list(rest)[0][: len(tail)] == tail  # only the tail is cut


def test_token_budget_is_met_in_whole_batches_repeating_epochs(tokenizer):
    corpus_tokens = len(stream_of(DOCS, tokenizer))
    for max_tokens in (1, 100, 3 * corpus_tokens + 5):
        loader = make_loader(DOCS, tokenizer, seq_len=16, batch_size=2, max_tokens=max_tokens)
        batches = list(loader)
        assert len(batches) == len(loader) == math.ceil(max_tokens / 32)
        assert all(b["input_ids"].shape == (2, 16) for b in batches)
        assert max_tokens <= 32 * len(batches) < max_tokens + 32
    assert loader.state_dict()["epoch"] == 3  # the corpus was read more than three times
    epochs = documents_of(batches, tokenizer.bos_token_id)
    assert epochs[: len(DOCS)] != epochs[len(DOCS) : 2 * len(DOCS)]  # each epoch in a new order
    with pytest.raises(TypeError, match="one pass"):
        len(make_loader(DOCS, tokenizer, seq_len=16, batch_size=2))


def test_drop_last_drops_the_short_final_batch(tokenizer):
    kept = list(make_loader(DOCS, tokenizer, seq_len=16, batch_size=5, shuffle=False))
    dropped = list(make_loader(DOCS, tokenizer, seq_len=16, batch_size=5, shuffle=False, drop_last=True))
    assert kept[-1]["input_ids"].shape[0] < 5 and same_batches(kept[:-1], dropped)


@pytest.mark.parametrize("max_tokens", [None, 2000], ids=["one-pass", "budget-3-epochs"])
@pytest.mark.parametrize("stop_after", [0, 1, 4, 9])
def test_resume_yields_exactly_the_remaining_batches(tokenizer, max_tokens, stop_after):
    options = dict(seq_len=16, batch_size=3, seed=5, shuffle_buffer=6, max_tokens=max_tokens)
    full = list(make_loader(DOCS, tokenizer, **options))
    interrupted = make_loader(DOCS, tokenizer, **options)
    seen = list(islice(iter(interrupted), stop_after))  # a batch counts as done once it was handed out
    state = json.loads(json.dumps(interrupted.state_dict()))  # checkpoints store it as JSON
    resumed = make_loader(DOCS, tokenizer, **options)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert same_batches(seen + rest, full) and len(rest) == len(full) - stop_after
    assert same_batches(list(interrupted), full[stop_after:])  # iterating again continues too
    assert list(resumed) == []


def test_resume_from_a_folder_source(tokenizer, tmp_path):
    docs = read_documents(write_source("folder", tmp_path))
    options = dict(seq_len=16, batch_size=2, seed=0, shuffle_buffer=5, max_tokens=600)
    full = list(make_loader(docs, tokenizer, **options))
    interrupted = make_loader(docs, tokenizer, **options)
    for step, _ in enumerate(interrupted, 1):
        if step == 7:
            break
    resumed = make_loader(read_documents(tmp_path / "f"), tokenizer, **options)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    assert same_batches(list(resumed), full[7:])


def test_resume_refuses_other_settings(tokenizer):
    state = make_loader(DOCS, tokenizer, seq_len=16, batch_size=2).state_dict()
    other = make_loader(DOCS, tokenizer, seq_len=32, batch_size=2)
    with pytest.raises(ValueError, match="saved with seq_len=16, this loader has seq_len=32"):
        other.load_state_dict(state)


LOADER_ERRORS = {
    "one-shot-iterator": (lambda: (d for d in DOCS), {}, "re-iterable"),
    "no-documents": (lambda: [], {}, "no documents to load: the data is empty"),
    "blank-documents": (lambda: ["", "  \n "], {}, "empty"),
    "seq-len": (lambda: DOCS, {"seq_len": 1}, "seq_len >= 2"),
    "budget": (lambda: DOCS, {"max_tokens": 0}, "max_tokens=0 must be positive"),
}


@pytest.mark.parametrize("case", list(LOADER_ERRORS))
def test_loader_errors(tokenizer, case):
    documents, options, message = LOADER_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        make_loader(documents(), tokenizer, **{"seq_len": 8, "batch_size": 2, **options})


def test_documents_without_tokens_fail_instead_of_looping():
    loader = make_loader(["abc"], CharTokenizer(empty=True), seq_len=4, batch_size=1, max_tokens=100)
    with pytest.raises(ValueError, match="produced no tokens"):
        next(iter(loader))


def test_packed_rows_equal_documents_run_alone(tokenizer):
    """The convention end to end: HF attention separates packed documents (with use_cache=False)."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = T.LlamaForCausalLM(config).eval()
    batch = next(iter(make_loader(DOCS[:6], tokenizer, seq_len=48, batch_size=2, shuffle=False)))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row in range(2):
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [48]
            for a, b in zip(starts[:-1], starts[1:]):
                alone = model(input_ids=batch["input_ids"][row : row + 1, a:b], use_cache=False).logits[0]
                torch.testing.assert_close(packed[row, a:b], alone, atol=1e-5, rtol=1e-5)


def test_check_seq_len():
    llama = T.LlamaConfig(max_position_embeddings=64)
    check_seq_len(64, llama)
    with pytest.raises(ValueError, match="seq_len=65 exceeds the teacher's max_position_embeddings=64 and its config "
                                         "has no RoPE scaling; use seq_len <= 64"):
        check_seq_len(65, llama)
    scaled = T.LlamaConfig(max_position_embeddings=64, rope_parameters={
        "rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    check_seq_len(256, scaled)
    gemma = T.Gemma3TextConfig(max_position_embeddings=64)  # per-layer-type rope parameters, all default
    with pytest.raises(ValueError, match="seq_len=100"):
        check_seq_len(100, gemma)
    from mixerswap import MixerSwapConfig

    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        check_seq_len(100, MixerSwapConfig(teacher_config=llama))
    check_seq_len(10**6, T.MambaConfig())  # no positions: nothing to check


def test_check_vocab(tokenizer):
    small = T.LlamaConfig(vocab_size=len(tokenizer))
    padded = T.LlamaConfig(vocab_size=len(tokenizer) + 64)
    check_vocab(tokenizer, small)
    check_vocab(tokenizer, padded)  # embedding rows beyond the tokenizer are fine
    check_vocab(padded, padded)
    with pytest.raises(ValueError, match=f"vocab mismatch: the tokenizer has {len(tokenizer)} tokens but the student "
                                         f"has {len(tokenizer) - 1} embedding rows"):
        check_vocab(tokenizer, T.LlamaConfig(vocab_size=len(tokenizer) - 1))
    with pytest.raises(ValueError, match="vocab mismatch: the teacher's vocabulary has .* entries, the student's"):
        check_vocab(padded, small)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
    check_vocab(model, T.LlamaConfig(vocab_size=40))
    with pytest.raises(ValueError, match="vocab mismatch"):
        check_vocab(model, small)


def test_documents_repr(tmp_path):
    docs = read_documents(write_source("txt", tmp_path))
    assert isinstance(docs, Documents) and "d.txt" in repr(docs)


PAIRS = [PromptResponse(f"Question {i}: {DOCS[i]}", f" Answer: {DOCS[(i + 7) % len(DOCS)]}") for i in range(len(DOCS))]
PAIRS[4] = PromptResponse("", "Only a response.")  # an empty prompt is fine; an empty response is skipped
CHATS = [Chat([{"role": "user", "content": d}, {"role": "assistant", "content": DOCS[(i + 3) % len(DOCS)]},
               {"role": "user", "content": "And?"}, {"role": "assistant", "content": "The end."}])
         for i, d in enumerate(DOCS[:10])]
# ChatML-like templates: the second marks assistant output for transformers' assistant mask. trim_blocks
# (transformers' Jinja setting) eats a newline after a tag, so newlines are written as expressions.
PLAIN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
TAGGED_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
                   "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token + '\n' }}"
                   "{% endgeneration %}{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# Like Qwen3: only the last assistant turn keeps its reasoning, so a prefix renders differently.
REWRITING_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['role'] == 'assistant' "
                      "and loop.last %}{{ '<think></think>' }}{% endif %}{{ m['content'] + '\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


@pytest.fixture()
def chat_tokenizer():
    tokenizer = build_tokenizer(demo_text())
    tokenizer.chat_template = PLAIN_TEMPLATE
    return tokenizer


def encode(tokenizer, text) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labelled_stream(documents, tokenizer) -> tuple[list[int], list[int]]:
    """What a loader packs, built independently: (ids, labels) of the documents in order."""
    ids, labels = [], []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for doc in documents:
        if isinstance(doc, PromptResponse):
            prompt, response = encode(tokenizer, doc.prompt), encode(tokenizer, doc.response)
            ids += [bos, *prompt, *response, eos]
            labels += [-100] * (1 + len(prompt)) + [*response, eos]
        else:
            tokens = [bos, *encode(tokenizer, doc), eos]
            ids, labels = ids + tokens, labels + tokens
    return ids, labels


def write_pairs(kind, tmp_path, pairs, prompt="prompt", response="response"):
    records = [{prompt: p.prompt, response: p.response, "id": i} for i, p in enumerate(pairs)]
    if kind == "jsonl":
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return tmp_path / "p.jsonl"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), tmp_path / "p.parquet", row_group_size=7)
        return tmp_path / "p.parquet"
    from datasets import Dataset

    Dataset.from_list(records).save_to_disk(tmp_path / "ds")
    return tmp_path / "ds"


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "datasets"])
def test_prompt_response_records_read_as_pairs(kind, tmp_path):
    pairs = [*PAIRS[:5], PromptResponse("skipped: nothing to learn", "  ")]
    docs = read_documents(write_pairs(kind, tmp_path, pairs))
    assert list(docs) == PAIRS[:5] and docs.formats == {"prompt"}
    renamed = write_pairs(kind, tmp_path, PAIRS[:3], prompt="question", response="answer")
    with pytest.raises(ValueError, match="no (field|column) 'text'.*pass text_field=.*'prompt' and 'response'"):
        read_documents(renamed)
    assert list(read_documents(renamed, prompt_field="question", response_field="answer")) == PAIRS[:3]


def test_chat_records_read_as_conversations(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"messages": c.messages}) + "\n" for c in CHATS[:3]) +
                    json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    docs = read_documents(path)
    assert list(docs) == CHATS[:3] and docs.formats == {"chat"}  # a conversation without an answer is skipped
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"conversation": [c.messages for c in CHATS[:3]]}), tmp_path / "c.parquet")
    assert list(read_documents(tmp_path / "c.parquet", messages_field="conversation")) == CHATS[:3]


def test_formats_are_recognized_per_file_text_first(tmp_path):
    (tmp_path / "f").mkdir()
    write_txt(tmp_path / "f" / "a.txt", DOCS[:3])
    write_pairs("jsonl", tmp_path / "f", PAIRS[:3])
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"text": "a text", "prompt": "p", "response": "r"}) + "\n")
    docs = read_documents(tmp_path / "f")
    assert list(docs) == DOCS[:3] + PAIRS[:3] and docs.formats == {"text", "prompt"}
    assert list(read_documents(both)) == ["a text"]  # plain text wins unless data_format says otherwise
    assert list(read_documents(both, data_format="prompt")) == [PromptResponse("p", "r")]
    with pytest.raises(ValueError, match="no field 'messages'.*pass messages_field"):
        read_documents(both, data_format="chat")
    with pytest.raises(ValueError, match="a plain text file holds text, not data_format="):
        read_documents(tmp_path / "f", data_format="prompt")
    with pytest.raises(ValueError, match="data_format='sft'"):
        read_documents(both, data_format="sft")


RECORD_ERRORS = {
    "later-record-other-format": (b'{"prompt": "p", "response": "r"}\n{"text": "t"}\n',
                                  "p.jsonl:2: no field 'prompt'.*fields of its first"),
    "response-not-text": (b'{"prompt": "p", "response": ["r"]}\n', "p.jsonl:1: field 'response' is list, not text"),
    "messages-not-a-list": (b'{"messages": "hello"}\n', "p.jsonl:1: field 'messages' must be a non-empty list"),
    "message-without-role": (b'{"messages": [{"content": "hello"}]}\n', "must be a non-empty list of {role, content}"),
    "not-an-object": (b'["prompt", "response"]\n', "p.jsonl:1: a list, not a JSON object"),
}


@pytest.mark.parametrize("case", list(RECORD_ERRORS))
def test_bad_prompt_and_chat_records_name_file_and_line(case, tmp_path):
    content, message = RECORD_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        list(read_documents(corrupt(tmp_path, "p.jsonl", content)))


@pytest.mark.parametrize("seq_len, batch_size", [(16, 3), (7, 1), (64, 2)])
def test_prompt_tokens_are_labelled_ignore_and_labels_travel_with_their_tokens(tokenizer, seq_len, batch_size):
    documents = [*PAIRS[:10], *DOCS[:5]]  # text documents among pairs are learned whole
    batches = list(make_loader(documents, tokenizer, seq_len=seq_len, batch_size=batch_size, shuffle=False))
    ids, labels = labelled_stream(documents, tokenizer)
    got = flat(batches)
    assert got == ids[: len(got)] and flat(batches, "labels") == labels[: len(got)]
    assert len(ids) - len(got) < seq_len  # every row split kept each token's label
    assert all(set(b) == {"input_ids", "position_ids", "labels"} and b["labels"].dtype == torch.long for b in batches)
    prompt = encode(tokenizer, PAIRS[0].prompt)
    assert flat(batches, "labels")[: 1 + len(prompt) + 1] == [-100] * (1 + len(prompt)) + [ids[1 + len(prompt)]]


@pytest.mark.parametrize("max_tokens", [None, 3000], ids=["one-pass", "budget"])
@pytest.mark.parametrize("stop_after", [1, 5])
def test_labelled_data_shuffles_and_resumes_exactly(tokenizer, max_tokens, stop_after):
    options = dict(seq_len=16, batch_size=3, seed=3, shuffle_buffer=6, max_tokens=max_tokens)
    documents = [*PAIRS, *DOCS[:5]]
    full = list(make_loader(documents, tokenizer, **options))
    assert not same_batches(full, list(make_loader(documents, tokenizer, **{**options, "seed": 4})))
    interrupted = make_loader(documents, tokenizer, **options)
    seen = list(islice(iter(interrupted), stop_after))
    resumed = make_loader(documents, tokenizer, **options)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    assert same_batches(seen + list(resumed), full)
    # Shuffled, every document still carries its own labels: split the stream at BOS, compare as multisets.
    if max_tokens is None:
        ids, labels = flat(full), flat(full, "labels")
        starts = [i for i, t in enumerate(ids) if t == tokenizer.bos_token_id] + [len(ids)]
        got = Counter((tuple(ids[a:b]), tuple(labels[a:b])) for a, b in zip(starts[:-1], starts[1:-1]))
        expected = Counter(tuple(map(tuple, labelled_stream([d], tokenizer))) for d in documents)
        assert not got - expected and len(got) >= len(documents) - 3


def test_held_out_pairs_keep_their_labels(tokenizer, tmp_path):
    docs = read_documents(write_pairs("jsonl", tmp_path, PAIRS))
    train, held_out = held_out_split(docs, 3)
    assert held_out == PAIRS[:3] and list(train) == PAIRS[3:] and train.formats == {"prompt"}
    batch = next(iter(make_loader(held_out, tokenizer, seq_len=32, batch_size=2, shuffle=False)))
    assert "labels" in batch and (batch["labels"] == -100).any()


def assistant_text(tokenizer, batch) -> str:
    return tokenizer.decode([t for t in flat([batch], "labels") if t != -100])


def test_chat_labels_cover_the_assistant_turns_only(chat_tokenizer):
    chat = CHATS[0]
    text = chat_tokenizer.apply_chat_template(chat.messages, tokenize=False)
    batch = next(iter(make_loader([chat], chat_tokenizer, seq_len=len(encode(chat_tokenizer, text)), batch_size=1,
                                  max_tokens=1)))
    assert chat_tokenizer.decode(flat([batch])) == text  # the template's rendering as is: its own BOS, no EOS added
    reply = chat.messages[1]["content"]
    assert assistant_text(chat_tokenizer, batch) == f"{reply}</s>\nThe end.</s>\n"
    assert flat([batch])[0] == chat_tokenizer.bos_token_id and flat([batch], "labels")[0] == -100


def test_chat_generation_tags_and_prefix_rendering_agree(chat_tokenizer):
    options = dict(seq_len=24, batch_size=2, shuffle=False)
    prefix = list(make_loader(CHATS, chat_tokenizer, **options))
    chat_tokenizer.chat_template = TAGGED_TEMPLATE
    tagged = list(make_loader(CHATS, chat_tokenizer, **options))
    assert same_batches(prefix, tagged)
    assert flat(prefix, "labels").count(-100) < len(flat(prefix)) - 10


def test_chat_needs_a_template_that_keeps_earlier_turns(chat_tokenizer):
    plain = build_tokenizer(demo_text())
    with pytest.raises(ValueError, match="chat data .* needs a tokenizer with a chat template"):
        make_loader(CHATS, plain, seq_len=16, batch_size=1)
    chat_tokenizer.chat_template = REWRITING_TEMPLATE
    one_turn = Chat(CHATS[0].messages[:2])
    assert chat_template_spans(chat_tokenizer, one_turn.messages)[1]  # one assistant turn: the prefix holds
    with pytest.raises(ValueError, match="renders earlier turns differently.*generation"):
        next(iter(make_loader(CHATS, chat_tokenizer, seq_len=16, batch_size=1)))
