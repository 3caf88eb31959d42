"""Learning rates of the three stages, measured: the recovery table's rows at several (align, hidden, kd) triples.

    python benchmarks/lr_sweep.py                       # stories260k, 4 rows x 6 triples (~15 min on 2 cores)
    python benchmarks/lr_sweep.py --lrs 1e-2,3e-3,1e-3 3e-3,1e-3,5e-4 --rows mamba2-50 -- \
        --teacher SmolLM2-135M-Instruct.Q4_1.gguf --text wikitext2-test.raw --tokens 64k --batch-size 4
    python benchmarks/lr_sweep.py --lrs 3e-3,1e-3,5e-4 --fast-lr-scales 1 3 10 30 \
        --rows gla-25,gdn-25,mamba2-25,linear-25,mamba2-50 --json benchmarks/results/fast-lr-sweep-stories260k.json

Runs ``benchmarks/quality.py --rows ROWS --lr TRIPLE [--fast-lr-scale S]`` once per triple and scale
(options after ``--`` are passed on: teacher, text, token budget), each in its own process, and prints the
held-out perplexity of every row at conversion and after each stage, per run, with the best final
perplexity of each row marked.
Writes ``benchmarks/results/lr-sweep-<teacher>.json``: the rows of every triple as quality.py wrote them.
The package's default learning rates (``mixerswap.distill.recipe.DEFAULT_LR``) and the multiple for the
mixers' fast parameters (``DEFAULT_FAST_LR_SCALE``) come from these runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_LRS = ["1e-3,5e-4,1e-4", "3e-3,1e-3,5e-4", "3e-3,3e-3,1e-3", "1e-2,3e-3,1e-3", "1e-2,1e-2,3e-3",
               "3e-2,1e-2,3e-3"]


def run_of(report: dict) -> dict:
    """What the sweep keeps of one quality.py report."""
    return {"lr": report["lr"], "fast_lr_scale": report.get("fast_lr_scale", 1.0),
            "teacher_ppl": report["teacher_row"]["teacher_ppl"], "rows": report["rows"], "command": report["command"]}


def table(runs: list[dict]) -> str:
    """Markdown: per triple, each row's perplexity at conversion > align > hidden > kd; ``*`` the best kd."""
    names = [r["name"] for r in runs[0]["rows"]]
    best = {n: min(run_["rows"][i]["student_ppl_final"] for run_ in runs) for i, n in enumerate(names)}
    lines = [f"held-out perplexity: conversion > align > hidden > kd (teacher {runs[0]['teacher_ppl']:.2f}); "
             "* the row's best after kd",
             "| lr (align/hidden/kd) x fast | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for run_ in runs:
        cells = []
        for row in run_["rows"]:
            path = [row["student_ppl_init"], *row["stage_ppl"].values()]
            mark = "*" if row["student_ppl_final"] == best[row["name"]] else ""
            cells.append(" > ".join(f"{p:.2f}" for p in path) + mark)
        label = "/".join(f"{x:g}" for x in run_["lr"]) + f" x{run_['fast_lr_scale']:g}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", nargs="+", default=DEFAULT_LRS, help="align,hidden,kd triples")
    parser.add_argument("--fast-lr-scales", nargs="+", help="multiples for the fast parameters (default: the package's)")
    parser.add_argument("--rows", default="mamba2-50,mamba2-25,gdn-25,gla-25")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/lr-sweep-<teacher>.json")
    parser.add_argument("quality_options", nargs="*", help="after --: options for quality.py")
    args = parser.parse_args()
    teacher = "stories260k"
    if "--teacher" in args.quality_options:
        teacher = Path(args.quality_options[args.quality_options.index("--teacher") + 1]).name.split(".")[0]
    out = args.json or HERE / "results" / f"lr-sweep-{teacher}.json"
    runs = []
    with tempfile.TemporaryDirectory(prefix="mixerswap-lr-") as work:
        for lrs, scale in [(lrs, scale) for lrs in args.lrs for scale in args.fast_lr_scales or [None]]:
            path = Path(work) / f"{lrs}-{scale}.json"
            fast = ["--fast-lr-scale", scale] if scale else []
            command = [sys.executable, str(HERE / "quality.py"), "--rows", args.rows, "--lr", lrs, *fast,
                       "--out", str(path), *args.quality_options]
            print(f"== lr {lrs}" + (f", fast x{scale}" if scale else ""), flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            runs.append(run_of(json.loads(path.read_text())))
    print(table(runs))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "quality_options": args.quality_options,
                               "command": " ".join(["python", *sys.argv]), "runs": runs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
