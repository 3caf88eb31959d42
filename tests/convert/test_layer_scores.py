"""Measured layer selection (``select`` / ``convert --select kl``) on the trained stories260k teacher."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from mixerswap.architectures import MixerSwapForCausalLM
from mixerswap.cli import main
from mixerswap.convert import convert
from mixerswap.convert.calibration import calibration_rows, load_teacher_fp32, load_tokenizer
from mixerswap.convert.layer_scores import (ALIGN_LR, FAST_LR_SCALE, SELECT_ALIGN_STEPS, _kl, _LayerOutputs, _Swapper,
                                            _teacher_logprobs, score_layers)
from mixerswap.distill.recipe import DEFAULT_FAST_LR_SCALE, DEFAULT_LR

from ..conftest import teacher_stories


@pytest.fixture(scope="module")
def stories_text(stories_dir, tmp_path_factory):
    _, _, text, _ = teacher_stories(stories_dir, 12, calibration=12)
    path = tmp_path_factory.mktemp("select") / "stories.txt"
    path.write_text(text)
    return path


def select_kl(stories_dir, stories_text, out, **options):
    result = convert(stories_dir, out, to="mamba2", keep_attention=0.2, select="kl", calibration=stories_text,
                     calibration_tokens=384, progress=False, dtype="float32", **options)
    return out, result, yaml.safe_load((out / "mixerswap.yaml").read_text())["selection"]


@pytest.fixture(scope="module")
def selected(stories_dir, stories_text, tmp_path_factory):
    """A student converted with ``--select kl`` (1 of 5 layers keeps attention) and its provenance."""
    return select_kl(stories_dir, stories_text, tmp_path_factory.mktemp("selected") / "s")


@pytest.fixture(scope="module")
def selected_as_converted(stories_dir, stories_text, tmp_path_factory):
    """The same, scored on the calibrated conversion itself (no alignment before scoring)."""
    return select_kl(stories_dir, stories_text, tmp_path_factory.mktemp("selected0") / "s", select_align_steps=0)


def test_every_layer_is_scored_and_the_greedy_single_layer_is_the_best_single(selected):
    _, result, selection = selected
    assert [s["layer"] for s in selection["scores"]] == list(range(5))
    for s in selection["scores"]:
        assert s["kl"] > 0 and 0 < s["init_error"]
    # one kept layer: greedy is exhaustive, so it keeps the layer whose replacement costs most and
    # beats (or ties) the evenly spaced choice
    assert result.attention_layers == selection["keep"] and len(selection["keep"]) == 1
    assert selection["keep_kl"] <= selection["uniform_kl"] + 1e-6
    assert selection["keep_kl"] < selection["all_replaced_kl"]
    assert selection["path"][0]["layer"] == selection["keep"][0]


def test_the_scored_kl_is_the_kl_of_the_written_student(stories_dir, stories_text, selected_as_converted):
    """Swapping the teacher's attention into an all-replaced student models the real student exactly."""
    out, _, selection = selected_as_converted
    assert selection["align_steps"] == 0
    assert "chosen by `--select kl`" in (out / "README.md").read_text()
    tokenizer = load_tokenizer(stories_dir)
    skip = selection["calibration_tokens"] if selection["scored_on_held_out"] else 0
    rows = calibration_rows(tokenizer, stories_text.read_text(), tokens=selection["scoring_tokens"], seq_len=256,
                            skip=skip)
    student = MixerSwapForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = _teacher_logprobs(load_teacher_fp32(stories_dir), rows, 4)
    assert _kl(student, rows, reference, 4) == pytest.approx(selection["keep_kl"], rel=1e-4)


@pytest.mark.parametrize("base, changed", [(set(), 3), ({1, 3}, 0), ({1, 3}, 2), ({0, 2, 4}, 4)],
                         ids=["teacher+layer3", "set+layer0", "set+layer2", "set-layer4"])
