"""``mixerswap demo``: the whole job on a real trained teacher, in a minute or two on a laptop CPU.

1. The teacher is stories260k, a trained 260K-parameter Llama shipped with the package (MIT, from
   llama2.c); it writes its own corpus (no download).
2. Convert it with calibration: 3 of its 5 layers become Mamba-2 mixers.
3. Distill (align → hidden → kd) and report held-out perplexity after every stage beside the
   teacher's, agreement with the teacher, greedy generations and a speed / cache table.

``build_tokenizer`` and ``demo_text`` (a few bundled stories) serve tests that need a tokenizer or
text without a download.
"""

from __future__ import annotations

import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from .convert import convert
from .distill.recipe import DEFAULT_LR


def distill_stages(total_tokens: int, split: tuple[float, float, float] = (1, 1, 2)) -> list[dict]:
    """The demo's stages: ``total_tokens`` shared by align, hidden and kd in the proportions ``split`` (by default
    a quarter, a quarter and half), each at the package's default learning rate (``DEFAULT_LR``). A stage with
    share 0 is left out; kd takes what rounding leaves so the stages add up to ``total_tokens``."""
    if len(split) != 3 or min(split) < 0 or split[2] <= 0:
        raise ValueError(f"split takes three non-negative shares (align, hidden, kd) with kd above 0, got {split}")
    tokens = [int(total_tokens * share / sum(split)) for share in split[:2]]
    tokens.append(max(total_tokens - sum(tokens), 1))
    return [{"name": name, "tokens": n, "lr": DEFAULT_LR[name]}
            for name, n, share in zip(("align", "hidden", "kd"), tokens, split) if share > 0]


def demo_text() -> str:
    return resources.files("mixerswap").joinpath("data/demo_stories.txt").read_text()


