"""lm-eval on model objects we already hold, with offline task folders, and side-by-side tables.

``run_lm_eval`` wraps the model in ``lm_eval.models.huggingface.HFLM`` (so loglikelihood
batching, padding and generation are exactly lm-eval's; generation goes through
``model.generate`` and therefore the student's ``HybridMixerCache``) and calls
``lm_eval.simple_evaluate``. The numbers equal those of the plain command line
``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path ...``.

Task specs are names (``hellaswag``, ``mixerswap_stories``) or folders of task YAMLs
(``./my_tasks/``: every task defined there). The bundled offline tasks in
``mixerswap/evals/tasks`` are always on the include path. lm-eval's own task index (thousands of
YAMLs) is only built when a name is not found in the local folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..progress import library_bars
from . import TASKS_DIR
from .tables import delta, format_table, format_value

logger = logging.getLogger(__name__)
RESULT_SKIP = {"alias", "name", "sample_len", " "}
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
# lm-eval's modules that draw bars with their own ``tqdm`` name; "tqdm" itself for the stderr bootstrap,
# which imports ``tqdm.tqdm`` inside the function
LM_EVAL_BAR_MODULES = ["lm_eval.api.model", "lm_eval.api.task", "lm_eval.models.huggingface", "tqdm"]


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval warns once per task that uses ``custom_dataset`` (all local jsonl tasks do); not news to users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetHint())


@dataclass
class TaskSelection:
    """Task names to run and the folders lm-eval must index to find them."""

    names: list[str]
    include_paths: list[Path] = field(default_factory=list)
    needs_defaults: bool = False

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=[str(p) for p in self.include_paths], include_defaults=self.needs_defaults)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec or Path(spec).is_dir()


def resolve_tasks(specs: str | list[str], include_paths: list[str | Path] | None = None) -> TaskSelection:
    """Expand task folders, check every name exists; raises ``FileNotFoundError`` / ``ValueError``."""
    from lm_eval.tasks import TaskManager

    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise ValueError("no tasks given")
    paths = [TASKS_DIR]
    for extra in include_paths or []:
        extra = Path(extra).expanduser()
        if not extra.is_dir():
            raise FileNotFoundError(f"no such task folder: {extra}")
        paths.append(extra.resolve())
    names = []
    for item in items:
        if not _looks_like_path(item):
            names.append(item)
            continue
        folder = Path(item).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"no such task folder: {item}")
        found = TaskManager(include_path=str(folder.resolve()), include_defaults=False).all_subtasks
        if not found:
            raise ValueError(f"task folder {item} defines no lm-eval tasks (no task YAML files found)")
        paths.append(folder.resolve())
        names += found
    paths = list(dict.fromkeys(paths))
    local = set(TaskManager(include_path=[str(p) for p in paths], include_defaults=False).all_tasks)
    missing = [n for n in names if n not in local]
    selection = TaskSelection(list(dict.fromkeys(names)), paths, needs_defaults=bool(missing))
    if missing:
        logger.info("indexing lm-eval's built-in tasks to find %s", ", ".join(missing))
        known = set(selection.task_manager().all_tasks)
        unknown = [n for n in missing if n not in known]
        if unknown:
            raise ValueError(f"unknown task(s): {', '.join(unknown)} (not in lm-eval nor in the task folders "
                             f"{', '.join(map(str, paths))}; list them with `lm_eval ls tasks`)")
    return selection


def offline_message(tasks: list[str], err: BaseException) -> str:
    """One line for a task whose dataset cannot be downloaded: what failed and how to use local data."""
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)
    why = f"offline mode is on ({' / '.join(OFFLINE_VARIABLES)})" if offline else "the Hub could not be reached"
    return (f"the dataset of lm-eval task(s) {', '.join(tasks)} could not be fetched: {' '.join(str(err).split())}; "
            f"{why}. Run once with network access (datasets caches it), or copy the task's YAML into a folder, "
            "point dataset_path / dataset_kwargs (data_files) at local files, and pass that folder to --tasks or "
            "--include-path (the bundled tasks in `mixerswap tasks --path` are examples)")


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records the git commit of the working folder with ``git describe``, whose ``fatal: not a git
    repository`` goes straight to the terminal outside a repository (even under ``-q``): same lookup, with
    git's stderr dropped."""
    from lm_eval import evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def commit() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return get_commit_from_path(os.getcwd())

    original, evaluator.get_git_commit_hash = evaluator.get_git_commit_hash, commit
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def run_lm_eval(model, tokenizer, selection: TaskSelection, *, batch_size: int = 8, limit: int | float | None = None,
                num_fewshot: int | None = None, bootstrap_iters: int = 100000, log_samples: bool = False,
                progress: bool = True) -> dict:
    """``simple_evaluate`` on ``model``; returns lm-eval's result dict made JSON-safe (no samples unless asked).

    Seeds (few-shot sampling and the like) are lm-eval's defaults, as in its command line. lm-eval's
    progress bars are :func:`mixerswap.progress.progress_bar` bars (plain lines in a log; off without ``progress``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    if tokenizer is None:
        raise ValueError("lm-eval tasks need a tokenizer, and the model folder has none")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    try:
        with _quiet_git_hash(), library_bars(LM_EVAL_BAR_MODULES, enabled=progress):
            results = lm_eval.simple_evaluate(
                model=lm, tasks=selection.names, task_manager=selection.task_manager(), limit=limit,
                num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
            )
    except ConnectionError as err:  # datasets' "Couldn't reach 'Rowan/hellaswag' on the Hub", offline or not
        raise ValueError(offline_message(selection.names, err)) from None
    if results is None:  # only non-zero ranks of a distributed run get None
        return {}
    return json.loads(json.dumps(results, default=handle_non_serializable))


def metric_rows(results: dict) -> dict[tuple[str, str], float]:
    """``{(task, "metric,filter"): value}`` of an lm-eval result, without stderr and bookkeeping entries."""
    rows = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in RESULT_SKIP or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            rows[(task, key)] = value
    return rows


def _stderr(results: dict, task: str, metric: str) -> float | None:
    """lm-eval's standard error of ``metric`` (``"acc,none"`` → ``"acc_stderr,none"``), if it computed one."""
    name, _, filt = metric.partition(",")
    value = results.get("results", {}).get(task, {}).get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _samples(results: dict, task: str) -> int | None:
    """Documents lm-eval scored for ``task`` (``n-samples``' ``effective``: after ``--limit``)."""
    count = results.get("n-samples", {}).get(task, {})
    return count.get("effective", count.get("original")) if isinstance(count, dict) else None


