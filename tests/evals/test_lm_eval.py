"""lm-eval integration: the bundled offline tasks, `mixerswap eval`, and plain `lm_eval` agreeing with it."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mixerswap.architectures.cache import HybridMixerCache
from mixerswap.cli import main
from mixerswap.evals import TASKS_DIR
from mixerswap.evals.harness import metric_rows, resolve_tasks, run_lm_eval
from mixerswap.evals.loading import load_model
from mixerswap.evals.text_tasks import BUNDLED_SOURCE, build_story_tasks, bundled_text, story_docs

from ..conftest import SHARED_DATA

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WIKITEXT = SHARED_DATA / "text" / "wikitext2-test.raw"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def test_bundled_tasks_are_rebuilt_exactly_from_the_bundled_text(tmp_path):
    out = tmp_path / "stories"
    names = build_story_tasks(bundled_text(), out, source=BUNDLED_SOURCE)
    bundled = TASKS_DIR / "stories"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in bundled.iterdir() if p.is_file())
    uncommented = lambda path: [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]  # noqa: E731
    for path in out.iterdir():
        if path.suffix == ".yaml":  # the comment header names the folder it was written for
            assert uncommented(path) == uncommented(bundled / path.name), path.name
        else:
            assert path.read_bytes() == (bundled / path.name).read_bytes(), path.name
    assert names == ["mixerswap_stories_cloze", "mixerswap_stories_choice", "mixerswap_stories_next_word"]


def test_task_rows_are_deterministic_by_seed():
    text = bundled_text()
    first, again, other = story_docs(text, seed=0), story_docs(text, seed=0), story_docs(text, seed=1)
    assert first == again
    assert first["choice"] != other["choice"]
    for row in first["choice"]:
        assert len(row["choices"]) == 4 and 0 <= row["label"] < 4
        assert row["choices"][row["label"]] not in row["context"]
    for row in first["cloze"]:
        assert f"{row['context']} {row['target']}" in " ".join(text.split())


def test_unknown_task_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such task folder"):
        resolve_tasks(str(tmp_path / "absent") + "/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="defines no lm-eval tasks"):
        resolve_tasks(str(tmp_path / "empty"))
    selection = resolve_tasks("mixerswap_stories")
    assert selection.names == ["mixerswap_stories"] and not selection.needs_defaults


def test_generation_tasks_decode_through_the_hybrid_cache(stories_student):
    model, tokenizer = load_model(stories_student)
    seen = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        seen.append((ids.shape[1], type(cache), cache.get_seq_length() if cache is not None else 0))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        results = run_lm_eval(model, tokenizer, resolve_tasks("mixerswap_stories_next_word"), batch_size=2, limit=2,
                              bootstrap_iters=0)
    finally:
        handle.remove()
    assert "exact_match,first_word" in results["results"]["mixerswap_stories_next_word"]
    decode_steps = [s for s in seen if s[0] == 1]
    assert decode_steps, "no single-token decode step: generation did not use the cache"
    assert all(kind is HybridMixerCache and past > 0 for _, kind, past in decode_steps)


def test_eval_command_matches_plain_lm_eval(stories_student, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", str(stories_student), "--tasks", "mixerswap_stories", "--limit", "8", "--batch-size", "4",
            "--out", str(out), "-q"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ours = json.loads((out / "results.json").read_text())["lm_eval"]["student"]
    assert {"mixerswap_stories_cloze", "mixerswap_stories_choice", "mixerswap_stories_next_word"} <= set(
        ours["results"])
    assert "mixerswap_stories_cloze" in result.output

    plain_out = tmp_path / "plain"
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={stories_student},trust_remote_code=True", "--tasks", "mixerswap_stories",
           "--include_path", str(TASKS_DIR), "--limit", "8", "--batch_size", "4", "--device", "cpu",
           "--output_path", str(plain_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(Path(glob.glob(str(plain_out / "**" / "results_*.json"), recursive=True)[0]).read_text())
    ours_rows, plain_rows = metric_rows(ours), metric_rows(plain)
    assert ours_rows.keys() == plain_rows.keys() and len(ours_rows) >= 5
    for key, value in plain_rows.items():
        # on a GPU both runs take the same path, but matmul reductions there depend on the batch shapes
        assert ours_rows[key] == pytest.approx(value, rel=1e-4 if torch.cuda.is_available() else 1e-6, abs=1e-9), key
    assert any(0 < v < 1 for (task, metric), v in ours_rows.items() if metric.startswith("acc")), ours_rows


@pytest.mark.skipif(not WIKITEXT.exists(), reason="shared WikiText-2 text not available")
def test_task_folder_built_from_user_text(stories_dir, tmp_path):
    paragraphs = [line.strip() for line in WIKITEXT.read_text().splitlines()
                  if len(line.split()) > 40 and not line.strip().startswith("=")][:6]
    folder = tmp_path / "my_tasks"
    names = build_story_tasks("\n".join(paragraphs), folder, prefix="wiki")
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["eval", str(stories_dir), "--tasks", f"{folder}/", "--limit", "3", "--out",
                                       str(out), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())["lm_eval"]["stories260k"]["results"]
    assert set(results) == set(names)
