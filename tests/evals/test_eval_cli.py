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
                 "--decode-tokens", "2", "--plot", tmp_path / "b.png", "--json", tmp_path / "b.json", "--device", "cpu",
                 "-q")
    assert result.exit_code == 0, result.output
    assert "| pico-student" in result.output and "kernels: auto -> " in result.output
    assert "ssd_chunk_scan=" in result.output  # every op the registered kinds call, with its backend
    assert "1 warm-up and 5 timed repeat(s)" in result.output and "model MiB" in result.output
    assert "ran on the torch reference kernels" in result.output
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
        (["--mqar", "--batch-size", "0"], ["--batch-size 0: input should be greater than or equal to 1"]),
    ],
    ids=["missing-task-folder", "missing-include-path", "passkey-too-long", "mqar-too-long", "missing-text",
         "bad-length", "nothing-to-do", "batch-size-0"],
)
def test_eval_bad_input(stories_student, args, fragments):
    assert_one_error_line(run("eval", stories_student, *args), *fragments)


def test_eval_names_the_stride_for_windows_that_do_not_overlap(stories_student, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text(bundled_text()[:2000])
    result = run("eval", stories_student, "--perplexity", text, "--ppl-context", "64", "--ppl-stride", "64",
                 "--out", tmp_path / "e", "-q")
    assert_one_error_line(result, "stride must be in [1, context - 1] = [1, 63], got 64",
                          "--ppl-stride 63 gives windows that do not overlap")
    assert not (tmp_path / "e").exists()


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
        (["--max-memory", "1GB", "--context", "16", "--device", "cpu"], ["needs a CUDA device"]),
        (["--context", "1k,x"], ["Invalid value for '--context'"]),
    ],
    ids=["context-too-long", "decode-past-limit", "max-memory-on-cpu", "bad-length"],
)
def test_bench_bad_input(pico_student, args, fragments):
    assert_one_error_line(run("bench", pico_student, "--batch", "1", *args, "-q"), *fragments)


def test_missing_model_folder(tmp_path):
    assert_one_error_line(run("bench", tmp_path / "nope"), "no such model folder")
    assert_one_error_line(run("eval", tmp_path / "nope", "--mqar"), "no such model folder")


def test_eval_and_bench_outputs_never_replace_an_input(pico_student, tmp_path):
    """--out of eval may not be the model or a folder holding it (or the text); bench's --json / --plot may
    not replace a file of a benchmarked model. The inputs stay intact."""
    import shutil

    model = tmp_path / "models" / "student"
    shutil.copytree(pico_student, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    text = tmp_path / "texts" / "held-out.txt"
    text.parent.mkdir()
    text.write_text(bundled_text()[:300])
    for out, word in ((model, "is"), (model.parent, "contains")):
        assert_one_error_line(run("eval", model, "--mqar", "--mqar-lengths", "64", "--out", out, "-q"),
                              f"output {out} {word} an input of this run")
    assert_one_error_line(run("eval", model, "--perplexity", text, "--out", text.parent, "-q"),
                          f"contains an input of this run ({text})")
    for option in ("--json", "--plot"):
        result = run("bench", model, "--context", "16", "--batch", "1", "--decode-tokens", "2", option,
                     model / "config.json", "-q")
        assert_one_error_line(result, f"output {model / 'config.json'} would replace an input of this run")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_eval_refuses_a_model_with_non_finite_weights(pico_student, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-student"
    shutil.copytree(pico_student, model)
    weights = load_file(model / "model.safetensors")
    name = next(n for n in weights if "mlp" in n)
    weights[name][0, :4] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert_one_error_line(run("eval", model, "--mqar", "--mqar-lengths", "64", "--out", tmp_path / "e", "-q"),
                          f"weight {name} holds NaN or inf values")
    assert not (tmp_path / "e").exists()


def test_eval_and_bench_read_a_gguf_reference(pico_student, teacher_dir, tmp_path, monkeypatch):
    """MODEL and --vs may name a .gguf file, as a teacher does everywhere: read through its cached HF folder
    (the same folder convert and distill dequantize it into once)."""
    import shutil

    from mixerswap.convert.gguf import cached_folder

    monkeypatch.setenv("MIXERSWAP_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "teacher.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    shutil.copytree(teacher_dir("llama"), cached_folder(gguf))
    result = run("eval", pico_student, "--vs", gguf, "--mqar", "--mqar-lengths", "64", "--out", tmp_path / "e", "-q")
    assert result.exit_code == 0, result.output
    models = json.loads((tmp_path / "e" / "results.json").read_text())["models"]
    assert sorted(models) == ["pico-student", "teacher.Q8_0.gguf"]
    result = run("bench", gguf, "--vs", pico_student, "--context", "16", "--batch", "1", "--decode-tokens", "2",
                 "--device", "cpu", "--json", tmp_path / "bench.json", "-q")
    assert result.exit_code == 0, result.output