def build_tokenizer(text: str, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on ``text`` (``tokenizers``, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@torch.inference_mode()
def top1_agreement(model, reference, ids: torch.Tensor, seq: int = 128) -> float:
    """Fraction of positions where ``model`` and ``reference`` predict the same next token."""
    same = total = 0
    for start in range(0, len(ids), seq):
        window = ids[start : start + seq][None]
        same += (model(window).logits.argmax(-1) == reference(window).logits.argmax(-1)).sum().item()
        total += window.numel()
    return same / total


def packaged_teacher() -> Path:
    """The stories260k Llama shipped with the package (see ``data/stories260k/NOTICE.md``)."""
    return Path(str(resources.files("mixerswap").joinpath("data/stories260k")))


@torch.inference_mode()
def sample_stories(teacher, tokenizer, count: int, *, max_new_tokens: int = 200, batch: int = 40,
                   seed: int = 0) -> list[str]:
    """``count`` stories the teacher writes from BOS at temperature 1 (seeded): its own training text."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    stories: list[str] = []
    try:
        while len(stories) < count:
            start = torch.full((min(batch, count - len(stories)), 1), tokenizer.bos_token_id)
            out = teacher.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0,
                                   top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
            stories += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True) if t.strip()]
    finally:
        torch.random.set_rng_state(generator_state)
    return stories[:count]


def run_demo(out: str | Path | None = None, *, stories: int = 160, held_out: int = 16, keep_attention: float = 0.4,
             distill_tokens: int = 60_000, progress: bool = True, echo=print) -> dict:
    """Run the demo; returns the measured figures (also printed through ``echo``).

    The real, trained stories260k Llama writes its own corpus (``stories``, the first ``held_out`` kept
    for scoring, the next 40 for calibration), is converted with calibration (Mamba-2 in all but
    ``keep_attention`` of its layers) and distilled; held-out perplexity has one definition throughout:
    the distillation trainer's (next-token, on the held-out stories, teacher and student side by side).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .distill.recipe import DistillRecipe
    from .distill.trainer import run_distill
    from .evals.summary import demo_eval_report
    from .generation import generate_text

    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="mixerswap-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir, student_dir, distilled_dir = packaged_teacher(), work / "student", work / "student-distilled"
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    texts = sample_stories(teacher, tokenizer, stories)
    corpus, calibration = work / "stories.txt", work / "calibration.txt"
    corpus.write_text("\n\n".join(texts))
    calibration.write_text("\n\n".join(texts[held_out : held_out + 40]))
    echo(f"[1/4] teacher: stories260k, a real trained Llama (5 layers, hidden 64, MIT, shipped with mixerswap); "
         f"it wrote {len(texts)} stories ({held_out} held out) to {corpus}")

    result = convert(teacher_dir, student_dir, keep_attention=keep_attention, calibration=calibration,
                     overwrite=True, progress=False,
                     command=f"mixerswap convert {teacher_dir} --to mamba2 --keep-attention {keep_attention} "
                             f"--calibration {calibration} --out {student_dir}")
    kept = ",".join(map(str, result.attention_layers)) or "none"
    echo(f"[2/4] converted to {student_dir}: Mamba-2 in {len(result.plan) - len(result.attention_layers)} of "
         f"{len(result.plan)} layers (attention kept in {kept}), calibrated on 40 other stories")

    recipe = DistillRecipe.validated({
        "student": str(student_dir), "teacher": str(teacher_dir), "data": str(corpus), "out": str(distilled_dir),
        "seq_len": 256, "batch_size": 16, "held_out_docs": held_out, "checkpoint_every": 10_000,
        "stages": distill_stages(distill_tokens)})
    distilled = run_distill(recipe, overwrite=True, progress=progress)
    stages = ", ".join(f"{s.name} {s.tokens} tokens" for s in recipe.stages)
    echo(f"[3/4] distilled ({stages}) into {distilled_dir}")

    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    after = AutoModelForCausalLM.from_pretrained(distilled_dir).eval()
    held_ids = torch.tensor(tokenizer("\n\n".join(texts[:held_out]))["input_ids"])
    prompt = "Once upon a time"
    report = {
        "teacher_ppl": distilled.perplexity_teacher,
        "student_ppl": distilled.perplexity_before,
        "stage_ppl": distilled.stage_perplexity,
        "distilled_ppl": distilled.perplexity_after,
        "student_agreement": top1_agreement(student, teacher, held_ids),
        "distilled_agreement": top1_agreement(after, teacher, held_ids),
        "teacher_text": generate_text(teacher, tokenizer, prompt, max_new_tokens=40),
        "student_text": generate_text(student, tokenizer, prompt, max_new_tokens=40),
        "distilled_text": generate_text(after, tokenizer, prompt, max_new_tokens=40),
    }
    echo(f"[4/4] held-out perplexity (next token, the {held_out} held-out stories in rows of {recipe.seq_len} "
         "tokens; the same figures distill reports):")
    stages_ppl = " | ".join(f"after {s['stage']} {s['perplexity']:.2f}" for s in report["stage_ppl"])
    echo(f"  teacher {report['teacher_ppl']:.2f} | converted {report['student_ppl']:.2f} | {stages_ppl}")
    echo(f"  next-token agreement with the teacher: converted {report['student_agreement']:.1%} "
         f"| distilled {report['distilled_agreement']:.1%}")
    echo(f"  greedy, 40 new tokens — teacher:   {report['teacher_text']!r}")
    echo(f"                          converted: {report['student_text']!r}")
    echo(f"                          distilled: {report['distilled_text']!r}")
    report["table"] = demo_eval_report(teacher, after, tokenizer, None)
    echo("teacher vs distilled student at batch 1 (MQAR: a TinyStories model never saw key-value lists, so this "
         "teacher cannot show recall; run `mixerswap eval --mqar` on a teacher that can):")
    echo(report["table"])
    echo(f"done in {time.perf_counter() - started:.0f}s; folders in {work}")
    report["work_dir"] = work
    return report
