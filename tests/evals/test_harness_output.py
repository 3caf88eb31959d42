"""lm-eval's side of `eval`: n and standard errors in the table, one line when a task's data is offline, no git noise."""

import math

import pytest

from mixerswap.evals import harness
from mixerswap.evals.harness import TaskSelection, lm_eval_table, run_lm_eval


def result(acc, stderr, n):
    return {"results": {"arc": {"alias": "arc", "acc,none": acc, "acc_stderr,none": stderr}},
            "n-samples": {"arc": {"original": 100, "effective": n}}}


def test_table_shows_documents_and_standard_errors_next_to_the_delta():
    table = lm_eval_table({"student": result(0.3333, 0.0648, 54), "teacher": result(0.5, 0.068, 54)})
    header, _, row = table.splitlines()
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert [c.strip() for c in header.split("|")[1:-1]] == ["task", "metric", "n", "student", "teacher", "delta"]
    assert cells[:5] == ["arc", "acc", "54", "0.3333 ± 0.065", "0.5 ± 0.068"]
    assert cells[5] == f"-0.1667 ± {math.hypot(0.0648, 0.068):.2g}"


def test_unreachable_task_data_is_one_line(monkeypatch):
    import lm_eval
    import lm_eval.models.huggingface

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **kwargs: object())
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        run_lm_eval(object(), object(), TaskSelection(["hellaswag"]))
    message = str(err.value)
    assert "\n" not in message and "hellaswag" in message and "Rowan/hellaswag" in message
    assert "offline mode is on" in message and "--include-path" in message


def test_lm_eval_git_lookup_is_silent_outside_a_repository(tmp_path, monkeypatch, capfd):
    from lm_eval import evaluator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    original = evaluator.get_git_commit_hash
    with harness._quiet_git_hash():
        assert evaluator.get_git_commit_hash() is None
    assert evaluator.get_git_commit_hash is original
    assert "fatal" not in capfd.readouterr().err
