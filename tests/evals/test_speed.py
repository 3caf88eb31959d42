"""Speed bench: documented JSON, cache accounting, a valid PNG, OOM recorded and not fatal."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap.convert import convert
from mixerswap.evals import speed
from mixerswap.evals.plots import compact_number, plot_bench
from mixerswap.evals.speed import bench, is_oom, model_bytes, save_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOCUMENTED = set(re.findall(r"``(\w+)``", speed.__doc__))


@pytest.fixture(scope="module")
def pico(teacher_dir, tmp_path_factory):
    """A pico llama teacher and its pure Mamba-2 student."""
    out = tmp_path_factory.mktemp("bench") / "student"
    convert(teacher_dir("llama"), out, keep_attention=0.0, progress=False)
    return (AutoModelForCausalLM.from_pretrained(teacher_dir("llama")).eval(),
            AutoModelForCausalLM.from_pretrained(out).eval())


def test_report_fields_are_documented_and_caches_are_counted(pico, tmp_path):
    teacher, student = pico
    contexts, decode = [16, 48], 3
    report = bench({"student": student, "teacher": teacher}, contexts=contexts, batches=[1, 2],
                   decode_tokens=decode, reference="teacher")
    data = json.loads(save_report(report, tmp_path / "bench.json").read_text())
    keys = set(data) | set(data["kernels"]) | set(data["runs"][0]) | set(data["ratios"][0])
    keys |= {k for model in data["models"].values() for k in model}
    assert keys <= DOCUMENTED, keys - DOCUMENTED
    assert data["timing"] == "wall_clock" and data["reference"] == "teacher" and data["kernels"]["ops"]
    assert {r["status"] for r in data["runs"]} == {"ok"} and len(data["runs"]) == 8
    assert data["models"]["student"]["plan"] == ["mamba2"] * 3 and data["models"]["teacher"]["kind"] == "teacher"

    kv_per_token = 2 * 3 * teacher.config.num_key_value_heads * (32 // 4) * 4  # k+v, 3 layers, heads, dim, fp32
    for batch in (1, 2):
        teacher_runs = [report.run("teacher", batch, c) for c in contexts]
        student_runs = [report.run("student", batch, c) for c in contexts]
        assert [r.cache_bytes for r in teacher_runs] == [batch * (c + decode) * kv_per_token for c in contexts]
        assert student_runs[0].cache_bytes == student_runs[1].cache_bytes > 0  # fixed-size recurrent state
        for run in teacher_runs + student_runs:
            assert run.prefill_tokens_per_s > 0 and run.decode_tokens_per_s > 0
            assert run.decode_latency_ms_p50 <= run.decode_latency_ms_p90
    ratio = next(q for q in data["ratios"] if (q["batch"], q["context"]) == (2, 48))
    assert ratio["cache_reduction"] == pytest.approx(report.run("teacher", 2, 48).cache_bytes
                                                     / report.run("student", 2, 48).cache_bytes)
    png = plot_bench(data, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_out_of_memory_is_recorded_and_the_run_goes_on(pico, monkeypatch):
    teacher, student = pico
    forward = type(teacher).forward

    def tight_memory(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] * input_ids.shape[1] >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(teacher), "forward", tight_memory)
    report = bench({"teacher": teacher, "student": student}, contexts=[16, 32, 64], batches=[1, 2],
                   decode_tokens=2, reference="teacher")
    status = {(r.model, r.batch, r.context): r.status for r in report.runs}
    assert status == {("teacher", 1, 16): "ok", ("teacher", 1, 32): "ok", ("teacher", 1, 64): "oom",
                      ("teacher", 2, 16): "ok", ("teacher", 2, 32): "oom", ("teacher", 2, 64): "oom",
                      **{("student", b, c): "ok" for b in (1, 2) for c in (16, 32, 64)}}
    assert "simulated" in report.run("teacher", 2, 32).error and "skipped" in report.run("teacher", 2, 64).error
    assert {(q["batch"], q["context"]) for q in report.ratios()} == {(1, 16), (1, 32), (2, 16)}
    assert "oom" in report.table()


def test_other_errors_are_not_mistaken_for_oom(pico, monkeypatch):
    teacher, _ = pico

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch in layer 2")

    monkeypatch.setattr(type(teacher), "forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench({"teacher": teacher}, contexts=[16], batches=[1], decode_tokens=1)
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"))
    assert not is_oom(ValueError("out of memory"))


def test_bad_bench_options(pico):
    teacher, _ = pico
    with pytest.raises(ValueError, match="exceeds the model's limit of 256"):
        bench({"teacher": teacher}, contexts=[250], batches=[1], decode_tokens=8)
    with pytest.raises(ValueError, match="reference"):
        bench({"teacher": teacher}, contexts=[16], batches=[1], reference="student")
    with pytest.raises(ValueError, match="CUDA"):
        bench({"teacher": teacher}, contexts=[16], batches=[1], decode_tokens=1, max_memory_bytes=10**9)
    with pytest.raises(ValueError, match="repeats"):
        bench({"teacher": teacher}, contexts=[16], batches=[1], repeats=0)
    with pytest.raises(ValueError, match="timing"):
        bench({"teacher": teacher}, contexts=[16], batches=[1], timing="gpu")


@pytest.mark.parametrize("timing", ["wall", "cpu"])
def test_warm_up_then_repeats_give_medians_with_spread(pico, timing):
    teacher, student = pico
    prefills = []
    handle = student.register_forward_pre_hook(
        lambda module, args: prefills.append(args[0].shape[1]) if args[0].shape[1] > 1 else None)
    try:
        report = bench({"student": student, "teacher": teacher}, contexts=[24], batches=[2], decode_tokens=3,
                       reference="teacher", warmup=2, repeats=3, timing=timing)
    finally:
        handle.remove()
    assert prefills == [24] * 5  # 2 warm-up + 3 timed prefills, nothing more
    assert report.timing == {"wall": "wall_clock", "cpu": "process_cpu_time"}[timing]
    assert (report.warmup, report.repeats) == (2, 3)
    for run in report.runs:
        assert run.prefill_tokens_per_s_min <= run.prefill_tokens_per_s <= run.prefill_tokens_per_s_max
        assert run.decode_tokens_per_s_min <= run.decode_tokens_per_s <= run.decode_tokens_per_s_max
    (ratio,) = report.ratios()
    for measure in ("prefill_speedup", "decode_speedup"):
        assert ratio[f"{measure}_min"] <= ratio[measure] <= ratio[f"{measure}_max"]
    assert "[" in report.table()  # "median [min-max]" cells


def test_cpu_memory_is_the_models_own_bytes_and_reference_kernels_are_named(pico):
    teacher, student = pico
    report = bench({"student": student, "teacher": teacher}, contexts=[16], batches=[1], decode_tokens=2,
                   reference="teacher", repeats=1)
    assert report.memory_kind == "model_and_cache"
    for name, model in (("student", student), ("teacher", teacher)):
        run = report.run(name, 1, 16)
        assert run.peak_memory_bytes == model_bytes(model) + run.cache_bytes
    assert model_bytes(teacher) == sum(p.numel() * 4 for p in teacher.parameters()) + sum(
        b.numel() * b.element_size() for b in teacher.buffers())
    assert "model MiB" in report.table() and "peak MiB" not in report.table()
    assert report.reference_kernels() == ["causal_conv1d", "causal_conv1d_step", "gated_rmsnorm", "ssd_chunk_scan",
                                          "ssd_step"]  # what Mamba-2 calls, not every registered kind's ops
    assert any("torch reference kernels" in line and "not fast" in line for line in report.notes())
    assert report.to_dict()["reference_kernels"] == report.reference_kernels()


def test_axis_labels_read_as_plain_numbers():
    assert [compact_number(v) for v in (0.25, 4, 512, 1000, 1500, 16384, 2e6, 3e9)] == [
        "0.25", "4", "512", "1K", "1.5K", "16.4K", "2M", "3G"]


def test_models_take_turns_and_ratios_are_medians_of_rounds(pico):
    teacher, student = pico
    turns = []
    hooks = [model.register_forward_pre_hook(
        lambda module, args, name=name: turns.append(name) if args[0].shape[1] > 1 else None)
        for name, model in (("student", student), ("teacher", teacher))]
    try:
        report = bench({"student": student, "teacher": teacher}, contexts=[24], batches=[1], decode_tokens=2,
                       reference="teacher", warmup=1, repeats=4)
        sequential = bench({"student": student, "teacher": teacher}, contexts=[24], batches=[1], decode_tokens=2,
                           reference="teacher", warmup=0, repeats=2, interleave=False)
    finally:
        for hook in hooks:
            hook.remove()
    # warm-ups, then rounds whose order alternates; sequential: one model after the other
    assert turns == ["student", "teacher"] + ["student", "teacher", "teacher", "student"] * 2 + ["student"] * 2 + [
        "teacher"] * 2
    assert report.interleaved and not sequential.interleaved
    (ratio,) = report.ratios()
    ours, theirs = (report.run(m, 1, 24).decode_tokens_per_s_repeats for m in ("student", "teacher"))
    rounds = sorted(a / b for a, b in zip(ours, theirs))
    assert len(rounds) == 4 and ratio["decode_speedup"] == pytest.approx((rounds[1] + rounds[2]) / 2)
    assert (ratio["decode_speedup_min"], ratio["decode_speedup_max"]) == (rounds[0], rounds[-1])
    assert "per-round" in " ".join(report.notes()) and "per-round" not in " ".join(sequential.notes())
    run = sequential.run("student", 1, 24)
    assert run.decode_tokens_per_s_repeats is None
    (ratio,) = sequential.ratios()
    assert ratio["decode_speedup"] == pytest.approx(run.decode_tokens_per_s
                                                    / sequential.run("teacher", 1, 24).decode_tokens_per_s)


def test_each_configuration_is_reported_as_it_finishes(pico, tmp_path):
    """``on_configuration`` sees the runs measured so far (a long GPU run that is stopped keeps them)."""
    teacher, student = pico
    seen = []

    def save(report):
        seen.append(len(report.runs))
        save_report(report, tmp_path / "partial.json")

    report = bench({"student": student, "teacher": teacher}, contexts=[16, 32], batches=[1, 2], decode_tokens=2,
                   repeats=1, reference="teacher", on_configuration=save)
    assert seen == [2, 4, 6, 8]  # two models per configuration, interleaved on CPU
    saved = json.loads((tmp_path / "partial.json").read_text())
    assert len(saved["runs"]) == len(report.runs) == 8 and not list(tmp_path.glob(".*.tmp*"))
