"""MLA under a global KV budget (``kv_budget``): ranks chosen per layer on measured error, the budget spent
exactly, the saved cache as recorded, the KV/perplexity report, and one-line errors."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from mixerswap.architectures import PlanError
from mixerswap.convert import convert

from ..conftest import build_teacher, held_out_perplexity, teacher_stories


def cached_values(plan: list[dict]) -> int:
    """Values cached per token over all layers: latent plus RoPE key heads."""
    return sum(e["kv_rank"] + e["rope_heads"] * e["rope_dim"] for e in plan)


@pytest.fixture(scope="module")
def uneven_teacher_dir(tmp_path_factory):
    """A pico Llama (3 layers, 2 KV heads of 8 channels: 32 cached values per token and layer) whose
    layers 0 and 2 have keys and values of rank 2 (plus a little noise), layer 1 full rank ones."""
    model = build_teacher("llama", seed=2)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i in (0, 2):
            attn = model.model.layers[i].self_attn
            for proj in (attn.k_proj, attn.v_proj):
                low = torch.randn(16, 2, generator=gen) @ torch.randn(2, 32, generator=gen) / 4
                proj.weight.copy_(low + 1e-3 * torch.randn(16, 32, generator=gen))
    path = tmp_path_factory.mktemp("uneven-teacher")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("calibration", [None, "teacher"], ids=["weight-only", "calibrated"])
def test_budget_is_spent_exactly_and_goes_to_the_layer_that_needs_it(calibration, uneven_teacher_dir, tmp_path):
    """Half the teacher's 3 x 32 values: 3 x 8 RoPE keys leave 24 latent channels (8 each if uniform);
    the full-rank layer gets most. The saved cache holds exactly the recorded ranks."""
    result = convert(uneven_teacher_dir, tmp_path / "s", to="mla", mixer_settings={"kv_budget": 0.5, "rope_dim": 4},
                     calibration=calibration, calibration_tokens=512, progress=False)
    ranks = [e["kv_rank"] for e in result.plan]
    assert cached_values(result.plan) == 0.5 * 3 * 32, ranks
    assert ranks[1] > max(ranks[0], ranks[2]) and ranks[1] >= 14, ranks
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert [e["kv_rank"] for e in student.config.plan] == ranks
    with torch.no_grad():
        cache = student(torch.randint(3, 128, (2, 40)), use_cache=True).past_key_values
    for i, entry in enumerate(student.config.plan):  # fp32, one 64-token block, batch 2
        assert cache.mixer_layer(i).nbytes() == (entry["kv_rank"] + 2 * 4) * 4 * 64 * 2
    report = yaml.safe_load((tmp_path / "s" / "mixerswap.yaml").read_text())["kv_cache"]
    assert report["bytes_per_token"] == {"teacher": 3 * 32 * 4, "student": 48 * 4}
    assert [report["layers"][i]["student"] for i in range(3)] == [(r + 8) * 4 for r in ranks]


@torch.no_grad()
def test_perplexity_grows_as_the_budget_drops_on_stories260k(stories_dir, tmp_path):
    """stories260k (5 layers, 4 KV heads of 8 channels: 64 values per token and layer), RoPE on 2 channels
    per key head; calibrated on teacher stories. The report (mixerswap.yaml, model card) has the bytes
    and the held-out perplexities."""
    _, teacher, text, held_out = teacher_stories(stories_dir, 10, calibration=6)
    (tmp_path / "calib.txt").write_text(text)
    ppl = {}
    for budget in (0.75, 0.5, 0.25):
        out = tmp_path / f"s-{budget}"
        result = convert(stories_dir, out, to="mla", mixer_settings={"kv_budget": budget},
                         calibration=tmp_path / "calib.txt", calibration_tokens=512, progress=False)
        assert cached_values(result.plan) <= budget * 5 * 64  # measured errors stop falling: not all is spent
        rope = result.plan[0]["rope_heads"] * result.plan[0]["rope_dim"]
        assert rope == 4 * (4 if budget >= 0.5 else 2)  # default: RoPE on at most half the budget
        ppl[budget] = held_out_perplexity(AutoModelForCausalLM.from_pretrained(out).eval(), held_out)
    assert held_out_perplexity(teacher, held_out) < ppl[0.75] < ppl[0.5] < ppl[0.25], ppl

    settings = yaml.safe_load((out / "mixerswap.yaml").read_text())
    assert settings["kv_cache"]["bytes_per_token"] == {"teacher": 5 * 64 * 4, "student": cached_values(result.plan) * 4}
    held = settings["held_out"]
    assert held["tokens"] >= 256 and held["student"] > held["teacher"] > 1, held
    card = (out / "README.md").read_text()
    assert f"KV cache per token (float32): 1280 bytes in the teacher, {cached_values(result.plan) * 4} in" in card
    assert f"teacher {held['teacher']}, this student {held['student']}" in card


@pytest.mark.parametrize("to, settings, message", [
    ("mla", {"kv_budget": 0}, r"kv_budget must be a fraction of the teacher's KV cache in \(0, 1\], got 0"),
    ("mla", {"kv_budget": 1.5}, r"in \(0, 1\], got 1\.5"),
    ("mla", {"kv_budget": "half"}, r"in \(0, 1\], got 'half'"),
    ("mla", {"kv_budget": 0.25, "rope_dim": 4}, "kv_budget 0.25 leaves 8 cached values per token of the "
     r"teacher's 32, less than the RoPE key \(8\) plus 1 latent channel"),
    ("mla", {"kv_budget": 0.5, "kv_rank": 8}, "give kv_budget or kv_rank, not both"),
    ("mla", {"kv_budget": 0.5, "exact": True}, "exact mla fixes kv_budget"),
    ("mamba2", {"kv_budget": 0.5}, "mamba2 has no setting 'kv_budget'"),
], ids=["zero", "above-one", "not-a-number", "below-rope-key", "with-kv-rank", "with-exact", "not-mla"])
def test_bad_budgets_are_one_line_errors_and_nothing_is_written(to, settings, message, teacher_dir, tmp_path):
    with pytest.raises(PlanError, match=message) as err:
        convert(teacher_dir("llama"), tmp_path / "s", to=to, mixer_settings=settings, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s").exists()


def test_one_budget_covers_the_layers_that_ask(teacher_dir, tmp_path):
    """A plan file: layer 1 keeps attention, layers 0 and 2 share one budget; two budgets are refused."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("default: {kind: mla, kv_budget: 0.5}\nlayers:\n  - {layers: '1', kind: attention}\n")
    result = convert(teacher_dir("llama"), tmp_path / "s", plan=plan, progress=False)
    assert result.attention_layers == [1] and cached_values([result.plan[0], result.plan[2]]) == 0.5 * 2 * 32
    report = yaml.safe_load((tmp_path / "s" / "mixerswap.yaml").read_text())["kv_cache"]
    assert report["layers"][1] == {"kind": "attention", "teacher": 128, "student": 128}
    plan.write_text("default: {kind: mla, kv_budget: 0.5}\nlayers:\n  - {layers: '1', kind: mla, kv_budget: 0.75}\n")
    with pytest.raises(PlanError, match="mla layers ask for different kv_budget"):
        convert(teacher_dir("llama"), tmp_path / "x", plan=plan, progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_kv_budget(teacher_dir, tmp_path):
    from click.testing import CliRunner

    from mixerswap.cli import main

    base = ["convert", str(teacher_dir("llama")), "--to", "mla", "--calibration", "none", "-q"]
    bad = CliRunner().invoke(main, [*base, "--kv-budget", "2", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "kv_budget must be a fraction" in bad.output and not (tmp_path / "x").exists()
    result = CliRunner().invoke(main, [*base, "--kv-budget", "0.75", "--rope-dim", "4", "--out", str(tmp_path / "s")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.plan
    assert cached_values(plan) == 0.75 * 3 * 32
