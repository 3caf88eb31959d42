"""Distillation data: read documents, hold some out, pack the rest into fixed-length rows.

* :func:`read_documents` streams document texts from a ``.txt`` / ``.jsonl`` / ``.parquet`` file, a
  folder of them, a folder written by ``datasets``' ``save_to_disk``, or a ``datasets`` name.
* :func:`held_out_split` keeps the first documents (and/or a hashed fraction) apart for perplexity.
* :class:`PackedLoader` (``make_loader``) shuffles documents by seed, tokenizes them with the
  teacher's tokenizer, packs them into ``[B, T]`` rows under a token budget, and resumes exactly
  from its ``state_dict()``.
* :func:`check_seq_len`, :func:`check_vocab` fail before training when data and models disagree.

Packed rows follow the ``transformers`` convention for packed sequences: no ``attention_mask``, and
``position_ids`` that restart at 0 where a document starts, from which HF attention and the
student's mixers both find the boundaries. Call the models with ``use_cache=False``: with a cache
``transformers`` ignores the packing and documents would attend to each other.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import random
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet")
# Files that ``datasets``' ``save_to_disk`` writes at the top of a Dataset / DatasetDict folder.
DATASETS_MARKERS = ("state.json", "dataset_dict.json")
# Documents tokenized per call: the fast tokenizers parallelize over a batch.
ENCODE_BATCH = 64


def _texts(documents: Iterable[str]) -> Iterator[str]:
    """The documents that hold text: empty and whitespace-only ones are skipped everywhere."""
    return (text for text in documents if text and not text.isspace())


def _require(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImportError(f"{purpose} needs the '{package}' package: pip install 'mixerswap[data]'") from None


def _read_txt(path: Path, field: str) -> Iterator[str]:
    """Documents are blocks of non-blank lines separated by blank (empty or whitespace-only) lines;
    a block's lines are joined with ``\\n``."""
    block: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.isspace():
                    block.append(line.rstrip("\n"))
                elif block:
                    yield "\n".join(block)
                    block = []
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read data file {path}: not UTF-8 text ({e.reason})") from None
    if block:
        yield "\n".join(block)


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    """One JSON object per line, the text under ``field``; blank lines are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.isspace():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(f"{path}:{number}: no field {field!r} (found {keys}); pass text_field=...")
                if not isinstance(record[field], str):
                    raise ValueError(f"{path}:{number}: field {field!r} is {type(record[field]).__name__}, not text")
                yield record[field]
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read data file {path}: not UTF-8 text ({e.reason})") from None


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    """The ``field`` column, one row group batch at a time (null rows are skipped)."""
    pq = _require("pyarrow.parquet", "reading .parquet files")
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"cannot read data file {path}: not a parquet file ({e})") from None
    names = file.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {names}); pass text_field=...")
    for batch in file.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}: column {field!r} holds {type(text).__name__}, not text")
            if text is not None:
                yield text


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _looks_like_path(source: str) -> bool:
    """Whether a missing ``source`` was meant as a local path rather than a ``datasets`` name
    (names are ``name`` or ``owner/name``)."""
    return (Path(source).suffix in (*SUFFIXES, ".json", ".csv", ".gz", ".arrow") or source.startswith(("/", ".", "~"))
            or "\\" in source or source.count("/") > 1)


def _data_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    data = [p for p in files if p.suffix in READERS]
    if not data:
        raise ValueError(f"no {', '.join(SUFFIXES)} files in folder {folder}")
    skipped = [p for p in files if p.suffix not in READERS]
    if skipped:
        logger.warning("%s: ignoring %d file(s) that are not %s, e.g. %s", folder, len(skipped), "/".join(SUFFIXES),
                       skipped[0].name)
    return data


class Documents:
    """Document texts of one data source, read lazily on every pass; iterate as often as needed.

    Sources:
      * ``.txt``: documents are blocks of non-blank lines separated by one or more blank lines;
      * ``.jsonl``: one JSON object per line, the text under ``text_field``;
      * ``.parquet``: the ``text_field`` column (needs ``pyarrow``);
      * a folder: its ``.txt`` / ``.jsonl`` / ``.parquet`` files, recursively, in sorted path order
        (hidden files skipped, other files ignored with a warning);
      * a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks
        from a DatasetDict), or any other non-path string: ``datasets.load_dataset(source,
        split=split, streaming=streaming)`` (needs ``datasets``).

    Files are streamed line by line or row group by row group, never loaded whole. Empty and
    whitespace-only documents are skipped. Problems are reported here, before any training: a
    missing path (``FileNotFoundError``), an unknown extension, a file that cannot be read, a
    missing field or column (checked on each file's first record; a later bad record fails when it
    is reached, naming file and line), and data without any document (``ValueError``).
    """

    def __init__(self, source: str | Path, *, text_field: str = "text", split: str = "train",
                 streaming: bool = False):
        self.source, self.text_field, self.split = str(source), text_field, split
        self._files: list[Path] = []
        self._dataset = None
        path = Path(source).expanduser()
        if path.is_dir() and any((path / marker).exists() for marker in DATASETS_MARKERS):
            datasets = _require("datasets", f"reading the saved dataset {path}")
            self._dataset = self._pick_split(datasets.load_from_disk(str(path)))
        elif path.is_dir():
            self._files = _data_files(path)
        elif path.exists():
            if path.suffix not in READERS:
                raise ValueError(f"unsupported data file {path.name!r}: expected {', '.join(SUFFIXES)}, a folder "
                                 "of them, or a datasets folder or name")
            self._files = [path]
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
            if names is not None and text_field not in names:
                raise ValueError(f"{self.source}: no column {text_field!r} (columns: {names}); pass text_field=...")
        for file in self._files:
            try:
                next(READERS[file.suffix](file, text_field), None)
            except OSError as e:
                raise ValueError(f"cannot read data file {file}: {e.strerror or e}") from None
        if next(iter(self), None) is None:
            raise ValueError(f"no documents in {self.source}: the data is empty (or only blank text)")

    def _pick_split(self, dataset):
        if isinstance(dataset, dict):  # DatasetDict / IterableDatasetDict
            if self.split not in dataset:
                raise ValueError(f"{self.source} has splits {sorted(dataset)}, not {self.split!r}; pass split=...")
            return dataset[self.split]
        return dataset

    def __iter__(self) -> Iterator[str]:
        if self._dataset is not None:
            texts = (text for batch in self._dataset.select_columns([self.text_field]).iter(batch_size=1000)
                     for text in batch[self.text_field] if text is not None)
        else:
            texts = (text for file in self._files for text in READERS[file.suffix](file, self.text_field))
        return _texts(texts)

    def __repr__(self) -> str:
        return f"Documents({self.source!r}, text_field={self.text_field!r})"


def read_documents(source: str | Path, *, text_field: str = "text", split: str = "train",
                   streaming: bool = False) -> Documents:
    """The documents of ``source`` (a file, a folder, a saved or named ``datasets`` dataset); see :class:`Documents`."""
    return Documents(source, text_field=text_field, split=split, streaming=streaming)


def _hashed_fraction(index: int) -> float:
    """A fixed pseudo-random number in [0, 1) per document index."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class _TrainPart:
    """The documents that ``held_out_split`` did not hold out; re-reads its source on every pass."""

    def __init__(self, documents: Iterable[str], first: int, fraction: float):
        self.documents, self.first, self.fraction = documents, first, fraction

    def __iter__(self) -> Iterator[str]:
        for index, text in enumerate(_texts(self.documents)):
            if index >= self.first and not _hashed_fraction(index) < self.fraction:
                yield text


