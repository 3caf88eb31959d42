"""Offline lm-eval task folders built from plain text (one story or document per line).

Three tasks per folder, all read from local jsonl through the folder's ``local_json.py``:

- ``<prefix>_cloze`` (loglikelihood, LAMBADA-style): the story up to a sentence's last word; the
  target is that word. Metrics: ``perplexity`` of the word and ``acc`` (greedy decoding would
  produce it).
- ``<prefix>_choice`` (multiple choice, HellaSwag-style): the story so far; choose its true next
  sentence among sentences drawn from other lines. Metrics: ``acc``, ``acc_norm``.
- ``<prefix>_next_word`` (generate_until): greedy generation, decoded through the model's cache,
  of the cloze word. Metric: ``exact_match`` of the first generated word.

The YAMLs say ``dataset_path: json`` with ``dataset_kwargs: data_files`` as usual, plus
``custom_dataset: !function local_json.load``: lm-eval resolves that function next to the YAML
and hands it ``data_files``, which it reads relative to the folder. Plain ``data_files`` would be
resolved against the working directory, and going through ``datasets.load_dataset`` would touch
its cache; this way the folder runs offline from anywhere, with ``mixerswap eval`` or ``lm_eval``.

The folder shipped in ``mixerswap/evals/tasks/stories`` is ``build_story_tasks(bundled_text(),
...)`` with the defaults; the tests rebuild it and compare it (YAML comment headers aside).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from importlib import resources
from pathlib import Path

TASKS_ROOT = Path(__file__).parent / "tasks"
BUNDLED_PREFIX = "mixerswap_stories"
BUNDLED_SOURCE = "mixerswap/data/demo_stories.txt"
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+|(?<=[.!?]")\s+')
_LAST_WORD = re.compile(r'^(?P<head>.*\S)\s+(?P<word>[A-Za-z]+) ?(?P<tail>[.!?]"?)$')  # "word ." too (WikiText)

BUNDLED_FOLDER_HINT = '"$(mixerswap tasks --path)"'
_YAML_HEAD = """\
# Built by mixerswap.evals.text_tasks.build_story_tasks from {source}; edit that, not this file.
# Run: mixerswap eval MODEL --tasks {task}{include}
#  or: lm_eval --model hf --model_args pretrained=MODEL,trust_remote_code=True --tasks {task} --include_path {folder}
tag: {prefix}
task: {task}
dataset_path: json
custom_dataset: !function local_json.load
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
_YAML_BODY = {
    "cloze": """\
output_type: loglikelihood
doc_to_text: context
doc_to_target: "{{' ' + target}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "choice": """\
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "next_word": """\
output_type: generate_until
doc_to_text: context
doc_to_target: target
generation_kwargs:
  until: [".", ",", "\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "([A-Za-z]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
metadata:
  version: 1.0
""",
}


def bundled_text() -> str:
    """The short stories shipped with the package (``mixerswap/data/demo_stories.txt``)."""
    return resources.files("mixerswap").joinpath("data/demo_stories.txt").read_text(encoding="utf-8")


def split_sentences(line: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(line.strip()) if s.strip()]


def story_docs(text: str, *, seed: int = 0, num_choices: int = 4) -> dict[str, list[dict]]:
    """The rows of the cloze and choice tasks; deterministic in ``text`` and ``seed``."""
    stories = [split_sentences(line) for line in text.splitlines() if line.strip()]
    if len(stories) < 2:
        raise ValueError("need at least two non-empty lines (stories) to build tasks from the text")
    rng = random.Random(seed)
    cloze, choice = [], []
    for s_idx, sentences in enumerate(stories):
        others = [s for j, story in enumerate(stories) if j != s_idx for s in story]
        for i, sentence in enumerate(sentences):
            prefix = " ".join(sentences[:i])
            match = _LAST_WORD.match(sentence)
            if match:
                context = f"{prefix} {match['head']}".strip()
                cloze.append({"id": f"{s_idx}-{i}", "context": context, "target": match["word"]})
            if i > 0 and len(others) >= num_choices - 1:
                options = [sentence, *rng.sample(others, num_choices - 1)]
                order = list(range(num_choices))
                rng.shuffle(order)
                choice.append({"id": f"{s_idx}-{i}", "context": prefix, "choices": [options[k] for k in order],
                               "label": order.index(0)})
    if not cloze or not choice:
        raise ValueError("the text has no sentences ending in a word and a full stop to build tasks from")
    return {"cloze": cloze, "choice": choice}


def build_story_tasks(text: str, out_dir: str | Path, *, prefix: str = BUNDLED_PREFIX, seed: int = 0,
                      source: str = "user text") -> list[str]:
    """Write the three task YAMLs, their jsonl data and ``local_json.py`` to ``out_dir``; returns task names.

    ``prefix`` names the tasks (``<prefix>_cloze`` ...) and their tag (``<prefix>``: all three);
    pick one that no other task folder uses.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", prefix):
        raise ValueError(f"task prefix {prefix!r} must be letters, digits and underscores")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = story_docs(text, seed=seed)
    for kind, rows in docs.items():
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / f"{prefix}_{kind}.jsonl").write_text(lines, encoding="utf-8")
    bundled = out.resolve() == (TASKS_ROOT / "stories").resolve()
    if not bundled:
        shutil.copyfile(TASKS_ROOT / "stories" / "local_json.py", out / "local_json.py")
    names = []
    for kind, body in _YAML_BODY.items():
        task = f"{prefix}_{kind}"
        data = f"{prefix}_{'cloze' if kind == 'next_word' else kind}.jsonl"
        head = _YAML_HEAD.format(source=source, task=task, prefix=prefix, data=data,
                                 include="" if bundled else f" --include-path {out}",
                                 folder=BUNDLED_FOLDER_HINT if bundled else str(out))
        (out / f"{task}.yaml").write_text(head + body, encoding="utf-8")
        names.append(task)
    return names
