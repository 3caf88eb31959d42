"""Distillation end to end on the real stories260k teacher: each stage learns, resume is exact, errors are early."""

import json
from fnmatch import fnmatch

import yaml

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerswap.architectures.mixers import Mamba2Mixer
from mixerswap.cli import main
from mixerswap.convert import convert
from mixerswap.demo import demo_text
from mixerswap.distill.data import PackedLoader, read_documents
from mixerswap.distill.recipe import (DEFAULT_FAST_LR_SCALE, DEFAULT_LR, DistillRecipe, RecipeError, StageConfig,
                                     parse_stages)
from mixerswap.distill.stages import build_stage
from mixerswap.distill.trainer import DistillError, run_distill


@pytest.fixture(scope="module")
def setup(stories_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    convert(stories_dir, root / "student", keep_attention=0.4, progress=False)
    corpus = root / "stories.txt"
    corpus.write_text("\n\n".join(demo_text().splitlines()))
    return {"teacher": stories_dir, "student": root / "student", "data": corpus, "root": root}


def recipe(setup, out, stages, **extra):
    settings = dict(student=str(setup["student"]), teacher=str(setup["teacher"]), data=str(setup["data"]),
                    out=str(out), stages=stages, seq_len=32, batch_size=4, held_out_docs=2, checkpoint_every=2)
    settings.update(extra)
    return DistillRecipe.validated(settings)


@pytest.mark.parametrize("stage", ["align", "hidden", "kd", "align-matrix"])
def test_each_stage_lowers_its_loss(setup, stage):
    torch.manual_seed(0)
    name, _, mode = stage.partition("-")
    student = AutoModelForCausalLM.from_pretrained(setup["student"]).train()
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"], attn_implementation="eager").eval()
    config = StageConfig(name=name, tokens=10**6, mode=mode or "output", matrix_len=32)
    runner = build_stage(config, student, teacher)
    params = runner.select_trainable()
    tokenizer = AutoTokenizer.from_pretrained(setup["teacher"])
    batch = next(iter(PackedLoader(read_documents(str(setup["data"])), tokenizer, seq_len=32, batch_size=4)))
    opt = torch.optim.Adam(params, lr={"align": 3e-3, "hidden": 1e-3, "kd": 1e-3}[name])
    losses = []
    for _ in range(8):
        loss, _ = runner.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    if name != "kd":  # only the mixers (and nothing of the teacher) were trained
        assert all(not p.requires_grad for n, p in student.named_parameters() if "embed" in n or "lm_head" in n)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_pipeline_lowers_held_out_perplexity(setup, tmp_path):
    stages = parse_stages("align:2k,hidden:2k,kd:4k")
    result = run_distill(recipe(setup, tmp_path / "out", stages), progress=False)
    assert result.perplexity_after < result.perplexity_before
    assert [s["stage"] for s in result.stage_perplexity] == ["align", "hidden", "kd"]
    assert result.stage_perplexity[-1]["perplexity"] == pytest.approx(result.perplexity_after, rel=1e-4)
    assert result.perplexity_teacher < result.perplexity_after
    out = tmp_path / "out"
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "mixerswap.yaml"} <= {p.name for p in out.iterdir()}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in dict.fromkeys(line["stage"] for line in lines)] == ["align", "hidden", "kd"]
    assert [line["stage"] for line in lines if line.get("event") == "stage_end"] == ["align", "hidden", "kd"]
    recorded = yaml.safe_load((out / "mixerswap.yaml").read_text())["held_out_perplexity"]
    assert set(recorded) == {"teacher", "before", "stages", "after"}
    assert not (tmp_path / "out.work").exists()
    AutoModelForCausalLM.from_pretrained(out)


