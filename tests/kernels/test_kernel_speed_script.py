"""benchmarks/kernel_speed.py --check-only (on CPU through triton's interpreter): every check is printed as it
finishes and saved, and the run fails when a kernel is off its reference."""

import json
import sys

import pytest
import torch

from ..conftest import load_benchmark
from .conftest import requires_triton


@requires_triton
def test_check_only_reports_every_kernel_and_fails_past_the_tolerance(tmp_path, monkeypatch, capsys):
    module = load_benchmark("kernel_speed")
    args = ["kernel_speed.py", "--check-only", "--check-shapes", "1x64x2x16x16", "--ops", "ssd_chunk_scan,gla_chunk",
            "--out", str(tmp_path / "k.json"), "--device", "cuda" if torch.cuda.is_available() else "cpu"]
    monkeypatch.setattr(sys, "argv", args)
    module.main()
    report = json.loads((tmp_path / "k.json").read_text())
    assert [(c["op"], c["ok"]) for c in report["checks"] if c["dtype"] == "float32"] == [
        ("ssd_chunk_scan", True), ("gla_chunk", True)]
    assert capsys.readouterr().out.count("ok   check ") == len(report["checks"])
    monkeypatch.setattr(module, "CHECK_TOLERANCE", {"float32": 0.0, "bfloat16": 0.0})
    with pytest.raises(SystemExit, match="kernel checks failed"):
        module.main()
