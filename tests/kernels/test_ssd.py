import pytest
import torch

from mixerswap.kernels import ssd_chunk_scan, ssd_recurrent_ref, ssd_step, ssd_step_ref


def make_inputs(batch, seqlen, groups=2, rep=3, headdim=5, dstate=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    heads = groups * rep
    x = torch.randn(batch, seqlen, groups, headdim, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, seqlen, heads, generator=g, dtype=dtype) - 1)
    A = -torch.rand(heads, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(batch, seqlen, groups, dstate, generator=g, dtype=dtype)
    C = torch.randn(batch, seqlen, heads, dstate, generator=g, dtype=dtype)
    D = torch.randn(heads, generator=g, dtype=dtype)
    return x, dt, A, B, C, D


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("seqlen", [1, 63, 257], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("chunk_size", [8, 64], ids=lambda c: f"chunk{c}")
def test_chunked_equals_recurrence(seqlen, chunk_size):
    x, dt, A, B, C, D = make_inputs(2, seqlen, dtype=torch.float32)
    y, state = ssd_chunk_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D)
    y_ref, state_ref = ssd_recurrent_ref(x, dt, A, B, C, D=D)
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(state, state_ref) <= 1e-4


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_chunk_boundaries_and_initial_state(chunk_size):
    x, dt, A, B, C, D = make_inputs(2, chunk_size + 1)
    init = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    y, state = ssd_chunk_scan(x, dt, A, B, C, chunk_size=chunk_size, D=D, initial_state=init)
    y_ref, state_ref = ssd_recurrent_ref(x, dt, A, B, C, D=D, initial_state=init)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_ref.to(state.dtype), rtol=1e-6, atol=1e-6)


def test_split_sequence_continues_from_state():
    x, dt, A, B, C, D = make_inputs(1, 50)
    y_full, s_full = ssd_chunk_scan(x, dt, A, B, C, chunk_size=16, D=D)
    y1, s1 = ssd_chunk_scan(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], chunk_size=16, D=D)
    y2, s2 = ssd_chunk_scan(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], chunk_size=16, D=D, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full)
    torch.testing.assert_close(s2, s_full)


def test_documents_do_not_leak():
    """A packed row equals its documents run one by one, whatever the chunk alignment."""
    lengths = [5, 17, 1, 30]
    x, dt, A, B, C, D = make_inputs(1, sum(lengths))
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    y, state = ssd_chunk_scan(x, dt, A, B, C, chunk_size=8, D=D, seq_idx=seq_idx)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        y_doc, s_doc = ssd_chunk_scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], chunk_size=8, D=D)
        torch.testing.assert_close(y[:, sl], y_doc)
        start += n
    torch.testing.assert_close(state, s_doc)
    y_rec, _ = ssd_recurrent_ref(x, dt, A, B, C, D=D, seq_idx=seq_idx)
    torch.testing.assert_close(y, y_rec)


def test_zero_dt_is_invisible():
    """Positions with dt = 0 (padding) neither decay nor write the state."""
    x, dt, A, B, C, D = make_inputs(1, 20)
    dt_pad = dt.clone()
    dt_pad[:, :7] = 0
    _, s_pad = ssd_chunk_scan(x, dt_pad, A, B, C, chunk_size=8)
    _, s_cut = ssd_chunk_scan(x[:, 7:], dt[:, 7:], A, B[:, 7:], C[:, 7:], chunk_size=8)
    torch.testing.assert_close(s_pad, s_cut)


def test_step_matches_first_position():
    x, dt, A, B, C, D = make_inputs(3, 1)
    state = torch.zeros(3, 6, 5, 4, dtype=torch.float64)
    y, _ = ssd_step_ref(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    y_chunk, _ = ssd_chunk_scan(x, dt, A, B, C, D=D)
    torch.testing.assert_close(y, y_chunk[:, 0])


def test_gradients_match_recurrence():
    inputs = make_inputs(1, 19, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    y, s = ssd_chunk_scan(*leaves[:5], chunk_size=8, D=leaves[5])
    (y.square().sum() + s.sum()).backward()
    grads = [t.grad for t in leaves]
    leaves_ref = [t.clone().requires_grad_(True) for t in inputs]
    y_r, s_r = ssd_recurrent_ref(*leaves_ref[:5], D=leaves_ref[5])
    (y_r.square().sum() + s_r.sum()).backward()
    for got, want in zip(grads, (t.grad for t in leaves_ref)):
        torch.testing.assert_close(got, want)


def test_shape_errors_are_clear():
    x, dt, A, B, C, D = make_inputs(1, 4)
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ssd_chunk_scan(x, dt[..., :5], A[:5], B, C[:, :, :5], D=D)


def test_fp32_accumulation_holds_under_bf16_autocast():
    """The dispatcher turns autocast off around the reference; otherwise its einsums run in bf16 (4e-3)."""
    x, dt, A, B, C, D = make_inputs(2, 100, headdim=16, dstate=8, dtype=torch.float32)
    y, state = ssd_chunk_scan(x, dt, A, B, C, chunk_size=16, D=D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto, state_auto = ssd_chunk_scan(x, dt, A, B, C, chunk_size=16, D=D)
    assert y_auto.dtype == torch.float32
    assert rel_err(y_auto, y) <= 1e-5
    assert rel_err(state_auto, state) <= 1e-5


def step_out_of_place(state, x, dt, A, B, C, D):
    """The step as it was before it worked in place: ``S = exp(dt A) S + dt x B^T``, ``y = S C + D x``."""
    rep = C.shape[1] // x.shape[1]
    x_h, B_h = x.repeat_interleave(rep, 1), B.repeat_interleave(rep, 1)  # [b, h, p], [b, h, n]
    new = state * torch.exp(dt * A)[..., None, None] + (dt[..., None] * x_h)[..., None] * B_h[:, :, None]
    y = torch.einsum("bhpn,bhn->bhp", new, C) + D[:, None] * x_h
    return y, new


@pytest.mark.parametrize("step", [ssd_step_ref, ssd_step], ids=["reference", "dispatched"])
def test_step_updates_state_in_place(step):
    x, dt, A, B, C, D = make_inputs(2, 1, dtype=torch.float32)
    state = torch.randn(2, 6, 5, 4)
    y_want, state_want = step_out_of_place(state.clone(), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    ptr = state.data_ptr()
    y, out_state = step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert out_state is state and state.data_ptr() == ptr
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(state, state_want)


def test_recurrence_leaves_initial_state_alone_and_keeps_gradients():
    x, dt, A, B, C, D = make_inputs(1, 5)
    init = torch.randn(1, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    before = init.detach().clone()
    y, state = ssd_recurrent_ref(x, dt, A, B, C, D=D, initial_state=init)
    (y.sum() + state.sum()).backward()
    torch.testing.assert_close(init.detach(), before)
    y_chunk, s_chunk = ssd_chunk_scan(x, dt, A, B, C, chunk_size=4, D=D, initial_state=init.detach())
    torch.testing.assert_close(y, y_chunk)
    assert init.grad is not None and init.grad.abs().sum() > 0
