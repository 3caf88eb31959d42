"""`mixerswap eval` and `mixerswap bench`: happy paths write their files; bad input ends in one `Error:` line."""

import json

import pytest
from click.testing import CliRunner

from mixerswap.cli import main
from mixerswap.convert import convert
from mixerswap.evals.text_tasks import bundled_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def pico_student(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pico-student"
    convert(teacher_dir("llama"), out, keep_attention=0.34, progress=False)
    return out


def test_bench_command_writes_table_json_and_plot(pico_student, teacher_dir, tmp_path):
    result = run("bench", pico_student, "--vs", teacher_dir("llama"), "--context", "16,32", "--batch", "1,2",
                 "--decode-tokens", "2", "--plot", tmp_path / "b.png", "--json", tmp_path / "b.json", "-q")
    assert result.exit_code == 0, result.output
    assert "| pico-student" in result.output and "kernels: auto -> " in result.output
    assert "ssd_chunk_scan=" in result.output  # every op the registered kinds call, with its backend
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["reference"] == teacher_dir("llama").name
    assert len(report["runs"]) == 8 and len(report["ratios"]) == 4
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_command_perplexity_and_probes_side_by_side(stories_student, stories_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(bundled_text()[:600])
    out = tmp_path / "eval"
    result = run("eval", stories_student, "--vs", stories_dir, "--perplexity", text, "--ppl-context", "128",
                 "--passkey", "200", "--needle", "200", "--needle-depths", "0,1", "--samples", "1", "--mqar",
                 "--mqar-lengths", "64", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["perplexity"]) == set(results["probes"]) == {"student", "stories260k"}
    teacher_ppl = results["perplexity"]["stories260k"]
    assert teacher_ppl["context"] == 128 and teacher_ppl["bytes"] == 600 and teacher_ppl["perplexity"] > 1
    probes = {(r["probe"], r["length"], r["depth"]) for r in results["probes"]["student"]}
    assert probes == {("passkey", 200, None), ("needle", 200, 0.0), ("needle", 200, 1.0), ("mqar", 64, None)}
    assert (out / "probes.png").read_bytes()[:8] == PNG_MAGIC
    assert "bits_per_byte" in result.output and "| mqar" in result.output
    assert (out / "summary.md").read_text().strip() in result.output


def assert_one_error_line(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.replace("\r", "\n").splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--tasks", "./no/such/tasks/"], ["no such task folder: ./no/such/tasks/"]),
        (["--tasks", "mixerswap_stories", "--include-path", "./missing-dir"], ["no such task folder"]),
        (["--passkey", "1k"], ["passkey length 1k + 10 generated tokens exceeds the model's limit of 512"]),
        (["--mqar", "--mqar-lengths", "2k"], ["MQAR length 2k exceeds the model's limit of 512"]),
        (["--perplexity", "./absent.txt"], ["no such text file"]),
        (["--passkey", "4q"], ["Invalid value for '--passkey'", "bad length '4q'"]),
        ([], ["nothing to evaluate"]),
    ],
    ids=["missing-task-folder", "missing-include-path", "passkey-too-long", "mqar-too-long", "missing-text",
         "bad-length", "nothing-to-do"],
)
def test_eval_bad_input(stories_student, args, fragments):
    assert_one_error_line(run("eval", stories_student, *args), *fragments)


def test_eval_unknown_task(stories_student):
    result = run("eval", stories_student, "--tasks", "mixerswap_stories,no_such_task_xyz", "-q")
    assert_one_error_line(result, "unknown task(s): no_such_task_xyz")


def test_eval_needs_a_tokenizer_for_tasks(pico_student):
    assert_one_error_line(run("eval", pico_student, "--tasks", "mixerswap_stories"), "has no tokenizer files")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--context", "1k"], ["bench context 1k + 32 generated tokens exceeds the model's limit of 256"]),
        (["--context", "200", "--decode-tokens", "64"], ["exceeds the model's limit of 256"]),
        (["--max-memory", "1GB", "--context", "16"], ["needs a CUDA device"]),
        (["--context", "1k,x"], ["Invalid value for '--context'"]),
    ],
    ids=["context-too-long", "decode-past-limit", "max-memory-on-cpu", "bad-length"],
)
def test_bench_bad_input(pico_student, args, fragments):
    assert_one_error_line(run("bench", pico_student, "--batch", "1", *args, "-q"), *fragments)


def test_missing_model_folder(tmp_path):
    assert_one_error_line(run("bench", tmp_path / "nope"), "no such model folder")
    assert_one_error_line(run("eval", tmp_path / "nope", "--mqar"), "no such model folder")
