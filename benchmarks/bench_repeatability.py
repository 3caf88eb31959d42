"""Are ``mixerswap bench`` ratios repeatable on CPU? The same bench, run in separate processes, compared.

    python benchmarks/bench_repeatability.py [--runs 2] [--json FILE] [-- BENCH OPTIONS...]

Converts the packaged stories260k teacher to a Mamba-2 student that keeps 2 of its 5 attention layers
(the demo's models, untrained: speed does not depend on the weights), runs ``mixerswap bench STUDENT
--vs TEACHER --device cpu`` ``--runs`` times, each in a fresh process, and prints every ratio
(student ÷ teacher prefill and decode tokens/s) per run with the largest relative difference between
any two runs. The target (issue 14): two runs within ±25% of each other.

Default bench options: ``--context 128,256,448 --batch 1,8 --timing cpu --repeats 15 --warmup 2
--decode-tokens 64`` with ``OMP_NUM_THREADS=1`` (one thread, this process's CPU time: what other
processes on a shared machine do least to). Options after ``--`` replace them, e.g. ``-- --context
128,448 --batch 1,8`` to measure the command's own defaults (5 repeats, wall clock, all threads).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mixerswap
from mixerswap.convert import convert

DEFAULT_OPTIONS = ["--context", "128,256,448", "--batch", "1,8", "--timing", "cpu", "--repeats", "15",
                   "--warmup", "2", "--decode-tokens", "64"]
TARGET = 0.25
MEASURES = ("prefill_speedup", "decode_speedup")


def bench_once(student: Path, teacher: Path, options: list[str], out: Path, threads: str | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    command = [sys.executable, "-m", "mixerswap", "bench", str(student), "--vs", str(teacher), "--device", "cpu",
               *options, "--json", str(out), "-q"]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def compare(reports: list[dict]) -> tuple[list[list], float]:
    """Rows ``[batch, context, measure, ratio of run 1, ..., largest difference]`` and the largest overall."""
    rows, worst = [], 0.0
    for first in reports[0]["ratios"]:
        key = (first["model"], first["batch"], first["context"])
        matched = [next(q for q in r["ratios"] if (q["model"], q["batch"], q["context"]) == key) for r in reports]
        for measure in MEASURES:
            values = [q[measure] for q in matched]
            spread = max(abs(a / b - 1) for a, b in itertools.permutations(values, 2)) if len(values) > 1 else 0.0
            worst = max(worst, spread)
            rows.append([first["batch"], first["context"], measure, *values, spread])
    return rows, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="bench runs, each in a fresh process")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS for the runs ('' leaves it unset)")
    parser.add_argument("--json", type=Path, help="write the runs' ratios and the largest difference here")
    parser.add_argument("bench_options", nargs="*", help="after --: options for mixerswap bench")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2 (there is nothing to compare otherwise)")
    options = args.bench_options or DEFAULT_OPTIONS
    teacher = Path(mixerswap.__file__).parent / "data" / "stories260k"
    with tempfile.TemporaryDirectory(prefix="mixerswap-repeat-") as work:
        student = Path(work) / "student"
        convert(teacher, student, keep_attention=0.4, progress=False)
        reports = []
        for run in range(args.runs):
            reports.append(bench_once(student, teacher, options, Path(work) / f"run{run}.json", args.threads))
            print(f"run {run + 1}/{args.runs} done", flush=True)
    rows, worst = compare(reports)
    from mixerswap.evals.tables import format_table

    print(format_table(["batch", "context", "ratio", *(f"run {i + 1}" for i in range(args.runs)), "largest diff"],
                       rows))
    threads = f"OMP_NUM_THREADS={args.threads} " if args.threads else ""
    print(f"{threads}mixerswap bench {' '.join(options)}; student: stories260k, Mamba-2 at layers 0, 2, 4")
    status = "PASS" if worst <= TARGET else "FAIL"
    print(f"{status}  largest difference between runs {100 * worst:.1f}% (target within {100 * TARGET:.0f}%)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"options": options, "threads": args.threads or None, "runs": args.runs,
                                         "ratios": [r["ratios"] for r in reports], "largest_difference": worst,
                                         "versions": reports[0]["versions"]}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
