"""benchmarks/distill_device.py runs one small distillation, reports each stage, and compares two reports."""

import json
import sys

import pytest
import torch

from ..conftest import load_benchmark

SMALL = ["--stages", "align:4k,hidden:4k,kd:4k", "--batch-size", "4", "--seq-len", "64", "--stories", "60", "-q"]


@pytest.mark.slow
def test_each_stage_is_reported_and_reports_compare(tmp_path, monkeypatch):
    module = load_benchmark("distill_device")
    monkeypatch.setattr(sys, "argv", ["distill_device.py", *SMALL, "--out", str(tmp_path / "a.json")])
    module.main()
    report = json.loads((tmp_path / "a.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["align", "hidden", "kd"]
    for stage in report["stages"]:
        assert stage["steps"] == len(stage["loss"]) == 16 and stage["tokens"] == 16 * 4 * 64
        peak = stage["peak_memory_bytes"]  # measured on CUDA only
        assert stage["tokens_per_s"] > 0 and (peak > 0 if torch.cuda.is_available() else peak is None)
    assert report["perplexity"]["after"] < report["perplexity"]["before"]
    assert report["command"].endswith(f"--out {tmp_path / 'a.json'}")

    other = json.loads(json.dumps(report))
    for stage in other["stages"]:  # the same curves, scaled and lengthened: correlated, not equal
        stage["loss"] = [2 * x for x in stage["loss"] for _ in range(2)]
        stage["last_loss"] *= 2
    comparison = module.compare(report, other, tmp_path / "other.json")
    for stage in comparison["stages"]:
        assert stage["loss_pearson"] == pytest.approx(1.0) and stage["final_loss_ratio"] == 0.5, stage
    assert comparison["after_perplexity_ratio"] == 1.0
