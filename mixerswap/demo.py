"""``mixerswap demo``: the whole job on a teacher built here, in about a minute on a laptop CPU.

1. Train a byte-level BPE tokenizer and a small Llama on the short stories shipped in
   ``mixerswap/data/demo_stories.txt`` (no download).
2. Convert it: half of the layers become Mamba-2 mixers initialized from the attention weights.
3. Generate from teacher and student, and report held-out perplexity and cache memory.

The student is not distilled here, so its text is worse than the teacher's; that gap is what
``mixerswap distill`` closes.
"""

from __future__ import annotations

import math
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from .convert import convert


HELD_OUT = 2


def distill_stages(total_tokens: int) -> list[dict]:
    """The demo's stages: a quarter of the budget to align, a quarter to hidden, half to kd."""
    quarter = max(total_tokens // 4, 1)
    return [{"name": "align", "tokens": quarter, "lr": 3e-3}, {"name": "hidden", "tokens": quarter, "lr": 1e-3},
            {"name": "kd", "tokens": 2 * quarter, "lr": 5e-4}]


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


def build_teacher(out_dir: Path, *, steps: int = 300, seed: int = 0, progress: bool = True) -> dict:
    """Train a small Llama teacher on the demo stories and save it (weights + tokenizer) to ``out_dir``."""
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    text = demo_text()
    tokenizer = build_tokenizer(text)
    stories = [line for line in text.splitlines() if line.strip()]
    # The first HELD_OUT stories are never trained on (distillation holds out the same ones).
    held_out = torch.tensor(tokenizer("\n".join(stories[:HELD_OUT]))["input_ids"])
    train = torch.tensor(tokenizer("\n".join(stories[HELD_OUT:]))["input_ids"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    seq, batch = 64, 16
    losses = []
    for _ in tqdm(range(steps), desc="train teacher", disable=not progress):
        starts = torch.randint(0, len(train) - seq - 1, (batch,))
        window = torch.stack([train[s : s + seq + 1] for s in starts])
        loss = model(window, labels=window).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"first_loss": losses[0] if losses else float("nan"), "last_loss": losses[-1] if losses else float("nan"),
            "held_out": held_out}


def perplexity(model, ids: torch.Tensor, context: int = 128) -> float:
    """Sliding-window perplexity of ``ids`` (see :mod:`mixerswap.evals.perplexity`)."""
    from .evals.perplexity import sequence_nll

    nll, tokens, _ = sequence_nll(model, ids, context=min(context, len(ids)), stride=max(1, context // 2))
    return math.exp(nll / tokens)


@torch.inference_mode()
def top1_agreement(model, reference, ids: torch.Tensor, seq: int = 128) -> float:
    """Fraction of positions where ``model`` and ``reference`` predict the same next token."""
    same = total = 0
    for start in range(0, len(ids), seq):
        window = ids[start : start + seq][None]
        same += (model(window).logits.argmax(-1) == reference(window).logits.argmax(-1)).sum().item()
        total += window.numel()
    return same / total


def run_demo(out: str | Path | None = None, *, steps: int = 300, distill_tokens: int = 160_000,
             progress: bool = True, echo=print) -> dict:
    """Run the demo; returns the measured figures (also printed through ``echo``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .distill.recipe import DistillRecipe
    from .distill.trainer import run_distill
    from .evals.summary import demo_eval_report
    from .generation import generate_text

    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="mixerswap-demo-"))
    teacher_dir, student_dir, distilled_dir = work / "teacher", work / "student", work / "student-distilled"
    started = time.perf_counter()
    facts = build_teacher(teacher_dir, steps=steps, progress=progress)
    echo(f"[1/4] trained a {steps}-step Llama teacher (4 layers, hidden 64) on the bundled stories: "
         f"loss {facts['first_loss']:.2f} -> {facts['last_loss']:.2f}; saved to {teacher_dir}")

    result = convert(teacher_dir, student_dir, keep_attention=0.5, overwrite=True, progress=False,
                     command=f"mixerswap convert {teacher_dir} --to mamba2 --keep-attention 0.5 --out {student_dir}")
    kept = ",".join(map(str, result.attention_layers))
    echo(f"[2/4] converted to {student_dir}: Mamba-2 in {len(result.plan) - len(result.attention_layers)} of "
         f"{len(result.plan)} layers, attention kept in layer(s) {kept}")

    corpus = work / "stories.txt"
    corpus.write_text("\n\n".join(line for line in demo_text().splitlines() if line.strip()))
    recipe = DistillRecipe.validated({
        "student": str(student_dir), "teacher": str(teacher_dir), "data": str(corpus), "out": str(distilled_dir),
        "seq_len": 64, "batch_size": 8, "held_out_docs": HELD_OUT, "checkpoint_every": 10_000,
        "stages": distill_stages(distill_tokens)})
    distilled = run_distill(recipe, overwrite=True, progress=progress)
    stages = ", ".join(f"{s.name} {s.tokens} tokens" for s in recipe.stages)
    echo(f"[3/4] distilled ({stages}) into {distilled_dir}")

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    after = AutoModelForCausalLM.from_pretrained(distilled_dir).eval()
    prompt = "Once upon a time"
    held_out = facts["held_out"]
    report = {
        "teacher_ppl": perplexity(teacher, held_out),
        "student_ppl": perplexity(student, held_out),
        "distilled_ppl": perplexity(after, held_out),
        "student_agreement": top1_agreement(student, teacher, held_out),
        "distilled_agreement": top1_agreement(after, teacher, held_out),
        "teacher_text": generate_text(teacher, tokenizer, prompt, max_new_tokens=40),
        "student_text": generate_text(student, tokenizer, prompt, max_new_tokens=40),
        "distilled_text": generate_text(after, tokenizer, prompt, max_new_tokens=40),
    }
    echo("[4/4] on the held-out stories, and greedy generation (40 new tokens):")
    echo(f"  perplexity: teacher {report['teacher_ppl']:.2f} | student converted {report['student_ppl']:.2f} "
         f"| student distilled {report['distilled_ppl']:.2f}")
    echo(f"  next-token agreement with the teacher: converted {report['student_agreement']:.1%} "
         f"| distilled {report['distilled_agreement']:.1%}")
    echo(f"  teacher:   {report['teacher_text']!r}")
    echo(f"  converted: {report['student_text']!r}")
    echo(f"  distilled: {report['distilled_text']!r}")
    report["table"] = demo_eval_report(teacher, after, tokenizer, held_out)
    echo("teacher vs distilled student (held-out perplexity, MQAR recall, speed and cache at batch 1):")
    echo(report["table"])
    echo(f"done in {time.perf_counter() - started:.0f}s; folders in {work}")
    report["work_dir"] = work
    return report