def _with_error(value, stderr) -> str | None:
    if value is None:
        return None
    return format_value(value) if stderr is None else f"{format_value(value)} ± {format_value(stderr, 2)}"


def lm_eval_table(results_by_model: dict[str, dict]) -> str:
    """Task, metric, documents scored (n), one ``value ± stderr`` column per model and, for two models,
    ``delta`` = first - second ``± sqrt(se1² + se2²)`` (both models see the same documents, so this
    unpaired error is an upper bound)."""
    labels = list(results_by_model)
    per_model = {label: metric_rows(res) for label, res in results_by_model.items()}
    keys = sorted({k for rows in per_model.values() for k in rows})
    rows = []
    for task, metric in keys:
        values = [per_model[label].get((task, metric)) for label in labels]
        errors = [_stderr(results_by_model[label], task, metric) for label in labels]
        counts = {_samples(results_by_model[label], task) for label in labels} - {None}
        row = [task, metric.replace(",none", ""), "/".join(map(str, sorted(counts))) or None,
               *(_with_error(v, e) for v, e in zip(values, errors))]
        if len(labels) == 2:
            difference = delta(*values)
            both = None if None in errors or difference is None else math.hypot(*errors)
            row.append(_with_error(difference, both))
        rows.append(row)
    headers = ["task", "metric", "n", *labels] + (["delta"] if len(labels) == 2 else [])
    return format_table(headers, rows)
