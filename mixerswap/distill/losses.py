"""Distillation losses: logit KD (forward, reverse or mixed KL), its chunked form for large
vocabularies, cross-entropy, and masked MSE for mixer-output and hidden-state alignment.

Every loss is masked and averaged per valid token: ``Σ over valid tokens / number of valid
tokens``. (Some prior implementations divide the masked sum by the batch size instead, so the loss
grows with sequence length and shrinks with padding; these do not.) Softmaxes and reductions run in
fp32; fp64 inputs stay fp64.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KDKind = Literal["forward", "reverse", "mix"]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_kd_args(kind: str, mix: float, temperature: float) -> None:
    if kind not in ("forward", "reverse", "mix"):
        raise ValueError(f"unknown KD kind {kind!r}; use 'forward', 'reverse' or 'mix'")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix={mix} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``Σ_v p_v (log p_v − log q_v)`` over the last dim, with 0 · log 0 = 0 (and no NaN gradient there)."""
    p = log_p.exp()
    return (p * (log_p - log_q).masked_fill(p == 0, 0.0)).sum(-1)


def _kd_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, mix: float,
                  temperature: float) -> torch.Tensor:
    """``[N, V], [N, V] -> [N]``: the KD term of each token, τ² included (see :func:`kd_loss`)."""
    log_q = F.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_upcast(teacher_logits) / temperature, dim=-1)
    if kind == "forward":
        loss = _kl(log_p, log_q)
    elif kind == "reverse":
        loss = _kl(log_q, log_p)
    else:
        loss = mix * _kl(log_p, log_q) + (1.0 - mix) * _kl(log_q, log_p)
    return loss * temperature**2


