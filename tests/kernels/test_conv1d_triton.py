"""Our Triton causal conv1d (``mixerswap/kernels/conv1d/triton.py``) against the reference ``naive.py``.

Forward output, final state and the gradient of every input (x, weight, bias, initial state) under a
random upstream gradient on both ``y`` and the final state. On CPU the kernels run through triton's
interpreter (``TRITON_INTERPRET=1``, set in tests/conftest.py), so shapes are small; the same file
runs on CUDA, where bf16 cases are added.

Tolerances, as ``max |ours - ref| <= rtol * max |ref|`` per tensor:
fp32: ``rtol = 1e-5`` (both accumulate in fp32; only the summation order differs).
bf16 (CUDA only): ``rtol = 1e-2``, against the reference run in fp32 on the same bf16 values (ours
accumulates in fp32 and rounds once; the reference in bf16 would itself be off by more).
"""

import pytest
import torch

from mixerswap import kernels
from mixerswap.kernels import causal_conv1d_ref, causal_conv1d_step_ref

from .conftest import requires_triton

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _triton():
    from mixerswap.kernels.conv1d import triton as conv_triton

    return conv_triton


def assert_rel_close(actual, expected, rtol, what=""):
    assert actual.shape == expected.shape, what
    if not expected.numel():
        return
    err = ((actual.float() - expected.float()).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def make_inputs(batch, seqlen, dim, width, dtype, *, bias=True, initial_state=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, dim, generator=g)
    w = torch.randn(dim, width, generator=g) / width**0.5
    b = torch.randn(dim, generator=g) if bias else None
    init = torch.randn(batch, dim, width - 1, generator=g) if initial_state else None
    return [None if t is None else t.to(DEVICE, dtype) for t in (x, w, b, init)]


def check_against_reference(x, w, b, init, *, seq_idx=None, activation=None):
    """Run both backends with gradients on every float input and compare everything."""
    rtol = RTOL[x.dtype]
    named = [(n, t) for n, t in zip(["dx", "dweight", "dbias", "dinitial_state"], (x, w, b, init)) if t is not None]

    def run(fn, cast):
        inputs = [None if t is None else t.detach().to(cast).requires_grad_() for t in (x, w, b, init)]
        y, final = fn(inputs[0], inputs[1], inputs[2], initial_state=inputs[3], seq_idx=seq_idx,
                      activation=activation)
        return y, final, [t for t in inputs if t is not None]

    ref_dtype = torch.float32  # the reference in fp32 on the same values is the target for every dtype
    y_ref, f_ref, in_ref = run(causal_conv1d_ref, ref_dtype)
    y, final, ins = run(_triton().causal_conv1d_triton, x.dtype)
    assert y.dtype == x.dtype and final.dtype == x.dtype
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(y_ref.shape, generator=g).to(DEVICE)
    dfinal = torch.randn(f_ref.shape, generator=g).to(DEVICE)
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + (f_ref * dfinal).sum(), in_ref)
    grads = torch.autograd.grad((y.float() * dy).sum() + (final.float() * dfinal).sum(), ins)
    assert_rel_close(y, y_ref, rtol, "y")
    assert_rel_close(final, f_ref, rtol, "final_state")
    for (name, leaf), got, want in zip(named, grads, grads_ref, strict=True):
        assert got.dtype == leaf.dtype, name
        assert_rel_close(got, want, rtol, name)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("activation", [None, "silu"], ids=["no_act", "silu"])
