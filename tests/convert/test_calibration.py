"""Calibrated conversion: per-head output scales fitted to the teacher, reported per layer."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mixerswap.convert import convert
from mixerswap.demo import demo_text

from ..conftest import held_out_perplexity, teacher_stories


def test_calibration_fits_each_layer_closer_to_the_teacher(stories_dir, tmp_path):
    """The least-squares head scales can only lower each head's error; the whole layer follows."""
    text = tmp_path / "calib.txt"
    text.write_text(demo_text())
    convert(stories_dir, tmp_path / "s", keep_attention=0.4, calibration=text, calibration_tokens=256, progress=False)
    report = yaml.safe_load((tmp_path / "s" / "mixerswap.yaml").read_text())["calibration"]
    assert report["tokens"] == 256 and set(report["layers"]) == {0, 2, 4}
    for layer in report["layers"].values():
        assert layer["after"]["rel_error"] < layer["before"]["rel_error"]
        assert layer["after"]["rel_error"] <= 1.0 + 1e-6
    assert "| layer | RMS ratio before |" in (tmp_path / "s" / "README.md").read_text()


def test_calibration_errors_are_one_line(teacher_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        convert(teacher_dir("llama"), tmp_path / "s", calibration=empty, progress=False)
    with pytest.raises(FileNotFoundError, match="calibration text"):
        convert(teacher_dir("llama"), tmp_path / "s", calibration=tmp_path / "missing.txt", progress=False)
    empty.write_text("a few words")
    with pytest.raises(ValueError, match="needs the teacher's tokenizer"):
        convert(teacher_dir("llama"), tmp_path / "s", calibration=empty, progress=False)
    assert not (tmp_path / "s").exists()


@torch.no_grad()
def test_calibrated_student_starts_near_a_real_teacher(stories_dir, tmp_path):
    """stories260k, 3 of 5 layers replaced: calibration on the teacher's own stories (a text file of
    them, or ``"teacher"``: sampled by convert itself, the command line's default) takes the converted
    student's held-out perplexity from hundreds to within a few times the teacher's."""
    _, teacher, text, held_out = teacher_stories(stories_dir, 16)
    (tmp_path / "calib.txt").write_text(text)

    def perplexity(model):
        return held_out_perplexity(model, held_out)

    ppl = {}
    for calibration in (None, tmp_path / "calib.txt", "teacher"):
        out = tmp_path / f"student-{calibration is not None}-{calibration == 'teacher'}"
        convert(stories_dir, out, keep_attention=0.4, calibration=calibration, calibration_tokens=1024, progress=False)
        ppl[str(calibration)] = perplexity(AutoModelForCausalLM.from_pretrained(out))
    teacher_ppl = perplexity(teacher)
    assert max(ppl[str(tmp_path / "calib.txt")], ppl["teacher"]) < 4 * teacher_ppl < ppl["None"]
    report = yaml.safe_load((out / "mixerswap.yaml").read_text())["calibration"]
    assert report["text"] == "samples the teacher wrote" and report["tokens"] == 1024


def test_teacher_samples_are_seeded_full_rows_and_leave_the_global_rng_alone(teacher_dir):
    from mixerswap.convert.calibration import load_teacher_fp32, teacher_sample_rows

    model = load_teacher_fp32(teacher_dir("llama"))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    rows = teacher_sample_rows(model, tokens=70, seq_len=32, seed=5)
    assert torch.equal(torch.rand(3), before)
    assert rows.shape == (3, 32) and bool((rows[:, 0] == model.config.bos_token_id).all())
    assert torch.equal(rows, teacher_sample_rows(model, tokens=70, seq_len=32, seed=5))
    assert not torch.equal(rows, teacher_sample_rows(model, tokens=70, seq_len=32, seed=6))


def test_attention_reach_and_the_dt_it_implies():
    """A head that attends to the current token gets a fast decay, one that looks 2 back a slower one, and
    the decay puts half its weight within reach + 1 tokens."""
    from mixerswap.convert.calibration import attention_reach
    from mixerswap.convert.mamba2 import dt_bias_from_reach

    length = 8
    probs = torch.zeros(2, 2, length, length)
    for i in range(length):
        probs[:, 0, i, i] = 1.0
        probs[:, 1, i, max(0, i - 2)] = 0.6
        probs[:, 1, i, 0] += 0.4  # an attention sink does not drag the reach to the first token
    reach = attention_reach(probs)
    assert reach.tolist() == [0.0, 2.0]
    A_log = torch.log(torch.tensor([4.0, 4.0]))
    dt = torch.nn.functional.softplus(dt_bias_from_reach(reach, A_log))
    decay = torch.exp(-dt * 4.0)  # per-token decay exp(dt A)
    torch.testing.assert_close(decay ** (reach + 1), torch.tensor([0.5, 0.5]))


class _Projected(torch.nn.Module):
    """A mixer stand-in whose output is ``o_proj(tanh(inner(h)))``."""

    def __init__(self, hidden: int, width: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.inner = torch.nn.Linear(hidden, width)
        self.o_proj = torch.nn.Linear(width, hidden, bias=False)

    def forward(self, hidden_states, **kwargs):
        return self.o_proj(torch.tanh(self.inner(hidden_states))), None


@torch.no_grad()
def test_output_refit_finds_the_projection_the_teacher_output_needs():
    """The teacher's output is another projection of the same head outputs: the ridge least-squares refit
    recovers it (the smallest ridge wins on the held-out rows); a projection already right is kept as is."""
    from mixerswap.convert.calibration import refit_output_projection
    from mixerswap.convert.converters import LayerStats

    mixer, wanted = _Projected(16, 24, seed=0), _Projected(16, 24, seed=1)
    wanted.inner = mixer.inner
    inputs = torch.randn(8, 32, 16, generator=torch.Generator().manual_seed(2))
    stats = LayerStats(inputs=inputs, outputs=wanted(inputs)[0])
    weight, report = refit_output_projection(mixer, stats, capture="o_proj")
    before, after = report["held_out_rel_error"]
    assert report["ridge"] == 1e-3 and before > 0.5 and after < 0.05, report
    assert torch.allclose(weight, wanted.o_proj.weight, atol=0.05)

    stats = LayerStats(inputs=inputs, outputs=mixer(inputs)[0])
    weight, report = refit_output_projection(mixer, stats, capture="o_proj")
    assert report["ridge"] is None and torch.equal(weight, mixer.o_proj.weight)


def test_cli_no_output_refit_keeps_the_converters_projection(stories_dir, tmp_path):
    from click.testing import CliRunner

    from mixerswap.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(demo_text())
    reports = {}
    for flag in ("--output-refit", "--no-output-refit"):
        out = tmp_path / flag
        result = CliRunner().invoke(main, ["convert", str(stories_dir), "--keep-attention", "0.4", "--calibration",
                                           str(text), "--calibration-tokens", "512", flag, "--out", str(out), "-q"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        reports[flag] = yaml.safe_load((out / "mixerswap.yaml").read_text())["calibration"]
    assert reports["--output-refit"]["output_refit"] and not reports["--no-output-refit"]["output_refit"]
    assert all("output_refit" in layer for layer in reports["--output-refit"]["layers"].values())
    assert not any("output_refit" in layer for layer in reports["--no-output-refit"]["layers"].values())
    assert "| output refit |" in (tmp_path / "--output-refit" / "README.md").read_text()
    card = (tmp_path / "--no-output-refit" / "README.md").read_text()
    assert "| rel. error before | after |\n" in card and "output refit" not in card
