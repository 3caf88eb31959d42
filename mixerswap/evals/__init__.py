"""Evaluation: lm-eval harness, perplexity, long-context probes, speed and memory.

``evaluate`` (``mixerswap eval``) runs ``harness`` (lm-eval), ``perplexity`` and ``probes`` on a model
and its reference; ``speed`` (``mixerswap bench``) measures prefill, decode and cache memory;
``plots`` draws both; ``summary`` is the demo's small table; ``text_tasks`` builds offline lm-eval
task folders like the bundled one in ``tasks/``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
