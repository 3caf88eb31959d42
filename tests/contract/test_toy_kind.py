"""The toy ``meanpool`` kind is what it says, converts as it says, and runs in the speed bench."""

import torch

from mixerswap.architectures.mixers import registered_kinds
from mixerswap.architectures.mixers.common import PADDING_MASK_KWARG
from mixerswap.evals.speed import bench

from .conftest import KINDS, random_ids
from .toy_kind import MeanPoolMixer


def test_every_test_runs_on_the_built_in_kinds_and_the_toy_kind():
    assert {"mamba2", "meanpool"} <= set(KINDS) == set(registered_kinds())


def naive_meanpool(mixer: MeanPoolMixer, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``out_t = W_o mean_{s <= t, keep[s, t]} W_v h_s`` with an explicit ``[B, T, T]`` averaging matrix."""
    T = h.shape[1]
    weights = keep & torch.ones(T, T, dtype=torch.bool).tril()
    weights = weights.to(h.dtype) / weights.sum(-1, keepdim=True).clamp_min(1)
    return mixer.out_proj(weights @ mixer.v_proj(h))


def test_meanpool_is_causal_mean_pooling_per_document_without_padding(student):
    mixer = student("llama", "meanpool", "all-replaced").layer_mixer(0)
    h = torch.randn(2, 12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        causal = naive_meanpool(mixer, h, torch.ones(2, 12, 12, dtype=torch.bool))
        torch.testing.assert_close(mixer(h)[0], causal)

        position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)
        doc = torch.cat([torch.zeros(5), torch.ones(7)])
        same_doc = (doc[:, None] == doc[None, :]).expand(2, -1, -1)
        torch.testing.assert_close(mixer(h, position_ids=position_ids)[0], naive_meanpool(mixer, h, same_doc))

        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :4] = 0
        padded, _ = mixer(h, **{PADDING_MASK_KWARG: mask})
        real = mask.bool()[:, None, :].expand(-1, 12, -1)
        torch.testing.assert_close(padded[1, 4:], naive_meanpool(mixer, h, real)[1, 4:])


def test_meanpool_converter_is_uniform_attention(student, teacher):
    """Layer 0 of the converted student equals the teacher's layer-0 attention with every score zeroed:
    ``W_o`` applied to the mean of the value heads, each shared by its group of query heads."""
    mixer = student("llama", "meanpool", "all-replaced").layer_mixer(0)
    attn = teacher("llama").model.layers[0].self_attn
    heads, kv_heads, head_dim = 4, 2, 8
    h = torch.randn(1, 10, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = (h @ attn.v_proj.weight.double().T).view(1, 10, kv_heads, head_dim)
        v = v.repeat_interleave(heads // kv_heads, dim=2).flatten(2)
        uniform = torch.ones(10, 10, dtype=torch.float64).tril()
        want = (uniform / uniform.sum(-1, keepdim=True)) @ v @ attn.o_proj.weight.double().T
        torch.testing.assert_close(mixer(h)[0], want)


def test_meanpool_student_benches(student):
    model = student("llama", "meanpool", "all-replaced", torch.float32)
    report = bench({"meanpool": model}, contexts=[16], batches=[1], decode_tokens=2)
    (run,) = report.runs
    assert run.status == "ok" and run.decode_tokens_per_s > 0
    with torch.no_grad():
        cache = model(random_ids(1, 16)).past_key_values
    assert run.cache_bytes == cache.nbytes() > 0  # a running sum and a count per layer, whatever the length
