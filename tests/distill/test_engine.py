"""The engine: stage objectives, FSDP2 under torchrun, precision, parameter groups, pickle-free checkpoints."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mixerswap.architectures import MixerSwapForCausalLM
from mixerswap.architectures.mixers import Mamba2Mixer
from mixerswap.convert import convert
from mixerswap.distill.checkpoint import CheckpointError, latest_checkpoint, load_progress
from mixerswap.distill.lora import lora_targets
from mixerswap.distill.recipe import DEFAULT_LR, LoraOptions, RecipeError, StageConfig, parse_stages
from mixerswap.distill.stages import build_stage
from mixerswap.distill.trainer import run_distill, save_student, saved_dtype

from ..conftest import build_teacher
from .test_pipeline import CPU_PROCESSES, assert_one_line_error, one_adam_step, recipe, run_cli, setup  # noqa: F401  (module fixture)

STAGES = "align:512,hidden:512,kd:1k"  # 2 + 2 + 4 optimizer steps of 8 rows x 32 tokens


def torchrun(setup, out, *extra, stages=STAGES):  # noqa: F811
    """``torchrun --nproc_per_node 2 -m mixerswap distill`` on CPU (gloo), batch 4 per process."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "mixerswap", "distill", str(setup["student"]), "--teacher", str(setup["teacher"]), "--data", str(setup["data"]),
            *(["--stages", stages] if stages else []), "--seq-len", "32", "--held-out-docs", "2", "--batch-size", "4", "--checkpoint-every", "2",
            "--out", str(out), "-q", *map(str, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def pico_student(teacher_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pico") / "student"
    convert(teacher_dir("llama"), folder, attention_layers=[1], progress=False)
    return folder


@CPU_PROCESSES
def test_fsdp_matches_one_process_and_resumes_exactly(setup, tmp_path):  # noqa: F811
    """FSDP2 over 2 CPU processes = one process with the same global batch; a crash + resume = no crash."""
    run_distill(recipe(setup, tmp_path / "one", parse_stages(STAGES), batch_size=8), progress=False)
    proc = torchrun(setup, tmp_path / "fsdp", "--distributed", "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, fsdp = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    for name in one:  # summation order only: Adam makes that up to about one step on near-zero gradients
        torch.testing.assert_close(fsdp[name], one[name], rtol=0, atol=one_adam_step(name), msg=name)

    crashed = torchrun(setup, tmp_path / "b", "--distributed", "fsdp", "--fail-after-step", 7)  # inside kd
    assert crashed.returncode != 0 and "simulated crash after step 7" in crashed.stderr
    assert load_progress(latest_checkpoint(tmp_path / "b.work" / "checkpoints")).global_step == 6
    resumed = torchrun(setup, tmp_path / "b", "--distributed", "fsdp", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = weights(tmp_path / "b")
    for name in fsdp:
        assert torch.equal(fsdp[name], b[name]), name


@CPU_PROCESSES
def test_fsdp_undoes_a_bad_stage_like_one_process(setup, tmp_path):  # noqa: F811
    """The stage guard under FSDP2: rank 0 keeps the gathered start weights, every rank gets them back."""
    stages = [{"name": "align", "tokens": 512, "lr": 1.0}, {"name": "kd", "tokens": 1024}]
    one = run_distill(recipe(setup, tmp_path / "one", stages, batch_size=8, validation_docs=4), progress=False)
    assert [s["reverted"] for s in one.stage_perplexity] == [True, False]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({"stages": stages, "validation_docs": 4}))
    proc = torchrun(setup, tmp_path / "fsdp", "--distributed", "fsdp", "--recipe", recipe_file, stages=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(align, undone)" in proc.stdout and "(kd)" in proc.stdout, proc.stdout
    ones, fsdp = weights(tmp_path / "one"), weights(tmp_path / "fsdp")
    for name in ones:
        torch.testing.assert_close(fsdp[name], ones[name], rtol=0, atol=one_adam_step(name), msg=name)


def test_bf16_autocast_lowers_the_loss(setup, tmp_path):  # noqa: F811
    settings = recipe(setup, tmp_path / "out", [{"name": "kd", "tokens": 3000, "lr": 2e-3}], mixed_precision="bf16")
    result = run_distill(settings, progress=False)
    losses = [h["loss"] for h in result.history]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < 0.9 * losses[0], losses
    assert result.perplexity_after < result.perplexity_before


def test_fp16_is_refused_before_loading_anything(tmp_path):
    args = ["distill", tmp_path / "no-student", "--teacher", tmp_path / "no-teacher", "--data", tmp_path / "none.txt",
            "--stages", "kd:1k", "--out", tmp_path / "out", "--mixed-precision", "fp16"]
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli(*args), "mixed_precision 'fp16' needs CUDA")
    assert_one_line_error(run_cli(*args, "--distributed", "fsdp"), "fp16")
    assert not (tmp_path / "out.work").exists()


def test_engine_options_are_validated(setup, tmp_path):  # noqa: F811
    with pytest.raises(RecipeError, match="teacher_offload .* needs distributed 'fsdp'"):
        recipe(setup, tmp_path / "o", parse_stages("kd:1k"), teacher_offload=True)
    with pytest.raises(RecipeError, match="lora is not supported with distributed 'fsdp'"):
        recipe(setup, tmp_path / "o", parse_stages("kd:1k"), distributed="fsdp", lora={"r": 2})
    with pytest.raises(ValueError, match="launch with torchrun"):  # FSDP needs a process group
        run_distill(recipe(setup, tmp_path / "o", parse_stages("kd:1k"), distributed="fsdp"), progress=False)


def test_checkpoints_hold_no_pickle_and_resume_never_unpickles(setup, tmp_path):  # noqa: F811
    stages = parse_stages("align:1k,kd:1k")
    crashed = recipe(setup, tmp_path / "b", stages)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_distill(crashed, progress=False, _fail_after_step=6)
    latest = latest_checkpoint(tmp_path / "b.work" / "checkpoints")
    assert {p.suffix for p in latest.iterdir()} == {".safetensors", ".json"}
    trainer = json.loads((latest / "trainer.json").read_text())
    assert trainer["format"] == 2 and trainer["param_groups"][0]["params"][0].startswith("model.")

    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (latest / "trainer.pt").write_bytes(pickle.dumps({"optimizer": Exploit()}))
    run_distill(crashed, resume=True, progress=False)
    assert not marker.exists()
    run_distill(recipe(setup, tmp_path / "a", stages), progress=False)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    old = tmp_path / "c.work" / "checkpoints" / "step-00000002"  # a checkpoint of the pickle era is refused
    old.mkdir(parents=True)
    (old.parent / "latest").write_text(old.name)
    (old / "trainer.pt").write_bytes(pickle.dumps({"optimizer": Exploit()}))
    with pytest.raises(CheckpointError, match="pickled trainer.pt .* never loaded"):
        run_distill(recipe(setup, tmp_path / "c", stages), resume=True, progress=False)
    assert not marker.exists()


def test_weight_decay_and_fast_groups_come_from_the_contract(pico_student):
    student = MixerSwapForCausalLM.from_pretrained(pico_student)
    teacher = build_teacher("llama")
    names = {id(p): n for n, p in student.named_parameters()}
    for name, trains in [("align", "x_proj.weight"), ("kd", "model.embed_tokens.weight")]:
        config = StageConfig(name=name, tokens=1)
        stage = build_stage(config, student, teacher)
        stage.select_trainable()
        groups = stage.param_groups(0.1)
        grouped = [{names[id(p)] for p in g["params"]} for g in groups]
        assert sum(map(len, grouped)) == len(set().union(*grouped)) == sum(p.requires_grad for p in student.parameters())
        decayed = set().union(*(n for n, g in zip(grouped, groups) if g["weight_decay"] == 0.1))
        kept = set().union(*(n for n, g in zip(grouped, groups) if g["weight_decay"] == 0.0))
        fast = set().union(*(n for n, g in zip(grouped, groups) if g["lr"] == config.peak_lr * config.fast_lr_scale))
        assert all(g["lr"] in (config.peak_lr, config.peak_lr * config.fast_lr_scale) for g in groups)
        for ssm in ("A_log", "D", "dt_proj.bias", "norm_weight", "conv1d.bias", "z_proj.bias"):
            assert f"model.layers.0.self_attn.{ssm}" in kept, ssm
        # the mixers' declared fast parameters, and nothing else, train at fast_lr_scale x lr
        assert fast == {f"model.layers.{i}.self_attn.{n}" for i in (0, 2) for n in
                        ("A_log", "D", "dt_proj.bias", "conv1d.weight", "conv1d.bias")}
        assert "model.layers.0.self_attn.x_proj.weight" in decayed - fast
        assert any(n.endswith(trains) for n in decayed)
        if name == "kd":
            assert {"model.norm.weight", "model.layers.1.input_layernorm.weight"} <= kept
            assert "model.layers.1.self_attn.q_proj.weight" in decayed
        else:  # align trains the mixers' align parameters only
            assert all(".self_attn." in n and not n.startswith("model.layers.1.") for n in decayed | kept)
    stage = build_stage(StageConfig(name="kd", tokens=1, fast_lr_scale=1), student, teacher)
    stage.select_trainable()
    assert {g["lr"] for g in stage.param_groups(0.1)} == {DEFAULT_LR["kd"]}


def test_stage_is_a_module_objective_over_the_student_only(pico_student):
    student = MixerSwapForCausalLM.from_pretrained(pico_student)
    teacher = build_teacher("llama")
    stage = build_stage(StageConfig(name="align", tokens=1), student, teacher)
    assert [n for n, _ in stage.named_children()] == ["student"]
    assert {id(p) for p in stage.parameters()}.isdisjoint(id(p) for p in teacher.parameters())
    stage.select_trainable()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    loss = stage({"input_ids": ids, "position_ids": torch.arange(9)[None].expand(2, -1)})
    loss.backward()
    assert loss.ndim == 0 and set(stage.metrics) == {"layer0", "layer2"}


def test_matrix_alignment_names_a_mixer_without_a_mixing_matrix(pico_student, monkeypatch):
    student = MixerSwapForCausalLM.from_pretrained(pico_student)
    monkeypatch.delattr(Mamba2Mixer, "mixing_matrix")
    with pytest.raises(ValueError, match="mamba2 mixer of layer 0 has no mixing_matrix"):
        build_stage(StageConfig(name="align", tokens=1, mode="matrix"), student, build_teacher("llama"))


def test_lora_targets_follow_the_plan_and_the_mixers(pico_student):
    student = MixerSwapForCausalLM.from_pretrained(pico_student)
    assert lora_targets(student, LoraOptions()) == [f"model.layers.1.self_attn.{p}" for p in
                                                    ("q_proj", "k_proj", "v_proj", "o_proj")]
    mixers = lora_targets(student, LoraOptions(layers="mixers"))
    assert mixers[:5] == [f"model.layers.0.self_attn.{p}" for p in Mamba2Mixer.lora_targets]
    assert len(lora_targets(student, LoraOptions(layers="all"))) == 4 + len(mixers)


def test_student_is_saved_in_the_teacher_dtype_with_fp32_ssm_parameters(tmp_path):
    teacher = tmp_path / "teacher"
    build_teacher("qwen2").to(torch.bfloat16).save_pretrained(teacher)
    convert(teacher, tmp_path / "student", attention_layers=[1], progress=False)
    student = MixerSwapForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32)
    settings = recipe({"student": "s", "teacher": teacher, "data": "d"}, tmp_path / "o", parse_stages("kd:1k"))
    assert saved_dtype(settings) == torch.bfloat16
    assert saved_dtype(settings.model_copy(update={"dtype": "float32"})) == torch.float32
    save_student(student.config, student.state_dict(), torch.bfloat16, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    fp32 = {k for k, d in dtypes.items() if d == "F32"}
    assert fp32 == {f"model.layers.{i}.self_attn.{n}" for i in (0, 2) for n in ("A_log", "D", "dt_proj.bias")}
    assert {d for k, d in dtypes.items() if k not in fp32} == {"BF16"}
    assert "lm_head.weight" not in dtypes  # tied to the embeddings, saved once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(loaded.state_dict()["model.layers.0.self_attn.A_log"],
                               student.state_dict()["model.layers.0.self_attn.A_log"], rtol=0, atol=0)
