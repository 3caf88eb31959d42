"""The third-party adapters' argument plumbing, run on CPU against fakes of the packages' functions.

The fakes check the layout and dtype rules the real kernels enforce (from their sources) and compute
with our references, so these tests say the adapters translate our contract correctly; whether the
real kernels then agree with the references needs a GPU with mamba-ssm / causal-conv1d / fla installed.
"""

import pytest
import torch

from mixerswap.kernels.conv1d import causal_conv1d_adapter
from mixerswap.kernels.conv1d.naive import causal_conv1d_ref
from mixerswap.kernels.delta_rule import fla_adapter as delta_fla
from mixerswap.kernels.delta_rule.naive import delta_rule_chunk_ref
from mixerswap.kernels.dispatch import Call
from mixerswap.kernels.gla import fla_adapter as gla_fla
from mixerswap.kernels.gla.naive import gla_chunk_ref
from mixerswap.kernels.ssd import mamba_ssm_adapter
from mixerswap.kernels.ssd.naive import ssd_chunk_scan_ref
from mixerswap.kernels.varlen import pack

from .test_ssd import make_inputs, rel_err


def fake_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                   seq_idx=None, dt_softplus=False, return_final_states=False):
    """mamba-ssm's contract: ``x`` ``[B, T, H, P]``, ``B`` and ``C`` ``[B, T, ngroups, N]`` of one shape."""
    assert x.shape[2] == C.shape[2] and B.shape == C.shape
    assert seq_idx is None or seq_idx.dtype == torch.int32
    assert z is None and dt_bias is None and not dt_softplus
    # With as many groups as heads, our reference computes exactly what mamba-ssm does.
    y, final = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=initial_states,
                                  seq_idx=seq_idx)
    return (y, final.to(x.dtype)) if return_final_states else y


def fake_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                          final_states_out=None, activation=None):
    """causal-conv1d's checks for the channel-last path (``csrc/causal_conv1d.cpp``), computed by our reference."""
    dim, width = weight.shape
    assert x.stride(1) == 1 and dim % 8 == 0 and 2 <= width <= 4 and activation in (None, "silu", "swish")
    assert bias is None or bias.dtype == weight.dtype
    assert seq_idx is None or (seq_idx.dtype == torch.int32 and initial_states is None)
    assert initial_states is None or (initial_states.dtype == x.dtype and initial_states.stride(1) == 1)
    y, _ = causal_conv1d_ref(x.transpose(1, 2), weight, bias, initial_state=initial_states,
                             seq_idx=None if seq_idx is None else seq_idx.long(), activation=activation)
    return y.transpose(1, 2)


def test_supports_cuda_only():
    for adapter in (mamba_ssm_adapter, causal_conv1d_adapter, gla_fla, delta_fla):
        assert adapter.supports(Call("op", "cuda", torch.bfloat16, needs_grad=True))
        assert not adapter.supports(Call("op", "cpu", torch.float32, needs_grad=False))
        assert not adapter.supports(Call("op", "cuda", torch.float64, needs_grad=False))


@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_mamba_ssm_adapter_repeats_grouped_x_and_b_per_head(monkeypatch, packed):
    monkeypatch.setattr(mamba_ssm_adapter, "mamba_chunk_scan_combined", fake_mamba_chunk_scan_combined)
    x, dt, A, B, C, D = make_inputs(2, 37, dtype=torch.float32)
    init = torch.randn(2, 6, 5, 4)
    seq_idx = torch.tensor([[0] * 20 + [1] * 17] * 2) if packed else None
    got = mamba_ssm_adapter.ssd_chunk_scan_mamba_ssm(x, dt, A, B, C, chunk_size=16, D=D, initial_state=init,
                                                      seq_idx=seq_idx)
    want = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=16, D=D, initial_state=init, seq_idx=seq_idx)
    assert got[1].dtype == torch.float32
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize("case", ["plain", "initial-state", "packed", "fallback-width", "fallback-both"])
def test_causal_conv1d_adapter_matches_reference(monkeypatch, case):
    monkeypatch.setattr(causal_conv1d_adapter, "causal_conv1d_fn", fake_causal_conv1d_fn)
    g = torch.Generator().manual_seed(0)
    width = 5 if case == "fallback-width" else 4
    x = torch.randn(2, 11, 16, generator=g)
    weight, bias = torch.randn(16, width, generator=g), torch.randn(16, generator=g)
    init = torch.randn(2, 16, width - 1, generator=g) if case in ("initial-state", "fallback-both") else None
    seq_idx = torch.tensor([[0] * 6 + [1] * 5] * 2) if case in ("packed", "fallback-both") else None
    kwargs = dict(initial_state=init, seq_idx=seq_idx, activation="silu")
    got = causal_conv1d_adapter.causal_conv1d_dao(x, weight, bias, **kwargs)
    want = causal_conv1d_ref(x, weight, bias, **kwargs)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_)


