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


def test_mixed_plan_and_extra_setting_options(teacher_dir, tmp_path):
    """--plan with attention and mamba2 layers; --NAME VALUE options are mixer settings."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("default: {kind: mamba2, chunk_size: 8}\nlayers:\n  - {layers: -1, kind: attention}\n"
                    "  - {layers: 0, kind: mamba2, conv_kernel: 2}\n")
    result = run("convert", teacher_dir("qwen3"), "--plan", plan, "--out", tmp_path / "mixed", "-q")
    assert result.exit_code == 0, result.output
    entries = json.loads((tmp_path / "mixed" / "config.json").read_text())["plan"]
    assert [(e["kind"], e.get("conv_kernel"), e.get("chunk_size")) for e in entries] == [
        ("mamba2", 2, 64), ("mamba2", 4, 8), ("attention", None, None)]  # entries do not inherit the default's settings
    result = run("convert", teacher_dir("qwen3"), "--chunk-size", "16", "--norm=rms", "--out", tmp_path / "x", "-q")
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "x" / "config.json").read_text())["plan"][0]
    assert (entry["chunk_size"], entry["norm"]) == (16, "rms")


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
        (["--chunk-sise", "8"], "mamba2 has no setting 'chunk_sise'"),
        (["--plan", "MISSING"], "plan file"),
        (["--plan", "BADKIND"], "layer 1: unknown mixer kind 'rwkv'"),
        (["--plan", "OVERLAP"], "layer 2 is in plan entries 1 and 2"),
        (["--plan", "NOTFIT"], "layer 0 (mamba2): mamba2 settings ['d_state'] follow from the teacher"),
    ],
    ids=["index", "not-int", "ratio-high", "ratio-low", "both", "kind", "fixed-setting", "bad-setting", "typo-option",
         "plan-missing", "plan-kind", "plan-overlap", "plan-misfit"],
)
def test_bad_plan_options(teacher_dir, tmp_path, args, message):
    out = tmp_path / "out"
    plans = {"BADKIND": "default: attention\nlayers: [{layers: 1, kind: rwkv}]",
             "OVERLAP": "layers: [{layers: 0-2, kind: mamba2}, {layers: 2, kind: attention}]",
             "NOTFIT": "default: {kind: mamba2, d_state: 4}\nlayers: []"}
    if args[0] == "--plan":
        args = ["--plan", tmp_path / f"{args[1]}.yaml"]
        if args[1].stem in plans:
            args[1].write_text(plans[args[1].stem])
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
    """A reduced demo: one perplexity definition, distillation moves the student towards the teacher."""
    from mixerswap.demo import run_demo

    lines = []
    report = run_demo(tmp_path / "demo", stories=48, held_out=8, distill_tokens=12_000, progress=False,
                      echo=lines.append)
    assert report["teacher_ppl"] < report["distilled_ppl"] < report["student_ppl"]
    assert [s["stage"] for s in report["stage_ppl"]] == ["align", "hidden", "kd"]
    assert report["distilled_agreement"] > report["student_agreement"]
    output = "\n".join(lines)
    assert output.count("held-out perplexity") == 1 and "MQAR accuracy" in output and "decode tokens/s" in output
    assert "held-out perplexity" not in report["table"]  # reported once, by the trainer's definition
    assert (tmp_path / "demo" / "student-distilled" / "config.json").exists()
    result = run("demo", "--help")
    assert result.exit_code == 0 and "--stories" in result.output