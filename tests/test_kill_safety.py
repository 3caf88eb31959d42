"""kill -9 at several points of `convert` and `distill`: OUT is the complete old or the complete new folder
(or, killed between the two renames of a replacement, the old one is put back by the next run), and the
next run leaves no temporary folder, lock or work folder behind."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mixerswap.convert import convert

pytestmark = pytest.mark.slow


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mixerswap", *map(str, args), "-q"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every 2 ms); False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait()
    return False


def leftovers(out) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def snapshot(folder) -> dict[str, bytes] | None:
    """The files that make a student (weights, index, config), or None for no folder."""
    if not folder.is_dir():
        return None
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")}


def test_convert_killed_anywhere_leaves_old_or_new(teacher_dir, tmp_path):
    teacher = teacher_dir("llama")
    options = ["--calibration", "none", "--max-shard-size", "20KB"]
    root = tmp_path / "runs"
    root.mkdir()
    out = root / "student"
    convert(teacher, out, keep_attention=1.0, progress=False)
    old = snapshot(out)
    shutil.copytree(out, tmp_path / "old")
    began = time.monotonic()
    reference = start("convert", teacher, "--out", tmp_path / "new", *options)
    assert reference.wait() == 0, reference.stderr.read()
    seconds = time.monotonic() - began
    new = snapshot(tmp_path / "new")
    assert new and new != old

    def appeared(pattern):
        return lambda: any(root.glob(pattern))

    moments = {"lock taken": appeared(".student.lock"), "writing": appeared(".student.tmp-*/.shard-*"),
               "replacing": appeared(".student.old-*")}
    for fraction in (0.5, 0.8, 0.9, 0.97):
        moments[f"{fraction:.0%} of a run"] = lambda t=time.monotonic, f=fraction, s=seconds: t() - began > f * s
    kills = []
    for moment, ready in moments.items():
        if snapshot(out) == new:  # start again from the old output, so that each kill can lose it
            shutil.rmtree(out)
            shutil.copytree(tmp_path / "old", out)
        began = time.monotonic()
        killed = kill_when(start("convert", teacher, "--out", out, "--overwrite", *options), ready)
        kills += [moment] * killed
        state = snapshot(out)
        if state is None:  # killed between the two renames: the old output waits beside it, whole
            assert killed and [snapshot(p) for p in root.glob(".student.old-*")] == [old], moment
        else:
            assert state in (old, new), moment
    assert len(kills) >= 3, kills  # most runs were killed before they ended
    final = start("convert", teacher, "--out", out, "--overwrite", *options)
    assert final.wait() == 0, final.stderr.read()
    assert snapshot(out) == new and leftovers(out) == []


def test_distill_killed_anywhere_resumes_and_leaves_nothing_behind(stories_dir, tmp_path):
    from mixerswap.demo import demo_text

    student = tmp_path / "student"
    convert(stories_dir, student, keep_attention=0.4, progress=False)
    data = tmp_path / "stories.txt"
    data.write_text("\n\n".join(demo_text().splitlines()))
    out = tmp_path / "out"
    checkpoints = tmp_path / "out.work" / "checkpoints"
    args = ["distill", student, "--teacher", stories_dir, "--data", data, "--stages", "align:1k,kd:2k",
            "--seq-len", "32", "--batch-size", "4", "--held-out-docs", "2", "--checkpoint-every", "3", "--out", out]

    def again():  # what a user runs after a crash
        return [*(["--resume"] if (checkpoints / "latest").exists() else []), *(["--overwrite"] if out.exists() else [])]

    began = time.monotonic()
    moments = {"early": lambda: time.monotonic() - began > 2,
               "first checkpoint": lambda: (checkpoints / "latest").exists(),
               "a later checkpoint": lambda: len(list(checkpoints.glob("step-*"))) > 1,
               "writing the output": lambda: any(tmp_path.glob(".out.tmp-*/*.safetensors"))}
    kills = []
    for moment, ready in moments.items():
        began = time.monotonic()
        kills += [moment] * kill_when(start(*args, *again()), ready)
        assert snapshot(out) is None or (out / "config.json").exists() and (out / "model.safetensors").exists(), moment
    assert len(kills) >= 3, kills
    final = start(*args, *again())
    assert final.wait() == 0, final.stderr.read()[-3000:]
    assert (out / "config.json").exists() and (out / "metrics.jsonl").exists()
    assert leftovers(out) == [] and not (tmp_path / "out.work").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["global_step"] for line in lines if "loss" in line] == list(range(1, 8 + 16 + 1))  # align, kd
