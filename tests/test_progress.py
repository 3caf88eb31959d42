"""Progress output: one plain line per bar off a terminal, nothing under -q or off rank 0."""

import io
import logging
import sys
import types

import pytest
from click.testing import CliRunner

from mixerswap import progress
from mixerswap.cli import main, setup_logging
from mixerswap.progress import library_bars, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_a_bar_is_one_plain_line():
    log = io.StringIO()
    with progress_bar(total=1000, desc="convert", unit="B", file=log) as bar:
        for _ in range(1000):
            bar.update(1)
    resumed = progress_bar(range(2), total=5, initial=3, desc="kd", file=log)
    for _ in resumed:
        pass
    resumed.close()
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and lines[-1] == "" and len(lines) == 3, log.getvalue()
    assert lines[0].startswith("convert: 100%") and "1000/1000" in lines[0]
    assert lines[1].startswith("kd: 100%") and "5/5" in lines[1]  # a resumed bar: not its starting 3/5


def test_a_long_bar_writes_a_line_per_interval_and_one_at_the_end(monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)  # every redraw is due: one line per new count
    log = io.StringIO()
    with progress_bar(total=3, desc="kd", file=log) as bar:
        for _ in range(3):
            bar.set_postfix(loss="1.0")  # redraws without a new count: no line of its own
            bar.update(1)
    assert [line.split("|")[0] for line in log.getvalue().splitlines()] == ["kd:  33%", "kd:  67%", "kd: 100%"]


def test_a_terminal_gets_the_live_bar():
    screen = Terminal()
    for _ in progress_bar(range(3), desc="score layers", file=screen):
        pass
    assert "\r" in screen.getvalue() and "3/3" in screen.getvalue()


@pytest.mark.parametrize("rank, enabled", [("0", False), ("1", True)], ids=["quiet", "rank-1"])
def test_no_bar_under_quiet_or_off_rank_0(monkeypatch, rank, enabled):
    monkeypatch.setenv("RANK", rank)
    log = io.StringIO()
    for _ in progress_bar(range(3), desc="kd", enabled=enabled, file=log):
        pass
    with progress_bar(total=3, disable=True, file=log) as bar:  # a library's own switch is kept
        bar.update(3)
    assert log.getvalue() == ""


def test_library_bars_are_ours_for_a_while_then_theirs(monkeypatch):
    module = types.ModuleType("some_library")
    module.tqdm = original = object()
    monkeypatch.setitem(sys.modules, "some_library", module)
    log = io.StringIO()
    with library_bars(["some_library"], enabled=True):
        for _ in module.tqdm(range(4), desc="requests", file=log):
            pass
    assert module.tqdm is original
    assert log.getvalue().startswith("requests: 100%") and log.getvalue().count("\n") == 1


def test_rank_1_logs_warnings_only_and_silences_library_bars(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(progress, "silence_library_bars", lambda: calls.append("silenced"))
    calls = []
    try:
        setup_logging(quiet=False)
        assert logging.getLogger().level == logging.WARNING and calls == ["silenced"]
    finally:
        logging.getLogger().setLevel(logging.WARNING)
        hf_logging.enable_progress_bar()


def test_convert_off_a_terminal_prints_one_progress_line(stories_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    try:
        result = CliRunner().invoke(main, ["convert", str(stories_dir), "--calibration", "none", "--out",
                                           str(tmp_path / "s")], catch_exceptions=False)
    finally:
        hf_logging.enable_progress_bar()
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("convert:")] == [
        next(line for line in result.stderr.splitlines() if line.startswith("convert: 100%"))]
