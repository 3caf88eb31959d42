"""Evaluation: lm-eval harness, perplexity, long-context probes, speed and memory.

``evaluate`` (``mixerswap eval``) runs ``harness`` (lm-eval), ``perplexity`` and ``probes`` on a model
and its reference; ``speed`` (``mixerswap bench``) measures prefill, decode and cache memory;
``plots`` draws both; ``summary`` is the demo's small table; ``text_tasks`` builds offline lm-eval
task folders like the bundled one in ``tasks/``.
"""

import re
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"


def bundled_tasks() -> dict[str, list[str]]:
    """``{tag: [task, ...]}`` of the task YAMLs in :data:`TASKS_DIR`, read as text (no lm-eval import)."""
    groups: dict[str, list[str]] = {}
    for path in sorted(TASKS_DIR.rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        task = re.search(r"^task:\s*(\S+)", text, re.MULTILINE)
        tag = re.search(r"^tag:\s*(\S+)", text, re.MULTILINE)
        if task:
            groups.setdefault(tag.group(1) if tag else task.group(1), []).append(task.group(1))
    return groups
