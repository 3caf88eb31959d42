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


def test_a_small_keep_attention_fraction_keeps_one_layer(stories_dir, tmp_path):
    """0.1 of stories260k's 5 layers rounds to 0: at least one layer keeps attention, as --help says."""
    result = run("convert", stories_dir, "--keep-attention", "0.1", "--calibration", "none", "--out", tmp_path / "s", "-q")
    assert result.exit_code == 0, result.output
    assert "attention kept at 2," in result.output
    assert "at least one when above 0" in " ".join(run("convert", "--help").output.split())


def test_tasks_command_lists_the_bundled_tasks_and_prints_their_folder_for_lm_eval():
    from lm_eval.tasks import TaskManager

    listing = run("tasks")
    assert listing.exit_code == 0 and listing.output.startswith(
        "mixerswap_stories: mixerswap_stories_choice, mixerswap_stories_cloze, mixerswap_stories_next_word\n")
    folder = run("tasks", "--path").output
    assert folder.count("\n") == 1 and folder.strip() in listing.output
    found = TaskManager(include_path=folder.strip(), include_defaults=False).all_tasks  # what lm_eval --include_path reads
    assert {"mixerswap_stories", "mixerswap_stories_cloze"} <= set(found)


def test_generate_command(stories_dir, tmp_path):
    out = tmp_path / "student"
    assert run("convert", stories_dir, "--keep-attention", "1", "--out", out, "-q").exit_code == 0
    student = run("generate", out, "Once upon a time", "--max-new-tokens", "12", "-q")
    teacher = run("generate", stories_dir, "Once upon a time", "--max-new-tokens", "12", "-q")
    assert student.exit_code == 0, student.output
    assert student.stdout == teacher.stdout and student.stdout.startswith("Once upon a time")


def test_generate_chat_puts_the_prompt_through_the_chat_template(stories_dir, tmp_path):
    """``--chat``: the prompt is a user message of the tokenizer's chat template and only the reply is printed;
    a tokenizer without a template is refused in one line."""
    import torch
    from transformers import AutoTokenizer

    refused = run("generate", stories_dir, "Once upon a time", "--chat", "-q")
    assert refused.exit_code == 1 and "no chat template" in refused.output and "Traceback" not in refused.output
    model = tmp_path / "chat"
    shutil.copytree(stories_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} Then{% endif %}")
    reply = run("generate", model, "Once upon a time", "--chat", "--max-new-tokens", "12", "-q")
    assert reply.exit_code == 0, reply.output

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = torch.tensor([tokenizer("Once upon a time Then")["input_ids"]])
    out = AutoModelForCausalLM.from_pretrained(model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                                               do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert reply.stdout == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    assert not reply.stdout.startswith("Once upon a time")


def test_generate_chat_says_so_when_the_reply_is_empty(stories_dir, tmp_path, monkeypatch):
    """A reply that ends at its first token prints an empty line and says why on stderr (an undistilled
    student often does), instead of leaving the user with nothing."""
    import mixerswap.generation as generation

    seen = {}
    monkeypatch.setattr(generation, "generate_text", lambda *a, chat, **k: seen.setdefault("chat", chat) and "")
    result = run("generate", stories_dir, "Hello", "--chat", "-q")
    assert result.exit_code == 0 and seen["chat"] is True
    assert result.stdout == "\n" and "empty reply" in result.stderr
    monkeypatch.setattr(generation, "generate_text", lambda *a, **k: "")
    assert "empty reply" not in run("generate", stories_dir, "Hello", "-q").stderr


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
        (["--set", "chunk=3"], "mamba2 has no setting 'chunk' (did you mean 'chunk_size'?); tunable: A_init_max, "
                               "A_init_min, chunk_size, conv_activation, conv_kernel, dt_max, dt_min, norm,"),
        (["--plan", "MISSING"], "plan file"),
        (["--plan", "BADKIND"], "layer 1: unknown mixer kind 'rwkv'"),
        (["--plan", "OVERLAP"], "layer 2 is in plan entries 1 and 2"),
        (["--plan", "NOTFIT"], "layer 0 (mamba2): mamba2 settings ['d_state'] follow from the teacher"),
    ],
    ids=["index", "not-int", "ratio-high", "ratio-low", "both", "kind", "fixed-setting", "bad-setting", "typo-option", "typo-set",
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

def test_read_only_or_full_disk_is_one_line_and_leaves_nothing(teacher_dir, tmp_path, monkeypatch):
    """A read-only output file system and a disk that fills up mid-write end in one line saying what to do."""
    import errno
    import os

    from mixerswap.convert.checkpoint_io import SafetensorsShard

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    out = tmp_path / "ro" / "student"
    with monkeypatch.context() as patch:
        patch.setattr(os, "open", read_only)
        assert_clean_failure(run("convert", teacher_dir("llama"), "--out", out, "-q"), out, "read-only file system",
                             "choose an --out on a writable disk")

    def disk_full(self, name, target):
        raise OSError(errno.ENOSPC, "No space left on device", getattr(target, "name", None))

    monkeypatch.setattr(SafetensorsShard, "copy_to", disk_full)
    out = tmp_path / "full"
    assert_clean_failure(run("convert", teacher_dir("llama"), "--out", out, "-q"), out, "no space left on the disk",
                         "free some space")


def test_folders_that_are_not_models_or_students_are_one_line(teacher_dir, tmp_path, monkeypatch):
    """Invalid config.json, random files as a student, and a path typo in generate: one line each."""
    import os

    teacher = copy_teacher(teacher_dir, tmp_path)
    (teacher / "config.json").write_text("{not json")
    out = tmp_path / "out"
    assert_clean_failure(run("convert", teacher, "--out", out), out, "config.json", "not a valid JSON")

    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (junk / name).write_bytes(os.urandom(300))
    assert_clean_failure(run("generate", junk, "hi"), out)
    text = tmp_path / "d.txt"
    text.write_text("some text\n")
    assert_clean_failure(run("distill", junk, "--teacher", teacher_dir("llama"), "--data", text, "--stages", "kd:1k",
                             "--out", out), out, "is not a student", "mixerswap convert")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "students").mkdir()
    assert_clean_failure(run("generate", "students/no_such_student", "hi"), out,
                         "no such model folder: students/no_such_student", "not a hub id")


def test_a_plan_that_does_not_fit_the_weights_is_one_line(teacher_dir, tmp_path):
    out = tmp_path / "student"
    assert run("convert", teacher_dir("llama"), "--out", out, "--calibration", "none", "-q").exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config["plan"][0]["n_heads"] *= 2
    (out / "config.json").write_text(json.dumps(config))
    result = run("generate", out, "hi")
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert errors[0].startswith("Error: the checkpoint's weights do not have the shapes the student's plan gives "
                                "them (layer 0, mamba2: ") and "in the checkpoint, the plan's settings give" in errors[0]
    assert errors[0].endswith("was edited or does not belong to these weights: convert the teacher again")


def test_convert_warns_when_the_teacher_has_no_tokenizer(teacher_dir, tmp_path, caplog):
    import logging

    from mixerswap.convert import convert

    with caplog.at_level(logging.WARNING, logger="mixerswap"):
        convert(teacher_dir("llama"), tmp_path / "student", calibration=None, progress=False)
    assert "has no tokenizer files, so neither has the student" in caplog.text
