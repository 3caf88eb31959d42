"""gla_chunk (the chunked reference) against the token-by-token recurrence, forward and backward, in fp64."""

import pytest
import torch

from mixerswap import kernels
from mixerswap.kernels.gla.naive import gla_chunk_ref, gla_recurrent_ref, gla_step_ref

B, H, K, V = 2, 3, 8, 5


def inputs(seqlen, seed=0, padding=False):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, seqlen, H, K, dtype=torch.float64, generator=gen) for _ in range(2))
    v = torch.randn(B, seqlen, H, V, dtype=torch.float64, generator=gen)
    # strong and weak decays: exp(g) from ~0.007 to ~1
    g = -torch.rand(B, seqlen, H, dtype=torch.float64, generator=gen) * 5 * torch.rand(H, dtype=torch.float64, generator=gen)
    if padding:
        real = torch.rand(B, seqlen, generator=gen) > 0.3
        k, g = k * real[..., None, None], g * real[..., None]
    return q, k, v, g


def packed_ids(seqlen):
    ids = torch.zeros(B, seqlen, dtype=torch.long)
    for cut in (seqlen // 3, seqlen // 3 + 1, 2 * seqlen // 3):  # includes a one-token document
        ids[:, cut:] += 1
    ids[1] = 0  # the second row is one document
    return ids


LENGTHS = [1, 15, 16, 17, 63, 64, 65, 257]


@pytest.mark.parametrize("seqlen", LENGTHS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"chunk{c}")
def test_chunked_equals_recurrent(seqlen, chunk_size):
    q, k, v, g = inputs(seqlen)
    init = torch.randn(B, H, K, V, dtype=torch.float64)
    out, final = gla_chunk_ref(q, k, v, g, chunk_size=chunk_size, initial_state=init)
    want, want_final = gla_recurrent_ref(q, k, v, g, initial_state=init)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, want_final, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seqlen", [17, 63, 257], ids=lambda t: f"T{t}")
def test_documents_and_padding_do_not_leak(seqlen):
    q, k, v, g = inputs(seqlen, padding=True)
    seq_idx = packed_ids(seqlen)
    out, final = gla_chunk_ref(q, k, v, g, chunk_size=16, seq_idx=seq_idx, scale=0.7)
    want, want_final = gla_recurrent_ref(q, k, v, g, seq_idx=seq_idx, scale=0.7)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, want_final, rtol=1e-10, atol=1e-10)
    last = seq_idx[0] == seq_idx[0, -1]
    alone, alone_final = gla_chunk_ref(*(t[:1, last] for t in (q, k, v, g)), chunk_size=16, scale=0.7)
    torch.testing.assert_close(out[:1, last], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final[:1], alone_final, rtol=1e-10, atol=1e-10)


def test_gradients_match_the_recurrence():
    q, k, v, g = (t.requires_grad_() for t in inputs(37))
    out, final = gla_chunk_ref(q, k, v, g, chunk_size=16)
    grads = torch.autograd.grad((out.sin().sum() + final.cos().sum()), (q, k, v, g))
    out, final = gla_recurrent_ref(q, k, v, g)
    want = torch.autograd.grad((out.sin().sum() + final.cos().sum()), (q, k, v, g))
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_step_updates_the_state_in_place_and_dispatch_reaches_the_reference():
    q, k, v, g = inputs(1)
    state = torch.randn(B, H, K, V, dtype=torch.float64)
    expected, _ = gla_recurrent_ref(q, k, v, g, initial_state=state)
    pointer = state.data_ptr()
    out, returned = kernels.gla_step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0])
    assert returned is state and state.data_ptr() == pointer
    torch.testing.assert_close(out, expected[:, 0])
    assert kernels.resolve("gla_chunk", q, k, v, g)[0] == "torch"
    assert kernels.resolve("gla_step", state, q[:, 0], k[:, 0], v[:, 0], g[:, 0])[0] == "torch"
    assert gla_step_ref.__doc__ and "[B, H, K, V]" in gla_chunk_ref.__doc__


def test_fp32_inputs_keep_an_fp32_state():
    q, k, v, g = (t.float() for t in inputs(20))
    out, final = gla_chunk_ref(q, k, v, g, chunk_size=8)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    want, _ = gla_recurrent_ref(*(t.double() for t in (q, k, v, g)))
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
