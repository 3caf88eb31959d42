"""The Gated DeltaNet mixer and its converter: parallel == recurrent, padding and packing stay invisible,
the converted mixer keeps the teacher's projections, calibration fits decays and output scales."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from mixerswap.architectures.cache import HybridMixerCache
from mixerswap.architectures.mixers import mixer_kind
from mixerswap.architectures.mixers.common import PADDING_MASK_KWARG
from mixerswap.architectures.mixers.gdn import GDNMixer, GDNSettings
from mixerswap.cli import main
from mixerswap.convert.adapters import AttentionShape, AttentionWeights
from mixerswap.convert.calibration import output_match, replay_mixer
from mixerswap.convert.converters import AttentionLayout, LayerStats
from mixerswap.convert.gdn import BETA_GRID, CONVERTER, decay_from_reach
from mixerswap.kernels import causal_conv1d, delta_rule_chunk

from ..conftest import build_teacher, family_config

HIDDEN = 32


def make_mixer(chunk_size=8, seed=0, **overrides):
    """A mixer whose every part matters: input-dependent decay, write strength and gate, a random conv."""
    torch.manual_seed(seed)
    settings = GDNSettings(n_heads=4, n_kv_heads=2, head_dim=8, chunk_size=chunk_size, **overrides)
    mixer = GDNMixer(settings, HIDDEN, layer_idx=0)
    mixer.init_parameters(std=0.2)
    with torch.no_grad():
        for proj in (mixer.a_proj, mixer.b_proj, mixer.g_proj):
            proj.weight.normal_(std=0.3)
        mixer.conv1d.weight.normal_(std=0.5)
        if settings.qk_norm:
            mixer.q_norm_weight.normal_()
            mixer.k_norm_weight.normal_()
    return mixer.double().eval()


def fresh_cache(mixer):
    return HybridMixerCache(family_config("llama"), {0: mixer.new_cache_layer()})


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seqlen", [1, 63, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk_size", [7, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("variant", [{"conv_activation": "identity"}, {"qk_norm": True, "qkv_bias": True}],
                         ids=["identity", "silu-qk_norm-bias"])
def test_parallel_equals_token_by_token(seqlen, chunk_size, variant):
    mixer = make_mixer(chunk_size, **variant).float()
    h = torch.randn(2, seqlen, HIDDEN)
    with torch.no_grad():
        full, _ = mixer(h)
        cache = fresh_cache(mixer)
        steps = [mixer(h[:, t : t + 1], past_key_values=cache)[0] for t in range(seqlen)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4


@pytest.mark.parametrize("split", [1, 7, 8, 9, 30])
def test_prefill_then_decode_and_chunked_prefill(split):
    mixer = make_mixer(chunk_size=8, conv_kernel=3)
    h = torch.randn(1, 31, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full, _ = mixer(h)
        cache = fresh_cache(mixer)
        first, _ = mixer(h[:, :split], past_key_values=cache)
        rest, _ = mixer(h[:, split:], past_key_values=cache)  # multi-token continuation from cached states
        decoded, _ = mixer(h[:, -1:], past_key_values=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(decoded, mixer(torch.cat([h, h[:, -1:]], 1))[0][:, -1:], rtol=1e-10, atol=1e-12)
    assert cache.get_seq_length() == 32


def test_left_padding_is_invisible():
    mixer = make_mixer()
    h = torch.randn(1, 13, HIDDEN, dtype=torch.float64)
    pad = torch.randn(1, 5, HIDDEN, dtype=torch.float64) * 10
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 13)], 1).long()
    with torch.no_grad():
        alone, _ = mixer(h)
        padded, _ = mixer(torch.cat([pad, h], 1), **{PADDING_MASK_KWARG: mask})
        c1, c2 = fresh_cache(mixer), fresh_cache(mixer)
        mixer(h, past_key_values=c1)
        mixer(torch.cat([pad, h], 1), past_key_values=c2, **{PADDING_MASK_KWARG: mask})
        nxt = torch.randn(1, 1, HIDDEN, dtype=torch.float64)
        step1, _ = mixer(nxt, past_key_values=c1)
        step2, _ = mixer(nxt, past_key_values=c2, **{PADDING_MASK_KWARG: torch.ones(1, 19)})
    torch.testing.assert_close(padded[:, 5:], alone)
    torch.testing.assert_close(step2, step1)


@pytest.mark.parametrize("lengths", [[5, 11, 1, 14], [8, 8, 8]], ids=["ragged", "chunk-aligned"])
def test_packed_documents_equal_separate_runs(lengths):
    mixer = make_mixer(chunk_size=8)
    h = torch.randn(1, sum(lengths), HIDDEN, dtype=torch.float64)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed, _ = mixer(h, position_ids=position_ids)
        start = 0
        for n in lengths:
            alone, _ = mixer(h[:, start : start + n])
            torch.testing.assert_close(packed[:, start : start + n], alone)
            start += n


def test_gradients_flow_to_all_parameters():
    mixer = make_mixer(qk_norm=True, qkv_bias=True, out_bias=True)
    h = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    out, _ = mixer(h)
    out.square().sum().backward()
    for name, param in mixer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_state_size_is_independent_of_sequence_length():
    mixer = make_mixer().float()
    sizes = set()
    for seqlen in (10, 300):
        cache = fresh_cache(mixer)
        with torch.no_grad():
            mixer(torch.randn(3, seqlen, HIDDEN), past_key_values=cache)
        sizes.add(cache.mixer_layer(0).nbytes())
    spec = mixer.cache_spec(3, torch.float32)
    assert sizes == {spec["conv"] + spec["recurrent"]}
    assert spec["recurrent"] == 3 * 4 * 8 * 8 * 4  # one fp32 [K, V] state per query head


def test_decode_updates_states_in_place():
    mixer = make_mixer().float()
    cache = fresh_cache(mixer)
    with torch.no_grad():
        mixer(torch.randn(2, 9, HIDDEN), past_key_values=cache)
        held = {name: t.data_ptr() for name, t in cache.mixer_layer(0).states.items()}
        for _ in range(3):
            mixer(torch.randn(2, 1, HIDDEN), past_key_values=cache)
    assert {name: t.data_ptr() for name, t in cache.mixer_layer(0).states.items()} == held
    assert cache.mixer_layer(0).states["recurrent"].dtype == torch.float32


def test_mixing_matrix_reproduces_the_delta_rule():
    """o = M v per head (before the output norm), documents included."""
    mixer = make_mixer()
    h = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    position_ids = torch.cat([torch.arange(6), torch.arange(7)])[None].expand(2, -1)
    seq_idx = torch.tensor([[0] * 6 + [1] * 7]).expand(2, -1)
    with torch.no_grad():
        M = mixer.mixing_matrix(h, position_ids=position_ids)
        qkv, g, beta = mixer._project(h, None)
        qkv, _ = causal_conv1d(qkv, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, seq_idx=seq_idx,
                               activation="silu")
        q, k, v = mixer._heads(qkv)
        o, _ = delta_rule_chunk(q, k, v, g, beta, chunk_size=4, seq_idx=seq_idx)
    assert M.shape == (2, 4, 13, 13)
    torch.testing.assert_close(torch.einsum("bhij,bjhv->bihv", M, v), o)
    assert (M.triu(1) == 0).all() and (M[:, :, 6:, :6] == 0).all()


def test_initialized_mixer_is_normalized_delta_rule_with_unit_gate():
    """Fresh: conv identity, gate exactly 1, beta = beta_init, decays in the documented range."""
    torch.manual_seed(0)
    mixer = GDNMixer(GDNSettings(n_heads=4, n_kv_heads=2, head_dim=8, beta_init=0.25), HIDDEN, 0)
    mixer.init_parameters()
    h = torch.randn(2, 6, HIDDEN)
    with torch.no_grad():
        _, g, beta = mixer._project(h, None)
        gate = torch.nn.functional.silu(mixer.g_proj(h))
    torch.testing.assert_close(gate, torch.ones_like(gate))
    torch.testing.assert_close(beta, torch.full_like(beta, 0.25))
    alpha = torch.exp(g)
    assert (alpha > math.exp(-16 * 0.1) * 0.99).all() and (alpha < 1).all()


def test_parameter_groups():
    mixer = make_mixer(qk_norm=True)
    align = {n for n, p in mixer.named_parameters() if any(p is q for q in mixer.align_parameters())}
    assert align == {"a_proj.weight", "b_proj.weight", "b_proj.bias", "A_log", "dt_bias", "conv1d.weight",
                     "conv1d.bias", "g_proj.weight", "g_proj.bias", "norm_weight"}
    assert set(mixer.no_decay_parameter_names()) == {"A_log", "dt_bias", "b_proj.bias", "conv1d.bias", "g_proj.bias",
                                                     "norm_weight", "q_norm_weight", "k_norm_weight"}
    assert mixer.parameter_names(mixer.fp32_parameters) == ["dt_bias", "A_log"]
    assert all(isinstance(getattr(mixer, n), torch.nn.Linear) for n in mixer.lora_targets)


def test_settings_validation():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        GDNSettings(n_heads=4, n_kv_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="conv_kernel"):
        GDNSettings(n_heads=4, n_kv_heads=2, head_dim=8, conv_kernel=0)
    with pytest.raises(ValueError, match="beta_init"):
        GDNSettings(n_heads=4, n_kv_heads=2, head_dim=8, beta_init=1.0)
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        GDNSettings(n_heads=4, n_kv_heads=2, head_dim=8, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match="extra"):
        GDNSettings(n_heads=4, n_kv_heads=2, head_dim=8, window=3)


def teacher_layer(family: str, layer: int = 0):
    """A pico teacher, one attention layer's weights and its layout, read from the live module."""
    teacher = build_teacher(family)
    attn = teacher.model.layers[layer].self_attn
    weights = AttentionWeights(q=attn.q_proj.weight, k=attn.k_proj.weight, v=attn.v_proj.weight,
                               o=attn.o_proj.weight, q_bias=attn.q_proj.bias, k_bias=attn.k_proj.bias,
                               v_bias=attn.v_proj.bias, o_bias=attn.o_proj.bias,
                               q_norm=getattr(getattr(attn, "q_norm", None), "weight", None),
                               k_norm=getattr(getattr(attn, "k_norm", None), "weight", None))
    layout = AttentionLayout(AttentionShape.from_config(teacher.config), qkv_bias=attn.q_proj.bias is not None,
                             out_bias=attn.o_proj.bias is not None, qk_norm=weights.q_norm is not None)
    return teacher, attn, weights, layout


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_converter_copies_the_teacher_projections(family):
    teacher, _, weights, layout = teacher_layer(family)
    settings = CONVERTER.settings(teacher.config, layout, {"conv_kernel": 2, "chunk_size": 16})
    assert (settings.n_heads, settings.n_kv_heads, settings.conv_kernel, settings.chunk_size) == (4, 2, 2, 16)
    assert settings.qk_norm == (family == "qwen3") and settings.qkv_bias == (family == "qwen2")
    state = CONVERTER.from_attention(weights, settings, teacher.config, seed=3)
    mixer = GDNMixer(settings, HIDDEN, 0)
    mixer.load_state_dict(state)  # every parameter is there, and nothing else
    for name, want in [("q_proj.weight", weights.q), ("k_proj.weight", weights.k), ("v_proj.weight", weights.v),
                       ("out_proj.weight", weights.o), ("q_proj.bias", weights.q_bias),
                       ("q_norm_weight", weights.q_norm)]:
        if want is not None:
            torch.testing.assert_close(state[name], want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(state["conv1d.weight"][:, 0, -1], torch.ones(mixer.conv1d.weight.shape[0]))
    again = CONVERTER.from_attention(weights, settings, teacher.config, seed=3)
    assert all(torch.equal(state[n], again[n]) for n in state)  # reproducible


def test_converter_refuses_what_follows_from_the_teacher():
    teacher, _, _, layout = teacher_layer("llama")
    with pytest.raises(ValueError, match="cannot be set"):
        CONVERTER.settings(teacher.config, layout, {"n_heads": 2})
    with pytest.raises(ValueError, match="no setting 'window'"):
        CONVERTER.settings(teacher.config, layout, {"window": 2})
    assert {"conv_kernel", "chunk_size", "conv_activation", "beta_init"} <= CONVERTER.tunable
    assert mixer_kind("gdn").load_converter() is CONVERTER


def test_decay_from_reach_gives_the_half_life():
    dt_bias = torch.tensor([-3.0, 0.0, 2.0])
    reach = torch.tensor([0.0, 9.0, 99.0])
    A_log = decay_from_reach(dt_bias, reach)
    alpha = torch.exp(-torch.exp(A_log) * torch.nn.functional.softplus(dt_bias))
    torch.testing.assert_close(alpha ** (reach + 1), torch.full((3,), 0.5))


def calibration_stats(teacher, attn, seqlen=40) -> LayerStats:
    """What convert --calibration records for one layer, from a forward of the pico teacher."""
    record = {}

    def hook(module, args, kwargs, output):
        record.update(inputs=kwargs["hidden_states"].detach(), outputs=output[0].detach(),
                      kwargs={k: kwargs[k] for k in ("position_embeddings", "position_ids") if k in kwargs})

    handles = [attn.register_forward_hook(hook, with_kwargs=True),
               attn.o_proj.register_forward_pre_hook(lambda m, args: record.update(head_outputs=args[0].detach()))]
    with torch.no_grad():
        teacher(torch.randint(3, 128, (2, seqlen), generator=torch.Generator().manual_seed(0)))
    for handle in handles:
        handle.remove()
    return LayerStats(**record)


def test_calibration_fits_head_scales_and_decays():
    teacher, attn, weights, layout = teacher_layer("qwen3")
    stats = calibration_stats(teacher, attn)
    stats.attention_reach = torch.tensor([0.0, 3.0, 10.0, 30.0])  # what collect_layer_stats measures
    settings = CONVERTER.settings(teacher.config, layout)
    plain = CONVERTER.from_attention(weights, settings, teacher.config)
    fitted = CONVERTER.from_attention(weights, settings, teacher.config, stats=stats)

    def error(state):
        mixer = GDNMixer(settings, HIDDEN, 0)
        mixer.load_state_dict(state)
        return output_match(replay_mixer(mixer, stats), stats.outputs)["rel_error"]

    assert error(fitted) < error(plain)
    torch.testing.assert_close(fitted["A_log"], decay_from_reach(plain["dt_bias"], stats.attention_reach))
    betas = torch.sigmoid(fitted["b_proj.bias"].double())
    assert all(any(abs(b - g) < 1e-6 for g in BETA_GRID) for b in betas.tolist())
    assert {n for n in plain if not torch.equal(plain[n], fitted[n])} <= {"A_log", "b_proj.bias", "norm_weight"}


def test_convert_command_with_gdn_options(teacher_dir, tmp_path):
    out = tmp_path / "student"
    result = CliRunner().invoke(main, ["convert", str(teacher_dir("qwen3")), "--to", "gdn", "--keep-attention", "0.34",
                                       "--conv-kernel", "2", "--chunk-size", "16", "--out", str(out), "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "config.json").read_text())["plan"]
    assert [e["kind"] for e in plan] == ["gdn", "attention", "gdn"]
    assert (plan[0]["conv_kernel"], plan[0]["chunk_size"], plan[0]["qk_norm"]) == (2, 16, True)
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        generated = student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 13)
