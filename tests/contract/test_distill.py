"""Every distillation stage trains every kind: a few AdamW steps on one fixed batch lower its loss."""

import pytest
import torch

from mixerswap.architectures.mixers import mixer_kind
from mixerswap.distill.recipe import StageConfig
from mixerswap.distill.stages import build_stage

from .conftest import FAMILIES, KINDS, random_ids

STAGES = {
    "align-output": dict(name="align", mode="output"),
    "align-matrix": dict(name="align", mode="matrix", matrix_len=12),
    "hidden": dict(name="hidden"),
    "kd": dict(name="kd"),
}


def stage_cases() -> list:
    """Every stage for every kind; matrix alignment only for kinds that offer a ``mixing_matrix``."""
    return [pytest.param(kind, stage, id=f"{kind}-{stage}") for kind in KINDS for stage in STAGES
            if stage != "align-matrix" or hasattr(mixer_kind(kind).module, "mixing_matrix")]


def packed_batch() -> dict:
    """Two rows of 16 tokens, the second packing two documents (9 + 7), as the data loader builds them."""
    position_ids = torch.stack([torch.arange(16), torch.cat([torch.arange(9), torch.arange(7)])])
    return {"input_ids": random_ids(2, 16, seed=5), "position_ids": position_ids}


def nudge_mixers(student, scale: float = 0.05) -> None:
    """Move the mixers off their converted initialization, which may already sit at a stage's optimum
    (mean pooling *is* the attention of a pico teacher whose scores are all near zero)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mixer in student.mixers():
            for p in mixer.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("kind, stage", stage_cases())
@pytest.mark.parametrize("family", FAMILIES)
def test_stage_runs_and_lowers_its_loss(family, kind, stage, trainable_student, teacher):
    student = trainable_student(family, kind, "hybrid").train()
    nudge_mixers(student)
    run = build_stage(StageConfig(tokens=10_000, **STAGES[stage]), student, teacher(family))
    params = run.select_trainable()
    assert params and all(p.requires_grad for p in params)
    if run.name == "align":  # what each mixer declares, nothing else
        declared = {id(p) for mixer in student.mixer_layers().values() for p in mixer.align_parameters()}
        assert {id(p) for p in params} == declared
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    batch = packed_batch()
    losses = []
    for _ in range(3):
        loss, parts = run.loss(batch)
        assert isinstance(parts, dict) and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = run.loss(batch)[0].item()
    assert final < losses[0], losses + [final]


@pytest.mark.parametrize("kind", KINDS)
def test_declared_parameter_groups_name_real_parameters(kind, trainable_student):
    """A pattern in ``fp32_parameters``, ``no_weight_decay`` or ``fast_parameters`` that matches nothing is a
    typo that would silently train or store a parameter the wrong way."""
    mixer = next(iter(trainable_student(FAMILIES[0], kind, "hybrid").mixer_layers().values()))
    for group in ("fp32_parameters", "no_weight_decay", "fast_parameters"):
        for pattern in getattr(mixer, group):
            assert mixer.parameter_names((pattern,)), f"{kind}.{group}: {pattern!r} matches no parameter"
