"""Our Triton gla_chunk / gla_step (``mixerswap/kernels/gla/triton.py``) against the reference, forward and backward.

Runs on CUDA when there is one, else on CPU tensors through triton's interpreter (small shapes; the
bigger ones are ``slow``). The reference is evaluated in fp64 on the very same (rounded) inputs, and
errors are measured relative to the largest magnitude of each compared tensor
(``|got - want| <= rtol * (|want| + max|want|)``):

* fp32: ``rtol = 1e-4`` for ``o``, the final state and every gradient (measured under the interpreter:
  at most 5e-7 of the largest magnitude);
* bf16 (CUDA only): ``rtol = 2e-2`` for ``o``, the final state and the gradients of ``q, k, v`` and
  the initial state, ``5e-2`` for the gate gradient (a sum of many products inside each chunk).
"""

import pytest
import torch

from mixerswap import kernels
from mixerswap.kernels.gla.naive import gla_chunk_ref, gla_step_ref

from .conftest import requires_triton

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, K, V = 2, 2, 8, 5
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GATE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# exp(g) per token: "none" 1, "weak" 0.9..1, "mixed" 0.007..1 with a rate per head, "strong" down to e^-40
DECAYS = {
    "none": lambda shape, gen: torch.zeros(shape),
    "weak": lambda shape, gen: -0.1 * torch.rand(shape, generator=gen),
    "mixed": lambda shape, gen: -5 * torch.rand(shape, generator=gen) * torch.rand(shape[-1], generator=gen),
    "strong": lambda shape, gen: -40 * torch.rand(shape, generator=gen),
    "extreme": lambda shape, gen: -1e4 * torch.rand(shape, generator=gen),  # exp underflows to exactly 0
}


def triton_ops():
    from mixerswap.kernels.gla import triton as gla_triton

    return gla_triton.gla_chunk_triton, gla_triton.gla_step_triton


def inputs(seqlen, *, dims=(B, H, K, V), decay="mixed", dtype=torch.float32, padding=False, seed=0):
    batch, heads, dk, dv = dims
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, seqlen, heads, dk, generator=gen) for _ in range(2))
    v = torch.randn(batch, seqlen, heads, dv, generator=gen)
    g = DECAYS[decay]((batch, seqlen, heads), gen)
    if padding:
        real = torch.rand(batch, seqlen, generator=gen) > 0.3
        k, g = k * real[..., None, None], g * real[..., None]
    init = torch.randn(batch, heads, dk, dv, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, g)], init.to(DEVICE)


def packed_ids(seqlen, cuts):
    ids = torch.zeros(B, seqlen, dtype=torch.long)
    for cut in cuts:
        ids[:, cut:] += 1
    ids[1] = 3  # the second row is one document (ids need not start at zero)
    return ids.to(DEVICE)


def close(got, want, rtol, what):
    assert torch.isfinite(got).all(), f"{what}: not finite"
    got, want = got.double(), want.double()
    err, peak = (got - want).abs(), want.abs().max()
    assert (err <= rtol * (want.abs() + peak)).all(), f"{what}: max error {err.max():.3g} (max |want| {peak:.3g})"


def check_against_reference(qkvg, init, *, chunk_size=16, seq_idx=None, scale=None):
    """Forward output, final state and the gradients of q, k, v, g and the initial state."""
    gla_chunk_triton, _ = triton_ops()
    dtype = qkvg[2].dtype
    ours = [t.clone().requires_grad_() for t in (*qkvg, init)]
    ref = [t.detach().double().requires_grad_() for t in ours]
    init_before = init.clone()
    o, final = gla_chunk_triton(*ours[:4], scale=scale, chunk_size=chunk_size, initial_state=ours[4], seq_idx=seq_idx)
    want_o, want_final = gla_chunk_ref(*ref[:4], scale=scale, chunk_size=chunk_size, initial_state=ref[4],
                                       seq_idx=seq_idx)
    assert o.dtype == dtype and final.dtype == torch.float32 and o.shape == want_o.shape
    close(o, want_o, RTOL[dtype], "o")
    close(final, want_final, RTOL[dtype], "final state")
    assert torch.equal(init, init_before)
    # a loss that weighs every output and every state entry differently
    gen = torch.Generator().manual_seed(1)
    w_o, w_s = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(DEVICE) for t in (want_o, want_final))
    ((o.double() * w_o).sum() + (final.double() * w_s).sum()).backward()
    ((want_o * w_o).sum() + (want_final * w_s).sum()).backward()
    for name, got, want in zip("qkvg", ours, ref, strict=False):
        assert got.grad.dtype == got.dtype
        close(got.grad, want.grad, (GATE_RTOL if name == "g" else RTOL)[dtype], f"d{name}")
    close(ours[4].grad, ref[4].grad, RTOL[dtype], "d initial_state")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("seqlen", [1, 32, 33, 63, 130], ids=lambda t: f"T{t}")
def test_matches_reference_with_initial_state(seqlen, dtype):
    qkvg, init = inputs(seqlen, dtype=dtype)
    check_against_reference(qkvg, init, chunk_size=32)