def test_resume_after_crash_is_bit_exact(setup, tmp_path):
    stages = parse_stages("align:1k,hidden:1k,kd:1k")
    run_distill(recipe(setup, tmp_path / "a", stages), progress=False)
    crashed = recipe(setup, tmp_path / "b", stages)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distill(crashed, progress=False, _fail_after_step=11)  # inside the hidden stage, off a checkpoint
    assert not (tmp_path / "b").exists()
    run_distill(crashed, resume=True, progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the steps the crashed run logged after its last checkpoint are logged once, by the resumed run
    logs = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in "ab"}
    steps = {run: [(line["stage"], line.get("step"), line.get("loss")) for line in lines]
             for run, lines in logs.items()}
    assert [line["global_step"] for line in logs["b"] if "loss" in line] == list(range(1, 25))
    assert steps["a"] == steps["b"]


# Two processes on CPU (gloo) against one in this process: with a GPU, this process would train on it while two
# ranks cannot share one GPU under NCCL, so these checks are for machines without one (CI).
CPU_PROCESSES = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU multi-process check (two ranks, gloo)")
BAD_ALIGN = [{"name": "align", "tokens": 1024, "lr": 2.0}, {"name": "kd", "tokens": 1024}]  # align's rate wrecks it


def test_a_stage_that_raises_validation_perplexity_is_undone(setup, tmp_path):
    result = run_distill(recipe(setup, tmp_path / "out", BAD_ALIGN, validation_docs=4), progress=False)
    align, kd = result.stage_perplexity
    assert align["reverted"] and align["validation_perplexity"] > align["validation_kept"], align
    # undone: the held-out perplexity is the converted student's again, and kd started from there
    assert align["perplexity_trained"] > 1.5 * align["perplexity"]
    assert align["perplexity"] == pytest.approx(result.perplexity_before, rel=1e-6)
    assert not kd["reverted"] and kd["validation_kept"] == kd["validation_perplexity"] < align["validation_kept"]
    assert result.perplexity_after == pytest.approx(kd["perplexity"], rel=1e-4)
    assert result.perplexity_after < result.perplexity_before
    events = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
              if '"stage_end"' in line]
    assert [e["reverted"] for e in events] == [True, False]
    measured = torch.cuda.is_available()  # peak memory: CUDA only
    assert all(e["tokens_per_s"] > 0 and (e["peak_memory_bytes"] > 0 if measured else e["peak_memory_bytes"] is None)
               for e in events)
    # without validation documents every stage is kept, whatever it did
    kept = run_distill(recipe(setup, tmp_path / "kept", BAD_ALIGN[:1]), progress=False)  # kd after it may overflow
    assert kept.stage_perplexity[0]["perplexity"] > 1.5 * result.perplexity_before
    assert "reverted" not in kept.stage_perplexity[0]


