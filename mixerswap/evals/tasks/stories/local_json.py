"""Offline loader for the jsonl files beside this file (lm-eval ``custom_dataset`` hook).

lm-eval hands ``dataset_kwargs`` to ``custom_dataset``; ``data_files`` name jsonl files relative to
this folder, so the task folder works from any working directory and never touches the network
or the ``datasets`` cache. Copied verbatim into every folder ``mixerswap.evals.text_tasks`` writes.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files, **_metadata):
    """``{split: file}`` → ``DatasetDict`` with one split per file (rows in file order)."""
    splits = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else HERE / name
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
