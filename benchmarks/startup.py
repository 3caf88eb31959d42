"""Start-up time of the command line: ``import mixerswap`` and ``mixerswap --help`` against torch + transformers.

    python benchmarks/startup.py [--repeats 7] [--json FILE]

Each command runs ``--repeats`` times in a fresh interpreter (after one untimed run that warms the
file cache); printed are the median and min/max of the wall time and of the CPU time the child used
(user + system, from ``os.wait4``). CPU time is the steadier figure on a shared machine: wall time
also counts the time the child waited for a core. The target (issue 14) is ``import mixerswap`` and
``mixerswap --help`` within 1.5 s of ``import torch, transformers``.

``torch, transformers`` is what any tool built on them pays. ``import mixerswap`` imports neither
(the Auto classes are registered by an import hook when transformers' Auto modules are imported, see
``mixerswap/auto_registration.py``); the last two rows show what a command that loads a model
pays: transformers' Auto classes alone (``modeling_utils``, ``generation`` and what they pull in),
and the same with mixerswap registered (our model code on top).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = 1.5
COMMANDS = {
    "torch, transformers": [sys.executable, "-c", "import torch, transformers"],
    "import mixerswap": [sys.executable, "-c", "import mixerswap"],
    "mixerswap --help": [sys.executable, "-m", "mixerswap", "--help"],
    "transformers Auto classes": [sys.executable, "-c", "import torch; from transformers import AutoModelForCausalLM"],
    "mixerswap + Auto classes": [sys.executable, "-c", "import mixerswap; from transformers import AutoModelForCausalLM"],
}


def time_once(argv: list[str]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one run of ``argv``; raises if it fails."""
    begin = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - begin
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {child.stderr.read().decode()[-500:]}")
    child.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def measure(repeats: int) -> dict[str, dict[str, float]]:
    results = {}
    for name, argv in COMMANDS.items():
        time_once(argv)  # warms the page cache and bytecode caches
        walls, cpus = zip(*(time_once(argv) for _ in range(repeats)))
        results[name] = {"wall_median": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
                         "cpu_median": statistics.median(cpus), "cpu_min": min(cpus), "cpu_max": max(cpus)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="Also write the numbers here.")
    args = parser.parse_args()
    results = measure(args.repeats)
    base = results["torch, transformers"]
    print(f"{'command':28} {'wall s (median, min-max)':>26} {'CPU s (median, min-max)':>26} {'CPU over base':>14}")
    for name, r in results.items():
        print(f"{name:28} {r['wall_median']:>10.2f} ({r['wall_min']:.2f}-{r['wall_max']:.2f})"
              f"{'':>5} {r['cpu_median']:>10.2f} ({r['cpu_min']:.2f}-{r['cpu_max']:.2f}){'':>5}"
              f" {r['cpu_median'] - base['cpu_median']:>+13.2f}")
    for name in ("import mixerswap", "mixerswap --help"):
        over = results[name]["cpu_median"] - base["cpu_median"]
        verdict = "within" if over <= TARGET_SECONDS else "OVER"
        print(f"{name}: {over:+.2f} s CPU over torch + transformers, {verdict} the {TARGET_SECONDS} s target")
    print(f"({args.repeats} runs each after one warm-up; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f})")
    if args.json:
        args.json.write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
