"""The MLA mixer alone: absorbed decode == expanded prefill, its latent cache (exact bytes, in place,
sliding windows), RoPE frequency selection, padding and packed documents."""

import pytest
import torch

from mixerswap.architectures.cache import HybridMixerCache
from mixerswap.architectures.mixers import MLAMixer, MLASettings
from mixerswap.architectures.mixers.common import PADDING_MASK_KWARG

from ..conftest import family_config

HIDDEN = 32
VARIANTS = {
    # DeepSeek's shape: one shared RoPE key, a no-RoPE part read from the latent, a latent norm
    "deepseek": dict(n_heads=4, kv_rank=12, rope_dim=4, rope_heads=1, nope_dim=6, v_head_dim=8, latent_norm=True),
    # the exact-conversion shape of a GQA teacher: a RoPE key per KV head, no no-RoPE part, q/k norms
    "gqa-exact": dict(n_heads=4, kv_rank=16, rope_dim=8, rope_heads=2, nope_dim=0, v_head_dim=8, q_norm=True,
                      k_norm=True, exact=True),
    # Gemma-2-like: biases, softcap, sliding window, chosen RoPE frequencies of a wider rotary
    "windowed": dict(n_heads=4, kv_rank=10, rope_dim=4, rope_heads=2, nope_dim=4, v_head_dim=6, qkv_bias=True,
                     out_bias=True, softcap=5.0, sliding_window=6, rope_freqs=[3, 0], scaling=0.3),
}
ROTARY = 8  # the width of the test's (cos, sin)


def make_mixer(variant: str, dtype=torch.float64, seed: int = 0) -> MLAMixer:
    torch.manual_seed(seed)
    mixer = MLAMixer(MLASettings(**VARIANTS[variant]), HIDDEN, layer_idx=0)
    mixer.init_parameters(std=0.3)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return mixer.to(dtype).eval()


