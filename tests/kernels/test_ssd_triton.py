"""Our Triton SSD kernels (``mixerswap/kernels/ssd/triton.py``) against the reference ``naive.py``.

The chunk scan is checked on its outputs, its final state and the gradients of every input (x, dt,
A, B, C, D, initial state) under random upstream gradients on both ``y`` and the final state; the
decoding step on its output and its in-place state update, and a run of steps against the chunk scan.
On CPU the kernels run through triton's interpreter (``TRITON_INTERPRET=1``, set in
tests/conftest.py), so shapes are small (the file takes about 35 s of CPU time); the same file runs on
CUDA, with bf16 and larger shapes.

Errors are relative Frobenius norms ``|ours - ref| / |ref|`` per tensor, the reference run in fp64 on
the same (rounded) input values:

* fp32: ``1e-5`` for outputs, states and gradients, ``5e-5`` for ``dA`` and ``dD`` (one number per
  head, summed over every position from terms that partly cancel). Ours accumulates in fp32 with
  full-precision (``ieee``) dots; measured on the interpreter: at most ``8e-7``, ``dA`` and ``dD`` up
  to ``5e-6``.
* fp16: ``5e-3``; bf16 (CUDA only: triton's interpreter multiplies bf16 tiles wrongly): ``3e-2``, for
  everything. The dots run on the input dtype (tensor cores on a GPU), with the attention-like scores
  rounded to it before they multiply ``x`` or ``dy``; measured on the interpreter in fp16: at most
  ``4e-4``.
"""

import pytest
import torch

from mixerswap import kernels
from mixerswap.kernels import ssd_chunk_scan_ref, ssd_step_ref