@pytest.mark.parametrize("width", [2, 3, 4], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("seqlen", [1, 63, 130], ids=lambda t: f"T{t}")
def test_forward_backward_with_bias_and_initial_state(seqlen, width, activation, dtype):
    x, w, b, init = make_inputs(1, seqlen, 12, width, dtype)
    check_against_reference(x, w, b, init, activation=activation)


@pytest.mark.parametrize("activation", [None, "identity", "silu"], ids=["none", "identity", "silu"])
@pytest.mark.parametrize("width", [2, 4], ids=lambda k: f"K{k}")
def test_without_bias_or_initial_state(width, activation):
    x, w, _, _ = make_inputs(1, 63, 12, width, torch.float32, bias=False, initial_state=False)
    check_against_reference(x, w, None, None, activation=activation)


def test_width_one_has_an_empty_state():
    x, w, b, init = make_inputs(2, 5, 12, 1, torch.float32)
    check_against_reference(x, w, b, init, seq_idx=_seq_idx(5, [2]).expand(2, -1), activation="silu")


def test_gradient_through_the_final_state_alone():
    """A loss on the final state only: autograd hands the backward no gradient for ``y``."""
    x, w, _, init = make_inputs(1, 7, 12, 4, torch.float32, bias=False)
    x, init = x.requires_grad_(), init.requires_grad_()
    _, final = _triton().causal_conv1d_triton(x, w, initial_state=init)
    got = torch.autograd.grad(final.square().sum(), (x, init))
    _, final_ref = causal_conv1d_ref(x, w, initial_state=init)
    want = torch.autograd.grad(final_ref.square().sum(), (x, init))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


def test_channels_over_several_blocks_and_strided_input():
    """More channels than one block, a channel count that is not a power of two, a transposed ``x``."""
    x, w, b, init = make_inputs(1, 40, 37, 4, torch.float32, seed=3)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    check_against_reference(x, w, b, init, activation="silu")


def _seq_idx(seqlen, starts):
    """``[1, T]`` document ids that change at each of ``starts``."""
    seq_idx = torch.zeros(1, seqlen, dtype=torch.int32)
    for s in starts:
        seq_idx[:, s:] += 1
    return seq_idx.to(DEVICE)


@pytest.mark.parametrize("activation", [None, "silu"], ids=["no_act", "silu"])
@pytest.mark.parametrize("width", [2, 4], ids=lambda k: f"K{k}")
def test_packed_documents(width, activation):
    """Boundaries: a one-token document (at 5), one at the tile edge (64), one just after it (65)."""
    block = _triton().INTERPRET_BLOCK_T
    x, w, b, init = make_inputs(1, 130, 12, width, torch.float32, seed=1)
    seq_idx = _seq_idx(130, [5, 6, block, block + 1])
    y = check_against_reference(x, w, b, init, seq_idx=seq_idx, activation=activation)
    for lo, hi in [(6, block), (block + 1, 130)]:  # a later document sees nothing before its start
        alone, _ = causal_conv1d_ref(x[:, lo:hi], w, b, activation=activation)
        torch.testing.assert_close(y[:, lo:hi], alone, rtol=1e-5, atol=1e-5)


def test_packed_documents_last_one_short():
    """The last document is shorter than the state: its final state keeps only its own inputs."""
    x, w, b, init = make_inputs(2, 63, 12, 4, torch.float32, seed=2)
    seq_idx = _seq_idx(63, [30, 62]).expand(2, -1).contiguous()
    seq_idx[1] = 0  # the second row is one document: the initial state is used and the state is full
    check_against_reference(x, w, b, init, seq_idx=seq_idx, activation="silu")


def test_does_not_modify_initial_state():
    x, w, b, init = make_inputs(1, 3, 12, 4, torch.float32)
    before = init.clone()
    _triton().causal_conv1d_triton(x, w, b, initial_state=init)
    torch.testing.assert_close(init, before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("activation", [None, "silu"], ids=["no_act", "silu"])
@pytest.mark.parametrize("width", [2, 3, 4], ids=lambda k: f"K{k}")
def test_step_in_place(width, activation, dtype):
    x, w, b, state = make_inputs(2, 1, 37, width, dtype, seed=4)
    x = x[:, 0]
    want_y, want_state = causal_conv1d_step_ref(x.float(), state.float().clone(), w.float(), b.float(),
                                                activation=activation)
    ptr = state.data_ptr()
    y, out = _triton().causal_conv1d_step_triton(x, state, w, b, activation=activation)
    assert out is state and state.data_ptr() == ptr
    assert y.dtype == x.dtype
    assert_rel_close(y, want_y, RTOL[dtype], "y")
    torch.testing.assert_close(state.float(), want_state, rtol=0, atol=0)  # a shift: exact


@pytest.mark.parametrize("width", [2, 4], ids=lambda k: f"K{k}")
def test_steps_equal_full_forward(width):
    x, w, b, init = make_inputs(2, 9, 12, width, torch.float32, seed=5)
    conv = _triton()
    y_full, final = conv.causal_conv1d_triton(x, w, b, initial_state=init, activation="silu")
    state, ys = init.clone(), []
    for t in range(x.shape[1]):
        y_t, state = conv.causal_conv1d_step_triton(x[:, t], state, w, b, activation="silu")
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final, rtol=0, atol=0)


def test_unknown_activation_and_bad_weight_raise():
    x, w, b, _ = make_inputs(1, 3, 12, 4, torch.float32)
    with pytest.raises(ValueError, match="unknown activation"):
        _triton().causal_conv1d_triton(x, w, b, activation="relu")
    with pytest.raises(ValueError, match="weight must be"):
        _triton().causal_conv1d_triton(x, w[:5], b)


def test_dispatch_runs_the_triton_backend():
    x, w, b, init = make_inputs(1, 5, 12, 4, torch.float32)
    state = init.clone()
    with kernels.use_backend("triton"):
        assert kernels.resolve("causal_conv1d", x, w, b, initial_state=init)[0] == "triton"
        assert kernels.resolve("causal_conv1d_step", x[:, 0], state, w, b)[0] == "triton"
        y, final = kernels.causal_conv1d(x, w, b, initial_state=init, activation="silu")
        y_t, out = kernels.causal_conv1d_step(x[:, 0], state, w, b, activation="silu")
    assert out is state
    want, want_final = causal_conv1d_ref(x, w, b, initial_state=init, activation="silu")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, want_final)
    torch.testing.assert_close(y_t, want[:, 0], rtol=1e-5, atol=1e-5)