@pytest.mark.parametrize("decay", ["none", "weak", "strong", "extreme"])
def test_decay_strengths_stay_finite_and_exact(decay):
    qkvg, init = inputs(40, decay=decay)
    check_against_reference(qkvg, init, scale=0.7)


@pytest.mark.parametrize(
    "cuts", [(16,), (7, 8, 32), (0, 47)], ids=["cut_at_chunk_edge", "one_token_doc_and_edge", "cut_in_last_chunk"]
)
def test_documents_with_padding(cuts):
    qkvg, init = inputs(48, padding=True)
    check_against_reference(qkvg, init, seq_idx=packed_ids(48, cuts))


@pytest.mark.parametrize("chunk_size", [64, 100], ids=["chunk64", "chunk100_uses_64"])
def test_odd_head_sizes_and_two_value_blocks(chunk_size):
    qkvg, init = inputs(70, dims=(1, 2, 20, 70), seed=3)  # V = 70: two blocks of 64 values
    check_against_reference(qkvg, init, chunk_size=chunk_size, seq_idx=packed_ids(70, (30,))[:1])


def test_without_grad_and_without_initial_state():
    gla_chunk_triton, _ = triton_ops()
    qkvg, _ = inputs(33)
    with torch.no_grad():
        o, final = gla_chunk_triton(*qkvg, chunk_size=16)
    want_o, want_final = gla_chunk_ref(*(t.double() for t in qkvg), chunk_size=16)
    close(o, want_o, RTOL[torch.float32], "o")
    close(final, want_final, RTOL[torch.float32], "final state")
    # only o enters the loss: the final state's gradient is absent
    q = qkvg[0].clone().requires_grad_()
    o, _ = gla_chunk_triton(q, *qkvg[1:], chunk_size=16)
    (grad,) = torch.autograd.grad(o.sum(), q)
    qr = qkvg[0].double().requires_grad_()
    (want,) = torch.autograd.grad(gla_chunk_ref(qr, *(t.double() for t in qkvg[1:]), chunk_size=16)[0].sum(), qr)
    close(grad, want, RTOL[torch.float32], "dq")


def test_step_updates_the_state_in_place_and_steps_equal_the_chunk_op():
    gla_chunk_triton, gla_step_triton = triton_ops()
    seqlen = 12
    (q, k, v, g), init = inputs(seqlen)
    state = init.clone()
    pointer = state.data_ptr()
    ref_state = init.double()
    outs = []
    for t in range(seqlen):
        o, returned = gla_step_triton(state, q[:, t], k[:, t], v[:, t], g[:, t], 0.5)
        assert returned is state and state.data_ptr() == pointer and o.dtype == v.dtype
        want, ref_state = gla_step_ref(ref_state, *(x[:, t].double() for x in (q, k, v, g)), 0.5)
        close(o, want, RTOL[torch.float32], f"o at step {t}")
        outs.append(o)
    close(state, ref_state, RTOL[torch.float32], "state after the steps")
    chunk_o, chunk_final = gla_chunk_triton(q, k, v, g, scale=0.5, chunk_size=16, initial_state=init)
    close(torch.stack(outs, 1), chunk_o, RTOL[torch.float32], "steps vs chunk")
    close(state, chunk_final, RTOL[torch.float32], "step state vs chunk state")
    # a non-contiguous state is still updated in place
    strided = init.transpose(-1, -2).contiguous().transpose(-1, -2)
    _, returned = gla_step_triton(strided, q[:, 0], k[:, 0], v[:, 0], g[:, 0])
    assert returned is strided
    close(strided, gla_step_ref(init.clone(), q[:, 0], k[:, 0], v[:, 0], g[:, 0])[1], RTOL[torch.float32], "strided")


def test_dispatch_reaches_the_triton_backend():
    (q, k, v, g), init = inputs(20)
    state = init.clone()
    with kernels.use_backend("triton"):
        assert kernels.resolve("gla_chunk", q, k, v, g)[0] == "triton"
        assert kernels.resolve("gla_step", state, q[:, 0], k[:, 0], v[:, 0], g[:, 0])[0] == "triton"
        o, final = kernels.gla_chunk(q, k, v, g, chunk_size=16, initial_state=init)
        step_o, returned = kernels.gla_step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0])
    assert returned is state
    want_o, want_final = gla_chunk_ref(q, k, v, g, chunk_size=16, initial_state=init)
    close(o, want_o, RTOL[torch.float32], "o")
    close(final, want_final, RTOL[torch.float32], "final state")
    close(step_o, want_o[:, 0], RTOL[torch.float32], "step o")
    if DEVICE == "cpu":  # auto never picks the interpreter
        assert kernels.resolve("gla_chunk", q, k, v, g)[0] == "torch"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_bigger_shapes(dtype):
    qkvg, init = inputs(300, dims=(2, 4, 64, 65), dtype=dtype, padding=True, seed=5)
    qkvg[0], qkvg[1] = qkvg[0] / 8, qkvg[1] / 8  # keep o of order one, as a normalized feature map would
    check_against_reference(qkvg, init, chunk_size=64, seq_idx=packed_ids(300, (64, 65, 200)))
