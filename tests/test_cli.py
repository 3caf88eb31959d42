"""Command line: the happy path and every bad input ending in one clear line, status 1, no output left."""

import json
import shutil

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from mixerswap.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, out_dir, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.replace("\r", "\n").splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    assert not leftovers, leftovers


def test_convert_command(teacher_dir, tmp_path):
    out = tmp_path / "student"
    result = run("convert", teacher_dir("llama"), "--to", "mamba2", "--keep-attention", "0.34", "--set",
                 "chunk_size=16", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "attention kept at 1" in result.output
    config = json.loads((out / "config.json").read_text())
    assert [e["kind"] for e in config["plan"]] == ["mamba2", "attention", "mamba2"]
    assert config["plan"][0]["chunk_size"] == 16
    assert {"mixerswap.yaml", "README.md", "modeling_mixerswap.py"} <= {p.name for p in out.iterdir()}
    AutoModelForCausalLM.from_pretrained(out)


def test_generate_command(stories_dir, tmp_path):
    out = tmp_path / "student"
    assert run("convert", stories_dir, "--keep-attention", "1", "--out", out, "-q").exit_code == 0
    student = run("generate", out, "Once upon a time", "--max-new-tokens", "12", "-q")
    teacher = run("generate", stories_dir, "Once upon a time", "--max-new-tokens", "12", "-q")
    assert student.exit_code == 0, student.output
    assert student.stdout == teacher.stdout and student.stdout.startswith("Once upon a time")


def test_unknown_family(tmp_path):
    teacher = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(teacher)
    out = tmp_path / "out"
    result = run("convert", teacher, "--out", out)
    assert_clean_failure(result, out, "unsupported teacher architecture 'gpt2'", "llama", "qwen3")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention-layers", "0,3"], "index 3 is out of range for a teacher with 3 layers"),
        (["--attention-layers", "0,x"], "comma-separated integers"),
        (["--keep-attention", "1.5"], "fraction in [0, 1]"),
        (["--keep-attention", "-0.1"], "fraction in [0, 1]"),
        (["--keep-attention", "0.5", "--attention-layers", "1"], "not both"),
        (["--to", "rwkv"], "unknown target mixer 'rwkv'"),
        (["--set", "n_heads=2"], "cannot be set"),
        (["--set", "chunk_size=0"], "chunk_size"),
    ],
    ids=["index", "not-int", "ratio-high", "ratio-low", "both", "kind", "fixed-setting", "bad-setting"],
)
def test_bad_plan_options(teacher_dir, tmp_path, args, message):
    out = tmp_path / "out"
    assert_clean_failure(run("convert", teacher_dir("llama"), *args, "--out", out), out, message)


def test_missing_teacher_folder(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("convert", tmp_path / "nope", "--out", out), out, "no such folder")


def copy_teacher(teacher_dir, tmp_path):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir("llama"), copy)
    return copy


def test_missing_shard(teacher_dir, tmp_path):
    teacher = copy_teacher(teacher_dir, tmp_path)
    victim = sorted(teacher.glob("model-*.safetensors"))[1]
    victim.unlink()
    out = tmp_path / "out"
    assert_clean_failure(run("convert", teacher, "--out", out), out, "missing", victim.name)


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupt_shard(teacher_dir, tmp_path, damage):
    teacher = copy_teacher(teacher_dir, tmp_path)
    victim = sorted(teacher.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + data[17:])
    out = tmp_path / "out"
    assert_clean_failure(run("convert", teacher, "--out", out), out, "corrupt shard", victim.name)


def test_existing_output_needs_overwrite(teacher_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run("convert", teacher_dir("llama"), "--out", out)
    assert result.exit_code != 0 and "pass --overwrite" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    assert run("convert", teacher_dir("llama"), "--out", out, "--overwrite", "-q").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failure_midway_leaves_no_output(teacher_dir, tmp_path, monkeypatch):
    import mixerswap.convert.pipeline as pipeline

    def explode(*args, **kwargs):
        raise ValueError("simulated failure while writing a mixer")

    monkeypatch.setattr(pipeline, "_write_mixer", explode)
    out = tmp_path / "out"
    assert_clean_failure(run("convert", teacher_dir("llama"), "--out", out), out, "simulated failure")


def test_demo_runs(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--steps", "20", "--distill-tokens", "4096", "-q")
    assert result.exit_code == 0, result.output
    assert "perplexity: teacher" in result.output and "MQAR accuracy" in result.output
    assert "decode tokens/s" in result.output
    assert (tmp_path / "demo" / "student-distilled" / "config.json").exists()
