"""The Mamba-2 mixer: parallel path == recurrent path, padding and packed documents stay invisible."""

import pytest
import torch

from mixerswap.architectures.cache import HybridMixerCache
from mixerswap.architectures.mixers.common import PADDING_MASK_KWARG
from mixerswap.architectures.mixers.mamba2 import Mamba2Mixer, Mamba2Settings

from ..conftest import family_config

HIDDEN = 32


def make_mixer(chunk_size=8, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = Mamba2Settings(n_heads=4, n_groups=2, head_dim=8, d_state=8, chunk_size=chunk_size, **overrides)
    mixer = Mamba2Mixer(settings, HIDDEN, layer_idx=0)
    mixer.init_parameters(std=0.2)
    with torch.no_grad():  # make every path matter: nonzero D, input-dependent dt and gate, random conv
        mixer.D.normal_()
        mixer.dt_proj.weight.normal_(std=0.3)
        if hasattr(mixer, "z_proj"):
            mixer.z_proj.weight.normal_(std=0.3)
        mixer.conv1d.weight.normal_(std=0.5)
    return mixer.double().eval()


def fresh_cache(mixer):
    return HybridMixerCache(family_config("llama"), {0: mixer.new_cache_layer()})


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seqlen", [1, 63, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk_size", [8, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("bc_norm", [False, True], ids=["plain", "bc_norm"])
def test_parallel_equals_token_by_token(seqlen, chunk_size, bc_norm):
    mixer = make_mixer(chunk_size, bc_norm=bc_norm).float()
    h = torch.randn(2, seqlen, HIDDEN)
    with torch.no_grad():
        full, _ = mixer(h)
        cache = fresh_cache(mixer)
        steps = [mixer(h[:, t : t + 1], past_key_values=cache)[0] for t in range(seqlen)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-4


@pytest.mark.parametrize("split", [1, 7, 8, 9, 30])
def test_prefill_then_decode_and_chunked_prefill(split):
    mixer = make_mixer(chunk_size=8)
    h = torch.randn(1, 31, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        full, _ = mixer(h)
        cache = fresh_cache(mixer)
        first, _ = mixer(h[:, :split], past_key_values=cache)
        rest, _ = mixer(h[:, split:], past_key_values=cache)  # multi-token continuation from cached states
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    assert cache.get_seq_length() == 31


def test_left_padding_is_invisible():
    mixer = make_mixer()
    h = torch.randn(1, 13, HIDDEN, dtype=torch.float64)
    pad = torch.randn(1, 5, HIDDEN, dtype=torch.float64) * 10
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 13)], 1).long()
    with torch.no_grad():
        alone, _ = mixer(h)
        padded, _ = mixer(torch.cat([pad, h], 1), **{PADDING_MASK_KWARG: mask})
        # the states after the padded prompt continue exactly like the unpadded ones
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
    mixer = make_mixer()
    h = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    out, _ = mixer(h)
    out.square().sum().backward()
    for name, param in mixer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_cache_spec_matches_stored_states():
    mixer = make_mixer().float()
    cache = fresh_cache(mixer)
    with torch.no_grad():
        mixer(torch.randn(3, 10, HIDDEN), past_key_values=cache)
    spec = mixer.cache_spec(3, torch.float32)
    assert cache.mixer_layer(0).nbytes() == spec["conv"] + spec["ssm"]


def test_wrong_cache_type_is_a_clear_error():
    from transformers import DynamicCache

    mixer = make_mixer().float()
    with pytest.raises(TypeError, match="HybridMixerCache"):
        mixer(torch.randn(1, 3, HIDDEN), past_key_values=DynamicCache())


def test_settings_validation():
    with pytest.raises(ValueError, match="multiple of n_groups"):
        Mamba2Settings(n_heads=4, n_groups=3, head_dim=8, d_state=8)


def test_mixing_matrix_reproduces_the_scan():
    """y = M x + D x with M from mixing_matrix, for plain (ungated, unnormalized) output."""
    mixer = make_mixer(norm="none", conv_activation="identity")
    h = torch.randn(2, 13, HIDDEN, dtype=torch.float64)
    position_ids = torch.cat([torch.arange(6), torch.arange(7)])[None].expand(2, -1)
    with torch.no_grad():
        M = mixer.mixing_matrix(h, position_ids=position_ids)
        xbc = torch.cat([mixer.x_proj(h), mixer.b_proj(h), mixer.c_proj(h)], -1)
        from mixerswap.kernels import causal_conv1d

        seq_idx = torch.tensor([[0] * 6 + [1] * 7]).expand(2, -1)
        xbc, _ = causal_conv1d(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, seq_idx=seq_idx)
        x = xbc[..., : mixer.x_dim].view(2, 13, 2, 8).repeat_interleave(2, dim=2)  # [b, t, h, p]
        y_matrix = torch.einsum("bhij,bjhp->bihp", M, x) + mixer.D.view(4, 1) * x
        y_module, _ = mixer(h, position_ids=position_ids)
        y_module = y_module @ torch.linalg.pinv(mixer.out_proj.weight).T  # undo out_proj (full column rank)
    torch.testing.assert_close(y_matrix.reshape(2, 13, -1), y_module)
