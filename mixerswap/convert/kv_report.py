"""What a conversion to MLA costs and saves: KV-cache bytes per token and the one-shot perplexity change.

``convert`` writes both into ``mixerswap.yaml`` (``kv_cache``, ``held_out``) and the model card when
the plan has MLA layers:

* bytes per token of every layer that caches per token: the teacher's ``2 G d`` keys and values
  against the student's ``kv_rank + rope_heads * rope_dim`` (MLA) or the same ``2 G d`` (kept
  attention), at the element size the student is stored in (mixers with a fixed-size state, e.g.
  Mamba-2, cache nothing per token and are left out);
* perplexity of teacher and converted student, before any training, on a few hundred tokens the
  calibration did not see (:func:`~mixerswap.convert.calibration.load_calibration_rows` with
  ``held_out``: the calibration file's next tokens, or teacher samples of another seed).
"""

from __future__ import annotations

import gc
import logging
import math
from pathlib import Path

import torch

from ..architectures.plan import ATTENTION
from .adapters import AttentionShape
from .calibration import TEACHER_SAMPLES, load_calibration_rows, load_teacher_fp32

logger = logging.getLogger(__name__)

MLA = "mla"
HELD_OUT_TOKENS = 512
HELD_OUT_ROW = 128


def kv_cache_report(plan: list[dict], teacher_config, dtype: torch.dtype) -> dict:
    """Bytes per token and layer, teacher and student, and their totals (see the module docstring)."""
    shape = AttentionShape.from_config(teacher_config)
    size = torch.empty((), dtype=dtype).element_size()
    teacher_layer = 2 * shape.num_kv_heads * shape.head_dim * size
    layers = {}
    for idx, entry in enumerate(plan):
        if entry["kind"] == ATTENTION:
            layers[idx] = {"kind": ATTENTION, "teacher": teacher_layer, "student": teacher_layer}
        elif entry["kind"] == MLA:
            student = (entry["kv_rank"] + entry["rope_heads"] * entry["rope_dim"]) * size
            layers[idx] = {"kind": MLA, "kv_rank": entry["kv_rank"], "teacher": teacher_layer, "student": student}
    teacher = sum(r["teacher"] for r in layers.values())
    student = sum(r["student"] for r in layers.values())
    return {"dtype": str(dtype).removeprefix("torch."), "bytes_per_token": {"teacher": teacher, "student": student},
            "ratio": round(student / teacher, 4) if teacher else None, "layers": layers}


def held_out_perplexity(model_dir: str | Path, student_dir: str | Path, calibration: str | Path, *,
                        calibration_tokens: int, seed: int = 0, tokens: int = HELD_OUT_TOKENS) -> dict | None:
    """Teacher and student perplexity (fp32) on ``tokens`` held-out tokens; ``None`` if the text has none."""
    from ..architectures import MixerSwapForCausalLM
    from ..evals.perplexity import sequence_nll

    teacher = load_teacher_fp32(model_dir)
    sampled = str(calibration) == TEACHER_SAMPLES
    # a text file's held-out tokens come after the calibration's, so ask for as many as it used (in rows
    # no longer than its 256, so at least as many are skipped)
    rows = load_calibration_rows(teacher, model_dir, calibration, tokens=tokens if sampled else calibration_tokens,
                                 seq_len=HELD_OUT_ROW, held_out=True, seed=seed)
    if rows is None:
        return None
    rows = rows[: max(1, tokens // rows.shape[1])]

    def perplexity(model) -> float:
        nll = sum(sequence_nll(model, row, context=len(row), stride=len(row) - 1)[0] for row in rows)
        return round(math.exp(nll / (rows.shape[0] * (rows.shape[1] - 1))), 4)

    result = {"tokens": int(rows.numel()), "teacher": perplexity(teacher)}
    del teacher
    gc.collect()
    student = MixerSwapForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    result["student"] = perplexity(student)
    result["ratio"] = round(result["student"] / result["teacher"], 4)
    return result


def log_report(kv_cache: dict, held_out: dict | None) -> None:
    b = kv_cache["bytes_per_token"]
    logger.info("KV cache per token: %d bytes (teacher) -> %d bytes (student, %.1f%%); per layer: %s",
                b["teacher"], b["student"], 100 * kv_cache["ratio"],
                ", ".join(f"{i}: {r['student']}" for i, r in kv_cache["layers"].items()))
    if held_out:
        logger.info("held-out perplexity (%d tokens, before training): teacher %.4g -> student %.4g",
                    held_out["tokens"], held_out["teacher"], held_out["student"])


def report_lines(kv_cache: dict | None, held_out: dict | None) -> list[str]:
    """Markdown lines for the model card."""
    if not kv_cache:
        return []
    b = kv_cache["bytes_per_token"]
    lines = [f"KV cache per token ({kv_cache['dtype']}): {b['teacher']} bytes in the teacher, {b['student']} in this "
             f"student ({100 * kv_cache['ratio']:.1f}%).", "",
             "| layer | kind | kv_rank | teacher bytes/token | student bytes/token |", "|---|---|---|---|---|"]
    for idx, r in kv_cache["layers"].items():
        lines.append(f"| {idx} | {r['kind']} | {r.get('kv_rank', '-')} | {r['teacher']} | {r['student']} |")
    lines.append("")
    if held_out:
        lines += [f"Held-out perplexity before any training ({held_out['tokens']} tokens the calibration did not "
                  f"see): teacher {held_out['teacher']}, this student {held_out['student']} "
                  f"(x{held_out['ratio']}).", ""]
    return lines
