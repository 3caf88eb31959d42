"""The recovery table: every student kind converted from one teacher, distilled with one fixed budget, measured.

    python benchmarks/quality.py                                   # stories260k, every row (~1 h on 2 cores)
    python benchmarks/quality.py --rows mamba2-25,mamba2-25-kl --tokens 60k
    python benchmarks/quality.py --rows mamba2-50 --stories 20000 --tokens 12M --workdir W --keep-students  # ~40 min
    python benchmarks/quality.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf --text wikitext2-test.raw \
        --rows mamba2-50,mamba2-50-kl --tokens 32k --seq-len 256 --out benchmarks/results/quality-smollm2.json
    python benchmarks/quality.py --teacher SmolLM2-135M-Instruct.Q4_1.gguf --text wikitext2-test.raw \
        --train-text corpus/corpus.jsonl.xz --rows mamba2-50 --tokens 20M --seq-len 1024 --batch-size 32 \
        --mixed-precision bf16 --out q-gpu.json        # on a GPU (evaluations there too), more training text

Data. stories260k (the default, packaged with mixerswap) only knows TinyStories: the teacher writes its
own corpus (``--stories`` seeded samples, kept in ``--workdir`` and reused by the next run there); the
first 10% are held out, the next 40 calibrate every conversion. With ``--text`` (a raw WikiText-style file,
articles split at `` = Title = `` lines) the first ``--held-out-docs`` articles are held out, the next ones
calibrate (as few as hold the 4,096 tokens that calibration and ``--select`` scoring read: a WikiText article is
thousands of tokens), the rest train; ``--calibration-docs N`` sets the count. Perplexity is scored on the first
``--held-out-rows`` packed rows of the held-out documents (8 with the stories, 64 with ``--text``).
``--train-text`` adds training documents (``benchmarks/corpus.py`` builds a public-domain and
free-documentation corpus from Debian packages) for budgets larger than the text.
With ``--validation-docs N`` the first N training documents are kept out as well, and a stage that raises
their perplexity is undone (the distill stage guard; the table marks such a stage with ``*``).

Per row: ``convert`` (calibrated; ``-kl`` rows choose their attention layers by the KL of aligned mixers,
``-kl-init`` by that of the conversion as it is), ``distill``
align → hidden → kd with ``--tokens`` split 1:1:2 (``--split``), then on the held-out documents: perplexity (the
trainer's held-out perplexity, one definition for teacher, init and after every stage), next-token
agreement with the teacher, greedy-generation agreement (share of ``--gen-tokens`` greedy tokens the
student produces before it first departs from the teacher, over held-out prompts), MQAR and passkey
retrieval (``--passkey-length``, clipped to the teacher's positions; exact answers, and in brackets the
share of the key's leading digits answered) when the teacher itself solves them, and the cache bytes
per token after a prefill of 1K and 8K tokens.
Writes one JSON row per student (``--out``; ``--append`` keeps the rows of an earlier run with the same
teacher that this run does not measure again), a PNG of perplexity against tokens, and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mixerswap.architectures.cache import HybridMixerCache
from mixerswap.convert import convert
from mixerswap.convert.adapters import AttentionShape
from mixerswap.convert.checkpoint_io import resolve_model_dir
from mixerswap.convert.converters import AttentionLayout
from mixerswap.convert.mla import CONVERTER as MLA_CONVERTER, rotary_width
from mixerswap.convert.mla_rope import rorope_freqs
from mixerswap.devices import pick_device
from mixerswap.demo import distill_stages, packaged_teacher, sample_stories, top1_agreement
from mixerswap.distill.recipe import DEFAULT_FAST_LR_SCALE, DistillRecipe, parse_tokens
from mixerswap.distill.checkpoint import latest_checkpoint
from mixerswap.distill.trainer import run_distill, work_dir
from mixerswap.evals.lengths import position_limit
from mixerswap.evals.probes import mqar_accuracy, passkey_accuracy
from mixerswap.generation import pad_token_id

RESULTS = Path(__file__).parent / "results"


def mla_even(teacher_config, fraction: float, rope_share: float = 1.0) -> dict:
    """MLA with ``fraction`` of the teacher's KV cache in every layer (no allocation across layers): the RoRoPE
    key with ``rope_share`` of the slots ``convert`` gives it under that ``kv_budget`` (RoPE on at most half the
    budget), the latent the rest."""
    shape = AttentionShape.from_config(teacher_config)
    budgeted = MLA_CONVERTER.settings(teacher_config, AttentionLayout(shape), {"kv_budget": fraction})
    slots = max(1, round(budgeted.rope_dim // 2 * rope_share))  # rorope: one shared key, two channels a slot
    rot = rotary_width(teacher_config, shape.head_dim)
    return {"to": "mla", "keep": 0.0, "kv_fraction": fraction,
            "settings": {"kv_rank": int(fraction * 2 * shape.num_kv_heads * shape.head_dim) - 2 * slots,
                         "rope_freqs": rorope_freqs(slots, rot // 2)}}


def rows_for(teacher_config) -> dict[str, dict]:
    """Every student of the table: kind, attention kept, selection, settings, or a plan."""
    def mla(fraction: float) -> dict:  # ranks per layer chosen under the budget (convert's kv_budget)
        return {"to": "mla", "keep": 0.0, "kv_fraction": fraction, "settings": {"kv_budget": fraction}}

    rows = {f"mamba2-{int(k * 100)}": {"to": "mamba2", "keep": k} for k in (0.5, 0.25, 0.0)}
    rows |= {f"mamba2-{int(k * 100)}-kl": {"to": "mamba2", "keep": k, "select": "kl"} for k in (0.5, 0.25)}
    # the same selection scored on the conversion as it is, before any alignment (--select-align-steps 0)
    rows["mamba2-25-kl-init"] = {"to": "mamba2", "keep": 0.25, "select": "kl", "select_align_steps": 0}
    window = min(64, teacher_config.max_position_embeddings // 8)
    linear_family = {"swa": {"window": window}, "linear": {"window": window // 4}, "gla": {}, "gdn": {}}
    for kind, settings in linear_family.items():
        rows |= {f"{kind}-{int(k * 100)}": {"to": kind, "keep": k, "settings": settings} for k in (0.25, 0.0)}
    rows |= {"mla-kv50": mla(0.5), "mla-kv25": mla(0.25)}
    shape = AttentionShape.from_config(teacher_config)
    if shape.num_kv_heads > 1:  # RoRoPE slots: the same cache in every layer, the default split or fewer slots
        rows["mla-kv25-even"] = mla_even(teacher_config, 0.25)
        rows |= {f"mla-kv25-even-rope{int(share * 100)}": mla_even(teacher_config, 0.25, share) for share in (0.75, 0.5, 0.25)}
    n = teacher_config.num_hidden_layers
    rows["mixed"] = {"plan": {"default": {"kind": "gdn"},
                              "layers": [{"layers": str(n // 2), "kind": "attention"},
                                         {"layers": f"0,{n - 1}", "kind": "mla", **mla(0.5)["settings"]}]}}
    return rows


def teacher_stories(work: Path, teacher_dir: Path, teacher, tokenizer, count: int) -> list[str]:
    """``count`` stories the teacher writes (seed 0), kept in ``work/stories.json`` and read back from there by a
    later run with the same teacher and count (sampling 20,000 takes about 12 minutes on one CPU thread)."""
    path = work / "stories.json"
    key = {"teacher": str(Path(teacher_dir).resolve()), "count": count, "seed": 0}
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in key} == key:
            print(f"reusing the {count} stories in {path}")
            return saved["stories"]
    stories = sample_stories(teacher, tokenizer, count)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**key, "stories": stories}), encoding="utf-8")
    tmp.replace(path)
    return stories


PROMPT_TOKENS = 32  # of a training paragraph: what a --teacher-samples continuation starts from
TEXT_HELD_OUT_ROWS = 64  # with --text: 16k tokens at --seq-len 256 (benchmarks/RESULTS.md, "Training text and held-out
# rows on SmolLM2": 2048 held-out tokens ranked two students the other way round from all 40k)
STORY_CALIBRATION_DOCS = 40  # stories260k: the stories after the held-out ones that calibrate
CALIBRATION_TOKENS = 4096  # what the calibration documents must hold: convert's 2048 tokens + --select's 2048 to score


@torch.inference_mode()
def teacher_continuations(work: Path, teacher_dir: Path, teacher, tokenizer, docs: list[str], count: int,
                          new_tokens: int, batch: int) -> list[str]:
    """``count`` documents the teacher writes (temperature 1, seed 0): each starts with the first
    ``PROMPT_TOKENS`` tokens of a paragraph of ``docs`` (paragraphs taken in turn, again from the first
    when there are fewer) and goes on for ``new_tokens`` sampled tokens (less where the teacher ends it).
    Kept in ``work/samples.json`` and read back by a later run with the same teacher, documents and
    settings. Sequence-level distillation: the student learns on the teacher's own distribution, in
    the documents' domain, as many tokens as wanted."""
    path = work / "samples.json"
    digest = hashlib.sha256("\0".join(docs).encode()).hexdigest()[:16]
    key = {"teacher": str(Path(teacher_dir).resolve()), "count": count, "new_tokens": new_tokens,
           "prompt_tokens": PROMPT_TOKENS, "documents": digest, "seed": 0}
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in key} == key:
            print(f"reusing the {count} teacher samples in {path}")
            return saved["samples"]
    paragraphs = [p for d in docs for p in re.split(r"\n\s*\n", d) if p.strip()]
    prompts = [ids[:PROMPT_TOKENS] for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
               if len(ids) >= PROMPT_TOKENS]
    if not prompts:
        raise SystemExit(f"--teacher-samples: no training paragraph has {PROMPT_TOKENS} tokens to start from")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    samples, started = [], time.perf_counter()
    try:
        for start in range(0, count, batch):
            ids = torch.tensor([prompts[i % len(prompts)] for i in range(start, min(count, start + batch))],
                               device=teacher.device)
            out = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                   max_new_tokens=new_tokens, pad_token_id=pad_token_id(tokenizer))
            samples += tokenizer.batch_decode(out, skip_special_tokens=True)
            rate = (len(samples) * new_tokens) / (time.perf_counter() - started)
            print(f"teacher samples: {len(samples)}/{count} ({rate:,.0f} tokens/s at most)", flush=True)
    finally:
        torch.random.set_rng_state(generator_state)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**key, "samples": samples}), encoding="utf-8")
    tmp.replace(path)
    return samples