def rope(position_ids: torch.Tensor, dtype=torch.float64, width: int = ROTARY):
    """``(cos, sin)`` ``[B, T, width]`` in ``transformers``' rotate-half layout."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, width, 2, dtype=torch.float64) / width))
    angles = position_ids[..., None].double() * inv_freq
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def new_cache(mixer: MLAMixer) -> HybridMixerCache:
    return HybridMixerCache(family_config("llama"), {0: mixer.new_cache_layer()})


def call(mixer, h, start=0, cache=None, mask=None, position_ids=None):
    if position_ids is None:
        position_ids = torch.arange(start, start + h.shape[1])[None].expand(h.shape[0], -1)
    kwargs = {} if mask is None else {PADDING_MASK_KWARG: mask}
    with torch.no_grad():
        out, _ = mixer(h, position_ids=position_ids, past_key_values=cache,
                       position_embeddings=rope(position_ids, h.dtype), **kwargs)
    return out


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_absorbed_equals_expanded_fp32(variant):
    """The two compute paths on the same full sequence, and decoding (absorbed) vs the full forward (expanded)."""
    mixer = make_mixer(variant, torch.float32)
    h = torch.randn(2, 23, HIDDEN, generator=torch.Generator().manual_seed(1))
    mixer.path = "expanded"
    expanded = call(mixer, h)
    mixer.path = "absorbed"
    assert rel_err(call(mixer, h), expanded) <= 1e-5
    mixer.path = "auto"  # prefill expanded, then absorbed single-token steps from the latent cache
    cache = new_cache(mixer)
    steps = [call(mixer, h[:, :9], 0, cache)] + [call(mixer, h[:, t : t + 1], t, cache) for t in range(9, 23)]
    assert rel_err(torch.cat(steps, 1), expanded) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_and_decode_equal_full_forward_fp64(variant):
    mixer = make_mixer(variant)
    h = torch.randn(2, 30, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cache, outs, start = new_cache(mixer), [], 0
    for n in [7, 5, 1, 1, 9, 1, 6]:
        outs.append(call(mixer, h[:, start : start + n], start, cache))
        start += n
    torch.testing.assert_close(torch.cat(outs, 1), call(mixer, h), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["deepseek", "windowed"])
def test_cache_holds_latents_only_exact_bytes_in_place(variant):
    """Bytes = (kv_rank + rope_heads * rope_dim) * element size * capacity * batch; decode writes in place."""
    mixer = make_mixer(variant, torch.float32)
    s = mixer.settings
    mixer.settings = s.model_copy(update={"cache_block": 8})
    per_token = (s.kv_rank + s.rope_heads * s.rope_dim) * 4
    assert mixer.cache_bytes_per_token(torch.float32) == per_token
    cache = new_cache(mixer)
    layer = cache.mixer_layer(0)
    h = torch.randn(3, 20, HIDDEN)
    call(mixer, h[:, :5], 0, cache)
    window = mixer.window
    for t in range(5, 20):
        before = {x.untyped_storage().data_ptr() for x in layer.tensors()}
        capacity_before = layer.capacity
        call(mixer, h[:, t : t + 1], t, cache)
        capacity = layer.capacity
        if window is None:
            assert capacity == 8 * -(-(t + 1) // 8)  # blocks of 8 tokens
            assert layer.held == t + 1
        else:
            assert capacity <= window - 1 and layer.held == min(t + 1, window - 1)
        if capacity == capacity_before:
            assert {x.untyped_storage().data_ptr() for x in layer.tensors()} == before
        assert layer.nbytes() == per_token * capacity * 3
        assert layer.latent.shape == (3, capacity, s.kv_rank)
        assert layer.rope_key.shape == (3, capacity, s.rope_heads, s.rope_dim)
    assert cache.get_seq_length() == 20


def test_rope_uses_the_chosen_teacher_frequencies():
    """rope_freqs [3, 0] of an 8-wide rotary: channel pairs (3, 7) and (0, 4) of the teacher's cos/sin."""
    mixer = make_mixer("windowed")
    pos = torch.arange(5)[None]
    cos, sin = rope(pos)
    x = torch.randn(1, 5, 2, 4, dtype=torch.float64)
    got = mixer._rope(x, (cos, sin))
    full = torch.zeros(1, 5, 2, ROTARY, dtype=torch.float64)
    full[..., [3, 0, 7, 4]] = x
    want = full * cos[:, :, None] + torch.cat([-full[..., 4:], full[..., :4]], -1) * sin[:, :, None]
    torch.testing.assert_close(got, want[..., [3, 0, 7, 4]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_and_packed_documents(variant):
    mixer = make_mixer(variant)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(n, HIDDEN, dtype=torch.float64, generator=gen) for n in (9, 4)]
    h = torch.zeros(2, 9, HIDDEN, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        h[i, 9 - len(r) :], mask[i, 9 - len(r) :] = r, 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    padded = call(mixer, h, mask=mask, position_ids=position_ids)
    assert torch.isfinite(padded).all()  # padding queries see nothing, yet give no NaN
    for i, r in enumerate(rows):
        torch.testing.assert_close(padded[i, 9 - len(r) :], call(mixer, r[None])[0])
    docs = [torch.randn(n, HIDDEN, dtype=torch.float64, generator=gen) for n in (5, 1, 8)]
    packed_pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    packed = call(mixer, torch.cat(docs)[None], position_ids=packed_pos)[0]
    for doc, part in zip(docs, packed.split([len(d) for d in docs]), strict=True):
        torch.testing.assert_close(part, call(mixer, doc[None])[0])


def test_sliding_window_applies_only_on_sliding_layers():
    settings = MLASettings(**{**VARIANTS["windowed"], "sliding_layers": [1]})
    assert MLAMixer(settings, HIDDEN, layer_idx=0).window is None
    assert MLAMixer(settings, HIDDEN, layer_idx=1).window == 6


@pytest.mark.parametrize("update, message", [
    ({"rope_dim": 3}, "rope_dim must be even"),
    ({"rope_heads": 3}, "multiple of rope_heads"),
    ({"rope_freqs": [1]}, "rope_freqs has 1 entries"),
])
def test_bad_settings_are_refused(update, message):
    with pytest.raises(ValueError, match=message):
        MLASettings(**{**VARIANTS["windowed"], **update})


def test_mixing_matrix_is_the_attention_probabilities():
    mixer = make_mixer("deepseek")
    h = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    pos = torch.arange(7)[None].expand(2, -1)
    probs = mixer.mixing_matrix(h, position_ids=pos, position_embeddings=rope(pos))
    assert probs.shape == (2, 4, 7, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))
    assert (probs.triu(1) == 0).all()