def test_replaying_the_layers_below_the_change_gives_the_full_forward_kl(stories_dir, stories_text, tmp_path,
                                                                         base, changed):
    """A candidate that differs from the base model from layer ``changed`` on may skip the layers below."""
    student_dir = tmp_path / "all"
    convert(stories_dir, student_dir, to="mamba2", keep_attention=0.0, calibration=stories_text,
            calibration_tokens=256, progress=False, dtype="float32")
    teacher = load_teacher_fp32(stories_dir)
    swap = _Swapper(MixerSwapForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval(), teacher)
    rows = calibration_rows(load_tokenizer(stories_dir), stories_text.read_text(), tokens=3 * 128, seq_len=128)
    reference = _teacher_logprobs(teacher, rows, 2)
    swap.use(base)
    recorded = _LayerOutputs(swap, rows, 2)
    candidate = swap.use(base ^ {changed})
    full = _kl(candidate, rows, reference, 2)
    assert full > 0
    assert _kl(candidate, rows, reference, 2, recorded, changed) == pytest.approx(full, rel=1e-6, abs=1e-9)
    # and the layers really are skipped: replaying a model that differs lower down gives another KL
    if changed > 0:
        other = swap.use(base ^ {changed, 0})
        assert _kl(other, rows, reference, 2, recorded, changed) != pytest.approx(_kl(other, rows, reference, 2),
                                                                                 rel=1e-3)
    assert all("forward" not in layer.__dict__ for layer in swap.layers)


def test_sets_are_scored_with_aligned_mixers_but_the_student_is_written_as_converted(
        stories_dir, stories_text, selected, selected_as_converted, tmp_path):
    """By default every mixer is aligned on its layer before the KL scores (what distillation's first stage
    would make of it); the student written is still the calibrated conversion of the kept set."""
    out, result, aligned = selected
    _, _, plain = selected_as_converted
    assert aligned["align_steps"] == SELECT_ALIGN_STEPS > 0
    assert aligned["all_replaced_kl"] < plain["all_replaced_kl"]
    assert all(s["align_error"] < s["init_error"] for s in aligned["scores"])
    assert [s["init_error"] for s in aligned["scores"]] == [s["init_error"] for s in plain["scores"]]
    same = convert(stories_dir, tmp_path / "same", to="mamba2", attention_layers=result.attention_layers,
                   calibration=stories_text, calibration_tokens=384, progress=False, dtype="float32")
    assert same.attention_layers == aligned["keep"]
    written = MixerSwapForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, value in MixerSwapForCausalLM.from_pretrained(tmp_path / "same", dtype=torch.float32).state_dict().items():
        assert torch.equal(written[name], value), name


def test_selection_aligns_with_the_align_stage_rates():
    assert (ALIGN_LR, FAST_LR_SCALE) == (DEFAULT_LR["align"], DEFAULT_FAST_LR_SCALE)


def test_align_steps_lower_the_layer_error(stories_dir, stories_text):
    selection = score_layers(stories_dir, to="mamba2", text=stories_text, calibration_tokens=256, scoring_tokens=256,
                             seq_len=128, align_steps=5, progress=False)
    assert selection.keep == [] and selection.keep_kl is None
    assert all(s.align_error < s.init_error for s in selection.scores)


def test_select_command_writes_table_json_and_a_plan_convert_takes(stories_dir, stories_text, tmp_path):
    out = tmp_path / "sel"
    args = ["select", str(stories_dir), "--to", "mamba2", "--data", str(stories_text), "--keep-attention", "0.4",
            "--calibration-tokens", "256", "--scoring-tokens", "256", "--seq-len", "128", "--align-steps", "0",
            "--no-mqar", "--device", "cpu", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| rank | layer |" in result.output and "evenly spaced" in result.output
    data = json.loads((out / "selection.json").read_text())
    assert len(data["keep"]) == 2 and (out / "selection.png").stat().st_size > 0
    converted = convert(stories_dir, tmp_path / "student", plan=out / "plan.yaml", progress=False)
    assert converted.attention_layers == data["keep"]


def test_select_needs_calibration_and_a_fraction(stories_dir, tmp_path):
    with pytest.raises(ValueError, match="--select kl measures"):
        convert(stories_dir, tmp_path / "s", keep_attention=0.4, select="kl", progress=False)
    with pytest.raises(ValueError, match="unknown layer selection"):
        convert(stories_dir, tmp_path / "s", keep_attention=0.4, select="mqar", progress=False)
