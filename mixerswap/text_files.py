"""What a text data file holds, told from its bytes: plain text, JSON lines or parquet.

Shared by ``distill --data`` (:mod:`mixerswap.distill.data`) and ``eval --perplexity``
(:mod:`mixerswap.evals.perplexity`), so that a file one of them reads the other reads too. A ``.txt``,
``.jsonl`` or ``.parquet`` name is taken at its word; any other name (``wikitext2-test.raw``,
``corpus.text``, no suffix at all) is looked at: parquet by its magic bytes, JSON lines when its
first non-blank line is a JSON object, otherwise plain text. Binary data is refused in one line
rather than read as text.
"""

from __future__ import annotations

import json
from pathlib import Path

KINDS = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
PARQUET_MAGIC = b"PAR1"
SNIFF_BYTES = 1 << 16


def data_file_kind(path: str | Path) -> str:
    """``"text"``, ``"jsonl"`` or ``"parquet"`` for an existing file (see the module docstring)."""
    path = Path(path)
    if path.suffix in KINDS:
        return KINDS[path.suffix]
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    if b"\0" in head:
        raise ValueError(f"{path} holds binary data, not plain text, JSON lines or parquet")
    first = next((line for line in head.splitlines() if line.strip()), b"")
    try:
        return "jsonl" if isinstance(json.loads(first), dict) else "text"
    except ValueError:  # not JSON (or cut off by SNIFF_BYTES, or not UTF-8): read as text, which names a bad line
        return "text"


def not_utf8(path: str | Path, error: UnicodeDecodeError) -> ValueError:
    """The error for a file that is not UTF-8 text, naming its first bad line (read again, in bytes)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return ValueError(f"cannot read data file {path}: not UTF-8 text at line {number} ({error.reason}); "
                                  "re-encode the file as UTF-8 or remove that line")
    return ValueError(f"cannot read data file {path}: not UTF-8 text ({error.reason})")
