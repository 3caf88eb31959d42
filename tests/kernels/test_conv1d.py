import pytest
import torch

from mixerswap.kernels import causal_conv1d, causal_conv1d_step, causal_conv1d_step_ref, gated_rmsnorm


@pytest.mark.parametrize("seqlen", [1, 3, 17])
@pytest.mark.parametrize("activation", ["silu", None])
def test_full_pass_equals_steps(seqlen, activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, seqlen, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    init = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    y, final = causal_conv1d(x, w, b, initial_state=init, activation=activation)
    state, ys = init.clone(), []
    for t in range(seqlen):
        yt, state = causal_conv1d_step(x[:, t], state, w, b, activation=activation)
        ys.append(yt)
    torch.testing.assert_close(y, torch.stack(ys, 1))
    torch.testing.assert_close(final, state)


@pytest.mark.parametrize("step", [causal_conv1d_step_ref, causal_conv1d_step], ids=["reference", "dispatched"])
def test_step_updates_state_in_place(step):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, generator=g)
    state = torch.randn(2, 6, 3, generator=g)
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    window = torch.cat([state, x[:, :, None]], dim=-1)  # the step before it worked in place
    y_want, state_want = torch.nn.functional.silu((window * w).sum(-1) + b), window[:, :, 1:].clone()
    ptr = state.data_ptr()
    y, out_state = step(x, state, w, b, activation="silu")
    assert out_state is state and state.data_ptr() == ptr
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(state, state_want)


def test_matches_torch_conv1d():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 11, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y, _ = causal_conv1d(x, w)
    want = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], padding=3, groups=5)[..., :11]
    torch.testing.assert_close(y, want.transpose(1, 2))


def test_documents_do_not_leak():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 9, 3, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2, 2]])
    y, final = causal_conv1d(x, w, seq_idx=seq_idx)
    for lo, hi in [(0, 5), (5, 7), (7, 9)]:
        y_doc, f_doc = causal_conv1d(x[:, lo:hi], w)
        torch.testing.assert_close(y[:, lo:hi], y_doc)
    torch.testing.assert_close(final, f_doc)


def test_gated_rmsnorm_groups():
    y = torch.randn(2, 3, 8, dtype=torch.float64)
    z = torch.randn(2, 3, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    out = gated_rmsnorm(y, z, w, group_size=4)
    h = (y * torch.nn.functional.silu(z)).view(2, 3, 2, 4)
    want = (h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).view(2, 3, 8) * w
    torch.testing.assert_close(out, want)
