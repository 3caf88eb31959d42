"""One real distillation on the device at hand: steps, tokens, tokens/s, peak memory, loss curve, perplexity per stage.

    python benchmarks/distill_device.py --out benchmarks/results/distill-cpu.json      # CPU: fp32 (~5 min on 2 cores)
    python benchmarks/distill_device.py --out benchmarks/results/distill-h100.json \
        --compare benchmarks/results/distill-cpu.json                                  # CUDA: bf16, against the CPU run
    python benchmarks/distill_device.py --stages align:64k,hidden:64k,kd:128k --batch-size 8 --seq-len 128 \
        --out /tmp/dd.json                                                              # a smoke test (~30 s on 2 cores)

The packaged stories260k teacher writes its own corpus (``--stories`` samples, seed 0, always on CPU in fp32 so
that every device gets the same text; the first 10% held out, the next 40 calibrate, as ``quality.py`` does), is
converted to Mamba-2 with 50% of its attention kept, and distilled once, align → hidden → kd (``--stages``, the
demo's learning rates), on CUDA when there is one (bf16 autocast by default) or on CPU (fp32). Per stage, from
the trainer's ``metrics.jsonl``: optimizer steps, tokens, tokens/s (the ``stage_end`` event's when the trainer
writes one, else the stage's last step record: stage tokens / seconds since the stage started), peak device
memory (the ``stage_end`` event's ``peak_memory_bytes``; null on CPU or when absent), every step's loss, and the
held-out perplexity after it (teacher and before distillation too). ``--compare OTHER.json`` (a previous run of
the same command on another device or precision) adds, per stage, the Pearson correlation of the two loss curves
(resampled to one length if they differ) and the ratios (this run / other) of final losses and perplexities.
Writes the JSON (``--out``, atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerswap.convert import convert
from mixerswap.demo import packaged_teacher, sample_stories
from mixerswap.distill.recipe import DistillRecipe, parse_stages
from mixerswap.distill.trainer import run_distill, work_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import STORY_CALIBRATION_DOCS, write_split  # noqa: E402  (the same data split as the recovery table)


def write_corpus(work: Path, stories: int) -> tuple[Path, Path, int, str]:
    """quality.py's stories260k data: held-out stories first (the trainer holds out the first ``held``
    documents), the 40 calibration stories left out of the corpus."""
    teacher_dir = packaged_teacher()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    docs = sample_stories(teacher, tokenizer, stories)
    held = max(1, len(docs) // 10)
    corpus, calibration = write_split(work, docs, held, STORY_CALIBRATION_DOCS)
    return corpus, calibration, held, f"{len(docs)} stories sampled from the teacher (seed 0), {held} held out"


def read_stages(metrics: Path) -> list[dict]:
    """Per stage: its step records and its ``stage_end`` event, in the order the trainer wrote them."""
    stages, steps = [], []
    for line in metrics.read_text().splitlines():
        record = json.loads(line) if line.strip() else None
        if record is None:
            continue
        if record.get("event") == "stage_end":
            stages.append({"steps": steps, "end": record})
            steps = []
        elif "event" not in record:
            steps.append(record)
    return stages


def stage_rows(stages: list[dict]) -> list[dict]:
    rows, tokens_before = [], 0
    for stage in stages:
        steps, end = stage["steps"], stage["end"]
        tokens = steps[-1]["tokens"] - tokens_before if steps else 0  # "tokens" counts from the start of the run
        tokens_before += tokens
        rate = end.get("tokens_per_s") or (steps[-1]["tokens_per_s"] if steps else None)
        loss = [s["loss"] for s in steps]
        rows.append({
            "stage": end["stage"], "steps": len(steps), "tokens": tokens, "tokens_per_s": rate,
            "tokens_per_s_from": "stage_end" if end.get("tokens_per_s") else "last step",
            "seconds": round(tokens / rate, 2) if rate else None,
            "peak_memory_bytes": end.get("peak_memory_bytes"),
            "first_loss": loss[0] if loss else None, "last_loss": loss[-1] if loss else None,
            "held_out_perplexity": end.get("held_out_perplexity"), "loss": loss})
    return rows


def pearson(a: list[float], b: list[float]) -> float | None:
    """Correlation of two curves, the longer one linearly resampled to the length of the shorter."""
    n = min(len(a), len(b))
    if n < 2:
        return None
    x, y = (np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(c)), c) for c in (a, b))
    if x.std() == 0 or y.std() == 0:
        return None
    return round(float(np.corrcoef(x, y)[0, 1]), 5)


def ratio(a, b) -> float | None:
    return round(a / b, 5) if a is not None and b else None


def compare(report: dict, other: dict, other_path: Path) -> dict:
    """This run against ``other`` (a report of this script): ratios are this run / the other run."""
    stages = []
    for mine, theirs in zip(report["stages"], other["stages"]):
        if mine["stage"] != theirs["stage"]:
            raise SystemExit(f"--compare: stage {mine['stage']} of this run meets {theirs['stage']} in {other_path}")
        stages.append({"stage": mine["stage"], "steps": [mine["steps"], theirs["steps"]],
                       "loss_pearson": pearson(mine["loss"], theirs["loss"]),
                       "final_loss_ratio": ratio(mine["last_loss"], theirs["last_loss"]),
                       "held_out_perplexity_ratio": ratio(mine["held_out_perplexity"], theirs["held_out_perplexity"]),
                       "tokens_per_s_ratio": ratio(mine["tokens_per_s"], theirs["tokens_per_s"])})
    if len(report["stages"]) != len(other["stages"]):
        print(f"--compare: {len(report['stages'])} stages here, {len(other['stages'])} in {other_path}; "
              "the first ones compared")
    return {"other": str(other_path), "other_device": other["device"],
            "other_mixed_precision": other["mixed_precision"], "other_command": other["command"],
            "ratios": "this run / other run", "stages": stages,
            "teacher_perplexity_ratio": ratio(report["perplexity"]["teacher"], other["perplexity"]["teacher"]),
            "before_perplexity_ratio": ratio(report["perplexity"]["before"], other["perplexity"]["before"]),
            "after_perplexity_ratio": ratio(report["perplexity"]["after"], other["perplexity"]["after"])}


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def md(cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def table(report: dict) -> str:
    ppl = report["perplexity"]
    head = ("stage", "steps", "tokens", "tok/s", "peak MiB", "first loss", "last loss", "held-out ppl")
    lines = [f"{report['device']} ({report['mixed_precision']}): held-out perplexity teacher "
             f"{fmt(ppl['teacher'], '.3f')}, before distillation {fmt(ppl['before'], '.3f')}; "
             f"distillation {report['distill_seconds']:.0f} s", md(head), "|" + "---|" * len(head)]
    for s in report["stages"]:
        peak = s["peak_memory_bytes"] / 2**20 if s["peak_memory_bytes"] is not None else None
        lines.append(md([s["stage"], s["steps"], s["tokens"], fmt(s["tokens_per_s"], ".0f"), fmt(peak, ".1f"),
                         fmt(s["first_loss"], ".4g"), fmt(s["last_loss"], ".4g"), fmt(s["held_out_perplexity"], ".3f")]))
    if "comparison" in report:
        c = report["comparison"]
        head = ("stage", "steps", "loss r", "final loss ratio", "ppl ratio", "tok/s ratio")
        lines += ["", f"against {c['other']} ({c['other_device']}, {c['other_mixed_precision']}); ratios this / other",
                  md(head), "|" + "---|" * len(head)]
        lines += [md([s["stage"], f"{s['steps'][0]}/{s['steps'][1]}", fmt(s["loss_pearson"], ".4f"),
                      fmt(s["final_loss_ratio"], ".4f"), fmt(s["held_out_perplexity_ratio"], ".4f"),
                      fmt(s["tokens_per_s_ratio"], ".2f")]) for s in c["stages"]]
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), help="default: bf16 on CUDA, no on CPU")
    parser.add_argument("--stages", default="align:1M,hidden:1M,kd:2M")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stories", type=int, default=400, help="stories the teacher writes as the corpus")
    parser.add_argument("--workdir", type=Path, help="keep the corpus, student and distilled model here")
    parser.add_argument("--compare", type=Path, help="a report of an earlier run of this script to compare with")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or step messages")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    precision = args.mixed_precision or ("bf16" if cuda else "no")
    other = json.loads(args.compare.read_text()) if args.compare else None  # before --out may replace it
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()

    started = time.perf_counter()
    torch.manual_seed(0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixerswap-distill-device-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()  # the CPU figures mean little on a machine busy with other work
    say(f"sampling {args.stories} stories from stories260k")
    corpus, calibration, held, data_note = write_corpus(work, args.stories)
    corpus_seconds = time.perf_counter() - started
    say("converting to Mamba-2 with 50% attention, calibrated")
    convert(packaged_teacher(), work / "student", to="mamba2", keep_attention=0.5, calibration=calibration,
            overwrite=True, progress=False)
    convert_seconds = time.perf_counter() - started - corpus_seconds
    distilled = work / "distilled"
    shutil.rmtree(work_dir(distilled), ignore_errors=True)  # an earlier run's checkpoints and metrics (--workdir)
    recipe = DistillRecipe.validated({
        "student": str(work / "student"), "teacher": str(packaged_teacher()), "data": str(corpus), "out": str(distilled),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "held_out_docs": held, "mixed_precision": precision,
        "checkpoint_every": 10**9,  # only the checkpoint at each stage end: none inside the timed steps
        "stages": parse_stages(args.stages)})
    device = torch.device("cuda" if cuda else "cpu")
    say(f"distilling on {device} ({precision}): {args.stages}")
    distill_started = time.perf_counter()
    result = run_distill(recipe, overwrite=True, progress=not args.quiet, keep_checkpoints=True)
    if cuda:
        torch.cuda.synchronize()
    distill_seconds = time.perf_counter() - distill_started

    from mixerswap.evals.speed import kernel_backends

    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "mixed_precision": precision, **versions(), "command": " ".join(["python", *sys.argv]),
        "teacher": "stories260k (packaged)", "student": "mamba2, keep_attention 0.5 (calibrated)", "data": data_note,
        "seq_len": args.seq_len, "batch_size": args.batch_size,
        "stages_requested": [{"name": s.name, "tokens": s.tokens, "lr": s.peak_lr} for s in recipe.stages],
        "kernel_backends": kernel_backends(device, torch.bfloat16 if precision == "bf16" else torch.float32),
        "perplexity": {"teacher": result.perplexity_teacher, "before": result.perplexity_before,
                       "after": result.perplexity_after},
        "stages": stage_rows(read_stages(work_dir(distilled) / "metrics.jsonl")),
        "corpus_seconds": round(corpus_seconds, 2), "convert_seconds": round(convert_seconds, 2),
        "distill_seconds": round(distill_seconds, 2),
        "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],  # at the start, at the end
    }
    if other is not None:
        report["comparison"] = compare(report, other, args.compare)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out, report)
    print(table(report))
    print(f"wrote {args.out} ({report['seconds']:.0f} s in all)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if any(s["held_out_perplexity"] is not None and math.isnan(s["held_out_perplexity"]) for s in report["stages"]):
        raise SystemExit("held-out perplexity is NaN after a stage")


if __name__ == "__main__":
    main()