def held_out_split(documents: Iterable[str], docs: int = 0, *, fraction: float = 0.0) -> tuple[_TrainPart, list[str]]:
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
        held_out = [text for index, text in enumerate(_texts(documents))
                    if index < docs or _hashed_fraction(index) < fraction]
    else:
        held_out = list(islice(_texts(documents), docs))
    if next(iter(train), None) is None:
        raise ValueError(f"holding out {len(held_out)} document(s) leaves none for training; hold out fewer")
    return train, held_out


class _Row(NamedTuple):
    ids: list[int]
    positions: list[int]
    cursor: tuple[int, int, int]  # where the next row starts: (epoch, document, token offset)


class PackedLoader:
    """Batches of packed rows: ``{"input_ids", "position_ids", "labels"}``, each ``[B, T]`` int64.

    * Order: each epoch streams the documents through a shuffle buffer of ``shuffle_buffer``
      documents seeded by ``(seed, epoch)`` (a full shuffle when the buffer holds the whole corpus);
      ``shuffle=False`` keeps the source order. Same seed, same batches.
    * Tokens: each document becomes ``[BOS] + tokens + [EOS]`` (BOS if the tokenizer has one, EOS
      if it has one, special tokens of the tokenizer's own template not added). The stream is cut
      into rows of ``seq_len``; ``position_ids`` count from 0 at every document start. A document
      that does not fit in the rest of a row continues at the start of the next row, again from
      position 0: the continuation is a new segment that does not see its own beginning (the usual
      cost of fixed-length packing). In exchange rows are independent and no position reaches
      ``seq_len``, so ``seq_len <= max_position_embeddings`` suffices.
    * ``labels`` equal ``input_ids``: rows are always full, nothing is padded. Document boundaries
      come from ``position_ids``; a loss that must not predict across them masks the next-token
      targets where the following position is 0.
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

    def __init__(self, documents: Iterable[str], tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
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
        self.documents, self.tokenizer = documents, tokenizer
        self.seq_len, self.batch_size, self.seed, self.max_tokens = seq_len, batch_size, seed, max_tokens
        self.shuffle, self.shuffle_buffer, self.drop_last = shuffle, shuffle_buffer, drop_last
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
            ids = torch.tensor([row.ids for row in batch], dtype=torch.long)
            positions = torch.tensor([row.positions for row in batch], dtype=torch.long)
            yield {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}

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

    def _ordered(self, epoch: int) -> Iterator[str]:
        """The documents of one epoch, through the seeded shuffle buffer."""
        texts = _texts(self.documents)
        if not self.shuffle:
            yield from texts
            return
        rng = random.Random(f"{self.seed}:{epoch}")
        buffer: list[str] = []
        for text in texts:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(text)
                continue
            pick = rng.randrange(len(buffer))
            yield buffer[pick]
            buffer[pick] = text
        rng.shuffle(buffer)
        yield from buffer

    def _encoded(self, texts: Iterator[str]) -> Iterator[list[int]]:
        while chunk := list(islice(texts, ENCODE_BATCH)):
            for ids in self.tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
                yield self._bos + ids + self._eos if ids else []

    def _rows(self, epoch: int, document: int, offset: int) -> Iterator[_Row]:
        """Full rows from the cursor on, each with the cursor just after it."""
        ids: list[int] = []
        positions: list[int] = []
        while True:
            any_tokens = False
            order = islice(self._ordered(epoch), document, None)
            for k, tokens in enumerate(self._encoded(order), start=document):
                while offset < len(tokens):
                    take = min(self.seq_len - len(ids), len(tokens) - offset)
                    ids += tokens[offset : offset + take]
                    positions += range(take)  # a segment starts at 0: a document start or a continuation
                    offset += take
                    any_tokens = True
                    if len(ids) == self.seq_len:
                        yield _Row(ids, positions, (epoch, k, offset) if offset < len(tokens) else (epoch, k + 1, 0))
                        ids, positions = [], []
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
