"""Gated delta rule: the chunked WY/UT form equals the per-token loop; closed forms; in-place steps."""

import inspect

import pytest
import torch

from mixerswap.kernels import (
    delta_rule_chunk,
    delta_rule_chunk_ref,
    delta_rule_recurrent_ref,
    delta_rule_step,
    delta_rule_step_ref,
    resolve,
)

HEADS, DK, DV = 3, 5, 4


def make_inputs(batch, seqlen, seed=0, dtype=torch.float64):
    """q, k (L2-normalized, as the mixer feeds them), v, log decays g <= 0 and beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, HEADS, DK, generator=gen, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(batch, seqlen, HEADS, DK, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(batch, seqlen, HEADS, DV, generator=gen, dtype=dtype)
    g = -torch.rand(batch, seqlen, HEADS, generator=gen, dtype=dtype) * 0.5
    beta = torch.rand(batch, seqlen, HEADS, generator=gen, dtype=dtype)
    return q, k, v, g, beta


def documents(batch, lengths) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None].expand(batch, -1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("seqlen", [1, 63, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk_size", [7, 13, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("with_docs", [False, True], ids=["one-doc", "packed"])
def test_chunked_equals_token_loop_fp64(seqlen, chunk_size, with_docs):
    q, k, v, g, beta = make_inputs(2, seqlen)
    init = torch.randn(2, HEADS, DK, DV, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    seq_idx = None
    if with_docs:  # boundaries inside chunks and on them, and a one-token document
        cuts = [n for n in (chunk_size, 1, 30) if n < seqlen]
        seq_idx = documents(2, cuts + [seqlen - sum(cuts)]) if cuts else documents(2, [seqlen])
    o, state = delta_rule_chunk(q, k, v, g, beta, chunk_size=chunk_size, initial_state=init, seq_idx=seq_idx)
    o_ref, state_ref = delta_rule_recurrent_ref(q, k, v, g, beta, initial_state=init, seq_idx=seq_idx)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=1e-10)
    assert state.dtype == torch.float64 and state.shape == (2, HEADS, DK, DV)


@pytest.mark.parametrize("seqlen", [63, 257], ids=lambda t: f"T{t}")
def test_chunked_equals_token_loop_fp32(seqlen):
    q, k, v, g, beta = make_inputs(2, seqlen, dtype=torch.float32)
    o, state = delta_rule_chunk(q, k, v, g, beta, chunk_size=64)
    o_ref, state_ref = delta_rule_recurrent_ref(q, k, v, g, beta)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(state, state_ref) <= 1e-5
    assert o.dtype == torch.float32 and state.dtype == torch.float32


def test_packed_documents_equal_separate_runs():
    lengths = [5, 17, 1, 30]
    q, k, v, g, beta = make_inputs(1, sum(lengths))
    o, state = delta_rule_chunk(q, k, v, g, beta, chunk_size=8, seq_idx=documents(1, lengths))
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        o_doc, s_doc = delta_rule_chunk(q[:, part], k[:, part], v[:, part], g[:, part], beta[:, part], chunk_size=8)
        torch.testing.assert_close(o[:, part], o_doc)
        start += n
    torch.testing.assert_close(state, s_doc)


def test_split_sequence_continues_from_state():
    q, k, v, g, beta = make_inputs(1, 50)
    o, state = delta_rule_chunk(q, k, v, g, beta, chunk_size=16)
    o1, s1 = delta_rule_chunk(q[:, :23], k[:, :23], v[:, :23], g[:, :23], beta[:, :23], chunk_size=16)
    o2, s2 = delta_rule_chunk(q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], beta[:, 23:], chunk_size=16,
                              initial_state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(s2, state)


@pytest.mark.parametrize("decay", [False, True], ids=["alpha1", "decaying"])
def test_zero_beta_writes_nothing(decay):
    """beta = 0: the state only decays, so with alpha = 1 it stays the initial state."""
    q, k, v, g, beta = make_inputs(2, 20)
    g = g if decay else torch.zeros_like(g)
    init = torch.randn(2, HEADS, DK, DV, dtype=torch.float64)
    o, state = delta_rule_chunk(q, k, v, g, torch.zeros_like(beta), chunk_size=8, initial_state=init)
    total = torch.exp(g.sum(1))[..., None, None]  # [b, h, 1, 1]
    torch.testing.assert_close(state, init * total, rtol=0, atol=1e-12)
    if not decay:
        torch.testing.assert_close(state, init, rtol=0, atol=0)
        torch.testing.assert_close(o, torch.einsum("bhkv,bthk->bthv", init, q) * DK**-0.5)


def test_padding_tokens_change_nothing():
    """g = beta = 0 (what the mixer feeds at padding): the state is as if those tokens were absent."""
    q, k, v, g, beta = make_inputs(1, 20)
    g_pad, beta_pad = g.clone(), beta.clone()
    g_pad[:, :7], beta_pad[:, :7] = 0, 0
    _, s_pad = delta_rule_chunk(q, k, v, g_pad, beta_pad, chunk_size=8)
    _, s_cut = delta_rule_chunk(q[:, 7:], k[:, 7:], v[:, 7:], g[:, 7:], beta[:, 7:], chunk_size=8)
    torch.testing.assert_close(s_pad, s_cut)


def test_one_token_without_decay_is_the_closed_form():
    """alpha = 1, one token: S_1 = (I - beta k k^T) S_0 + beta k v^T and o = scale S_1^T q."""
    q, k, v, g, beta = make_inputs(2, 1)
    init = torch.randn(2, HEADS, DK, DV, dtype=torch.float64)
    o, state = delta_rule_chunk(q, k, v, torch.zeros_like(g), beta, initial_state=init, scale=0.7)
    b, kt, vt, qt = beta[:, 0, :, None, None], k[:, 0], v[:, 0], q[:, 0]
    eye = torch.eye(DK, dtype=torch.float64)
    want = (eye - b * kt[..., :, None] * kt[..., None, :]) @ init + b * kt[..., :, None] * vt[..., None, :]
    torch.testing.assert_close(state, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(o[:, 0], 0.7 * torch.einsum("bhkv,bhk->bhv", want, qt), rtol=0, atol=1e-12)
    # from a zero state it is linear attention with one key: o = scale beta (q . k) v
    o0, _ = delta_rule_chunk(q, k, v, torch.zeros_like(g), beta, scale=0.7)
    torch.testing.assert_close(o0[:, 0], 0.7 * (beta[:, 0] * (qt * kt).sum(-1))[..., None] * vt)


def test_full_write_of_a_unit_key_replaces_its_value():
    """beta = 1 and ||k|| = 1: reading the state at k right after writing returns exactly v."""
    q, k, v, g, beta = make_inputs(1, 2)
    init = torch.randn(1, HEADS, DK, DV, dtype=torch.float64)
    _, state = delta_rule_chunk(q, k, v, g, torch.ones_like(beta), initial_state=init)
    torch.testing.assert_close(torch.einsum("bhkv,bhk->bhv", state, k[:, -1]), v[:, -1])


@pytest.mark.parametrize("step", [delta_rule_step_ref, delta_rule_step], ids=["reference", "dispatched"])
def test_step_updates_state_in_place_and_matches_the_loop(step):
    q, k, v, g, beta = make_inputs(2, 6, dtype=torch.float32)
    state = torch.randn(2, HEADS, DK, DV)
    init, ptr = state.clone(), state.data_ptr()
    outs = []
    for t in range(6):
        o, out = step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        assert out is state and state.data_ptr() == ptr
        outs.append(o)
    o_ref, state_ref = delta_rule_recurrent_ref(q, k, v, g, beta, initial_state=init)
    torch.testing.assert_close(torch.stack(outs, 1), o_ref)
    torch.testing.assert_close(state, state_ref)


def test_full_sequence_ops_leave_initial_state_alone():
    q, k, v, g, beta = make_inputs(1, 9)
    init = torch.randn(1, HEADS, DK, DV, dtype=torch.float64)
    before = init.clone()
    delta_rule_chunk(q, k, v, g, beta, chunk_size=4, initial_state=init)
    delta_rule_recurrent_ref(q, k, v, g, beta, initial_state=init)
    torch.testing.assert_close(init, before, rtol=0, atol=0)


def test_gradients_are_finite_and_match_the_loop():
    inputs = [*make_inputs(1, 19, seed=3), torch.randn(1, HEADS, DK, DV, dtype=torch.float64)]
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    o, s = delta_rule_chunk(*leaves[:5], chunk_size=8, initial_state=leaves[5], seq_idx=documents(1, [11, 8]))
    (o.square().sum() + s.sum()).backward()
    leaves_ref = [t.clone().requires_grad_(True) for t in inputs]
    o_r, s_r = delta_rule_recurrent_ref(*leaves_ref[:5], initial_state=leaves_ref[5], seq_idx=documents(1, [11, 8]))
    (o_r.square().sum() + s_r.sum()).backward()
    for got, want in zip((t.grad for t in leaves), (t.grad for t in leaves_ref), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


def test_gradients_are_finite_in_fp32_over_long_chunks():
    """Strong writes and slow decay over 64-token chunks, the worst case for the triangular solve."""
    q, k, v, g, beta = make_inputs(2, 200, dtype=torch.float32)
    leaves = [t.requires_grad_(True) for t in (q, k, v, g * 0.01, torch.ones_like(beta) * 0.99)]
    o, s = delta_rule_chunk(*leaves, chunk_size=64)
    (o.square().mean() + s.square().mean()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.isfinite(o).all() and s.abs().max() < 1e3


def test_state_size_is_independent_of_sequence_length():
    shapes = {delta_rule_chunk(*make_inputs(1, n), chunk_size=16)[1].shape for n in (10, 300)}
    assert shapes == {torch.Size([1, HEADS, DK, DV])}


def test_fp32_accumulation_holds_under_bf16_autocast():
    q, k, v, g, beta = make_inputs(2, 100, dtype=torch.float32)
    o, state = delta_rule_chunk(q, k, v, g, beta, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_auto, state_auto = delta_rule_chunk(q, k, v, g, beta, chunk_size=16)
    assert o_auto.dtype == torch.float32
    assert rel_err(o_auto, o) <= 1e-5 and rel_err(state_auto, state) <= 1e-5


def test_dispatch_picks_the_reference_on_cpu():
    q, k, v, g, beta = make_inputs(1, 3, dtype=torch.float32)
    assert resolve("delta_rule_chunk", q, k, v, g, beta)[0] == "torch"
    assert resolve("delta_rule_step", torch.zeros(1, HEADS, DK, DV), q[:, 0], k[:, 0], v[:, 0], g[:, 0],
                   beta[:, 0])[0] == "torch"
    assert delta_rule_chunk.__signature__ == inspect.signature(delta_rule_chunk_ref)


def test_shape_errors_are_clear():
    q, k, v, g, beta = make_inputs(1, 4)
    with pytest.raises(ValueError, match=r"g and beta must be \[B, T, H\]"):
        delta_rule_chunk(q, k, v, g[..., :2], beta)
    with pytest.raises(ValueError, match="k must be shaped like q"):
        delta_rule_chunk(q, k[..., :3], v, g, beta)
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_chunk(q, k, v, g, beta, chunk_size=0)