def _fake_varlen(reference):
    """fla's contract for a chunked op: ``[B, T, H, ...]`` inputs, or one row with ``cu_seqlens`` and one
    initial/final state per sequence; computed sequence by sequence with our reference."""
    def fake(*tensors, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        q, v = tensors[0], tensors[2]
        assert all(t.dtype == v.dtype for t in tensors[:3]) and tensors[3].dtype == torch.float32
        assert initial_state is None or initial_state.dtype == torch.float32
        if cu_seqlens is None:
            o, final = reference(*tensors, scale=scale, initial_state=initial_state)
            return o, final if output_final_state else None
        assert q.shape[0] == 1 and cu_seqlens.dtype == torch.int64 and cu_seqlens[-1] == q.shape[1]
        assert initial_state is None or initial_state.shape[0] == cu_seqlens.numel() - 1
        outs, finals = [], []
        for n, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            o, final = reference(*(t[:, a:b] for t in tensors), scale=scale,
                                 initial_state=None if initial_state is None else initial_state[n:n + 1])
            outs.append(o)
            finals.append(final)
        return torch.cat(outs, 1), torch.cat(finals) if output_final_state else None
    return fake


@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("op", ["gla_chunk", "delta_rule_chunk"])
def test_fla_adapters_pack_documents_as_variable_length_sequences(monkeypatch, op, packed):
    g = torch.Generator().manual_seed(0)
    batch, seqlen, heads, dk, dv = 3, 29, 2, 8, 4
    q, k = torch.randn(batch, seqlen, heads, dk, generator=g), torch.randn(batch, seqlen, heads, dk, generator=g)
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(batch, seqlen, heads, dv, generator=g)
    decay = torch.nn.functional.logsigmoid(torch.randn(batch, seqlen, heads, generator=g) + 3)
    init = torch.randn(batch, heads, dk, dv, generator=g)
    # rows with one, two and three documents; the last row's first document is a single token
    seq_idx = torch.tensor([[0] * 29, [0] * 10 + [1] * 19, [4] + [5] * 20 + [6] * 8]) if packed else None
    if op == "gla_chunk":
        monkeypatch.setattr(gla_fla, "chunk_simple_gla", _fake_varlen(gla_chunk_ref))
        got = gla_fla.gla_chunk_fla(q, k, v, decay, scale=0.3, initial_state=init, seq_idx=seq_idx)
        want = gla_chunk_ref(q, k, v, decay, scale=0.3, initial_state=init, seq_idx=seq_idx)
    else:
        beta = torch.rand(batch, seqlen, heads, generator=g)
        monkeypatch.setattr(delta_fla, "chunk_gated_delta_rule", _fake_varlen(delta_rule_chunk_ref))
        got = delta_fla.delta_rule_chunk_fla(q, k, v, decay, beta, scale=0.3, initial_state=init, seq_idx=seq_idx)
        want = delta_rule_chunk_ref(q, k, v, decay, beta, scale=0.3, initial_state=init, seq_idx=seq_idx)
    assert got[0].shape == v.shape and got[1].dtype == torch.float32
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


def test_packing_of_document_ids():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 2, 2], [0, 1, 2, 2, 3]])
    packing = pack(seq_idx)
    assert packing.cu_seqlens.tolist() == [0, 2, 5, 10, 11, 12, 14, 15]
    assert packing.first.tolist() == [0, 2, 3] and packing.last.tolist() == [1, 2, 6]
    state = torch.arange(3.0)[:, None] + 1
    assert packing.initial_states(state).squeeze(1).tolist() == [1, 0, 2, 3, 0, 0, 0]
    assert packing.final_states(torch.arange(7.0)).tolist() == [1, 2, 6]
