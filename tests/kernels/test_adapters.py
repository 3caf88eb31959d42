"""The third-party adapters' argument plumbing, run on CPU against fakes of the packages' functions.

The fakes check the layout and dtype rules the real kernels enforce (from their sources) and compute
with our references, so these tests say the adapters translate our contract correctly; whether the
real kernels then agree with the references needs a GPU with mamba-ssm / causal-conv1d installed.
"""

import pytest
import torch

from mixerswap.kernels.conv1d import causal_conv1d_adapter
from mixerswap.kernels.conv1d.naive import causal_conv1d_ref
from mixerswap.kernels.dispatch import Call
from mixerswap.kernels.ssd import mamba_ssm_adapter
from mixerswap.kernels.ssd.naive import ssd_chunk_scan_ref

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
    for adapter in (mamba_ssm_adapter, causal_conv1d_adapter):
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
