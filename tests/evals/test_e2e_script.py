"""benchmarks/e2e_speed.py runs end to end (scaled down) and reports every model and the kernels."""

import json
import sys
from ..conftest import load_benchmark


def test_e2e_speed_tiny(tmp_path, monkeypatch, capsys):
    module = load_benchmark("e2e_speed")
    monkeypatch.setattr(sys, "argv", ["e2e_speed.py", "--tiny", "--context", "64,128", "--batch", "1",
                                      "--decode-tokens", "2", "--workdir", str(tmp_path),
                                      "--json", str(tmp_path / "e2e.json")])
    assert module.main() == 0
    output = capsys.readouterr().out
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert list(report["models"]) == ["teacher", *module.STUDENTS]
    assert [m["plan"].count("attention") for m in report["models"].values()] == [4, 2, 1, 0, 1, 1, 1, 1, 0]
    assert {kind for m in report["models"].values() for kind in m["plan"]} == {
        "attention", "mamba2", "swa", "linear", "gla", "gdn", "mla"}
    assert {r["status"] for r in report["runs"]} == {"ok"} and len(report["ratios"]) == 2 * len(module.STUDENTS)
    assert "ssd_chunk_scan=" in output and "targets: not checked with --tiny" in output
    assert module.check_targets([])[0][1] == "n/a"
