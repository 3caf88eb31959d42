"""Speed bench: documented JSON, cache accounting, a valid PNG, OOM recorded and not fatal."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixerswap.convert import convert
from mixerswap.evals import speed
from mixerswap.evals.plots import plot_bench
from mixerswap.evals.speed import bench, is_oom, save_report

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
