"""Converted students with and without calibration, before any training, on a real trained teacher.

    python benchmarks/calibration.py --teacher ../shared/data/teachers/stories260k [--stories 40] [--keep 0.6,0.4,0]
    python benchmarks/calibration.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf \
        --text ../shared/data/text/wikitext2-test.raw [--context 1024] [--windows 8] [--keep 0.5,0.25,0]
    python benchmarks/calibration.py --teacher ../shared/data/teachers/stories260k --to mla --kv-budget 0.25,0.5 --keep 0

Without ``--text`` the teacher samples ``--stories`` stories (seeded, temperature 1; it only knows
TinyStories): the first half is the calibration text, the second half the held-out text. With
``--text`` the first 2% of the file calibrates and ``--windows`` windows of ``--context`` tokens from
its second half are held out (``--teacher-samples``: calibrate on text the teacher samples itself,
``convert``'s default, instead). For each attention fraction
(and ``--kv-budget`` of ``--to mla``), the student is converted without calibration, calibrated as
``convert`` does by default, and calibrated with the output projection's refit (``--output-refit``),
and its held-out perplexity printed beside the teacher's. Writes ``benchmarks/results/calibration.json``
(``calibration[-TEACHER][-KIND].json``).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerswap.cli import parse_settings
from mixerswap.convert import convert
from mixerswap.convert.checkpoint_io import resolve_model_dir


@torch.no_grad()
def perplexity(model, rows: list[torch.Tensor]) -> float:
    nll = sum(torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1].float(), ids[1:], reduction="sum")
              for ids in rows)
    return math.exp(nll.item() / sum(len(ids) - 1 for ids in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--stories", type=int, default=40)
    parser.add_argument("--keep", default="0.6,0.4,0")
    parser.add_argument("--to", default="mamba2", help="student kind (convert --to)")
    parser.add_argument("--kv-budget", default=None, help="--to mla: fractions of the teacher's KV cache, e.g. 0.25,0.5")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a mixer setting (convert --set), e.g. kv_weights=balance")
    parser.add_argument("--text", help="a text file: calibration from its start, held-out windows from its second half")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--teacher-samples", action="store_true",
                        help="calibrate on text the teacher samples itself (convert's default) instead of --text's start")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/calibration[-TEACHER].json)")
    args = parser.parse_args()

    teacher_dir = resolve_model_dir(args.teacher)  # a .gguf becomes an HF folder (cached)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
        calibration_text = text[: len(text) // 50]
        ids = tokenizer(text[len(text) // 2 :])["input_ids"]
        held_out = [torch.tensor(ids[i * args.context : (i + 1) * args.context]) for i in range(args.windows)]
        source = f"{args.windows} windows of {args.context} tokens from the second half of {args.text}"
    else:
        torch.manual_seed(0)
        start = torch.full((args.stories, 1), tokenizer.bos_token_id)
        with torch.no_grad():
            out = teacher.generate(start, attention_mask=torch.ones_like(start), do_sample=True, max_new_tokens=200,
                                   pad_token_id=tokenizer.eos_token_id)
        stories = [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]
        half = len(stories) // 2
        held_out = [torch.tensor(tokenizer(s)["input_ids"]) for s in stories[half:]]
        calibration_text = "\n\n".join(stories[:half])
        source = f"{len(held_out)} teacher-sampled stories; calibration: {half} other stories"
    rows = [{"model": "teacher", "keep_attention": 1.0, "calibrated": None, "perplexity": perplexity(teacher, held_out)}]
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calibration.txt"
        calib.write_text(calibration_text)
        budgets = [float(b) for b in args.kv_budget.split(",")] if args.kv_budget else [None]
        given = parse_settings(args.settings)
        source_of_calibration = "teacher" if args.teacher_samples else calib
        for keep in (float(k) for k in args.keep.split(",")):
            for budget in budgets:
                settings = {**given, **({"kv_budget": budget} if budget is not None else {})}
                for calibrated, refit in ((False, None), (True, False), (True, True)):
                    started = time.perf_counter()
                    folder = Path(tmp) / f"student-{keep}-{budget}-{calibrated}-{refit}"
                    convert(teacher_dir, folder, to=args.to, keep_attention=keep, mixer_settings=settings,
                            calibration=source_of_calibration if calibrated else None, output_refit=bool(refit),
                            progress=False)
                    student = AutoModelForCausalLM.from_pretrained(folder).eval()
                    rows.append({"model": "student", "kind": args.to, "settings": settings, "keep_attention": keep,
                                 "kv_budget": budget,
                                 "calibrated": calibrated, "output_refit": refit,
                                 "perplexity": perplexity(student, held_out),
                                 "convert_seconds": round(time.perf_counter() - started, 2)})
    tokens = sum(len(r) for r in held_out)
    print(f"teacher {args.teacher}; held-out: {source} ({tokens} tokens)")
    print(f"{'model':<10}{'attention kept':>16}{'kv budget':>10}{'calibrated':>12}{'refit':>7}{'perplexity':>12}")
    for r in rows:
        calibrated = "-" if r["calibrated"] is None else str(r["calibrated"])
        refit = "-" if r.get("output_refit") is None else str(r["output_refit"])
        budget = "-" if r.get("kv_budget") is None else f"{r['kv_budget']:g}"
        print(f"{r.get('kind', r['model']):<10}{r['keep_attention']:>16.2f}{budget:>10}{calibrated:>12}{refit:>7}"
              f"{r['perplexity']:>12.2f}")
    if args.out is None:
        name = "calibration.json" if not args.text else f"calibration-{Path(args.teacher).stem}.json"
        name = name.replace(".json", "-teacher-samples.json") if args.teacher_samples else name
        name = name.replace(".json", f"-{args.to}.json") if args.to != "mamba2" else name
        name = name.replace(".json", "".join(f"-{s.replace('=', '-')}" for s in args.settings) + ".json")
        args.out = str(Path(__file__).parent / "results" / name)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"teacher": args.teacher, "to": args.to, "held_out": source,
                                          "held_out_tokens": tokens,
                                          "calibration": "teacher samples" if args.teacher_samples else "text",
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