def write_split(work: Path, docs: list[str], held: int, calib: int, extra: list[str] = ()) -> tuple[Path, Path]:
    """``(corpus.jsonl, calibration.txt)`` in ``work``: the held-out documents first (distillation holds out
    the first ``held``), then the training ones and the ``extra`` training documents; the ``calib`` after the
    held-out ones calibrate and are left out."""
    corpus, calibration = work / "corpus.jsonl", work / "calibration.txt"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in [*docs[:held], *docs[held + calib :], *extra]))
    calibration.write_text("\n\n".join(docs[held : held + calib]))
    return corpus, calibration


def calibration_doc_count(docs: list[str], tokenizer, tokens: int = CALIBRATION_TOKENS) -> int:
    """The fewest of ``docs`` (in order) that hold ``tokens`` tokens once joined as ``write_split`` joins them
    (all of them when they hold fewer)."""
    total = 0
    for count, doc in enumerate(docs, 1):
        total += len(tokenizer(doc + "\n\n")["input_ids"])
        if total >= tokens:
            return count
    return len(docs)


def read_training_text(paths: list[Path]) -> list[str]:
    """Documents of ``--train-text`` files: JSONL with a ``text`` field per line (``.jsonl``, or ``.jsonl.xz``
    as ``benchmarks/corpus.py --xz`` writes it), else plain text with one document per blank-line-separated
    paragraph group of a file (the whole file when it has no blank lines)."""
    docs = []
    for path in paths:
        if not path.exists():
            raise SystemExit(f"--train-text: {path} does not exist")
        raw = lzma.open(path, "rt", encoding="utf-8").read() if path.suffix == ".xz" else path.read_text(encoding="utf-8")
        if path.name.endswith((".jsonl", ".jsonl.xz")):
            for number, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise SystemExit(f"--train-text: line {number} of {path} has no string 'text' field")
                    docs.append(record["text"])
        else:
            docs += [d.strip() for d in re.split(r"\n\s*\n", raw) if d.strip()]
    return docs


