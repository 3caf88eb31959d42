"""Every kind's mixer alone: the full-sequence forward equals decoding through its own cache layer.

The mixer is taken from a converted student (so its weights come from its converter) and every
parameter is nudged, so that parts a conversion starts at zero or identity (gates, skips, convs)
matter too. The mixer is called as the teacher's decoder layer calls its attention: with
``position_ids`` and the teacher's RoPE ``position_embeddings``.
"""

import pytest
import torch

from mixerswap.architectures.cache import HybridMixerCache

from .conftest import FAMILIES, KINDS, tunable

BATCH = 2


def kind_settings() -> list:
    """``(kind, settings overrides)``: odd and even chunk sizes for kinds that scan in chunks."""
    cases = []
    for kind in KINDS:
        if "chunk_size" in tunable(kind):
            cases += [pytest.param(kind, {"chunk_size": c}, id=f"{kind}-chunk{c}") for c in (7, 64)]
        else:
            cases.append(pytest.param(kind, {}, id=kind))
    return cases


def mixer_under_test(model, settings: dict, dtype: torch.dtype, seed: int = 0):
    """A copy of layer 0's mixer with ``settings`` changed and every parameter nudged."""
    source = model.layer_mixer(0)
    cls = type(source)
    mixer = cls(cls.Settings(**{**source.settings.model_dump(), **settings}), source.hidden_size, source.layer_idx)
    mixer.load_state_dict(source.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return mixer.to(dtype).eval()


class Caller:
    """Calls a mixer like a decoder layer calls its attention, positions counted from the start."""

    def __init__(self, model, mixer):
        self.model, self.mixer = model, mixer
        self.rotary = model.model.rotary_emb

    def new_cache(self) -> HybridMixerCache:
        return HybridMixerCache(self.model.config.teacher_config, {self.mixer.layer_idx: self.mixer.new_cache_layer()})

    def __call__(self, h: torch.Tensor, start: int = 0, cache=None, rope=None) -> torch.Tensor:
        position_ids = torch.arange(start, start + h.shape[1])[None].expand(h.shape[0], -1)
        rope = self.rotary(h, position_ids) if rope is None else rope
        with torch.no_grad():
            out, _ = self.mixer(h, attention_mask=None, position_ids=position_ids, past_key_values=cache,
                                position_embeddings=rope)
        return out

    def in_steps(self, h: torch.Tensor, steps: list[int]) -> tuple[torch.Tensor, HybridMixerCache]:
        """Runs ``h`` through a fresh cache in pieces of ``steps`` tokens (1 = a decode step)."""
        cos, sin = self.rotary(h, torch.arange(h.shape[1])[None].expand(h.shape[0], -1))
        cache, outs, start = self.new_cache(), [], 0
        for n in steps:
            piece = slice(start, start + n)
            outs.append(self(h[:, piece], start, cache, rope=(cos[:, piece], sin[:, piece])))
            start += n
        return torch.cat(outs, 1), cache


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("seqlen", [1, 63, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("kind, settings", kind_settings())
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_equals_token_by_token_fp32(family, kind, settings, seqlen, student):
    model = student(family, kind, "all-replaced", torch.float32)
    call = Caller(model, mixer_under_test(model, settings, torch.float32))
    h = torch.randn(BATCH, seqlen, model.config.hidden_size, generator=torch.Generator().manual_seed(seqlen))
    full = call(h)
    stepped, cache = call.in_steps(h, [1] * seqlen)
    assert rel_err(stepped, full) <= 1e-4
    assert cache.get_seq_length() == seqlen


SCHEDULES = {
    "prefill40-decode23": [40] + [1] * 23,
    "prefill20-prefill25-decode18": [20, 25] + [1] * 18,  # a multi-token continuation, as chunked prefill does
}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind, settings", kind_settings())
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_equals_full_forward_fp64(family, kind, settings, schedule, student):
    model = student(family, kind, "all-replaced", torch.float32)
    call = Caller(model, mixer_under_test(model, settings, torch.float64))
    h = torch.randn(BATCH, 63, model.config.hidden_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    stepped, cache = call.in_steps(h, SCHEDULES[schedule])
    torch.testing.assert_close(stepped, call(h), rtol=1e-10, atol=1e-12)
    assert cache.get_seq_length() == 63