def test_a_run_resumed_inside_an_undone_stage_undoes_it_the_same(setup, tmp_path):
    run_distill(recipe(setup, tmp_path / "a", BAD_ALIGN, validation_docs=4), progress=False)
    crashed = recipe(setup, tmp_path / "b", BAD_ALIGN, validation_docs=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distill(crashed, progress=False, _fail_after_step=5)  # inside align, after the checkpoint of step 4
    resumed = run_distill(crashed, resume=True, progress=False)
    assert resumed.stage_perplexity[0]["reverted"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_nan_loss_stops_and_keeps_last_checkpoint(setup, tmp_path, monkeypatch):
    from mixerswap.distill import stages as stages_module

    real = stages_module.HiddenStage.loss
    calls = {"n": 0}

    def poisoned(self, batch, key=None):
        calls["n"] += 1
        loss, parts = real(self, batch)
        return (loss * float("nan"), parts) if calls["n"] >= 3 else (loss, parts)

    monkeypatch.setattr(stages_module.HiddenStage, "loss", poisoned)
    settings = recipe(setup, tmp_path / "out", parse_stages("align:1k,hidden:4k"))
    with pytest.raises(DistillError, match="loss became nan at step 3 of stage hidden.*teacher's outputs are finite, "
                                           "so the student's went non-finite.*Last good checkpoint"):
        run_distill(settings, progress=False)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.work" / "checkpoints" / "latest").exists()


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, fragment):
    assert result.exit_code != 0
    errors = [line for line in result.output.replace("\r", "\n").splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and fragment in errors[0], result.output


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"data": "missing.jsonl"}, "missing.jsonl"),
        ({"data": "empty.txt"}, "empty"),
        ({"seq_len": 100000}, "seq_len"),
        ({"data": "late-bad-byte.txt"}, "late-bad-byte.txt: not UTF-8 text at line 301"),
        ({"data": "late-no-text.jsonl"}, "late-no-text.jsonl:301: no field 'text'"),
    ],
    ids=["unreadable-data", "empty-data", "seq-len", "bad-utf8-mid-file", "jsonl-line-without-text"],
)
def test_bad_inputs_fail_before_training(setup, tmp_path, change, fragment):
    """Every input is checked before training starts, the whole data included (a bad line far into a
    file): one line naming it, and no output or work folder left."""
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "late-bad-byte.txt").write_bytes(b"a fine line of text\n\n" * 150 + b"caf\xe9 \xff\n")
    (tmp_path / "late-no-text.jsonl").write_text('{"text": "fine"}\n' * 300 + '{"txt": "oops"}\n')
    args = {"teacher": setup["teacher"], "data": setup["data"], "seq_len": 32}
    args.update({k: (tmp_path / v if k == "data" else v) for k, v in change.items()})
    result = run_cli("distill", setup["student"], "--teacher", args["teacher"], "--data", args["data"],
                     "--stages", "align:1k", "--seq-len", args["seq_len"], "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_without_teacher_the_recorded_one_distills_plain_text_of_any_name(setup, tmp_path):
    """No --teacher: the one in the student's mixerswap.yaml; --data a .raw file without blank lines (wikitext's
    shape): plain text, a document per line."""
    raw = tmp_path / "wikitext2-test.raw"
    raw.write_text("".join(f" {line} \r\n" for line in demo_text().splitlines()))
    result = run_cli("distill", setup["student"], "--data", raw, "--stages", "kd:1k", "--seq-len", "32",
                     "--held-out-docs", "2", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "out" / "mixerswap.yaml").read_text())["distill"]["teacher"] == str(setup["teacher"])