def _check_mask(mask: torch.Tensor, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.shape[:2] != mask.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the tensor has {tuple(t.shape)}; "
                             "the mask must be [B, T] of the same batch and length")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
            kind: KDKind = "forward", mix: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    r"""Knowledge-distillation loss between student and teacher logits, per valid token.

    With temperature τ, teacher distribution p = softmax(z_teacher / τ) and student distribution
    q = softmax(z_student / τ), the term of one token is::

        forward   KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)    mean-seeking: q covers all of p's modes
        reverse   KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)    mode-seeking: q concentrates on p's modes
        mix       λ · KL(p ‖ q) + (1 − λ) · KL(q ‖ p),   λ = ``mix``

    multiplied by τ² (Hinton et al. 2015: the gradients of a KL between τ-softened distributions
    shrink as 1/τ², so τ² keeps their size comparable across temperatures). With m the mask, the
    loss is the mean over valid tokens::

        loss = Σ_{b,t} m_{bt} · KL_{bt} / Σ_{b,t} m_{bt}

    i.e. divided by the number of valid tokens, not by the batch size (dividing a masked sum by B,
    as some prior implementations do, ties the loss scale to T and to padding). Masked positions are
    dropped before the softmax: their logits never matter and get exactly zero gradient. Terms with
    p_v = 0 (teacher logit −inf) count as 0. Softmaxes run in fp32 (fp64 stays fp64). An all-zero
    mask gives 0.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]`` (usually without gradient).
        mask: ``[B, T]``, nonzero where the token counts.
        kind: ``"forward"``, ``"reverse"`` or ``"mix"``.
        mix: λ, the weight of the forward KL when ``kind="mix"``.
        temperature: τ > 0.

    Returns:
        A scalar.
    """
    _check_kd_args(kind, mix, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; student and teacher need the same vocabulary")
    _check_mask(mask, student_logits)
    keep = mask.bool()
    if not keep.any():
        return student_logits.sum() * 0.0
    return _kd_per_token(student_logits[keep], teacher_logits[keep], kind, mix, temperature).mean()


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the tokens whose target is not -100 (0 if there is none).

    Args:
        logits: ``[B, T, V]``; position t scores the token at t+1.
        targets: ``[B, T]``, the token each position predicts (already shifted), -100 = no target.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not line up")
    total = F.cross_entropy(_upcast(logits).flatten(0, -2), targets.flatten(), ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp_min(1)


def _chunk_losses(hidden: torch.Tensor, teacher_flat: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor | None,
                  *, student_head: Callable, teacher_head: Callable | None, kind: str, mix: float,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD and CE of one chunk of valid tokens: ``hidden [n, H]``, ``rows [n]`` into ``teacher_flat``."""
    logits = student_head(hidden)
    with torch.no_grad():
        teacher_logits = teacher_flat.index_select(0, rows)
        if teacher_head is not None:
            teacher_logits = teacher_head(teacher_logits)
    if logits.shape != teacher_logits.shape:
        raise ValueError(f"student head gives {tuple(logits.shape)} logits, the teacher {tuple(teacher_logits.shape)}; "
                         "student and teacher need the same vocabulary")
    kd = _kd_per_token(logits, teacher_logits, kind, mix, temperature).sum()
    if targets is None:
        return kd, kd.new_zeros(())
    return kd, F.cross_entropy(_upcast(logits), targets, ignore_index=-100, reduction="sum")


def chunked_kd_loss(student_hidden: torch.Tensor, student_head: Callable[[torch.Tensor], torch.Tensor],
                    teacher: torch.Tensor, teacher_head: Callable[[torch.Tensor], torch.Tensor] | None,
                    mask: torch.Tensor, *, kind: KDKind = "forward", mix: float = 0.5, temperature: float = 1.0,
                    ce_weight: float = 0.0, labels: torch.Tensor | None = None,
                    chunk_tokens: int = 1024) -> torch.Tensor:
    """``kd_loss(student_head(student_hidden), teacher_logits, mask) + ce_weight · CE`` without ever
    holding more than ``chunk_tokens`` rows of vocabulary-sized logits (128K vocabularies).

    The valid tokens (mask nonzero) are gathered and cut into chunks of ``chunk_tokens``. Each
    chunk's loss runs under activation checkpointing: its student and teacher logits exist only
    while that chunk is computed, and are computed again, chunk by chunk, in backward. Peak memory
    for logits is a handful (about 6 to 8) of fp32 ``[chunk_tokens, V]`` temporaries, whatever the
    number of tokens, against about 10 ``[N, V]`` for :func:`kd_loss` (measured on CPU, V = 32000);
    the price is a second head matmul per chunk for student and teacher. The heads are called as
    given, so a final-logit softcap (Gemma) belongs inside them.

    The KD term is :func:`kd_loss`'s (same math, same per-token mean). The CE term is the student's
    cross-entropy at temperature 1 against ``labels``, averaged over the tokens that are valid in
    ``mask`` and whose label is not -100.

    Args:
        student_hidden: ``[B, T, H]`` the student's final hidden states (after its final norm).
        student_head: ``[n, H] -> [n, V]``, e.g. ``lm_head`` (plus softcap); called on at most
            ``chunk_tokens`` rows at a time.
        teacher: ``[B, T, V]`` teacher logits if ``teacher_head`` is None, else ``[B, T, H_t]``
            teacher hidden states.
        teacher_head: ``[n, H_t] -> [n, V]`` or None; run under ``no_grad`` on at most
            ``chunk_tokens`` rows at a time.
        mask: ``[B, T]``, nonzero where the token counts.
        kind, mix, temperature: as in :func:`kd_loss`.
        ce_weight: weight of the CE term (0 = KD only).
        labels: ``[B, T]`` next-token targets aligned with positions (``labels[b, t]`` is the token
            position t predicts; -100 = none); needed when ``ce_weight > 0``.
        chunk_tokens: valid tokens per chunk.

    Returns:
        A scalar.
    """
    _check_kd_args(kind, mix, temperature)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be positive")
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels (next-token targets, -100 = ignored)")
    _check_mask(mask, student_hidden, teacher, *([labels] if labels is not None else []))
    rows = mask.reshape(-1).nonzero().squeeze(1)  # [N] flat indices of the valid tokens
    if rows.numel() == 0:
        return student_hidden.sum() * 0.0
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)  # [N, H]
    teacher_flat = teacher.reshape(-1, teacher.shape[-1])
    targets = labels.reshape(-1).index_select(0, rows) if ce_weight else None
    step = partial(_chunk_losses, student_head=student_head, teacher_head=teacher_head, kind=kind, mix=mix,
                   temperature=temperature)
    if torch.is_grad_enabled():  # recompute each chunk's logits in backward instead of keeping them
        step = partial(checkpoint, step, use_reentrant=False, preserve_rng_state=False)
    kd_sum, ce_sum = 0.0, 0.0
    # split() has one backward node that concatenates the chunks' gradients, not one [N, H] per chunk.
    for start, chunk in zip(range(0, rows.numel(), chunk_tokens), hidden.split(chunk_tokens)):
        end = start + chunk.shape[0]
        kd, ce = step(chunk, teacher_flat, rows[start:end], None if targets is None else targets[start:end])
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    loss = kd_sum / rows.numel()
    if ce_weight:
        loss = loss + ce_weight * ce_sum / (targets != -100).sum().clamp_min(1)
    return loss


def mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the elements of the valid tokens (mixer-output and hidden-state alignment).

    With m the mask and D the elements per token::

        loss = Σ_{b,t} m_{bt} Σ_d (pred_{btd} − target_{btd})² / (D · Σ_{b,t} m_{bt})

    Masked tokens are dropped first (zero gradient). Computed in fp32 (fp64 stays fp64).

    Args:
        pred: ``[B, T, ...]``.
        target: same shape as ``pred``.
        mask: ``[B, T]``, nonzero where the token counts; None = every token counts.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if mask is not None:
        _check_mask(mask, pred)
        keep = mask.bool()
        if not keep.any():
            return pred.sum() * 0.0
        pred, target = pred[keep], target[keep]
    return F.mse_loss(_upcast(pred), _upcast(target).to(_upcast(pred).dtype))
