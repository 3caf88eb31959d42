"""Which key channels keep RoPE in compressed MLA (``rope_select``): the data-driven choices are no worse than
MHA2MLA's S_high where S_high is wrong, RoRoPE is exact where the KV heads share their positional keys, a
shared RoPE key keeping every slot computes what per-head RoPE computes (q norms, partial rotary), and exact
mode stays exact."""

import pytest
import torch
import transformers as T
import yaml
from transformers import AutoModelForCausalLM

from mixerswap.convert import convert

from ..conftest import COMMON, build_teacher


def ids(*shape, seed=0):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def logits(path, x, dtype=torch.float32):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()(x).logits


@pytest.fixture(scope="module")
def low_freq_teacher_dir(tmp_path_factory):
    """A pico Llama (2 KV heads of 8 channels, frequencies 0..3 of RoPE base 100: 1, 0.32, 0.1, 0.03 rad per
    token) whose keys use only the two lowest frequencies (channels 2, 3, 6, 7 of a head), large enough for
    sharp attention: S_high keeps RoPE on frequencies 0, 1, where the keys are zero."""
    torch.manual_seed(3)
    config = T.LlamaConfig(**COMMON, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            k = layer.self_attn.k_proj.weight.view(2, 8, 32)
            k.mul_(20)
            k[:, [0, 1, 4, 5]] = 0
    path = tmp_path_factory.mktemp("low-freq-teacher")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shared_keys_teacher_dir(tmp_path_factory):
    """A pico Llama whose second KV head's keys are the first's, scaled per frequency pair: per frequency the
    keys of the two heads span one direction, which RoRoPE's rotation finds."""
    model = build_teacher("llama", seed=4)
    scale = torch.tensor([0.5, -2.0, 1.5, 0.7]).repeat(2)[:, None]  # channel f and f + 4 share frequency f's scale
    with torch.no_grad():
        for layer in model.model.layers:
            k = layer.self_attn.k_proj.weight.view(2, 8, 32)
            k[1] = scale * k[0]
    path = tmp_path_factory.mktemp("shared-keys-teacher")
    model.save_pretrained(path)
    return path


def convert_with(teacher, out, select, **settings):
    """Full-rank latent (only the RoPE choice loses anything), calibrated on teacher samples; returns the plan
    and the mean relative output error of the converted layers on the calibration inputs."""
    result = convert(teacher, out, to="mla", mixer_settings={"rope_dim": 4, "rope_select": select, **settings},
                     calibration="teacher", calibration_tokens=512, progress=False)
    layers = yaml.safe_load((out / "mixerswap.yaml").read_text())["calibration"]["layers"]
    return result.plan, sum(r["after"]["rel_error"] for r in layers.values()) / len(layers)


def test_data_driven_rope_is_no_worse_than_s_high_when_positions_sit_in_low_frequencies(low_freq_teacher_dir,
                                                                                         tmp_path):
    """norm keeps RoPE on frequencies 2, 3 (where the keys are), so the layer is exact; S_high drops all the
    positional information; RoRoPE (one rotated head per frequency) lies in between."""
    errors, plans = {}, {}
    for select, kv_rank in (("high", 24), ("norm", 24), ("rorope", 32)):
        plans[select], errors[select] = convert_with(low_freq_teacher_dir, tmp_path / select, select, kv_rank=kv_rank)
    assert [e["rope_freqs"] for e in plans["norm"]] == [[2, 3]] * 3
    assert plans["high"][0]["rope_freqs"] is None and plans["rorope"][0]["rope_freqs"] == [0, 1, 2, 3]
    assert errors["norm"] < 1e-3 < errors["rorope"] < errors["high"], errors
    x = ids(2, 33)
    teacher = logits(low_freq_teacher_dir, x)
    assert rel_err(logits(tmp_path / "norm", x), teacher) <= 1e-4  # the saved rope_freqs reproduce the layer


def test_rorope_is_exact_when_kv_heads_share_their_positional_keys(shared_keys_teacher_dir, tmp_path):
    """Per frequency the keys span one direction across the 2 KV heads: one rotated head per frequency (the
    default slots at rope_dim 4: 2 heads x 2 channels = 8 RoPE values) carries all of RoPE, weight-only or
    calibrated; per-head partial RoPE at the same cache cannot."""
    x = ids(2, 33)
    teacher = logits(shared_keys_teacher_dir, x)
    for calibration in (None, "teacher"):
        out = tmp_path / f"rorope-{calibration}"
        result = convert(shared_keys_teacher_dir, out, to="mla", calibration=calibration, progress=False,
                         mixer_settings={"rope_dim": 4, "kv_rank": 16})
        entry = result.plan[0]
        assert (entry["rope_select"], entry["rope_heads"], entry["rope_dim"]) == ("rorope", 1, 8)
        assert rel_err(logits(out, x), teacher) <= 1e-4, calibration
    convert(shared_keys_teacher_dir, tmp_path / "high", to="mla", progress=False,
            mixer_settings={"rope_dim": 4, "kv_rank": 16, "rope_select": "high"})
    assert rel_err(logits(tmp_path / "high", x), teacher) > 1e-2


@pytest.mark.parametrize("family, rope_dim, kv_rank", [("qwen3", 16, 32), ("gemma3_text", 16, 32), ("phi3", 4, 24),
                                                       ("qwen2", 8, 16)])
def test_a_shared_rope_key_keeping_every_slot_equals_per_head_rope(family, rope_dim, kv_rank, teacher_dir, tmp_path):
    """RoPE kept on every rotary channel and a full-rank latent: rorope (one shared RoPE key, the query norm's RMS
    over the teacher's head channels only, biases rotated, Phi-3's pass channels in the latent) computes what
    per-head RoPE computes; both linearize a k norm alike."""
    x = ids(2, 21)
    out = {}
    for select in ("high", "rorope"):
        out[select] = tmp_path / select
        convert(teacher_dir(family), out[select], to="mla", progress=False,
                mixer_settings={"rope_dim": rope_dim, "kv_rank": kv_rank, "rope_select": select})
    rorope = AutoModelForCausalLM.from_pretrained(out["rorope"]).config.plan[0]
    assert rorope["rope_heads"] == 1 and rorope["q_norm_dims"] == (rorope["nope_dim"] if rorope["q_norm"] else None)
    assert rel_err(logits(out["rorope"], x, torch.float64), logits(out["high"], x, torch.float64)) <= 1e-5


def test_norm_without_calibration_keeps_the_highest_frequencies(low_freq_teacher_dir, tmp_path, caplog):
    result = convert(low_freq_teacher_dir, tmp_path / "s", to="mla", progress=False,
                     mixer_settings={"rope_dim": 4, "rope_select": "norm"})
    assert {(e["rope_select"], e["rope_freqs"]) for e in result.plan} == {("high", None)}
    assert "rope_select norm needs calibration statistics" in caplog.text


def test_exact_mode_stays_exact(low_freq_teacher_dir, tmp_path):
    convert(low_freq_teacher_dir, tmp_path / "s", to="mla", mixer_settings={"exact": True}, calibration="teacher",
            calibration_tokens=256, progress=False)
    entry = AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.plan[0]
    assert entry["exact"] and (entry["rope_heads"], entry["rope_dim"], entry["rope_select"]) == (2, 8, "high")
    x = ids(2, 33)
    assert rel_err(logits(tmp_path / "s", x, torch.float64), logits(low_freq_teacher_dir, x, torch.float64)) <= 1e-9


def test_rorope_takes_any_number_of_slots(shared_keys_teacher_dir, tmp_path):
    """``rope_freqs`` lists the slots: all four frequencies once is the default (exact here), three cache two
    values per token fewer and lose some positional information; the cache holds exactly what the plan says."""
    x = ids(2, 33)
    teacher = logits(shared_keys_teacher_dir, x)
    errors = {}
    for freqs in ([0, 1, 2, 3], [2, 0, 1]):
        out = tmp_path / f"slots-{len(freqs)}"
        result = convert(shared_keys_teacher_dir, out, to="mla", progress=False,
                         mixer_settings={"kv_rank": 16, "rope_freqs": freqs})
        entry = result.plan[0]
        assert (entry["rope_heads"], entry["rope_dim"], entry["rope_freqs"]) == (1, 2 * len(freqs), sorted(freqs))
        student = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            cache = student(x, use_cache=True).past_key_values
        assert cache.mixer_layer(0).nbytes() == (16 + 2 * len(freqs)) * 4 * 64 * 2  # fp32, one 64-token block
        errors[len(freqs)] = rel_err(logits(out, x), teacher)
    assert errors[4] <= 1e-4 < errors[3], errors
