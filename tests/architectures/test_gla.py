"""Gated linear attention with conv: parallel == decoding, padding and documents invisible, fixed-size
state, identity conv at init, and settings refused in one line."""

import pytest
import torch

from mixerswap.architectures import PlanError
from mixerswap.architectures.cache import HybridMixerCache
from mixerswap.architectures.mixers.common import PADDING_MASK_KWARG
from mixerswap.architectures.mixers.gla import GLAMixer, GLASettings, feature_map
from mixerswap.convert import convert

from ..conftest import family_config

HIDDEN = 32


def make_mixer(seed=0, nudge=True, **overrides):
    torch.manual_seed(seed)
    settings = GLASettings(**{"n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "chunk_size": 16, **overrides})
    mixer = GLAMixer(settings, HIDDEN, layer_idx=0)
    mixer.init_parameters(std=0.3)
    if nudge:  # make every new part matter: input-dependent gates, a mixing conv
        with torch.no_grad():
            mixer.gate_proj.weight.normal_(std=0.3)
            mixer.conv1d.weight.normal_(std=0.5)
            if settings.output_gate:
                mixer.out_gate_proj.weight.normal_(std=0.3)
    return mixer.double().eval()


def run(mixer, h, steps, **kwargs):
    cache = HybridMixerCache(family_config("llama"), {0: mixer.new_cache_layer()})
    outs, start = [], 0
    for n in steps:
        position_ids = torch.arange(start, start + n)[None].expand(h.shape[0], -1)
        extra = {key: value[:, : start + n] for key, value in kwargs.items()}
        with torch.no_grad():
            outs.append(mixer(h[:, start : start + n], position_ids=position_ids, past_key_values=cache, **extra)[0])
        start += n
    return torch.cat(outs, 1), cache.mixer_layer(0)


VARIANTS = {
    "default": {},
    "conv1": {"conv": 1},
    "relu-gated": {"feature_map": "relu", "output_gate": True},
    "softmax-unnormalized": {"feature_map": "softmax", "normalize": False},
}


@pytest.mark.parametrize("seqlen", [1, 63, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_parallel_equals_decoding(variant, seqlen):
    mixer = make_mixer(**VARIANTS[variant])
    h = torch.randn(2, seqlen, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(seqlen))
    full, _ = run(mixer, h, [seqlen])
    stepped, layer = run(mixer, h, [1] * seqlen)
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-12)
    third = seqlen // 3
    pieces, _ = run(mixer, h, [third, third, seqlen - 2 * third] if third else [seqlen])
    torch.testing.assert_close(pieces, full, rtol=1e-10, atol=1e-12)
    assert layer.get_seq_length() == seqlen


def test_matrix_form_equals_the_output():
    mixer = make_mixer()
    h = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        matrix = mixer.mixing_matrix(h)
        v = mixer.v_proj(h).view(2, 19, 2, 8).repeat_interleave(2, dim=2)
        y = torch.einsum("bhij,bjhv->bihv", matrix, v).flatten(-2)
        torch.testing.assert_close(mixer.o_proj(y), mixer(h)[0], rtol=1e-8, atol=1e-10)


def test_left_padded_row_equals_row_alone():
    mixer = make_mixer()
    h = torch.randn(2, 30, HIDDEN, dtype=torch.float64)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    batched, _ = run(mixer, h, [12] + [1] * 18, **{PADDING_MASK_KWARG: mask})
    alone, _ = run(mixer, h[1:, 7:], [5] + [1] * 18)
    torch.testing.assert_close(batched[1:, 7:], alone, rtol=1e-10, atol=1e-12)


def test_packed_documents_equal_separate_runs():
    mixer = make_mixer()
    lengths = [7, 1, 20, 5]
    h = torch.randn(1, sum(lengths), HIDDEN, dtype=torch.float64)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = mixer(h, position_ids=position_ids)[0]
        for doc, part in zip(h.split(lengths, 1), packed.split(lengths, 1), strict=True):
            torch.testing.assert_close(part, mixer(doc)[0], rtol=1e-10, atol=1e-12)


def test_state_size_does_not_depend_on_length():
    mixer = make_mixer().float()
    h = torch.randn(2, 200, HIDDEN)
    sizes = {n: run(mixer, h[:, :n], [8] + [1] * (n - 8))[1].nbytes() for n in (20, 200)}
    assert sizes[20] == sizes[200] == 2 * 4 * 8 * 9 * 4 + 2 * (32 + 16) * 3 * 4


def test_identity_conv_starts_at_the_teachers_projections():
    mixer = make_mixer(nudge=False)
    h = torch.randn(2, 11, HIDDEN, dtype=torch.float64)
    qk, *_ = mixer._inputs(h, None)
    q, k, _ = mixer._features(qk, None, None, step=False)
    torch.testing.assert_close(q, feature_map(mixer.q_proj(h).view(2, 11, 4, 8), "elu"))
    torch.testing.assert_close(k, feature_map(mixer.k_proj(h).view(2, 11, 2, 8), "elu"))


@pytest.mark.parametrize("setting, message", [({"conv": 0}, "conv"), ({"feature_map": "cosine"}, "feature_map"),
                                              ({"chunk_size": 0}, "chunk_size")])
def test_bad_settings_are_refused_in_one_line_and_nothing_is_written(setting, message, teacher_dir, tmp_path):
    with pytest.raises(PlanError, match=message) as err:
        convert(teacher_dir("llama"), tmp_path / "out", to="gla", mixer_settings=setting, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
