"""Our Triton delta_rule_chunk / delta_rule_step (``mixerswap/kernels/delta_rule/triton.py``) against the reference.

Runs on CUDA when there is one, else on CPU tensors through triton's interpreter (small shapes; the
bigger ones are ``slow``). The reference (``naive.py``) runs in fp64 on the very same (rounded) inputs;
an error is the largest absolute difference relative to the largest magnitude of the compared tensor
(``max|got - want| <= rtol * max|want|``), for ``o``, the final state and the gradients of q, k, v, g,
beta and the initial state (upstream gradients are random):

* fp32: ``rtol = 1e-4`` everywhere (measured on the interpreter: at most 1.4e-6, 4e-6 for dg with strong
  gates);
* bf16 (CUDA only; products in tf32): ``rtol = 3e-2`` for ``o``, the state and the gradients of q, k, v
  and the initial state, ``6e-2`` for those of g and beta (sums over a chunk of products of gradients).
"""

import pytest
import torch

from mixerswap import kernels
from mixerswap.kernels.delta_rule.naive import delta_rule_chunk_ref, delta_rule_step_ref

from .conftest import requires_triton

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H, K, V = 1, 2, 8, 5  # one sequence by default (the interpreter runs programs one at a time); packed: two
RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
GATE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
NAMES = ("q", "k", "v", "g", "beta", "initial_state")
# odd lengths, chunk multiples, one past a chunk (also of the default 64), a chunk size not a power of two
LENGTHS = [(1, 16), (63, 16), (130, 32), (64, 16), (17, 16), (65, 64), (40, 13)]
# log decay g per token: "none" keeps everything, "mixed" a rate per head, "strong" down to e^-30 per token
DECAYS = {
    "none": lambda shape, gen: torch.zeros(shape),
    "mixed": lambda shape, gen: -2 * torch.rand(shape, generator=gen) * torch.rand(shape[-1], generator=gen),
    "strong": lambda shape, gen: -30 * torch.rand(shape, generator=gen),
}
# write strengths: uniform, all but off, all but full, and exactly 1 (a full overwrite per token)
BETAS = {
    "uniform": lambda shape, gen: torch.rand(shape, generator=gen),
    "near0": lambda shape, gen: 1e-4 * torch.rand(shape, generator=gen),
    "near1": lambda shape, gen: 1 - 1e-4 * torch.rand(shape, generator=gen),
    "one": lambda shape, gen: torch.ones(shape),
}


def triton_ops():
    from mixerswap.kernels.delta_rule import triton as delta_rule_triton

    return delta_rule_triton.delta_rule_chunk_triton, delta_rule_triton.delta_rule_step_triton


def inputs(seqlen, *, dims=(B, H, K, V), decay="mixed", beta="uniform", same_keys=False, dtype=torch.float32,
           seed=0):
    """``[q, k, v, g, beta]`` on DEVICE in ``dtype`` (k L2-normalized, as the mixer feeds it) and an fp32 state."""
    batch, heads, dk, dv = dims
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, dk, generator=gen)
    k = torch.randn(batch, 1 if same_keys else seqlen, heads, dk, generator=gen).expand(batch, seqlen, heads, dk)
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(batch, seqlen, heads, dv, generator=gen)
    g = DECAYS[decay]((batch, seqlen, heads), gen)
    b = BETAS[beta]((batch, seqlen, heads), gen)
    init = torch.randn(batch, heads, dk, dv, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, g, b)], init.to(DEVICE)


def documents(seqlen, cuts):
    """``[2, T]`` ids: row 0 starts a document at every cut, row 1 is one document (ids need not start at 0)."""
    ids = torch.zeros(2, seqlen, dtype=torch.long)
    for cut in cuts:
        ids[0, cut:] += 1
    ids[1] = 3
    return ids.to(DEVICE)


