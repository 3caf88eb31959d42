"""Quality of the whole job on a real trained teacher: convert, distill, measure (CPU, a few minutes).

    python benchmarks/distill_quality.py --teacher ../shared/data/teachers/stories260k \
        [--to mamba2] [--set window=64 ...] [--keep-attention 0.4] [--calibration] [--stories 400] [--tokens 400k] [--workdir DIR]

The teacher writes its own corpus (it only knows TinyStories): ``--stories`` samples at temperature
1. The first 10% are held out (``--calibration``: the next 40 calibrate the conversion). The converted student is distilled with align → hidden → kd on the rest
(``--tokens`` split 1:1:2), then teacher, converted and distilled student are scored on the held-out
stories: perplexity (sliding window) and next-token agreement with the teacher. Prints a table.
``--to`` picks the mixer kind of the replaced layers and each ``--set KEY=VALUE`` one of its tunable
settings (the value read as YAML: ``--set window=64 --set feature_map=hedgehog``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixerswap.convert import convert
from mixerswap.distill.recipe import DistillRecipe, parse_tokens
from mixerswap.distill.trainer import run_distill
from mixerswap.evals.perplexity import sequence_nll


@torch.inference_mode()
def sample_stories(teacher, tokenizer, count: int, *, max_new_tokens: int = 256, batch: int = 50) -> list[str]:
    torch.manual_seed(0)
    stories = []
    start = torch.full((batch, 1), tokenizer.bos_token_id)
    while len(stories) < count:
        out = teacher.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0,
                               max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.eos_token_id)
        stories += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True) if t.strip()]
    return stories[:count]


@torch.inference_mode()
def score(model, teacher, tokenizer, texts: list[str], context: int = 256) -> tuple[float, float]:
    """(perplexity, top-1 agreement with the teacher) over ``texts``, each scored on its own."""
    nll = tokens = same = total = 0
    for text in texts:
        ids = torch.tensor(tokenizer(text)["input_ids"])
        n, t, _ = sequence_nll(model, ids, context=min(context, len(ids)), stride=max(1, context // 2))
        nll, tokens = nll + n, tokens + t
        window = ids[:context][None]
        same += (model(window).logits.argmax(-1) == teacher(window).logits.argmax(-1)).sum().item()
        total += window.numel()
    return math.exp(nll / tokens), same / total


def parse_setting(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE, got {item!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--to", default="mamba2", help="mixer kind of the replaced layers")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a tunable setting of the kind (repeatable)")
    parser.add_argument("--keep-attention", type=float, default=0.4)
    parser.add_argument("--calibration", action="store_true",
                        help="convert with --calibration on 40 training stories (never the held-out ones)")
    parser.add_argument("--stories", type=int, default=400)
    parser.add_argument("--tokens", default="400k")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixerswap-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    stories = sample_stories(teacher, tokenizer, args.stories)
    held = max(1, len(stories) // 10)
    corpus = work / "stories.jsonl"
    # held-out stories first: distillation holds out the first `held_out_docs` documents
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    calibration = None
    if args.calibration:
        calibration = work / "calibration.txt"
        calibration.write_text("\n\n".join(stories[held : held + 40]))
    convert(args.teacher, work / "student", to=args.to, keep_attention=args.keep_attention,
            mixer_settings=dict(args.set), calibration=calibration, overwrite=True, progress=False)
    quarter = parse_tokens(args.tokens) // 4
    recipe = DistillRecipe.validated({
        "student": str(work / "student"), "teacher": args.teacher, "data": str(corpus),
        "out": str(work / "distilled"), "seq_len": args.seq_len, "batch_size": 16, "held_out_docs": held,
        "stages": [{"name": "align", "tokens": quarter, "lr": 3e-3}, {"name": "hidden", "tokens": quarter, "lr": 1e-3},
                   {"name": "kd", "tokens": 2 * quarter, "lr": 5e-4}]})
    result = run_distill(recipe, overwrite=True, progress=False)

    held_out = stories[:held]
    rows = []
    for name, path in [("teacher", args.teacher), ("converted", work / "student"), ("distilled", work / "distilled")]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ppl, agree = score(model, teacher, tokenizer, held_out)
        rows.append((name, ppl, agree))
    plan = AutoModelForCausalLM.from_pretrained(work / "student").config.conversion["attention_layers"]
    print(f"teacher {args.teacher}; {args.to} {dict(args.set) or ''} elsewhere"
          f"{' (calibrated)' if args.calibration else ''}; attention kept in layers {plan}; "
          f"{len(stories) - held} training stories, "
          f"{held} held out; distillation {args.tokens} tokens (align/hidden/kd = 1/1/2), seq_len {args.seq_len}")
    print(f"{'model':<10}  {'held-out ppl':>12}  {'top-1 agreement':>15}")
    for name, ppl, agree in rows:
        print(f"{name:<10}  {ppl:>12.3f}  {agree:>15.1%}")
    print("held-out perplexity during distillation (first rows of the held-out stories): before "
          f"{result.perplexity_before:.3f}, " + ", ".join(f"after {r['stage']} {r['perplexity']:.3f}"
                                                       for r in result.stage_perplexity)
          + f"; teacher {result.perplexity_teacher:.3f}")
    print(f"whole run {time.perf_counter() - started:.0f} s (CPU)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
