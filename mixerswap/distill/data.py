"""Distillation data: read documents, hold some out, pack the rest into fixed-length rows.

* :func:`read_documents` streams documents from a plain text / JSON lines / parquet file (told
  by its content, :mod:`mixerswap.text_files`), a folder of ``.txt`` / ``.jsonl`` / ``.parquet`` files, a folder written by ``datasets``' ``save_to_disk``, or a ``datasets`` name. A
  document is plain text (``str``), a :class:`PromptResponse` pair or a :class:`Chat` conversation.
* :func:`held_out_split` keeps the first documents (and/or a hashed fraction) apart for perplexity.
* :class:`PackedLoader` (``make_loader``) shuffles documents by seed, tokenizes them with the
  teacher's tokenizer, packs them into ``[B, T]`` rows under a token budget, and resumes exactly
  from its ``state_dict()``.
* :func:`check_seq_len`, :func:`check_vocab` fail before training when data and models disagree.

Packed rows follow the ``transformers`` convention for packed sequences: no ``attention_mask``, and
``position_ids`` that restart at 0 where a document starts, from which HF attention and the
student's mixers both find the boundaries. Call the models with ``use_cache=False``: with a cache
``transformers`` ignores the packing and documents would attend to each other.

Prompt/response and chat data add ``labels`` (the input ids, -100 on prompt and non-assistant
tokens): the tokens the student only reads, never learns to write. Which positions a loss counts
follows from the batch alone (:mod:`mixerswap.distill.masks`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import random
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import NamedTuple, Union

import torch

from ..text_files import KINDS, data_file_kind, not_utf8

logger = logging.getLogger(__name__)

SUFFIXES = tuple(KINDS)  # the files of a folder that are read
# Files that ``datasets``' ``save_to_disk`` writes at the top of a Dataset / DatasetDict folder.
DATASETS_MARKERS = ("state.json", "dataset_dict.json")
# Documents tokenized per call: the fast tokenizers parallelize over a batch.
ENCODE_BATCH = 64
IGNORE = -100
# What a record may hold, tried in this order by data_format="auto".
FORMATS = ("text", "prompt", "chat")
# The tag transformers' return_assistant_tokens_mask relies on (same pattern as transformers uses).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class PromptResponse(NamedTuple):
    """A document whose ``prompt`` is read but not learned: only ``response`` tokens get labels."""

    prompt: str
    response: str


class Chat(NamedTuple):
    """A conversation, ``[{"role": ..., "content": ...}, ...]``, rendered with the tokenizer's chat
    template; only the assistant turns get labels."""

    messages: list[dict]


Document = Union[str, PromptResponse, Chat]


def _format_of(document: Document) -> str:
    return "chat" if isinstance(document, Chat) else "prompt" if isinstance(document, PromptResponse) else "text"


def _learnable(document: Document) -> bool:
    """Whether a document holds text to learn: blank texts, blank responses and conversations
    without a non-blank assistant turn are skipped everywhere."""
    def filled(text) -> bool:
        return isinstance(text, str) and bool(text) and not text.isspace()

    if isinstance(document, Chat):
        return any(m.get("role") == "assistant" and filled(m.get("content")) for m in document.messages)
    return filled(document.response if isinstance(document, PromptResponse) else document)


def _texts(documents: Iterable[Document]) -> Iterator[Document]:
    """The documents that hold something to learn (see :func:`_learnable`)."""
    return (document for document in documents if _learnable(document))


def _require(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImportError(f"{purpose} needs the '{package}' package: pip install 'mixerswap[data]'") from None


class Fields(NamedTuple):
    """Where a record keeps its document, and which format to read (``auto``: the first of
    :data:`FORMATS` whose fields the record has)."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    data_format: str = "auto"

    def of(self, data_format: str) -> list[str]:
        return {"text": [self.text], "prompt": [self.prompt, self.response], "chat": [self.messages]}[data_format]

    def pick(self, keys: dict | list[str], where: str, noun: str) -> str:
        """The format of a file or dataset from its first record's keys (a dict) or its column names."""
        for data_format in FORMATS if self.data_format == "auto" else (self.data_format,):
            if all(name in keys for name in self.of(data_format)):
                return data_format
        missing = next(n for n in self.of("text" if self.data_format == "auto" else self.data_format) if n not in keys)
        option = {self.text: "text_field", self.prompt: "prompt_field", self.response: "response_field",
                  self.messages: "messages_field"}[missing]
        found = f"found {sorted(keys)}" if isinstance(keys, dict) else f"columns: {list(keys)}"
        alternatives = (f" (or records with {self.prompt!r} and {self.response!r}, or {self.messages!r})"
                        if self.data_format == "auto" else "")
        raise ValueError(f"{where}: no {noun} {missing!r} ({found}); pass {option}=...{alternatives}")

    def document(self, record: dict, data_format: str, where: str, noun: str, skip_nulls: bool) -> Document | None:
        """The document of one record (None for a null field where nulls are skipped)."""
        values = []
        for name in self.of(data_format):
            if name not in record:
                raise ValueError(f"{where}: no {noun} {name!r} (found {sorted(record)}); every record of a file "
                                 f"must have the fields of its first ({data_format})")
            value = record[name]
            if value is None and skip_nulls:
                return None
            if data_format == "chat":
                if not (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                                  for m in value)):
                    raise ValueError(f"{where}: {noun} {name!r} must be a non-empty list of {{role, content}} messages")
            elif not isinstance(value, str):
                raise ValueError(f"{where}: {noun} {name!r} is {type(value).__name__}, not text")
            values.append(value)
        return {"text": str, "prompt": PromptResponse, "chat": Chat}[data_format](*values)


