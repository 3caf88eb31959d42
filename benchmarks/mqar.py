"""MQAR recall per student kind: a teacher that solves MQAR, converted to every kind, distilled alike, measured.

    python benchmarks/mqar.py                      # 5 kinds at 0% and 50% attention (~10 min on 1 thread)
    python benchmarks/mqar.py --keep 0 --kinds gla,gdn
    python benchmarks/mqar.py --layers 4 --keep 0.25 --kinds mamba2,gdn --select uniform,kl,kl-init  # selection
    python benchmarks/mqar.py --quick               # a tiny run that checks the pipeline (~15 s), writes nothing

Why a teacher of our own: the packaged stories260k has no recall circuit (MQAR 0.09 at length 64),
so a student cannot inherit one from it. Here a pico Llama (``transformers.LlamaConfig``, 2 layers,
hidden 64, 4 heads) learns MQAR (Arora et al., "Zoology", 2023) from
:func:`mixerswap.evals.probes.mqar_batch`, with Zoology's loss (cross-entropy on the answers only)
and a curriculum that reaches the target layout in three phases: 4 pairs at length 16 (where the
induction circuit forms within ~1.5k steps), 4 pairs at the target length, then the target pairs;
each phase ends when its own accuracy reaches ``--teacher-target`` (or after ``--phase-steps``).
Induction heads form abruptly after a plateau, and without the short first phase they do not
form within minutes on one CPU thread.

Data. A word-level tokenizer maps ``t<id>`` to ``<id>``, so MQAR sequences travel as text through
the package's ordinary data path. Each sequence is a chat (``user``: pairs, filler and the first
queried key; ``assistant``: its value; ``user``: the next key; ...) rendered back to the bare token
sequence by a chat template that adds nothing: distillation then counts exactly the answer positions
(the queried keys predicting their values), as Zoology's loss does, and the trainer's held-out
perplexity is the perplexity of the answers. Align and hidden still match every token's states.

Per student: ``convert`` (calibrated on MQAR text; rows of 256 tokens hold four sequences back to
back), ``distill`` align → hidden → kd with ``--tokens`` split 1:1:2 and learning rates 3e-3 / 1e-3 / 5e-4
(``mixerswap.demo.distill_stages``, as ``benchmarks/quality.py``), then MQAR accuracy (teacher-forced argmax at
every queried key, ``mqar_accuracy``) on ``--samples`` held-out sequences at init and after
distillation. Settings per kind are the converters' defaults except the windows: ``swa`` (no sinks)
and ``linear`` (LoLCATs' softmax window) see ``--window`` tokens, fewer than the distance from the
last key-value pair to the first query (33 at the defaults), so neither can answer through softmax:
at 0% attention ``swa`` is the control that has no path to the pairs (two layers reach back 30 tokens).
Writes one JSON row per student (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from mixerswap.convert import convert
from mixerswap.convert.layer_scores import score_layers
from mixerswap.demo import distill_stages
from mixerswap.distill.recipe import DistillRecipe
from mixerswap.distill.trainer import run_distill
from mixerswap.evals.probes import MQARSpec, mqar_accuracy, mqar_batch

RESULTS = Path(__file__).parent / "results"
KINDS = ("mamba2", "swa", "linear", "gla", "gdn")
# Disjoint seed ranges of mqar_batch: evaluation, teacher training, the teacher's phase checks,
# distillation data, calibration.
EVAL_SEED, TEACHER_SEEDS, CHECK_SEED, DISTILL_SEEDS, CALIBRATION_SEED = 0, 1_000_000, 1_500_000, 2_000_000, 3_000_000
# Zoology's plain chat: every message is its content and one space, so the rendering is the sequence itself.
TEACHER_LOG = "mqar_teacher.json"  # the teacher's curriculum, beside its weights
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """``t<id>`` ↔ ``<id>`` for ids 2 .. ``vocab_size - 1`` (0 and 1: ``<unk>``, ``<pad>``; special tokens
    are matched in raw text before splitting, so they must not prefix a word): MQAR ids as text, read back exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<pad>": 1} | {f"t{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def words(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def mqar_chats(spec: MQARSpec, length: int, count: int, seed: int) -> list[list[dict]]:
    """``count`` MQAR sequences as chats whose assistant turns are exactly the answers."""
    ids, positions, _ = mqar_batch(spec, length, count, seed=seed)
    chats = []
    for row in ids.tolist():
        messages, start = [], 0
        for query in positions.tolist():
            messages.append({"role": "user", "content": words(row[start : query + 1])})
            messages.append({"role": "assistant", "content": words(row[query + 1 : query + 2])})
            start = query + 2
        chats.append(messages)
    return chats


def teacher_config(args, vocab_size: int):
    """A pico Llama: 4 heads of ``hidden / 4``, tied embeddings."""
    return AutoConfig.for_model("llama", vocab_size=vocab_size, hidden_size=args.hidden,
                                intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=1)


def curriculum(length: int, pairs: int) -> list[tuple[int, int]]:
    """``(length, pairs)`` per phase: 4 pairs without filler, 4 pairs at ``length``, then ``pairs``."""
    phases = [(16, 4), (length, 4), (length, pairs)]
    return [p for i, p in enumerate(phases) if p not in phases[:i]]


def train_teacher(args, vocab_size: int) -> tuple[torch.nn.Module, dict]:
    """A pico Llama trained on MQAR (answers-only cross-entropy) through :func:`curriculum`."""
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(teacher_config(args, vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, betas=(0.9, 0.98), weight_decay=0.0)
    log, step, started = [], 0, time.perf_counter()
    for length, pairs in curriculum(args.length, args.pairs):
        spec = MQARSpec(vocab_size=vocab_size, num_pairs=pairs)
        accuracy = 0.0
        for phase_step in range(1, args.phase_steps + 1):
            for group in optimizer.param_groups:  # linear warm-up over the first 100 steps, then constant
                group["lr"] = args.teacher_lr * min(1.0, (step + 1) / 100)
            ids, positions, answers = mqar_batch(spec, length, args.teacher_batch, seed=TEACHER_SEEDS + step)
            logits = model(ids, use_cache=False).logits[:, positions]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), answers.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if phase_step % 100 == 0:
                model.eval()  # sequences of this phase's layout that neither training nor evaluation uses
                accuracy = mqar_accuracy(model, [length], spec=spec, samples=256, seed=CHECK_SEED)[0].accuracy
                model.train()
                if accuracy >= args.teacher_target:
                    break
        log.append({"length": length, "pairs": pairs, "steps": phase_step, "accuracy": accuracy})
        print(f"teacher phase length {length}, {pairs} pairs: MQAR {accuracy:.3f} after {phase_step} steps "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return model.eval(), {"curriculum": log, "steps": step, "seconds": round(time.perf_counter() - started, 1)}


def kind_settings(kind: str, window: int) -> dict | None:
    """The converters' defaults but the windows; ``swa`` without attention sinks (its default keeps 4),
    which would show it the first two key-value pairs."""
    return {"swa": {"window": window, "sinks": 0}, "linear": {"window": window}}.get(kind)


def measure(model, spec: MQARSpec, args) -> float:
    result = mqar_accuracy(model, [args.length], spec=spec, samples=args.samples, seed=EVAL_SEED)[0]
    return round(result.accuracy, 4)


def run_student(kind: str, keep: float, select: str | None, args, work: Path, teacher_dir: Path, data: Path,
                calibration: Path, spec: MQARSpec, teacher_mqar: float) -> dict:
    started = time.perf_counter()
    name = f"{kind}-{int(keep * 100)}" + (f"-{select}" if select else "")
    student = work / name / "student"
    settings = kind_settings(kind, args.window)
    layers, scored = None, {}
    if select is not None:  # `mixerswap select` on rows of one MQAR sequence each (the teacher's length), then
        # `convert --plan`: convert --select would score rows of 256 tokens, positions the teacher never saw
        options = {"align_steps": 0} if select == "kl-init" else {}
        selection = score_layers(teacher_dir, to=kind, text=calibration, keep_attention=keep, mixer_settings=settings,
                                 seq_len=args.length, progress=False, **options)
        layers, scored = selection.keep, {"select_align_steps": selection.align_steps, "keep_kl": selection.keep_kl,
                                          "uniform_kl": selection.uniform_kl}
    conversion = convert(teacher_dir, student, to=kind, mixer_settings=settings, calibration=calibration,
                         **({"attention_layers": layers} if layers is not None else {"keep_attention": keep}),
                         overwrite=True, progress=False)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    mqar_init = measure(model, spec, args)
    stages = distill_stages(args.tokens)
    recipe = DistillRecipe.validated({
        "student": str(student), "teacher": str(teacher_dir), "data": str(data), "out": str(work / name / "distilled"),
        "seq_len": args.length, "batch_size": args.batch_size, "held_out_docs": args.held_out, "seed": args.seed,
        "stages": stages})
    result = run_distill(recipe, overwrite=True, progress=False)
    model = AutoModelForCausalLM.from_pretrained(work / name / "distilled", dtype=torch.float32).eval()
    kinds = [entry["kind"] for entry in conversion.plan]
    row = {
        "name": name, "kind": kind, "select": select, **scored, "plan": kinds,
        "attention_kept": round(kinds.count("attention") / len(kinds), 3),
        "mqar_init": mqar_init, "mqar_final": measure(model, spec, args), "teacher_mqar": teacher_mqar,
        "answer_ppl_teacher": result.perplexity_teacher, "answer_ppl_init": result.perplexity_before,
        "answer_ppl_final": result.perplexity_after,
        "stage_ppl": {r["stage"]: r["perplexity"] for r in result.stage_perplexity},
        "tokens": sum(stage["tokens"] for stage in stages), "seconds": round(time.perf_counter() - started, 1),
        "settings": {"mixer": settings or {}, "stages": stages, "seq_len": args.length,
                     "batch_size": args.batch_size},
    }
    shutil.rmtree(work / name, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("student", "attn", "MQAR init", "MQAR final", "teacher", "answer ppl init", "final", "tokens", "s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["name"], f"{r['attention_kept']:.2f}", f"{r['mqar_init']:.3f}", f"{r['mqar_final']:.3f}",
            f"{r['teacher_mqar']:.3f}", f"{r['answer_ppl_init']:.2f}", f"{r['answer_ppl_final']:.2f}",
            f"{r['tokens']}", f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--keep", default="0,0.5", help="comma-separated fractions of layers that keep attention")
    parser.add_argument("--select", default="uniform",
                        help="comma-separated: uniform (evenly spaced attention layers), kl (layers chosen as "
                             "`mixerswap select` does, on the calibration sequences), kl-init (the same with "
                             "--align-steps 0: scored on the conversion before any alignment); kl only where some "
                             "attention is kept")
    parser.add_argument("--length", type=int, default=64, help="MQAR sequence length")
    parser.add_argument("--pairs", type=int, default=8, help="key-value pairs per sequence")
    parser.add_argument("--vocab", type=int, default=64, help="vocabulary: (vocab - 5) // 2 keys and as many values")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--teacher-batch", type=int, default=64)
    parser.add_argument("--teacher-target", type=float, default=0.99, help="MQAR accuracy that ends a phase")
    parser.add_argument("--phase-steps", type=int, default=3000, help="most optimizer steps of a curriculum phase")
    parser.add_argument("--window", type=int, default=16, help="swa / linear softmax window")
    parser.add_argument("--tokens", type=int, default=786_432,
                        help="distillation tokens per student, align/hidden/kd 1:1:2 (default: 768 batches of 16 x 64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=32, help="sequences the trainer holds out (perplexity)")
    parser.add_argument("--samples", type=int, default=256, help="MQAR evaluation sequences")
    parser.add_argument("--teacher", type=Path, help="a teacher of an earlier run (--workdir DIR keeps DIR/teacher)")
    parser.add_argument("--seed", type=int, default=0, help="teacher init, distillation data, trainer")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="default: results/mqar.json (quick: no file)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.pairs, args.phase_steps, args.tokens, args.samples = 32, 4, 100, 4096, 32
        args.teacher_target = 0.0
    elif args.out is None:
        args.out = RESULTS / "mqar.json"
    args.kinds, args.keep = args.kinds.split(","), [float(k) for k in args.keep.split(",")]
    args.select = [None if s == "uniform" else s for s in args.select.split(",")]
    if set(args.select) - {None, "kl", "kl-init"}:
        parser.error(f"--select takes uniform, kl and kl-init, not {args.select}")
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mixerswap-mqar-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(args.vocab)
    spec = MQARSpec(vocab_size=args.vocab, num_pairs=args.pairs)
    if args.teacher:  # a teacher an earlier run trained (``--workdir DIR`` keeps it in DIR/teacher)
        teacher_dir = args.teacher
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        teacher_log = json.loads((teacher_dir / TEACHER_LOG).read_text())
    else:
        teacher, teacher_log = train_teacher(args, args.vocab)
        teacher_dir = work / "teacher"
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
        (teacher_dir / TEACHER_LOG).write_text(json.dumps(teacher_log, indent=2) + "\n")
    teacher_mqar = measure(teacher, spec, args)
    print(f"teacher MQAR {teacher_mqar:.3f} at length {args.length}, {args.pairs} pairs "
          f"({teacher_log['steps']} steps, {teacher_log['seconds']:.0f} s)", flush=True)
    if not args.quick and teacher_mqar < 0.9:
        raise SystemExit(f"the teacher reached MQAR {teacher_mqar:.3f} < 0.9: no recall circuit to distill")

    # distillation sequences: the held-out ones first (the trainer holds out the first --held-out),
    # enough that the longest stage (kd, half the budget) sees each sequence about once
    count = args.held_out + args.tokens // 2 // args.length + 1
    data = work / "mqar.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n"
                            for chat in mqar_chats(spec, args.length, count, DISTILL_SEEDS + args.seed)))
    calibration = work / "calibration.txt"
    calibration.write_text(words(mqar_batch(spec, args.length, 64, seed=CALIBRATION_SEED)[0].flatten().tolist()))

    report = {
        "what": "MQAR accuracy (teacher-forced argmax at each queried key) of students converted from a pico Llama "
                "trained on MQAR, at init and after align/hidden/kd distillation on MQAR sequences",
        "teacher": {"config": {k: getattr(teacher.config, k) for k in (
                        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
                    "mqar": teacher_mqar, **teacher_log},
        "mqar": {"length": args.length, "pairs": args.pairs, "vocab": args.vocab, "symbols": spec.num_symbols,
                 "eval_samples": args.samples, "eval_seed": EVAL_SEED},
        "rows": [], "complete": False, "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    for keep in args.keep:
        for kind, select in [(k, s) for k in args.kinds for s in args.select if s is None or 0 < keep < 1]:
            # the file is rewritten after every row: an interrupted run keeps what it measured
            print(f"== {kind} (attention kept {keep:.0%}{', selected by ' + select if select else ''})", flush=True)
            report["rows"].append(run_student(kind, keep, select, args, work, teacher_dir, data, calibration, spec,
                                              teacher_mqar))
            print(json.dumps(report["rows"][-1]), flush=True)
            report["seconds"] = round(time.perf_counter() - started, 1)
            if args.out:
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    report["complete"] = True
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["rows"]))
    print(f"{'wrote ' + str(args.out) if args.out else 'quick run, nothing written'} ({report['seconds']:.0f} s)")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
