"""Our Triton gated RMSNorm (``mixerswap/kernels/norm/triton.py``) against the reference ``naive.py``.

Forward output and the gradients of ``y``, ``z`` and ``weight`` under a random upstream gradient, with
and without the gate, one or several groups, group sizes that are not powers of two, and row counts
that do not fill the last tile. On CPU the kernels run through triton's interpreter
(``TRITON_INTERPRET=1``, set in tests/conftest.py); on CUDA bf16 cases are added.

Tolerances, as ``max |ours - ref| <= rtol * max |ref|`` per tensor:
fp32: ``rtol = 1e-5`` (both compute in fp32; only the summation order differs).
bf16 (CUDA only): ``rtol = 1e-2`` against the reference run in fp32 on the same bf16 values (one
rounding of the fp32 result to bf16).
"""

import pytest
import torch

from mixerswap import kernels
from mixerswap.kernels import gated_rmsnorm_ref

from .conftest import requires_triton

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _triton_norm():
    from mixerswap.kernels.norm.triton import gated_rmsnorm_triton

    return gated_rmsnorm_triton


def assert_rel_close(actual, expected, rtol, what=""):
    assert actual.shape == expected.shape, what
    err = ((actual.float() - expected.float()).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def check_against_reference(shape, group_size, dtype, *, gate=True, eps=1e-6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=g).to(DEVICE, dtype)
    z = torch.randn(shape, generator=g).mul(2).to(DEVICE, dtype) if gate else None
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    dout = torch.randn(shape, generator=g).to(DEVICE)

    def run(fn, cast):
        inputs = [None if t is None else t.detach().to(cast).requires_grad_() for t in (y, z, w)]
        out = fn(inputs[0], inputs[1], inputs[2], group_size=group_size, eps=eps)
        leaves = [t for t in inputs if t is not None]
        return out, torch.autograd.grad((out.float() * dout).sum(), leaves)

    out_ref, grads_ref = run(gated_rmsnorm_ref, torch.float32)
    out, grads = run(_triton_norm(), dtype)
    assert out.dtype == dtype
    assert_rel_close(out, out_ref, RTOL[dtype], "out")
    names = ["dy", "dz", "dweight"] if gate else ["dy", "dweight"]
    for name, got, want in zip(names, grads, grads_ref, strict=True):
        assert got.dtype == dtype, name
        assert_rel_close(got, want, RTOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("gate", [True, False], ids=["gated", "no_gate"])
@pytest.mark.parametrize(
    "shape,group_size",
    [((2, 17, 32), 8), ((37, 24), 24), ((3, 5, 2, 40), 10), ((1, 1, 16), 16)],
    ids=["4_groups_of_8", "one_group_of_24", "4d_groups_of_10", "single_row"],
)
def test_forward_backward(shape, group_size, gate, dtype):
    check_against_reference(shape, group_size, dtype, gate=gate)


def test_large_eps_and_strided_input():
    """``eps`` is honoured, and a ``y`` whose rows are not contiguous in memory is read correctly."""
    check_against_reference((19, 12), 6, torch.float32, eps=0.5, seed=1)
    g = torch.Generator().manual_seed(2)
    y_wide, z = torch.randn(19, 24, generator=g).to(DEVICE), torch.randn(19, 12, generator=g).to(DEVICE)
    w = torch.randn(12, generator=g).to(DEVICE)
    y = y_wide[:, :12]  # row stride 24
    torch.testing.assert_close(_triton_norm()(y, z, w, group_size=6), gated_rmsnorm_ref(y, z, w, group_size=6),
                               rtol=1e-5, atol=1e-5)


def test_group_size_must_divide_channels():
    y = torch.randn(2, 12, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        _triton_norm()(y, y, torch.ones(12, device=DEVICE), group_size=5)


def test_dispatch_runs_the_triton_backend():
    g = torch.Generator().manual_seed(3)
    y, z = torch.randn(3, 16, generator=g).to(DEVICE), torch.randn(3, 16, generator=g).to(DEVICE)
    w = torch.randn(16, generator=g).to(DEVICE).requires_grad_()
    with kernels.use_backend("triton"):
        assert kernels.resolve("gated_rmsnorm", y, z, w, group_size=8)[0] == "triton"
        out = kernels.gated_rmsnorm(y, z, w, group_size=8)
    out.sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    want = gated_rmsnorm_ref(y, z, ref_w, group_size=8)
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-5)