def _has_blank_line(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        return any(line.isspace() for line in f)


def _read_txt(path: Path, fields: Fields, data_format: str) -> Iterator[str]:
    """Documents are blocks of non-blank lines separated by blank (empty or whitespace-only) lines;
    a block's lines are joined with ``\\n``. A file without any blank line holds one document per line
    (wikitext's ``.raw`` files, a story per line), not one document of the whole file."""
    block: list[str] = []
    try:
        per_line = not _has_blank_line(path)  # stops at the first blank line of a file that has one
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.isspace():
                    block.append(line.rstrip("\n"))
                if block and (per_line or line.isspace()):
                    yield "\n".join(block)
                    block = []
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    if block:
        yield "\n".join(block)


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` per non-blank line."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.isspace():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: a {type(record).__name__}, not a JSON object of fields")
                yield f"{path}:{number}", record
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def _read_jsonl(path: Path, fields: Fields, data_format: str) -> Iterator[Document]:
    """One JSON object per line holding the document's fields; blank lines are skipped."""
    for where, record in _jsonl_records(path):
        yield fields.document(record, data_format, where, "field", skip_nulls=False)


def _parquet_file(path: Path):
    pq = _require("pyarrow.parquet", "reading .parquet files")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"cannot read data file {path}: not a parquet file ({e})") from None


def _read_parquet(path: Path, fields: Fields, data_format: str) -> Iterator[Document]:
    """The document's columns, one row group batch at a time (rows with a null field are skipped)."""
    for batch in _parquet_file(path).iter_batches(batch_size=1024, columns=fields.of(data_format)):
        for record in batch.to_pylist():
            document = fields.document(record, data_format, str(path), "column", skip_nulls=True)
            if document is not None:
                yield document


def _file_format(path: Path, kind: str, fields: Fields) -> str | None:
    """The format of one file of ``kind`` (text, jsonl, parquet), checked on its first record (None: a file
    without records)."""
    if kind == "text":
        if fields.data_format not in ("auto", "text"):
            raise ValueError(f"{path}: a plain text file holds text, not data_format={fields.data_format!r}")
        return "text"
    if kind == "parquet":
        return fields.pick(_parquet_file(path).schema_arrow.names, str(path), "column")
    first = next(_jsonl_records(path), None)
    return None if first is None else fields.pick(first[1], first[0], "field")


READERS = {"text": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet}


def _looks_like_path(source: str) -> bool:
    """Whether a missing ``source`` was meant as a local path rather than a ``datasets`` name
    (names are ``name`` or ``owner/name``)."""
    return (Path(source).suffix in (*SUFFIXES, ".json", ".csv", ".gz", ".arrow") or source.startswith(("/", ".", "~"))
            or "\\" in source or source.count("/") > 1)


def _data_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    data = [p for p in files if p.suffix in KINDS]
    if not data:
        raise ValueError(f"no {', '.join(SUFFIXES)} files in folder {folder}")
    skipped = [p for p in files if p.suffix not in KINDS]
    if skipped:
        logger.warning("%s: ignoring %d file(s) that are not %s, e.g. %s", folder, len(skipped), "/".join(SUFFIXES),
                       skipped[0].name)
    return data


class Documents:
    """Documents of one data source, read lazily on every pass; iterate as often as needed.

    Sources:
      * a plain text file (``.txt``, or any name whose content is text: ``wikitext2-test.raw``),
        documents are blocks of non-blank lines separated by one or more blank lines (one per line
        in a file without blank lines);
      * a JSON lines file (``.jsonl``, or any name whose first line is a JSON object): one object per line;
      * a parquet file (``.parquet``, or any name with parquet's magic bytes): one row per document
        (needs ``pyarrow``);
      * a folder: its ``.txt`` / ``.jsonl`` / ``.parquet`` files, recursively, in sorted path order
        (hidden files skipped, other files ignored with a warning);
      * a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks
        from a DatasetDict), or any other non-path string: ``datasets.load_dataset(source,
        split=split, streaming=streaming)`` (needs ``datasets``).

    Records (JSON objects, parquet and ``datasets`` rows) hold one of three formats, recognized per
    file (or dataset) from its first record, in this order unless ``data_format`` names one:
      * ``text``: the text under ``text_field``, a ``str`` document;
      * ``prompt``: ``prompt_field`` and ``response_field`` texts, a :class:`PromptResponse`;
      * ``chat``: under ``messages_field`` a list of ``{"role", "content"}`` messages, a :class:`Chat`.
    Every record of a file has the fields of its first. :attr:`formats` says which formats the
    source holds; the loader adds ``labels`` when one is not plain text.

    Files are streamed line by line or row group by row group, never loaded whole. Documents with
    nothing to learn are skipped: empty or whitespace-only texts and responses, conversations
    without a non-blank assistant turn, and (parquet, ``datasets``) rows with a null field.
    Problems are reported here, before any training: a missing path (``FileNotFoundError``), an
    unknown extension, a file that cannot be read, missing fields or columns (checked on each
    file's first record; a later bad record fails when it is reached, naming file and line, or at
    once with :meth:`check`, as ``distill`` does), and data without any document (``ValueError``).
    """

    def __init__(self, source: str | Path, *, text_field: str = "text", split: str = "train",
                 streaming: bool = False, prompt_field: str = "prompt", response_field: str = "response",
                 messages_field: str = "messages", data_format: str = "auto"):
        if data_format not in ("auto", *FORMATS):
            raise ValueError(f"data_format={data_format!r}: expected one of auto, {', '.join(FORMATS)}")
        self.source, self.text_field, self.split = str(source), text_field, split
        self.fields = Fields(text_field, prompt_field, response_field, messages_field, data_format)
        self._files: dict[Path, str | None] = {}  # file -> its format (None: no records)
        self._kinds: dict[Path, str] = {}  # file -> text, jsonl or parquet
        self._dataset = None
        self._dataset_format = None
        path = Path(source).expanduser()
        if path.is_dir() and any((path / marker).exists() for marker in DATASETS_MARKERS):
            datasets = _require("datasets", f"reading the saved dataset {path}")
            self._dataset = self._pick_split(datasets.load_from_disk(str(path)))
        elif path.is_dir():
            self._files = dict.fromkeys(_data_files(path))
            self._kinds = {file: KINDS[file.suffix] for file in self._files}
        elif path.exists():
            self._files, self._kinds = {path: None}, {path: data_file_kind(path)}
            if path.suffix not in KINDS:
                logger.info("reading %s as %s (from its content)", path, self._kinds[path])
        elif _looks_like_path(self.source):
            raise FileNotFoundError(f"data not found: {self.source}")
        else:
            datasets = _require("datasets", f"loading the dataset {self.source!r}")
            try:
                dataset = datasets.load_dataset(self.source, split=split, streaming=streaming)
            except Exception as e:  # hub, network and builder errors alike: say what was tried
                raise ValueError(f"{self.source!r} is not a local file or folder, and datasets could not load "
                                 f"it: {e}") from e
            self._dataset = self._pick_split(dataset)
        if self._dataset is not None:
            names = self._dataset.column_names
            if names is None:  # a streamed dataset may not know its columns before the first row
                names = sorted(next(iter(self._dataset), {}))
            self._dataset_format = self.fields.pick(list(names), self.source, "column")
        for file in self._files:
            try:
                self._files[file] = _file_format(file, self._kinds[file], self.fields)
                next(READERS[self._kinds[file]](file, self.fields, self._files[file]), None)
            except OSError as e:
                raise ValueError(f"cannot read data file {file}: {e.strerror or e}") from None
        if next(iter(self), None) is None:
            raise ValueError(f"no documents in {self.source}: the data is empty (or only blank text)")

    @property
    def formats(self) -> frozenset[str]:
        """The formats of the source's files (or dataset): a subset of :data:`FORMATS`."""
        if self._dataset is not None:
            return frozenset({self._dataset_format})
        return frozenset(f for f in self._files.values() if f is not None)

    def _pick_split(self, dataset):
        if isinstance(dataset, dict):  # DatasetDict / IterableDatasetDict
            if self.split not in dataset:
                raise ValueError(f"{self.source} has splits {sorted(dataset)}, not {self.split!r}; pass split=...")
            return dataset[self.split]
        return dataset

    def _dataset_documents(self) -> Iterator[Document]:
        columns = self.fields.of(self._dataset_format)
        for batch in self._dataset.select_columns(columns).iter(batch_size=1000):
            for values in zip(*(batch[c] for c in columns)):
                document = self.fields.document(dict(zip(columns, values)), self._dataset_format, self.source,
                                                "column", skip_nulls=True)
                if document is not None:
                    yield document

    def __iter__(self) -> Iterator[Document]:
        if self._dataset is not None:
            documents = self._dataset_documents()
        else:
            documents = (document for file, data_format in self._files.items() if data_format is not None
                         for document in READERS[self._kinds[file]](file, self.fields, data_format))
        return _texts(documents)

    def check(self) -> int:
        """Read every local file to its end, so that a bad line anywhere (not UTF-8, a record without
        the field) fails now rather than when training reaches it; the number of documents. A
        ``datasets`` source is checked by its columns only (it may be streamed or large)."""
        if self._dataset is not None:
            return 0
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Documents({self.source!r}, formats={sorted(self.formats)})"


def read_documents(source: str | Path, *, text_field: str = "text", split: str = "train", streaming: bool = False,
                   prompt_field: str = "prompt", response_field: str = "response", messages_field: str = "messages",
                   data_format: str = "auto") -> Documents:
    """The documents of ``source`` (a file, a folder, a saved or named ``datasets`` dataset); see :class:`Documents`."""
    return Documents(source, text_field=text_field, split=split, streaming=streaming, prompt_field=prompt_field,
                     response_field=response_field, messages_field=messages_field, data_format=data_format)


def _hashed_fraction(index: int) -> float:
    """A fixed pseudo-random number in [0, 1) per document index."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def data_formats(documents: Iterable[Document]) -> frozenset[str]:
    """The formats (:data:`FORMATS`) of ``documents``: a source says so itself, a list is looked through."""
    formats = getattr(documents, "formats", None)
    return frozenset(_format_of(d) for d in _texts(documents)) if formats is None else frozenset(formats)


class _TrainPart:
    """The documents that ``held_out_split`` did not hold out; re-reads its source on every pass."""

    def __init__(self, documents: Iterable[Document], first: int, fraction: float):
        self.documents, self.first, self.fraction = documents, first, fraction

    @property
    def formats(self) -> frozenset[str]:
        return data_formats(self.documents)

    def __iter__(self) -> Iterator[Document]:
        for index, document in enumerate(_texts(self.documents)):
            if index >= self.first and not _hashed_fraction(index) < self.fraction:
                yield document


def held_out_split(documents: Iterable[Document], docs: int = 0, *,
                   fraction: float = 0.0) -> tuple[_TrainPart, list[Document]]:
    """Keep documents apart for validation (perplexity before and after distillation).

    Held out are the first ``docs`` documents and, if ``fraction > 0``, each later document whose
    index hashes below ``fraction`` (a fixed choice, independent of any shuffling seed). Returns
    ``(train, held_out)``: ``train`` is a lazy view that skips the held-out documents on every pass;
    ``held_out`` is a list, read into memory (keep it small; a fraction needs one pass over the data).
    """
    if docs < 0 or not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out docs={docs} must be >= 0 and fraction={fraction} in [0, 1)")
    train = _TrainPart(documents, docs, fraction)
    if fraction > 0:
        held_out = [document for index, document in enumerate(_texts(documents))
                    if index < docs or _hashed_fraction(index) < fraction]
    else:
        held_out = list(islice(_texts(documents), docs))
    if next(iter(train), None) is None:
        raise ValueError(f"holding out {len(held_out)} document(s) leaves none for training; hold out fewer")
    return train, held_out


def chat_template_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: a conversation rendered by the tokenizer's chat template, and the
    ``[start, end)`` character spans of its assistant turns in that text.

    A turn's span is what rendering the conversation up to that turn adds to rendering the
    conversation before it with the generation prompt: the assistant's content and its end-of-turn
    marker, not the header the generation prompt already wrote. This holds for any template that
    renders the turns before the last one independently of what follows; a template that rewrites
    earlier turns later (Qwen3 drops past reasoning) fails with a message, unless it marks the
    assistant output with ``{% generation %}`` (then the loader uses ``transformers``'
    ``return_assistant_tokens_mask`` instead).
    """
    def render(conversation, **options) -> str:
        return tokenizer.apply_chat_template(conversation, tokenize=False, **options)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)) or (spans and len(before) < spans[-1][1]):
            raise ValueError("the tokenizer's chat template renders earlier turns differently once later turns "
                             "follow, so assistant turns cannot be located by rendering prefixes: mark the assistant "
                             "output with {% generation %}...{% endgeneration %} in the template, or give one "
                             "assistant turn per conversation")
        spans.append((len(before), len(upto)))
    return text, spans


class _Row(NamedTuple):
    ids: list[int]
    labels: list[int]
    positions: list[int]
    cursor: tuple[int, int, int]  # where the next row starts: (epoch, document, token offset)


# A document on its way to tokens: pieces of text (tokenized in one batched call) or of ids, each
# with whether its tokens are learned (labelled with their ids) or only read (labelled -100).
_Pieces = list[tuple[Union[str, list[int]], bool]]


class PackedLoader:
    """Batches of packed rows: ``{"input_ids", "position_ids"}``, each ``[B, T]`` int64, plus
    ``"labels"`` when the documents are not all plain text.

    * Order: each epoch streams the documents through a shuffle buffer of ``shuffle_buffer``
      documents seeded by ``(seed, epoch)`` (a full shuffle when the buffer holds the whole corpus);
      ``shuffle=False`` keeps the source order. Same seed, same batches.
    * Tokens: a text document becomes ``[BOS] + tokens + [EOS]`` (BOS if the tokenizer has one, EOS
      if it has one, special tokens of the tokenizer's own template not added); a
      :class:`PromptResponse` becomes ``[BOS] + prompt tokens + response tokens + [EOS]``, prompt and
      response tokenized apart, as a prompt is at inference, no separator added; a :class:`Chat` is
      its chat-template rendering as is (the template writes its own BOS and end-of-turn tokens),
      tokenized in pieces cut at the assistant spans of :func:`chat_template_spans` (or, for a
      template with ``{% generation %}`` tags, with ``apply_chat_template``'s assistant mask). A
      chat source needs a tokenizer with a chat template. The stream is cut into rows of
      ``seq_len``; ``position_ids`` count from 0 at every document start. A document that does not
      fit in the rest of a row continues at the start of the next row, again from position 0: the
      continuation is a new segment that does not see its own beginning (the usual cost of
      fixed-length packing). In exchange rows are independent and no position reaches ``seq_len``,
      so ``seq_len <= max_position_embeddings`` suffices.
    * ``labels`` (only when :func:`data_formats` holds ``prompt`` or ``chat``; never for plain
      text, whose labels would equal ``input_ids``): each token's id where it is learned (text
      documents, responses, assistant turns with their end-of-turn tokens, a response's EOS) and
      -100 where it is only read (BOS, prompts, system/user turns, template headers). A token's label
      travels with it into whichever row it lands in. Rows are always full, nothing is padded.
      Document boundaries come from ``position_ids``; :func:`mixerswap.distill.masks.next_token_labels`
      turns a batch into next-token targets that do not cross them.
    * Budget: with ``max_tokens`` the loader yields ``ceil(max_tokens / (batch_size * seq_len))``
      full batches (``len(loader)``), starting new epochs (new orders) as needed. Without it, one
      pass: the tail shorter than a row is dropped and the final batch may have fewer rows (dropped
      too with ``drop_last``).
    * Resume: ``state_dict()`` (JSON-serializable) after a batch names the epoch, the document of
      that epoch's order and the token offset inside it where the next row starts, and the batches
      done; a new loader given it by ``load_state_dict`` yields exactly the batches an uninterrupted
      run would have yielded next. Resuming replays the epoch's document order up to that document
      (reading, not tokenizing). Iterating again continues where the last batch left off.
    """

    def __init__(self, documents: Iterable[Document], tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                 max_tokens: int | None = None, shuffle: bool = True, shuffle_buffer: int = 10_000,
                 drop_last: bool = False):
        if iter(documents) is documents:
            raise ValueError("documents must be re-iterable (read_documents(...) or a list), not a one-shot "
                             "iterator: epochs and resuming read them again")
        if seq_len < 2 or batch_size < 1 or shuffle_buffer < 1:
            raise ValueError(f"need seq_len >= 2, batch_size >= 1 and shuffle_buffer >= 1; got {seq_len}, "
                             f"{batch_size}, {shuffle_buffer}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be positive (or None for one pass)")
        if next(_texts(documents), None) is None:
            raise ValueError("no documents to load: the data is empty (or only blank text)")
        formats = data_formats(documents)
        if "chat" in formats and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat data (messages) needs a tokenizer with a chat template and this one has none; "
                             "set tokenizer.chat_template, or give prompt/response records")
        self.documents, self.tokenizer = documents, tokenizer
        self.seq_len, self.batch_size, self.seed, self.max_tokens = seq_len, batch_size, seed, max_tokens
        self.shuffle, self.shuffle_buffer, self.drop_last = shuffle, shuffle_buffer, drop_last
        self.labelled = bool(formats - {"text"})
        self._generation_tags = "chat" in formats and bool(GENERATION_TAG.search(tokenizer.get_chat_template()))
        self._bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self._cursor, self._batches = (0, 0, 0), 0

    @property
    def num_batches(self) -> int | None:
        """Batches a full run yields under the token budget; ``None`` for one pass (unknown in advance)."""
        return None if self.max_tokens is None else math.ceil(self.max_tokens / (self.batch_size * self.seq_len))

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a loader without max_tokens makes one pass of unknown length")
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows = self._rows(*self._cursor)
        while self.num_batches is None or self._batches < self.num_batches:
            batch = list(islice(rows, self.batch_size))
            if not batch or (self.drop_last and len(batch) < self.batch_size):
                return
            self._cursor, self._batches = batch[-1].cursor, self._batches + 1
            out = {"input_ids": torch.tensor([row.ids for row in batch], dtype=torch.long),
                   "position_ids": torch.tensor([row.positions for row in batch], dtype=torch.long)}
            if self.labelled:
                out["labels"] = torch.tensor([row.labels for row in batch], dtype=torch.long)
            yield out

    def _settings(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "bos": self._bos, "eos": self._eos}

    def state_dict(self) -> dict:
        epoch, document, offset = self._cursor
        return {"epoch": epoch, "document": document, "offset": offset, "batches": self._batches,
                "settings": self._settings()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._settings().items():
            saved = state["settings"].get(key)
            if saved != value:
                raise ValueError(f"the loader state was saved with {key}={saved!r}, this loader has {key}={value!r}; "
                                 "resume with the same data settings")
        self._cursor = (state["epoch"], state["document"], state["offset"])
        self._batches = state["batches"]

    def _ordered(self, epoch: int) -> Iterator[Document]:
        """The documents of one epoch, through the seeded shuffle buffer."""
        documents = _texts(self.documents)
        if not self.shuffle:
            yield from documents
            return
        rng = random.Random(f"{self.seed}:{epoch}")
        buffer: list[Document] = []
        for document in documents:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(document)
                continue
            pick = rng.randrange(len(buffer))
            yield buffer[pick]
            buffer[pick] = document
        rng.shuffle(buffer)
        yield from buffer

    def _pieces(self, document: Document) -> _Pieces:
        if isinstance(document, PromptResponse):
            return [(self._bos, False), (document.prompt, False), (document.response, True), (self._eos, True)]
        if isinstance(document, Chat) and self._generation_tags:
            out = self.tokenizer.apply_chat_template(document.messages, return_dict=True,
                                                     return_assistant_tokens_mask=True)
            return [([token], bool(learned)) for token, learned in zip(out["input_ids"], out["assistant_masks"])]
        if isinstance(document, Chat):
            text, spans = chat_template_spans(self.tokenizer, document.messages)
            cuts = [0, *(at for span in spans for at in span), len(text)]
            return [(text[a:b], k % 2 == 1) for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])) if b > a]
        return [(self._bos, True), (document, True), (self._eos, True)]

    def _encoded(self, documents: Iterator[Document]) -> Iterator[tuple[list[int], list[int]]]:
        """``(ids, labels)`` per document; ``([], [])`` for a document whose learned text has no tokens."""
        while chunk := list(islice(documents, ENCODE_BATCH)):
            pieces = [self._pieces(document) for document in chunk]
            texts = [piece for parts in pieces for piece, _ in parts if isinstance(piece, str)]
            encoded = iter(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
            for document, parts in zip(chunk, pieces):
                ids, labels, learned_text = [], [], False
                for piece, learned in parts:
                    tokens = next(encoded) if isinstance(piece, str) else piece
                    learned_text |= learned and isinstance(piece, str) and bool(tokens)
                    ids += tokens
                    labels += tokens if learned else [IGNORE] * len(tokens)
                if isinstance(document, Chat) or learned_text:
                    yield ids, labels
                else:
                    yield [], []

    def _rows(self, epoch: int, document: int, offset: int) -> Iterator[_Row]:
        """Full rows from the cursor on, each with the cursor just after it."""
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        while True:
            any_tokens = False
            order = islice(self._ordered(epoch), document, None)
            for k, (tokens, targets) in enumerate(self._encoded(order), start=document):
                while offset < len(tokens):
                    take = min(self.seq_len - len(ids), len(tokens) - offset)
                    ids += tokens[offset : offset + take]
                    labels += targets[offset : offset + take]
                    positions += range(take)  # a segment starts at 0: a document start or a continuation
                    offset += take
                    any_tokens = True
                    if len(ids) == self.seq_len:
                        yield _Row(ids, labels, positions,
                                   (epoch, k, offset) if offset < len(tokens) else (epoch, k + 1, 0))
                        ids, labels, positions = [], [], []
                offset = 0
            if document == 0 and not any_tokens:
                raise ValueError("the documents produced no tokens: the data is empty for this tokenizer")
            if self.max_tokens is None:
                return
            epoch, document = epoch + 1, 0


make_loader = PackedLoader


def _rope_scaled(config) -> bool:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # Per-layer-type parameters (Gemma-3: {"full_attention": {...}, "sliding_attention": {...}}).
    groups = list(params.values()) if params and all(isinstance(v, dict) for v in params.values()) else [params]
    return any(group.get("rope_type", group.get("type", "default")) != "default" for group in groups)


def check_seq_len(seq_len: int, teacher_config) -> None:
    """Fail if ``seq_len`` exceeds the teacher's ``max_position_embeddings`` and no RoPE scaling
    stretches it (a student config is read through its ``teacher_config``)."""
    config = getattr(teacher_config, "teacher_config", None)
    config = teacher_config if config is None else config
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or seq_len <= limit:
        return
    if _rope_scaled(config):
        logger.warning("seq_len=%d exceeds max_position_embeddings=%d; relying on the teacher's RoPE scaling",
                       seq_len, limit)
        return
    raise ValueError(f"seq_len={seq_len} exceeds the teacher's max_position_embeddings={limit} and its config has "
                     f"no RoPE scaling; use seq_len <= {limit}")


def _vocab_rows(obj) -> int:
    if hasattr(obj, "get_input_embeddings"):
        return obj.get_input_embeddings().num_embeddings
    return obj.vocab_size


def check_vocab(tokenizer_or_teacher, student) -> None:
    """Fail if the teacher's vocabulary and the student's do not line up.

    ``tokenizer_or_teacher``: the teacher's tokenizer (its ids must fit the student's embedding
    rows, which may be padded beyond ``len(tokenizer)``), or the teacher's config or model (its
    vocabulary must equal the student's exactly: KD compares logits token by token). ``student``:
    the student's config or model.
    """
    from transformers import PreTrainedTokenizerBase

    rows = _vocab_rows(student)
    if isinstance(tokenizer_or_teacher, PreTrainedTokenizerBase):
        size = len(tokenizer_or_teacher)
        if size > rows:
            raise ValueError(f"vocab mismatch: the tokenizer has {size} tokens but the student has {rows} "
                             "embedding rows; use the tokenizer of the teacher the student was converted from")
        return
    size = _vocab_rows(tokenizer_or_teacher)
    if size != rows:
        raise ValueError(f"vocab mismatch: the teacher's vocabulary has {size} entries, the student's {rows}; "
                         "distill a student converted from this teacher")