def split_articles(text: str) -> list[str]:
    """WikiText: an article starts at a `` = Title = `` line (one pair of ``=``)."""
    parts = re.split(r"\n(?= = [^=].* = \n)", "\n" + text)
    return [p.strip() for p in parts if len(p.split()) > 50]


@torch.inference_mode()
def generation_agreement(model, teacher, prompts: list[torch.Tensor], new_tokens: int) -> float:
    """Mean share of ``new_tokens`` greedy tokens produced before the student first departs from the teacher."""
    shares = []
    for ids in prompts:
        ids = ids.to(model.device)
        outs = [m.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)[0, len(ids):]
                for m in (model, teacher)]
        same = (outs[0] == outs[1]).long()
        shares.append(same.cumprod(0).sum().item() / new_tokens)
    return sum(shares) / len(shares)


@torch.inference_mode()
def cache_bytes_per_token(model, lengths: list[int], vocab: int) -> dict[str, float]:
    """Bytes the model's cache holds after a prefill of each length, per token (batch 1, model dtype)."""
    out = {}
    for length in lengths:
        ids = torch.randint(4, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(model.device)
        cache = model.make_cache() if hasattr(model, "make_cache") else transformers.DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        nbytes = cache.nbytes() if isinstance(cache, HybridMixerCache) else sum(
            t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
            if isinstance(t, torch.Tensor))
        out[f"{length}"] = round(nbytes / length, 1)
    return out


def held_out_prompts(tokenizer, docs: list[str], count: int, length: int) -> list[torch.Tensor]:
    prompts = [torch.tensor(tokenizer(d)["input_ids"][:length]) for d in docs]
    return [p for p in prompts if len(p) == length][:count]


def run_row(name: str, row: dict, args, work: Path, corpus: Path, calibration: Path, held: int, teacher, tokenizer,
            held_docs: list[str], teacher_mqar: float | None, passkey_length: int | None) -> dict:
    started = time.perf_counter()
    student = work / name / "student"
    plan_file = None
    resuming = args.resume and (student / "config.json").exists() and \
        latest_checkpoint(work_dir(work / name / "distilled") / "checkpoints") is not None
    if resuming:  # a stopped run's conversion and its distillation's latest checkpoint
        print(f"{name}: resuming the distillation of {student}")
        kinds = AutoConfig.from_pretrained(student).layer_kinds()
    elif "plan" in row:
        plan_file = work / name / "plan.yaml"
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(yaml.safe_dump(row["plan"], sort_keys=False))
        conversion = convert(args.teacher_dir, student, plan=plan_file, calibration=calibration, overwrite=True,
                             output_refit=args.output_refit, progress=False)
    else:
        conversion = convert(args.teacher_dir, student, to=row["to"], keep_attention=row["keep"],
                             mixer_settings=row.get("settings"), select=row.get("select"),
                             select_align_steps=row.get("select_align_steps"), select_device=args.device,
                             calibration=calibration, output_refit=args.output_refit, overwrite=True, progress=False)
    if not resuming:
        kinds = [e["kind"] for e in conversion.plan]
    lrs = dict(zip(("align", "hidden", "kd"), args.lr))
    stages = [{**stage, "lr": lrs[stage["name"]], "fast_lr_scale": args.fast_lr_scale}
              for stage in distill_stages(parse_tokens(args.tokens), args.split)]
    recipe = DistillRecipe.validated({
        "student": str(student), "teacher": str(args.teacher_dir), "data": str(corpus), "out": str(work / name / "distilled"),
        "seq_len": args.seq_len, "batch_size": args.batch_size, "held_out_docs": held, "held_out_rows": args.held_out_rows,
        "validation_docs": args.validation_docs, "mixed_precision": args.mixed_precision,
        "checkpoint_every": args.checkpoint_every, "stages": stages})
    if not resuming and latest_checkpoint(work_dir(recipe.out) / "checkpoints") is not None:
        print(f"{name}: starting afresh; the checkpoints a stopped run left go (--resume continues them)")
        shutil.rmtree(work_dir(recipe.out))
    result = run_distill(recipe, overwrite=True, resume=resuming, progress=False)
    model = AutoModelForCausalLM.from_pretrained(work / name / "distilled", dtype=torch.float32).eval().to(args.device)
    ids = torch.cat([torch.tensor(tokenizer(d)["input_ids"]) for d in held_docs])[: args.agreement_tokens]
    ids = ids.to(args.device)
    with torch.inference_mode():
        agreement = top1_agreement(model, teacher, ids, seq=args.seq_len)
    prompts = held_out_prompts(tokenizer, held_docs, args.gen_prompts, 16)
    selection = {}
    if row.get("select"):  # how the kept layers were scored (rows from before aligned scoring: 0)
        chosen = yaml.safe_load((student / "mixerswap.yaml").read_text())["selection"]
        selection = {"select_align_steps": chosen["align_steps"], "kept_layers": chosen["keep"]}
    out = {
        "name": name, "kind": "+".join(sorted(set(kinds) - {"attention"})), "plan": kinds,
        "select": row.get("select"), **selection, "attention_kept": round(kinds.count("attention") / len(kinds), 3),
        "kv_fraction": row.get("kv_fraction"), "teacher": str(args.teacher), "teacher_ppl": result.perplexity_teacher,
        "student_ppl_init": result.perplexity_before,
        "stage_ppl": {r["stage"]: r["perplexity"] for r in result.stage_perplexity},
        **({"undone": {r["stage"]: r["perplexity_trained"] for r in result.stage_perplexity if r["reverted"]},
            "stage_validation_ppl": {r["stage"]: r["validation_perplexity"] for r in result.stage_perplexity}}
           if args.validation_docs else {}),
        "student_ppl_final": result.perplexity_after, "next_token_agreement": round(agreement, 4),
        "gen_agreement": round(generation_agreement(model, teacher, prompts, args.gen_tokens), 4),
        "mqar": (round(mqar_accuracy(model, [args.mqar_length])[0].accuracy, 4) if teacher_mqar is not None else None),
        **passkey_fields(model, tokenizer, passkey_length, args.passkey_samples),
        "cache_bytes_per_token": cache_bytes_per_token(model, args.cache_lengths, model.config.vocab_size),
        "tokens": sum(stage["tokens"] for stage in stages),
        "stage_tokens": {stage["name"]: stage["tokens"] for stage in stages}, "lr": args.lr, "fast_lr_scale": args.fast_lr_scale,
        "validation_docs": args.validation_docs, "output_refit": args.output_refit,
        "seconds": round(time.perf_counter() - started, 1),  # with "resumed": this run's part only
        **({"resumed": True} if resuming else {}),
    }
    if not args.keep_students:
        shutil.rmtree(work / name, ignore_errors=True)
    return out


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch CUDA {torch.version.cuda}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def plot(rows: list[dict], teacher_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        quarter = row["tokens"] / 4  # rows from before --split: 1:1:2
        split = row.get("stage_tokens") or {"align": quarter, "hidden": quarter, "kd": 2 * quarter}
        xs, ys = [0.0], [row["student_ppl_init"]]
        for stage, tokens in split.items():
            if stage in row["stage_ppl"]:
                xs.append(xs[-1] + tokens)
                ys.append(row["stage_ppl"][stage])
        ax.plot(xs, ys, marker="o", label=row["name"])
    ax.axhline(teacher_ppl, color="black", linestyle="--", label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def passkey_fields(model, tokenizer, length: int | None, samples: int) -> dict:
    """``passkey`` (exact answers) and ``passkey_digits`` (share of the key's leading digits answered), or
    ``passkey: None`` where the teacher cannot do it."""
    if not length:
        return {"passkey": None}
    result = passkey_accuracy(model, tokenizer, [length], samples=samples)[0]
    return {"passkey": result.accuracy, "passkey_digits": round(result.key_digits, 4)}


def passkey_cell(row: dict) -> str:
    if row.get("passkey") is None:
        return "n/a"
    digits = row.get("passkey_digits")
    return f"{row['passkey']:.2f}" + ("" if digits is None else f" ({digits:.2f})")


def table(rows: list[dict]) -> str:
    lengths = [int(n) for n in rows[0]["cache_bytes_per_token"]] if rows else []
    sizes = [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths]
    head = ("student", "attn", "fast lr", "ppl init", "align", "hidden", "kd", "next-tok", "gen", "MQAR", "passkey",
            *[f"cache B/tok {size}" if i == 0 else size for i, size in enumerate(sizes)], "s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stage = [("-" if s not in r["stage_ppl"] else f"{r['stage_ppl'][s]:.2f}")  # "-": left out by --split
                 + ("*" if s in r.get("undone", {}) else "") for s in ("align", "hidden", "kd")]
        cache = list(r["cache_bytes_per_token"].values())
        lines.append("| " + " | ".join([
            r["name"], f"{r['attention_kept']:.2f}", f"x{r.get('fast_lr_scale') or 1:g}", f"{r['student_ppl_init']:.2f}", *stage,
            f"{r['next_token_agreement']:.1%}", f"{r['gen_agreement']:.1%}",
            "n/a" if r["mqar"] is None else f"{r['mqar']:.2f}",
            passkey_cell(r),
            *[f"{c:.0f}" for c in cache], f"{r['seconds']:.0f}"]) + " |")
    if any(r.get("undone") for r in rows):
        lines.append("\n\\* stage undone: it raised perplexity on the validation documents (the figure is the kept one)")
    return "\n".join(lines)


def rows_with_settings(report: dict) -> list[dict]:
    """A report's rows, each with the run's learning rates, fast-parameter multiple and calibration documents
    unless it has its own (1.0 and 40 for runs from before those options), so rows of several runs can share one
    table. A ``-kl`` row from before selection scored aligned mixers is the ``-kl-init`` row (scored on the
    conversion as is)."""
    rows = []
    for r in report["rows"]:
        r = {"lr": report.get("lr"), "fast_lr_scale": report.get("fast_lr_scale", 1.0),
             "validation_docs": report.get("validation_docs", 0), "calibration_docs": report.get("calibration_docs", STORY_CALIBRATION_DOCS),
             **({"select_align_steps": 0} if r.get("select") else {}),
             **r}
        if r.get("select") and r["select_align_steps"] == 0 and not r["name"].endswith("-init"):
            r["name"] += "-init"
        rows.append(r)
    return rows


def merge(reports: list[Path], out: Path) -> None:
    """``--merge``: one report from several runs (rows replaced by name, in order; every command kept)."""
    merged = None
    for path in ([out] if out.exists() else []) + reports:
        report = json.loads(path.read_text())
        report["rows"] = rows_with_settings(report)
        if merged is None:
            merged = {**report, "commands": report.get("commands", [report["command"]])}
            continue
        if report["teacher"] != merged["teacher"]:
            raise SystemExit(f"--merge: {path} holds rows of teacher {report['teacher']}, not {merged['teacher']}")
        rows = {r["name"]: r for r in merged["rows"]}
        rows.update({r["name"]: r for r in report["rows"]})
        merged["rows"] = list(rows.values())
        merged["commands"] = merged["commands"] + report.get("commands", [report["command"]])
        merged["seconds"] = round(sum(r["seconds"] for r in merged["rows"]), 1)
        merged["complete"] = merged.get("complete", False) and report.get("complete", False)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    plot(merged["rows"], merged["teacher_row"]["teacher_ppl"], out.with_suffix(".png"))
    print(table(merged["rows"]))
    print(f"wrote {out} and {out.with_suffix('.png')} ({len(merged['rows'])} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="HF folder or .gguf (default: the packaged stories260k)")
    parser.add_argument("--text", type=Path, help="raw text (WikiText articles) instead of teacher-written stories")
    parser.add_argument("--rows", help="comma-separated row names (default: all); --list shows them")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--stories", type=int, default=400)
    parser.add_argument("--held-out-docs", type=int, default=8, help="with --text: articles held out")
    parser.add_argument("--calibration-docs", type=int, default=None,
                        help="documents after the held-out ones that calibrate every conversion and are kept out of "
                             f"training (default: {STORY_CALIBRATION_DOCS} stories; with --text, as few articles as hold {CALIBRATION_TOKENS} "
                             "tokens)")
    parser.add_argument("--tokens", default="120k", help="distillation tokens per student, shared as --split says")
    parser.add_argument("--split", default="1:1:2",
                        help="shares of --tokens for align:hidden:kd (default 1:1:2); a share of 0 leaves that stage out")
    parser.add_argument("--lr", help="peak learning rates of align, hidden, kd (default: the demo's, 3e-3,1e-3,5e-4)")
    parser.add_argument("--output-refit", action="store_true",
                        help="convert with the output projection's refit (convert --output-refit)")
    parser.add_argument("--fast-lr-scale", type=float, default=DEFAULT_FAST_LR_SCALE,
                        help="learning-rate multiple of the mixers' fast parameters (1: none)")
    parser.add_argument("--validation-docs", type=int, default=0,
                        help="documents after the calibration ones kept out of training: a stage that raises their "
                             "perplexity is undone (0: every stage kept)")
    parser.add_argument("--held-out-rows", type=int, default=None,
                        help="packed rows of --seq-len tokens of the held-out documents scored for perplexity "
                             f"(default: 8 with the stories; with --text {TEXT_HELD_OUT_ROWS}: a few thousand tokens "
                             "of two or three articles rank students by their topics)")
    parser.add_argument("--train-text", type=Path, nargs="+", default=[],
                        help="more training documents (JSONL with a 'text' field, .jsonl.xz, or plain text), after "
                             "the training part of the stories or --text articles; held-out and calibration "
                             "documents stay those of the stories or --text")
    parser.add_argument("--teacher-samples", type=int, default=0,
                        help="with --text: this many training documents the teacher writes, each continuing the "
                             f"first {PROMPT_TOKENS} tokens of a training paragraph (kept in --workdir)")
    parser.add_argument("--sample-tokens", type=int, default=512, help="new tokens per teacher sample")
    parser.add_argument("--sample-batch", type=int, default=64, help="teacher samples generated at once")
    parser.add_argument("--device", default=None,
                        help="where the evaluations run (default: cuda when available, else cpu); distillation "
                             "runs where the engine puts it (the same GPU, or the CPU)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="distillation's autocast precision (distill's mixed_precision); evaluations run in fp32")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gen-prompts", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--agreement-tokens", type=int, default=4096)
    parser.add_argument("--mqar-length", type=int, default=64)
    parser.add_argument("--passkey-length", type=int, default=1024, help="clipped to the teacher's positions")
    parser.add_argument("--passkey-samples", type=int, default=10)
    parser.add_argument("--cache-lengths", default="1024,8192")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing --out (same teacher) that this run does not measure again")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep-students", action="store_true",
                        help="keep each row's conversion and distilled student in --workdir ROW/{student,distilled} "
                             "(for `mixerswap eval` at other lengths, say); without it they are removed after the row")
    parser.add_argument("--resume", action="store_true",
                        help="a row whose distillation a stopped run left checkpoints for in --workdir continues from "
                             "the latest one (its conversion is reused); other rows start afresh")
    parser.add_argument("--checkpoint-every", type=int, default=200, help="optimizer steps between checkpoints")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="measure nothing: put the rows of these reports (same teacher) into --out, replacing "
                             "rows of the same name, and rewrite its table and plot")
    args = parser.parse_args()
    if args.keep_students and args.workdir is None:
        raise SystemExit("--keep-students keeps the students in --workdir: give --workdir DIR")
    if args.teacher_samples and args.text is None:
        raise SystemExit("--teacher-samples continues --text paragraphs; stories260k rows sample with --stories")
    if args.resume and args.workdir is None:
        raise SystemExit("--resume continues rows a stopped run left in --workdir: give --workdir DIR")
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.held_out_rows is None:
        args.held_out_rows = 8 if args.text is None else TEXT_HELD_OUT_ROWS
    args.cache_lengths = [int(x) for x in args.cache_lengths.split(",")]
    args.lr = [float(x) for x in args.lr.split(",")] if args.lr else [s["lr"] for s in distill_stages(1)]
    if len(args.lr) != 3:
        raise SystemExit(f"--lr takes three learning rates (align,hidden,kd), got {len(args.lr)}")
    try:
        args.split = tuple(float(x) for x in args.split.split(":"))
        distill_stages(1000, args.split)
    except ValueError:
        raise SystemExit(f"--split takes three shares align:hidden:kd like 1:1:2, kd above 0; got {args.split!r}")
    args.device = pick_device(args.device)
    args.teacher = args.teacher or str(packaged_teacher())
    args.teacher_dir = resolve_model_dir(args.teacher)
    rows = rows_for(AutoConfig.from_pretrained(args.teacher_dir))
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in rows.items()))
        return
    chosen = args.rows.split(",") if args.rows else list(rows)
    unknown = sorted(set(chosen) - set(rows))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(rows)}")

    started = time.perf_counter()
    torch.manual_seed(0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixerswap-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_dir, dtype=torch.float32).eval()
    if args.text is None:
        docs = teacher_stories(work, args.teacher_dir, teacher, tokenizer, args.stories)
        held = max(1, len(docs) // 10)
        calib = STORY_CALIBRATION_DOCS if args.calibration_docs is None else args.calibration_docs
        data_note = f"{len(docs)} stories sampled from the teacher (seed 0), {held} held out, {calib} calibrate"
    else:
        docs = split_articles(args.text.read_text(encoding="utf-8"))
        held = args.held_out_docs
        calib = args.calibration_docs
        if calib is None:
            calib = calibration_doc_count(docs[held:], tokenizer)
        data_note = f"{len(docs)} articles of {args.text.name}, the first {held} held out, the next {calib} calibrate"
    if not 0 < calib < len(docs) - held:
        raise SystemExit(f"--calibration-docs {calib}: there are {len(docs) - held} documents after the held-out ones; "
                         "keep at least one for training")
    held_docs = docs[:held]
    extra = read_training_text(args.train_text)
    if extra:
        data_note += f", and {len(extra)} training documents of {', '.join(p.name for p in args.train_text)}"
    teacher.to(args.device)  # after sampling the stories (the sampler starts on the CPU)
    if args.teacher_samples:
        extra += teacher_continuations(work, args.teacher_dir, teacher, tokenizer, docs[held + calib :],
                                       args.teacher_samples, args.sample_tokens, args.sample_batch)
        data_note += (f", and {args.teacher_samples} teacher samples of {args.sample_tokens} tokens after the first "
                      f"{PROMPT_TOKENS} of a training paragraph")
    corpus, calibration = write_split(work, docs, held, calib, extra)
    teacher_mqar = mqar_accuracy(teacher, [args.mqar_length])[0].accuracy
    if teacher_mqar < 0.2:
        print(f"teacher MQAR accuracy {teacher_mqar:.2f} at length {args.mqar_length}: no recall circuit, MQAR left out")
        teacher_mqar = None
    passkey_length = min(args.passkey_length, (position_limit(teacher) or args.passkey_length + 16) - 16)
    teacher_passkey = passkey_accuracy(teacher, tokenizer, [passkey_length], samples=args.passkey_samples)[0].accuracy
    if teacher_passkey < 0.5:
        print(f"teacher passkey accuracy {teacher_passkey:.2f} at length {passkey_length}: passkey left out")
        passkey_length = None

    teacher_row = {"cache_bytes_per_token": cache_bytes_per_token(teacher, args.cache_lengths, teacher.config.vocab_size)}
    report = {"teacher": str(args.teacher), "data": data_note, "tokens_per_student": parse_tokens(args.tokens),
              "calibration_docs": calib,
              "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr, "fast_lr_scale": args.fast_lr_scale,
              "validation_docs": args.validation_docs, "held_out_rows": args.held_out_rows,
              "mixed_precision": args.mixed_precision,
              "teacher_row": teacher_row, "rows": [],
              "complete": False, "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "transformers": transformers.__version__, "machine": machine(args.device),
              "passkey": None if passkey_length is None else {"length": passkey_length, "samples": args.passkey_samples,
                                                               "teacher": teacher_passkey}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = report["rows"]
    if args.append and args.out.exists():  # rows keep their own tokens and lr; "commands" lists every run
        previous = json.loads(args.out.read_text())
        if previous["teacher"] != report["teacher"]:
            raise SystemExit(f"--append: {args.out} holds rows of teacher {previous['teacher']}, not {report['teacher']}")
        results += [r for r in rows_with_settings(previous) if r["name"] not in chosen]
        report["commands"] = previous.get("commands", [previous["command"]]) + [report["command"]]
    for name in chosen:  # the file is rewritten after every row, so an interrupted run keeps what it measured
        print(f"== {name}", flush=True)
        results.append(run_row(name, rows[name], args, work, corpus, calibration, held, teacher, tokenizer,
                               held_docs, teacher_mqar, passkey_length))
        print(json.dumps(results[-1]), flush=True)
        teacher_row["teacher_ppl"] = results[0]["teacher_ppl"]
        report["seconds"] = round(time.perf_counter() - started, 1)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    report["complete"] = True
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, teacher_row["teacher_ppl"], args.out.with_suffix(".png"))
    print(f"teacher {args.teacher}: held-out perplexity {teacher_row['teacher_ppl']:.3f}, cache bytes/token "
          f"{teacher_row['cache_bytes_per_token']}; {data_note}; {args.tokens} distillation tokens per student, "
          f"align:hidden:kd {':'.join(f'{x:g}' for x in args.split)}")
    print(table(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({report['seconds']:.0f} s)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if any(math.isnan(r["student_ppl_final"]) for r in results):
        raise SystemExit("a student's perplexity is NaN")


if __name__ == "__main__":
    main()
