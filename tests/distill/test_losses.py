"""Distillation losses against naive per-token references (values and gradients, fp64): masking,
padding invariance, per-token normalization, and the chunked path equal to the unchunked one."""

import math

import pytest
import torch

from mixerswap.distill.losses import ce_loss, chunked_kd_loss, kd_loss, mse_loss

KINDS = ["forward", "reverse", "mix"]
TEMPERATURES = [1.0, 0.5, 2.0, 4.0]


def naive_kd(student, teacher, mask, kind, mix=0.5, temperature=1.0):
    """Token by token, the textbook formula: τ² · KL of the softened distributions, mean over valid tokens."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            p = torch.softmax(teacher[b, t] / temperature, -1)
            q = torch.softmax(student[b, t] / temperature, -1)
            forward = (p * (p.log() - q.log())).sum()
            reverse = (q * (q.log() - p.log())).sum()
            term = {"forward": forward, "reverse": reverse, "mix": mix * forward + (1 - mix) * reverse}[kind]
            total = total + temperature**2 * term
            count += 1
    return total / count


def logits(b=3, t=7, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return student.requires_grad_(), teacher, mask


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind", KINDS)
def test_kd_matches_the_naive_formula_values_and_gradients(kind, temperature):
    student, teacher, mask = logits()
    loss = kd_loss(student, teacher, mask, kind=kind, mix=0.3, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, student)
    reference = naive_kd(student, teacher, mask, kind, mix=0.3, temperature=temperature)
    (ref_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_mix_is_the_weighted_sum_and_kl_properties():
    student, teacher, mask = logits()
    forward = kd_loss(student, teacher, mask, kind="forward", temperature=2.0)
    reverse = kd_loss(student, teacher, mask, kind="reverse", temperature=2.0)
    for mix in (0.0, 0.25, 1.0):
        torch.testing.assert_close(kd_loss(student, teacher, mask, kind="mix", mix=mix, temperature=2.0),
                                   mix * forward + (1 - mix) * reverse)
    assert forward > 0 and reverse > 0 and not torch.isclose(forward, reverse)
    for kind in KINDS:
        assert kd_loss(teacher, teacher, mask, kind=kind).abs() < 1e-12
    shifted = teacher + 5.0  # softmax does not see a constant shift
    assert kd_loss(shifted, teacher, mask).abs() < 1e-12


def test_masked_positions_do_not_count():
    student, teacher, mask = logits()
    loss = kd_loss(student, teacher, mask, kind="mix")
    (grad,) = torch.autograd.grad(loss, student)
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().max() > 0
    noisy_student = student.detach().clone()
    noisy_teacher = teacher.clone()
    noisy_student[~mask] = torch.randn_like(noisy_student[~mask]) * 100
    noisy_teacher[~mask] = float("nan")  # even garbage at masked positions never enters the loss
    assert kd_loss(noisy_student, noisy_teacher, mask, kind="mix") == loss.detach()


def test_padding_length_does_not_change_loss_or_gradients():
    student, teacher, mask = logits(b=2, t=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    base = kd_loss(student, teacher, mask, kind="reverse", temperature=2.0)
    (base_grad,) = torch.autograd.grad(base, student)
    for pad in (1, 6):
        padded_student = torch.cat([student.detach(), torch.randn(2, pad, 11, dtype=torch.float64)], 1).requires_grad_()
        padded_teacher = torch.cat([teacher, torch.randn(2, pad, 11, dtype=torch.float64)], 1)
        padded_mask = torch.cat([mask, torch.zeros(2, pad, dtype=torch.bool)], 1)
        loss = kd_loss(padded_student, padded_teacher, padded_mask, kind="reverse", temperature=2.0)
        (grad,) = torch.autograd.grad(loss, padded_student)
        assert loss == base
        assert torch.equal(grad[:, :5], base_grad) and grad[:, 5:].abs().max() == 0


def test_normalized_per_valid_token_not_per_row():
    student, teacher, _ = logits(b=2, t=6)
    one = torch.zeros(2, 6, dtype=torch.bool)
    one[1, 3] = True
    alone = kd_loss(student[1:, 3:4], teacher[1:, 3:4], torch.ones(1, 1))
    torch.testing.assert_close(kd_loss(student, teacher, one), alone)  # one valid token: its own KL, not KL / B
    full = torch.ones(2, 6)
    doubled = kd_loss(torch.cat([student, student]), torch.cat([teacher, teacher]), torch.cat([full, full]))
    torch.testing.assert_close(doubled, kd_loss(student, teacher, full))  # more rows, same mean


def test_an_empty_mask_gives_zero_with_a_gradient():
    student, teacher, _ = logits()
    loss = kd_loss(student, teacher, torch.zeros(3, 7))
    loss.backward()
    assert loss == 0 and student.grad.abs().max() == 0


def test_teacher_minus_infinity_logits_are_zero_probability():
    student, teacher, mask = logits()
    teacher = teacher.clone()
    teacher[..., :3] = float("-inf")  # e.g. tokens the teacher never emits
    loss = kd_loss(student, teacher, mask, kind="forward", temperature=2.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    p = torch.softmax(teacher[mask][:, 3:] / 2.0, -1)  # the teacher's support only
    log_q = torch.log_softmax(student[mask] / 2.0, -1)[:, 3:]
    torch.testing.assert_close(loss, 4.0 * (p * (p.log() - log_q)).sum(-1).mean())


def test_half_precision_inputs_are_reduced_in_fp32():
    student, teacher, mask = logits()
    loss = kd_loss(student.detach().bfloat16(), teacher.bfloat16(), mask)
    assert loss.dtype == torch.float32
    reference = kd_loss(student.detach().bfloat16().double(), teacher.bfloat16().double(), mask)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, t, m: kd_loss(s, t, m, kind="jsd"), "unknown KD kind 'jsd'"),
        (lambda s, t, m: kd_loss(s, t, m, temperature=0), "temperature=0 must be positive"),
        (lambda s, t, m: kd_loss(s, t, m, kind="mix", mix=1.5), r"mix=1.5 must be in \[0, 1\]"),
        (lambda s, t, m: kd_loss(s, t[..., :5], m), "same vocabulary"),
        (lambda s, t, m: kd_loss(s, t, m[:, :3]), r"mask has shape \(3, 3\)"),
        (lambda s, t, m: chunked_kd_loss(s, lambda x: x, t, None, m, ce_weight=1.0), "needs labels"),
        (lambda s, t, m: chunked_kd_loss(s, lambda x: x, t, None, m, chunk_tokens=0), "chunk_tokens=0"),
        (lambda s, t, m: chunked_kd_loss(s, lambda x: x[:, :4], t, None, m), "same vocabulary"),
    ],
    ids=["kind", "temperature", "mix", "vocab", "mask", "ce-labels", "chunk", "chunked-vocab"],
)
def test_errors_name_the_problem(call, message):
    student, teacher, mask = logits()
    with pytest.raises(ValueError, match=message):
        call(student, teacher, mask)


class CountingHead(torch.nn.Module):
    """A linear head with Gemma-style final softcap that records how many rows each call gets."""

    def __init__(self, hidden, vocab, softcap=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
        self.softcap, self.rows = softcap, []

    def forward(self, hidden):
        self.rows.append(hidden.shape[0] if hidden.dim() == 2 else hidden.shape[0] * hidden.shape[1])
        out = hidden @ self.weight.T
        return torch.tanh(out / self.softcap) * self.softcap if self.softcap else out


def hidden_states(b=3, t=9, h=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, h, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(b, t, h + 2, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.25
    labels = torch.randint(0, 13, (b, t), generator=g)
    labels[0, :3] = -100
    return student, teacher, mask, labels


def unchunked(student, head, teacher_logits, mask, labels, ce_weight, **kd):
    logits = head(student)
    loss = kd_loss(logits, teacher_logits, mask, **kd)
    if ce_weight:
        loss = loss + ce_weight * ce_loss(logits, labels.masked_fill(~mask, -100))
    return loss


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 1000], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("kind, temperature, ce_weight", [("forward", 1.0, 0.0), ("reverse", 2.0, 0.0),
                                                          ("mix", 0.7, 0.5)], ids=["forward", "reverse", "mix+ce"])
@pytest.mark.parametrize("teacher_as", ["logits", "hidden"])
def test_chunked_equals_unchunked(chunk_tokens, kind, temperature, ce_weight, teacher_as):
    student, teacher_hidden, mask, labels = hidden_states()
    head = CountingHead(6, 13, softcap=3.0)
    teacher_head = CountingHead(8, 13, seed=2)
    teacher_logits = teacher_head(teacher_hidden).detach()
    kd = dict(kind=kind, mix=0.3, temperature=temperature)
    reference = unchunked(student, head, teacher_logits, mask, labels, ce_weight, **kd)
    ref_grads = torch.autograd.grad(reference, [student, head.weight])
    teacher, t_head = (teacher_logits, None) if teacher_as == "logits" else (teacher_hidden, teacher_head)
    loss = chunked_kd_loss(student, head, teacher, t_head, mask, ce_weight=ce_weight, labels=labels,
                           chunk_tokens=chunk_tokens, **kd)
    grads = torch.autograd.grad(loss, [student, head.weight])
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12)
    assert grads[0][~mask].abs().max() == 0


def test_chunked_never_sees_more_than_a_chunk_of_rows():
    student, teacher_hidden, mask, labels = hidden_states(b=4, t=50)
    head, teacher_head = CountingHead(6, 13), CountingHead(8, 13, seed=2)
    loss = chunked_kd_loss(student, head, teacher_hidden, teacher_head, mask, ce_weight=1.0, labels=labels,
                           chunk_tokens=16)
    forward_calls = len(head.rows)
    loss.backward()
    valid = int(mask.sum())
    assert forward_calls == math.ceil(valid / 16) and len(head.rows) == 2 * forward_calls  # recomputed in backward
    assert max(head.rows) <= 16 and max(teacher_head.rows) <= 16
    assert sum(head.rows[:forward_calls]) == valid and student.grad is not None and head.weight.grad is not None


def test_chunked_without_grad_and_with_an_empty_mask():
    student, teacher_hidden, mask, labels = hidden_states()
    head, teacher_head = CountingHead(6, 13), CountingHead(8, 13, seed=2)
    with torch.no_grad():
        loss = chunked_kd_loss(student, head, teacher_hidden, teacher_head, mask, chunk_tokens=5)
        reference = kd_loss(head(student), teacher_head(teacher_hidden), mask)
    torch.testing.assert_close(loss, reference)
    empty = chunked_kd_loss(student, head, teacher_hidden, teacher_head, torch.zeros_like(mask))
    empty.backward()
    assert empty == 0 and student.grad.abs().max() == 0


def test_chunked_matches_the_model_dtype_path_in_bf16():
    student, teacher_hidden, mask, _ = hidden_states()
    head, teacher_head = CountingHead(6, 13).bfloat16(), CountingHead(8, 13, seed=2).bfloat16()
    loss = chunked_kd_loss(student.detach().bfloat16(), head, teacher_hidden.bfloat16(), teacher_head, mask,
                           chunk_tokens=4)
    reference = kd_loss(head(student.detach().bfloat16()), teacher_head(teacher_hidden.bfloat16()), mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_ce_loss_is_mean_over_targets():
    student, _, _ = logits()
    targets = torch.randint(0, 11, (3, 7))
    targets[0, :4] = -100
    expected = torch.nn.functional.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(ce_loss(student, targets), expected)
    assert ce_loss(student, torch.full((3, 7), -100)) == 0


def test_mse_is_mean_over_the_elements_of_valid_tokens():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    loss = mse_loss(pred, target, mask)
    naive = sum(((pred[b, t] - target[b, t]) ** 2).sum() for b in range(2) for t in range(5) if mask[b, t]) / (7 * 4)
    torch.testing.assert_close(loss, naive)
    (grad,) = torch.autograd.grad(loss, pred)
    assert grad[mask == 0].abs().max() == 0
    torch.testing.assert_close(mse_loss(pred, target), ((pred - target) ** 2).mean())
    padded = mse_loss(torch.cat([pred, torch.ones(2, 3, 4, dtype=torch.float64)], 1),
                      torch.cat([target, torch.zeros(2, 3, 4, dtype=torch.float64)], 1),
                      torch.cat([mask, torch.zeros(2, 3)], 1))
    assert padded == loss
    assert mse_loss(pred, target, torch.zeros(2, 5)) == 0
    half = mse_loss(pred.detach().bfloat16(), target.bfloat16(), mask)
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="differ in shape"):
        mse_loss(pred, target[:, :4])
    with pytest.raises(ValueError, match="mask has shape"):
        mse_loss(pred, target, mask[:, :4])
