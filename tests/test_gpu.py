"""Model-level checks on a GPU: every student kind in bf16, cached decoding, bench's CUDA timing and memory
cap, a bf16 distillation. Skipped without CUDA (the kernels have their own CUDA checks in
``benchmarks/kernel_speed.py --check-only``).

``MIXERSWAP_TEST_DEVICE`` picks the device (default ``cuda``); ``MIXERSWAP_TEST_DEVICE=cpu`` runs the
device-agnostic part on CPU to try the tests themselves without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap.convert import convert
from mixerswap.demo import demo_text
from mixerswap.distill.recipe import DistillRecipe
from mixerswap.distill.trainer import run_distill
from mixerswap.evals.speed import bench

from .conftest import teacher_stories

KINDS = ["mamba2", "swa", "linear", "gla", "gdn", "mla"]
SETTINGS = {"swa": {"window": 8}, "linear": {"window": 8}}  # windows shorter than the prompts


@pytest.fixture(scope="module")
def device():
    name = os.environ.get("MIXERSWAP_TEST_DEVICE", "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device (MIXERSWAP_TEST_DEVICE=cpu tries these tests on CPU)")
    return torch.device(name)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def students(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-students")
    for kind in KINDS:
        convert(teacher_dir("llama"), root / kind, to=kind, keep_attention=0.34, mixer_settings=SETTINGS.get(kind),
                progress=False)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_student_in_bf16_on_the_device_matches_fp32_and_decodes_through_its_cache(kind, device, students):
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(students / kind, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(students / kind, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        want = reference(ids).logits
        full = model(ids.to(device)).logits
        assert full.dtype == torch.bfloat16 and rel_err(full.cpu(), want) <= 3e-2
        out = model(ids[:, :24].to(device), use_cache=True)
        steps = [out.logits[:, -1]]
        cache = out.past_key_values
        for t in range(24, 40):
            out = model(ids[:, t : t + 1].to(device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1])
        stepped = torch.stack(steps[:-1], 1)  # logits after positions 23..38
        assert rel_err(stepped, full[:, 23:39]) <= 3e-2
    for name, param in model.named_parameters():  # SSM parameters stay fp32 in a bf16 student
        if name.endswith(("A_log", ".D", "dt_bias")):
            assert param.dtype == torch.float32, name


def test_bench_times_with_cuda_events_and_records_oom_under_a_memory_cap(device, students):
    if device.type != "cuda":
        pytest.skip("CUDA events and the allocator cap need CUDA")
    model = AutoModelForCausalLM.from_pretrained(students / "mamba2", dtype=torch.bfloat16).to(device).eval()
    report = bench({"student": model}, contexts=[32, 128], batches=[1, 4], decode_tokens=4, repeats=2)
    assert report.timing == "cuda_events" and report.memory_kind == "cuda_max_allocated"
    assert all(r.status == "ok" and r.peak_memory_bytes > 0 for r in report.runs)
    capped = bench({"student": model}, contexts=[128], batches=[512], decode_tokens=2, repeats=1,
                   max_memory_bytes=torch.cuda.memory_allocated(device) + 2**20)
    assert [r.status for r in capped.runs] == ["oom"]


def test_bf16_distillation_on_the_device_lowers_the_loss(device, stories_dir, tmp_path):
    if device.type != "cuda":
        pytest.skip("the engine puts training on CUDA when there is one; on CPU tests/distill cover bf16")
    convert(stories_dir, tmp_path / "student", keep_attention=0.4, progress=False)
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n\n".join(demo_text().splitlines()))
    recipe = DistillRecipe.validated(dict(
        student=str(tmp_path / "student"), teacher=str(stories_dir), data=str(corpus), out=str(tmp_path / "out"),
        seq_len=128, batch_size=8, held_out_docs=4, mixed_precision="bf16",
        stages=[{"name": "align", "tokens": 8192}, {"name": "hidden", "tokens": 8192}, {"name": "kd", "tokens": 16384}]))
    result = run_distill(recipe, progress=False)
    losses = torch.tensor([h["loss"] for h in result.history])
    assert torch.isfinite(losses).all()
    assert result.perplexity_after < result.perplexity_before


def test_layer_selection_on_the_device_scores_as_on_the_cpu(device, stories_dir, tmp_path):
    from mixerswap.convert.layer_scores import score_layers

    stories_text = tmp_path / "stories.txt"
    stories_text.write_text(teacher_stories(stories_dir, 12, calibration=12)[2])
    scored = {d: score_layers(stories_dir, to="mamba2", text=stories_text, keep_attention=0.4, calibration_tokens=256,
                              scoring_tokens=256, seq_len=128, align_steps=5, device=d, progress=False)
              for d in ("cpu", device)}
    on_cpu, on_device = scored["cpu"], scored[device]
    assert on_device.keep == on_cpu.keep
    for a, b in zip(on_device.scores, on_cpu.scores):
        assert a.init_error == pytest.approx(b.init_error, rel=1e-3, abs=1e-4)
        assert a.kl == pytest.approx(b.kl, rel=1e-2, abs=1e-4)