def rel_error(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def check_against_reference(qkvgb, init, *, chunk_size=16, seq_idx=None, scale=None):
    """Compare o, the final state and every gradient; returns the errors by name."""
    chunk_triton, _ = triton_ops()
    dtype = qkvgb[2].dtype
    ours = [t.clone().requires_grad_() for t in (*qkvgb, init)]
    ref = [t.detach().double().requires_grad_() for t in ours]
    init_before = init.clone()
    o, final = chunk_triton(*ours[:5], chunk_size=chunk_size, initial_state=ours[5], seq_idx=seq_idx, scale=scale)
    want_o, want_final = delta_rule_chunk_ref(*ref[:5], chunk_size=chunk_size, initial_state=ref[5],
                                              seq_idx=seq_idx, scale=scale)
    assert o.dtype == dtype and o.shape == want_o.shape
    assert final.dtype == torch.float32 and final.shape == want_final.shape
    assert torch.equal(ours[5].detach(), init_before), "the initial state was modified"
    gen = torch.Generator().manual_seed(1)
    d_o = torch.randn(o.shape, generator=gen).to(DEVICE)
    d_final = torch.randn(final.shape, generator=gen).to(DEVICE)
    ((o.float() * d_o).sum() + (final * d_final).sum()).backward()
    ((want_o * d_o.double()).sum() + (want_final * d_final.double()).sum()).backward()

    errors = {"o": rel_error(o, want_o), "final_state": rel_error(final, want_final)}
    for name, got, want in zip(NAMES, ours, ref, strict=True):
        assert got.grad.dtype == got.dtype and torch.isfinite(got.grad).all(), f"d{name}"
        errors[f"d{name}"] = rel_error(got.grad, want.grad)
    for what, err in errors.items():
        rtol = GATE_RTOL[dtype] if what in ("dg", "dbeta") else RTOL[dtype]
        assert torch.isfinite(torch.tensor(err)) and err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"
    return errors


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("seqlen", "chunk_size"), LENGTHS, ids=[f"T{t}-chunk{c}" for t, c in LENGTHS])
def test_chunk_matches_reference(seqlen, chunk_size, dtype):
    """Odd lengths, chunk multiples, one past a chunk, and a chunk size that is not a power of two."""
    qkvgb, init = inputs(seqlen, dtype=dtype)
    check_against_reference(qkvgb, init, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("cuts", [[5, 16, 17, 30], [32]], ids=["inside-on-edge-and-one-token", "at-chunk-edge"])
def test_chunk_with_documents_matches_reference(cuts, dtype):
    """Documents start inside chunks, exactly at a chunk edge (16, 32) and a one-token document (16)."""
    qkvgb, init = inputs(50, dims=(2, H, K, V), dtype=dtype, seed=2)
    check_against_reference(qkvgb, init, chunk_size=16, seq_idx=documents(50, cuts))


@pytest.mark.parametrize(("decay", "beta", "same_keys"), [
    ("strong", "uniform", False),
    ("none", "near0", False),
    ("none", "near1", False),
    ("mixed", "one", False),
    ("none", "one", True),
], ids=["strong-gates", "beta-near-0", "beta-near-1", "beta-1", "beta-1-same-key-no-decay"])
def test_extreme_gates_stay_finite_and_accurate(decay, beta, same_keys):
    """Strong decays underflow exp(G); beta 1 on one repeated key is the worst case of the triangular inverse."""
    qkvgb, init = inputs(40, decay=decay, beta=beta, same_keys=same_keys, seed=3)
    check_against_reference(qkvgb, init, chunk_size=32)


def test_without_initial_state_and_with_a_scale():
    chunk_triton, _ = triton_ops()
    (q, k, v, g, beta), _ = inputs(20, seed=4)
    ours = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
    ref = [t.detach().double().requires_grad_() for t in ours]
    o, final = chunk_triton(*ours, chunk_size=16, scale=0.3)
    want_o, want_final = delta_rule_chunk_ref(*ref, chunk_size=16, scale=0.3)
    assert rel_error(o, want_o) <= 1e-4 and rel_error(final, want_final) <= 1e-4
    o.square().sum().backward()  # the final state unused: its gradient arrives as zeros
    want_o.square().sum().backward()
    for got, want in zip(ours, ref, strict=True):
        assert rel_error(got.grad, want.grad) <= 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_step_updates_in_place_and_a_run_of_steps_equals_the_chunk_op(dtype):
    chunk_triton, step_triton = triton_ops()
    (q, k, v, g, beta), init = inputs(7, dims=(2, H, K, 40), dtype=dtype, seed=5)  # V = 40: two V blocks
    state = init.clone()
    ptr = state.data_ptr()
    ref_state = init.clone()
    outs = []
    for t in range(7):
        o, out = step_triton(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        assert out is state and state.data_ptr() == ptr
        assert o.dtype == dtype and o.shape == (2, H, 40)
        o_ref, _ = delta_rule_step_ref(ref_state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        assert rel_error(o, o_ref) <= RTOL[dtype]
        outs.append(o)
    o_chunk, final = chunk_triton(q, k, v, g, beta, chunk_size=16, initial_state=init)
    assert rel_error(torch.stack(outs, 1), o_chunk) <= RTOL[dtype]
    assert rel_error(state, final) <= RTOL[dtype] and rel_error(state, ref_state) <= RTOL[dtype]


def test_dispatch_runs_the_triton_backend_by_name():
    (q, k, v, g, beta), init = inputs(20, seed=6)
    q = torch.cat([q, q], -1)[..., :K]  # a strided view, as the mixer's head split gives
    state = init.clone()
    with kernels.use_backend("triton"):
        assert kernels.resolve("delta_rule_chunk", q, k, v, g, beta)[0] == "triton"
        assert kernels.resolve("delta_rule_step", state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])[0] == "triton"
        o, final = kernels.delta_rule_chunk(q, k, v, g, beta, chunk_size=16, initial_state=init)
        o_step, out = kernels.delta_rule_step(state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
    want_o, want_final = delta_rule_chunk_ref(q, k, v, g, beta, chunk_size=16, initial_state=init)
    assert rel_error(o, want_o) <= 1e-4 and rel_error(final, want_final) <= 1e-4
    assert out is state and rel_error(o_step, want_o[:, 0]) <= 1e-4
    if DEVICE == "cpu":  # the interpreter is never picked automatically
        assert kernels.resolve("delta_rule_chunk", q, k, v, g, beta)[0] == "torch"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_bigger_shapes_match_reference(dtype):
    """Head sizes of real models (64; 128 by 128 on CUDA), several V blocks, 64-token chunks, packed documents."""
    seqlen, dims = (1000, (2, 4, 128, 128)) if DEVICE == "cuda" else (200, (2, 2, 64, 80))
    qkvgb, init = inputs(seqlen, dims=dims, dtype=dtype, seed=7)
    check_against_reference(qkvgb, init, chunk_size=64, seq_idx=documents(seqlen, [64, 100, 101, 150]))