def test_a_recorded_teacher_that_is_not_here_is_one_line(setup, tmp_path):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(setup["student"], student)
    settings = yaml.safe_load((student / "mixerswap.yaml").read_text())
    (student / "mixerswap.yaml").write_text(yaml.safe_dump({**settings, "teacher": str(tmp_path / "gone")}))
    args = ("distill", student, "--data", setup["data"], "--stages", "kd:1k", "--out", tmp_path / "out", "-q")
    assert_one_line_error(run_cli(*args), f"the teacher recorded in {student / 'mixerswap.yaml'}, {tmp_path / 'gone'}, "
                                          "is not here; pass --teacher")
    (student / "mixerswap.yaml").unlink()
    assert_one_line_error(run_cli(*args), f"no --teacher given, and {student} records none")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def test_a_non_finite_teacher_is_blamed_in_one_line(setup, tmp_path, monkeypatch):
    """A teacher whose outputs turn NaN stops training with one line (no traceback) that says the teacher,
    not the learning rate, is at fault."""
    from mixerswap.distill.teacher import TeacherModel

    real, calls = TeacherModel.forward, {"n": 0}

    def poisoned(self, mode, inputs, *args, **kwargs):
        out = real(self, mode, inputs, *args, **kwargs)
        calls["n"] += mode == "hidden"
        return out * float("nan") if mode == "hidden" and calls["n"] >= 3 else out

    monkeypatch.setattr(TeacherModel, "forward", poisoned)
    result = run_cli("distill", setup["student"], "--teacher", setup["teacher"], "--data", setup["data"], "--stages",
                     "kd:2k", "--seq-len", "32", "--batch-size", "4", "--held-out-docs", "2", "--out", tmp_path / "out",
                     "-q")
    assert_one_line_error(result, "The teacher's own outputs are NaN/inf on this batch")
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_full_disk_keeps_the_last_checkpoint_and_says_resume(setup, tmp_path, monkeypatch):
    import errno

    from mixerswap.distill import checkpoint

    real, calls = checkpoint.save_file, {"n": 0}

    def fills_up(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    result = run_cli("distill", setup["student"], "--teacher", setup["teacher"], "--data", setup["data"], "--stages",
                     "align:2k", "--seq-len", "32", "--batch-size", "4", "--held-out-docs", "2",
                     "--checkpoint-every", "2", "--out", tmp_path / "out", "-q")
    assert_one_line_error(result, "no space left on the disk")
    assert "step-00000002 is kept" in result.output and "--resume" in result.output
    checkpoints = tmp_path / "out.work" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000002"]
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_is_caught(setup, tmp_path, teacher_dir):
    result = run_cli("distill", setup["student"], "--teacher", teacher_dir("llama"), "--data", setup["data"],
                     "--stages", "kd:1k", "--seq-len", "32", "--out", tmp_path / "out", "-q",
                     "--allow-other-teacher")  # past the identity check, to the vocabulary check
    assert result.exit_code != 0 and "vocab" in result.output.lower()


def test_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student: s\nteacher: t\ndata: d\nout: o\nstages: [{name: kd, tokens: 1M, temprature: 2}]\n")
    with pytest.raises(RecipeError, match="unknown key 'stages.0.temprature'"):
        DistillRecipe.from_yaml(path)
    path.write_text("student: s\nteacher: t\ndata: d\nout: o\nlearning_rate: 1\nstages: [{name: kd, tokens: 1M}]\n")
    result = run_cli("distill", "--recipe", path)
    assert_one_line_error(result, "unknown key 'learning_rate'")
    with pytest.raises(RecipeError, match="bad stage"):
        parse_stages("align:1M,distill:2M")
    assert parse_stages("align:20M,kd:1.5B") == [{"name": "align", "tokens": 20_000_000},
                                                 {"name": "kd", "tokens": 1_500_000_000}]


def test_lora_on_kept_attention_is_merged_and_resumable(setup, tmp_path):
    stages = parse_stages("align:512,kd:1k")
    lora = {"r": 4, "alpha": 8}
    run_distill(recipe(setup, tmp_path / "a", stages, lora=lora), progress=False)
    crashed = recipe(setup, tmp_path / "b", stages, lora=lora)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distill(crashed, progress=False, _fail_after_step=7)  # inside kd, after a checkpoint with adapters
    run_distill(crashed, resume=True, progress=False)
    student = AutoModelForCausalLM.from_pretrained(setup["student"])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert a.state_dict().keys() == student.state_dict().keys()  # merged: plain names, no adapters
    kept = a.config.conversion["attention_layers"][0]
    name = f"model.layers.{kept}.self_attn.q_proj.weight"
    assert not torch.equal(a.state_dict()[name], student.state_dict()[name])  # the adapter changed it
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    with pytest.raises(RecipeError, match="unknown key 'lora.rank'"):
        recipe(setup, tmp_path / "c", stages, lora={"rank": 4})


@CPU_PROCESSES
def test_two_process_data_parallel_matches_one_process(setup, tmp_path):
    """`torchrun --nproc_per_node 2` (CPU, gloo): each rank takes half of every batch, gradients are averaged;
    only rank 0 logs, draws progress (plain lines: stderr is a pipe) and says "wrote"."""
    import subprocess
    import sys

    common = ["distill", str(setup["student"]), "--teacher", str(setup["teacher"]), "--data", str(setup["data"]),
              "--stages", "align:1k,hidden:1k,kd:1k", "--seq-len", "32", "--held-out-docs", "2"]
    assert run_cli(*common, "--batch-size", "8", "--out", tmp_path / "one", "-q").exit_code == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "mixerswap", *common, "--batch-size", "4",
                           "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stderr.count("trainer: wrote ") == 1, proc.stdout + proc.stderr
    assert "\r" not in proc.stderr
    for stage in ("align", "hidden", "kd"):
        assert sum(line.startswith(f"{stage}: ") for line in proc.stderr.splitlines()) == 1, proc.stderr
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    # The runs differ only in the order gradients are summed; Adam turns that round-off into up to about one
    # step (the learning rate) on weights whose gradients are near zero, so that is the tolerance.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=one_adam_step(name), msg=name)
    start = AutoModelForCausalLM.from_pretrained(setup["student"]).state_dict()
    assert any(not torch.equal(one[n], start[n]) for n in one)  # training happened


def one_adam_step(name: str) -> float:
    """About the most one Adam step at the default rates moves weight ``name`` of a Mamba-2 student."""
    fast = ".self_attn." in name and any(fnmatch(name.split(".self_attn.")[1], p) for p in Mamba2Mixer.fast_parameters)
    return max(DEFAULT_LR.values()) * (DEFAULT_FAST_LR_SCALE if fast else 1.0)


def test_out_never_replaces_an_input(setup):
    """--overwrite with --out = the student, or the folder holding the student and the data, is refused."""
    stages = parse_stages("kd:1k")
    for out, word in ((setup["student"], "is"), (setup["root"], "contains")):
        with pytest.raises(ValueError, match=f"{word} an input of this run"):
            run_distill(recipe(setup, out, stages), overwrite=True, progress=False)
    assert (setup["student"] / "config.json").exists() and setup["data"].exists()


def test_every_recipe_in_the_repo_validates():
    from pathlib import Path

    recipes = [p for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml") if not p.name.startswith("accelerate_")]
    assert recipes
    for path in recipes:
        DistillRecipe.from_yaml(path)


def test_lolcats_lora_on_a_linear_student(setup, tmp_path):
    """The LoLCATs recipe's shape: align the new parts, then kd with LoRA on the linearized q/k/v/o."""
    student = tmp_path / "linear"
    convert(setup["teacher"], student, to="linear", keep_attention=0.4, mixer_settings={"window": 8}, progress=False)
    stages = [{"name": "align", "tokens": 2048, "lr": 1e-2}, {"name": "kd", "tokens": 2048, "trainable": "mixers"}]
    result = run_distill(recipe({**setup, "student": student}, tmp_path / "out", stages,
                                lora={"layers": "mixers", "r": 4}), progress=False)
    assert result.perplexity_after < result.perplexity_before
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not [n for n, _ in saved.named_parameters() if "lora" in n]  # merged back into q/k/v/o


def test_a_different_teacher_is_refused_unless_allowed(setup, tmp_path):
    """A same-shaped but different Llama as teacher: refused by fingerprint, accepted when allowed; a bf16
    re-save of the right teacher still matches."""
    import shutil

    from mixerswap.convert.checkpoint_io import folder_fingerprint

    other = tmp_path / "other-llama"
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(setup["teacher"]).config).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(setup["teacher"] / name, other / name)
    resaved = tmp_path / "teacher-bf16"
    AutoModelForCausalLM.from_pretrained(setup["teacher"], dtype=torch.bfloat16).save_pretrained(resaved)
    assert folder_fingerprint(resaved) == folder_fingerprint(setup["teacher"]) != folder_fingerprint(other)

    stages = parse_stages("kd:1k")
    with pytest.raises(ValueError, match="is not the model .* was converted from"):
        run_distill(recipe({**setup, "teacher": other}, tmp_path / "out", stages), progress=False)
    assert not (tmp_path / "out").exists()
    result = run_distill(recipe({**setup, "teacher": other}, tmp_path / "out", stages, allow_other_teacher=True),
                         progress=False)
    assert (result.out / "config.json").exists()


def test_held_out_rows_sets_the_rows_scored(setup, tmp_path):
    from mixerswap.distill.data import held_out_split
    from mixerswap.distill.validation import HeldOutNLL, eval_rows, perplexity

    stages = parse_stages("align:128")
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup["teacher"])
    _, held_out = held_out_split(read_documents(str(setup["data"])), 8)
    for rows in (8, 20):
        result = run_distill(recipe(setup, tmp_path / f"out{rows}", stages, held_out_docs=8, held_out_rows=rows),
                             progress=False)
        batches = eval_rows(held_out, tokenizer, 32, max_rows=rows)
        assert sum(len(b["input_ids"]) for b in batches) == rows
        expected = perplexity(lambda o, b: o(b), HeldOutNLL(teacher), batches, "cpu")
        assert result.perplexity_teacher == pytest.approx(expected, rel=1e-6), rows