from .conftest import requires_triton
from .test_ssd import make_inputs, rel_err

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = [
    torch.float16,
    pytest.param(torch.bfloat16,
                 marks=pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter's bf16 tl.dot is wrong")),
]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
RTOL_SUMS = {torch.float32: 5e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # dA and dD
NAMES = ["x", "dt", "A", "B", "C", "D", "initial_state"]


def _triton():
    from mixerswap.kernels.ssd import triton as ssd_triton

    return ssd_triton


def case_inputs(batch, seqlen, *, groups=2, rep=2, headdim=8, dstate=16, with_D=True, with_init=False,
                dtype=torch.float32, seed=0):
    """``[x, dt, A, B, C, D or None, initial_state or None]`` on ``DEVICE``."""
    x, dt, A, B, C, D = make_inputs(batch, seqlen, groups, rep, headdim, dstate, seed=seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    init = torch.randn(batch, groups * rep, headdim, dstate, generator=g) if with_init else None
    inputs = [x.to(dtype), dt, A, B.to(dtype), C.to(dtype), D if with_D else None, init]
    return [None if t is None else t.to(DEVICE) for t in inputs]


def check_against_reference(inputs, *, chunk_size, seq_idx=None):
    """Forward and backward of ours against the fp64 reference; returns the errors by name."""
    x = inputs[0]
    rtol = RTOL[x.dtype]
    g = torch.Generator().manual_seed(123)

    def run(fn, cast):
        leaves = [None if t is None else t.detach().to(cast or t.dtype).requires_grad_() for t in inputs]
        y, final = fn(*leaves[:5], chunk_size=chunk_size, D=leaves[5], initial_state=leaves[6], seq_idx=seq_idx)
        return y, final, leaves

    y, final, leaves = run(_triton().ssd_chunk_scan_triton, None)
    y_ref, final_ref, leaves_ref = run(ssd_chunk_scan_ref, torch.float64)
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert final.dtype == torch.float32 and final.shape == final_ref.shape
    dy = torch.randn(y.shape, generator=g).to(DEVICE)
    dfinal = torch.randn(final.shape, generator=g).to(DEVICE)
    ((y.float() * dy).sum() + (final * dfinal).sum()).backward()
    ((y_ref * dy.double()).sum() + (final_ref * dfinal.double()).sum()).backward()

    errors = {"y": rel_err(y.double(), y_ref), "final_state": rel_err(final.double(), final_ref)}
    for name, ours, ref in zip(NAMES, leaves, leaves_ref):
        if ours is not None:
            assert ours.grad is not None and ours.grad.dtype == ours.dtype, name
            errors["d" + name] = rel_err(ours.grad.double(), ref.grad)
    for name, err in errors.items():
        limit = RTOL_SUMS[x.dtype] if name in ("dA", "dD") else rtol
        assert err <= limit, f"{name}: relative error {err:.1e} > {limit:.0e}"
    return errors


def documents(lengths, batch=1):
    """``seq_idx`` ``[batch, sum(lengths)]``: document ``i`` spans ``lengths[i]`` positions."""
    row = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    return row.expand(batch, -1).contiguous().to(DEVICE)


CASES = {
    "T1": dict(seqlen=1, chunk_size=16),
    "T63": dict(seqlen=63, chunk_size=16),
    "T130-chunk32-init": dict(seqlen=130, chunk_size=32, groups=1, with_init=True),
    "T64-exact-chunks-init-noD": dict(seqlen=64, chunk_size=32, with_init=True, with_D=False),
    "T17-chunk-plus-one": dict(seqlen=17, chunk_size=16, with_init=True),
    "T20-one-group-four-heads": dict(seqlen=20, chunk_size=16, groups=1, rep=4),
    "T20-chunk8-ungrouped-batch2": dict(seqlen=20, chunk_size=8, groups=3, rep=1, batch=2, with_init=True),
    "T30-chunk24-headdim5-dstate4": dict(seqlen=30, chunk_size=24, headdim=5, dstate=4, with_init=True),
}


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_chunk_scan_matches_reference(case):
    opts = dict(CASES[case])
    chunk_size, seqlen, batch = opts.pop("chunk_size"), opts.pop("seqlen"), opts.pop("batch", 1)
    check_against_reference(case_inputs(batch, seqlen, **opts), chunk_size=chunk_size)


def test_blocks_smaller_than_the_chunk(monkeypatch):
    """Chunks of several position blocks (the last one partial) and states of several P / N tiles,
    as the GPU configurations run them; the interpreter otherwise takes whole chunks."""
    if DEVICE == "cpu":
        monkeypatch.setattr(_triton().chunk, "INTERPRETER_MAX_BLOCK", 16)
    inputs = case_inputs(1, 60, groups=1, rep=2, headdim=20, dstate=24, with_init=True)
    check_against_reference(inputs, chunk_size=40, seq_idx=documents([35, 25]))


@pytest.mark.parametrize("boundaries", ["inside-chunks", "at-chunk-edges"])
def test_documents_match_reference(boundaries):
    """Packed documents, boundaries inside chunks or exactly at a chunk's first position; the initial
    state belongs to the first document only; the second row is packed differently."""
    lengths = [5, 12, 1, 14] if boundaries == "inside-chunks" else [16, 16, 15]
    inputs = case_inputs(2, sum(lengths), groups=1, with_init=True)
    seq_idx = torch.cat([documents(lengths), documents([9, sum(lengths) - 9])])
    check_against_reference(inputs, chunk_size=16, seq_idx=seq_idx)


def test_zero_dt_padding_matches_reference_and_is_invisible():
    """Left padding (dt = 0, garbage x) and right padding with a document boundary after it."""
    inputs = case_inputs(1, 40, with_init=True)
    dt = inputs[1].clone()
    dt[:, :7] = 0
    dt[:, 33:] = 0
    inputs[1] = dt
    check_against_reference(inputs, chunk_size=16, seq_idx=documents([20, 20]))
    x, _, A, B, C, D, init = inputs
    _, final_pad = _triton().ssd_chunk_scan_triton(x, dt, A, B, C, chunk_size=16, D=D, initial_state=init)
    _, final_cut = _triton().ssd_chunk_scan_triton(x[:, 7:33], dt[:, 7:33], A, B[:, 7:33], C[:, 7:33], chunk_size=16,
                                                   D=D, initial_state=init)
    torch.testing.assert_close(final_pad, final_cut, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=lambda d: str(d).removeprefix("torch."))
def test_low_precision_matches_reference(dtype):
    if DEVICE == "cuda":
        batch, seqlen, chunk_size, size = 2, 255, 64, 64
    else:
        batch, seqlen, chunk_size, size = 1, 40, 16, 16
    inputs = case_inputs(batch, seqlen, headdim=size, dstate=size, rep=4, with_init=True, dtype=dtype)
    check_against_reference(inputs, chunk_size=chunk_size,
                            seq_idx=documents([seqlen // 3, seqlen - seqlen // 3], batch=batch))


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu", reason="minutes under the interpreter; the small cases cover the same paths")
def test_long_sequence_matches_reference():
    inputs = case_inputs(2, 1000, headdim=64, dstate=128, rep=4, with_init=True)
    check_against_reference(inputs, chunk_size=64, seq_idx=documents([300, 450, 250], batch=2))


def test_inputs_are_left_alone_and_strided_inputs_work():
    x, dt, A, B, C, D, init = case_inputs(1, 20, with_init=True)
    x_wide = torch.randn(1, 20, 2, 16, device=DEVICE)
    x_wide[..., ::2] = x
    before = init.clone()
    y, final = _triton().ssd_chunk_scan_triton(x_wide[..., ::2], dt, A, B, C, chunk_size=16, D=D, initial_state=init)
    y_ref, final_ref = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=16, D=D, initial_state=init)
    torch.testing.assert_close(init, before, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final_ref, rtol=1e-5, atol=1e-5)


def test_fp64_is_refused():
    x, dt, A, B, C, D, _ = case_inputs(1, 4)
    with pytest.raises(TypeError, match="fp32, bf16 and fp16"):
        _triton().ssd_chunk_scan_triton(x.double(), dt, A, B, C)


@pytest.mark.parametrize("with_D", [True, False], ids=["D", "noD"])
@pytest.mark.parametrize("rep", [1, 3], ids=lambda r: f"rep{r}")
def test_step_updates_state_in_place(with_D, rep):
    x, dt, A, B, C, D, _ = case_inputs(2, 1, rep=rep, headdim=40, dstate=12, with_D=with_D)
    state = torch.randn(2, 2 * rep, 40, 12, device=DEVICE)
    want_state = state.clone()
    y_want, _ = ssd_step_ref(want_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    ptr = state.data_ptr()
    y, out_state = _triton().ssd_step_triton(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert out_state is state and state.data_ptr() == ptr
    assert y.dtype == x.dtype and y.shape == y_want.shape
    torch.testing.assert_close(y, y_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)


def test_steps_equal_chunk_scan():
    """Decoding token by token from a prefix's state equals scanning the whole sequence."""
    x, dt, A, B, C, D, init = case_inputs(1, 21, with_init=True)
    y_scan, final_scan = _triton().ssd_chunk_scan_triton(x, dt, A, B, C, chunk_size=16, D=D, initial_state=init)
    y_prefix, state = _triton().ssd_chunk_scan_triton(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13],
                                                      chunk_size=16, D=D, initial_state=init)
    ys = [y_prefix]
    for t in range(13, 21):
        y, state = _triton().ssd_step_triton(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y_scan, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final_scan, rtol=1e-5, atol=1e-5)


def test_dispatch_runs_the_triton_backend():
    x, dt, A, B, C, D, init = case_inputs(1, 19, with_init=True)
    x.requires_grad_()
    with kernels.use_backend("triton"):
        assert kernels.resolve("ssd_chunk_scan", x, dt, A, B, C, chunk_size=16, D=D)[0] == "triton"
        y, final = kernels.ssd_chunk_scan(x, dt, A, B, C, chunk_size=16, D=D, initial_state=init)
        state = final.detach().clone()
        with torch.no_grad():
            assert kernels.resolve("ssd_step", state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)[0] == "triton"
            y_step, out = kernels.ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    assert out is state
    y.sum().backward()
    assert x.grad is not None
    y_ref, final_ref = ssd_chunk_scan_ref(x.detach(), dt, A, B, C, chunk_size=16, D=D, initial_state=init)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.detach(), final_ref, rtol=1e-5, atol=1e-5)
    y_step_ref, _ = ssd_step_ref(final_ref.clone(), x[:, 0].detach(), dt[:, 0], A, B[:, 0], C[:, 0], D)
    torch.testing.assert_close(y_step, y_step_ref, rtol=1e-5, atol=1e-5)


def test_auto_never_picks_the_interpreter():
    x, dt, A, B, C, D, _ = case_inputs(1, 4)
    backend = kernels.resolve("ssd_chunk_scan", x, dt, A, B, C)[0]
    assert backend == ("triton" if DEVICE == "cuda" else "torch")
