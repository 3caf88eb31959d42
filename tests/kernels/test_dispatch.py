"""Backend selection, tested with fake backends registered on dummy operators (no real kernel needed)."""

import logging

import pytest
import torch

from mixerswap import kernels
from mixerswap.kernels import KernelBackendError, dispatch, register, resolve, use_backend


def double_ref(x, *, scale=2.0):
    return x * scale


def fake(tag):
    def run(x, *, scale=2.0):
        return tag

    return run


def forward_only(call):
    return not call.needs_grad


@pytest.fixture
def dummy():
    """Operator ``dummy`` with its reference and a forward-only fake ``triton``; ``other`` with a fake ``triton``."""
    register("dummy", "torch", double_ref)
    register("dummy", "triton", fake("triton"), supports=forward_only)
    register("other", "torch", double_ref)
    register("other", "triton", fake("triton"))
    return torch.ones(3)


def test_auto_skips_forward_only_kernel_when_grad_is_needed(dummy):
    leaf = torch.ones(3, requires_grad=True)
    assert resolve("dummy", dummy)[0] == "triton"
    assert resolve("dummy", leaf)[0] == "torch"
    with torch.no_grad():
        assert resolve("dummy", leaf)[0] == "triton"


def test_grad_on_any_argument_counts():
    register("dummy", "torch", double_ref)
    call = dispatch.describe("dummy", torch.ones(2), torch.ones(2, requires_grad=True))
    assert call == dispatch.Call("dummy", "cpu", torch.float32, needs_grad=True)


def test_auto_priority_triton_then_third_party_then_torch():
    register("dummy", "torch", double_ref)
    register("dummy", "fla", fake("fla"))
    register("dummy", "mamba_ssm", fake("mamba_ssm"))
    assert resolve("dummy", torch.ones(1))[0] == "mamba_ssm"
    register("dummy", "triton", fake("triton"), supports=lambda call: call.dtype == torch.bfloat16)
    assert resolve("dummy", torch.ones(1))[0] == "mamba_ssm"
    assert resolve("dummy", torch.ones(1, dtype=torch.bfloat16))[0] == "triton"
    assert kernels.registered("dummy") == ["triton", "mamba_ssm", "fla", "torch"]


def test_entry_point_runs_the_chosen_backend():
    register("gated_rmsnorm", "triton", lambda y, z, weight, **kw: "fake", supports=forward_only)
    y, w = torch.randn(2, 4), torch.ones(4)
    assert kernels.gated_rmsnorm(y, None, w, group_size=4) == "fake"
    out = kernels.gated_rmsnorm(y, None, w.requires_grad_(), group_size=4)
    torch.testing.assert_close(out, kernels.gated_rmsnorm_ref(y, None, w, group_size=4))


def test_main_input_of_ssd_step_is_x_not_the_fp32_state():
    state = torch.zeros(1, 2, 3, 4)
    x = torch.zeros(1, 1, 3, dtype=torch.bfloat16)
    assert dispatch.describe("ssd_step", state, x).dtype == torch.bfloat16
    assert dispatch.describe("ssd_step", state, x=x).dtype == torch.bfloat16


def test_resolve_accepts_a_single_probe_tensor():
    probe = torch.empty(1, dtype=torch.bfloat16)
    for op in ("ssd_chunk_scan", "ssd_step", "causal_conv1d", "causal_conv1d_step", "gated_rmsnorm"):
        name, fn = resolve(op, probe)
        assert name in kernels.BACKENDS and callable(fn)


def test_env_per_op_override(dummy, monkeypatch):
    monkeypatch.setenv("MIXERSWAP_KERNELS", "auto, dummy=torch")
    assert resolve("dummy", dummy)[0] == "torch"
    assert resolve("other", dummy)[0] == "triton"
    assert kernels.requested_backend() == "auto" and kernels.requested_backend("dummy") == "torch"


def test_env_is_read_once_until_reset(dummy, monkeypatch):
    monkeypatch.setenv("MIXERSWAP_KERNELS", "torch")
    assert resolve("dummy", dummy)[0] == "torch"
    monkeypatch.setenv("MIXERSWAP_KERNELS", "triton")
    assert resolve("dummy", dummy)[0] == "torch"
    kernels.reset()
    assert resolve("dummy", dummy)[0] == "triton"


def test_use_backend_per_op_and_global_nest_and_restore(dummy, monkeypatch):
    monkeypatch.setenv("MIXERSWAP_KERNELS", "torch")
    with use_backend("triton"):
        assert resolve("dummy", dummy)[0] == resolve("other", dummy)[0] == "triton"
        with use_backend("torch", op="other"):
            assert resolve("dummy", dummy)[0] == "triton"
            assert resolve("other", dummy)[0] == "torch"
        assert resolve("other", dummy)[0] == "triton"
    assert resolve("dummy", dummy)[0] == resolve("other", dummy)[0] == "torch"


def test_choice_is_logged_once_per_cache_key(dummy, caplog):
    caplog.set_level(logging.DEBUG, logger="mixerswap.kernels")
    for _ in range(3):
        resolve("dummy", dummy)
    resolve("dummy", dummy.double())
    lines = [r.getMessage() for r in caplog.records if r.name == "mixerswap.kernels"]
    assert len(lines) == 2
    assert "dummy" in lines[0] and "float32" in lines[0] and "triton" in lines[0]
    assert "float64" in lines[1]


def test_named_backend_that_is_missing_or_unsupported_is_a_clear_error(dummy, monkeypatch):
    monkeypatch.setenv("MIXERSWAP_KERNELS", "mamba_ssm")
    with pytest.raises(KernelBackendError, match=r"kernel dummy: backend 'mamba_ssm' is not installed.*usable here: triton, torch"):
        resolve("dummy", dummy)
    with use_backend("triton"):
        with pytest.raises(KernelBackendError, match=r"kernel dummy: backend 'triton' does not support cpu float32 with grad.*usable here: torch"):
            resolve("dummy", dummy.clone().requires_grad_())


@pytest.mark.parametrize("value, message", [
    ("cuda_magic", "unknown kernel backend 'cuda_magic'"),
    ("auto,nosuchop=torch", "unknown kernel operator 'nosuchop'"),
    ("auto,dummy=bogus", "unknown kernel backend 'bogus'"),
    ("torch,triton", "more than one default backend"),
], ids=["backend", "operator", "op-backend", "two-defaults"])
def test_unknown_names_in_env_are_clear_errors(dummy, monkeypatch, value, message):
    monkeypatch.setenv("MIXERSWAP_KERNELS", value)
    with pytest.raises(ValueError, match=f"MIXERSWAP_KERNELS=.*{message}"):
        resolve("dummy", dummy)


def test_unknown_names_in_code_are_clear_errors(dummy):
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        register("dummy", "cuda", double_ref)
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        with use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="unknown kernel operator 'nope'"):
        with use_backend("torch", op="nope"):
            pass


def test_reference_runs_with_autocast_off_and_other_backends_do_not():
    seen = {}

    def record(name):
        def run(x):
            seen[name] = torch.is_autocast_enabled("cpu")
            return x

        return run

    register("dummy", "torch", record("torch"))
    register("dummy", "triton", record("triton"), supports=forward_only)
    run = dispatch.entry_point("dummy", double_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(torch.ones(1))
        run(torch.ones(1, requires_grad=True))
    assert seen == {"triton": True, "torch": False}


def test_backend_usable_by_name_but_never_chosen_by_auto():
    """The Triton interpreter on CPU: ``auto`` must not pick it, a named request must get it."""
    register("ssd_step", "triton", lambda *a, **k: "interpreted", auto=lambda call: False)
    x = torch.zeros(2, 3)
    assert resolve("ssd_step", x)[0] == "torch"
    with use_backend("triton", op="ssd_step"):
        assert resolve("ssd_step", x)[0] == "triton"


def test_triton_backend_registration_is_lazy_and_cpu_only_when_interpreting(monkeypatch):
    from mixerswap.kernels import triton_support

    monkeypatch.setattr(triton_support, "installed", lambda: True)
    triton_support.register_triton("ssd_step", "json", "dumps", dtypes=(torch.float32,), grad=False)
    backend = dispatch._REGISTRY["ssd_step"]["triton"]
    cpu = dispatch.Call("ssd_step", "cpu", torch.float32, False)
    cuda = dispatch.Call("ssd_step", "cuda", torch.float32, False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.supports(cpu) and backend.supports(cuda) and backend.auto(cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.supports(cpu) and not backend.auto(cpu)
    assert not backend.supports(dispatch.Call("ssd_step", "cuda", torch.bfloat16, False))
    assert not backend.supports(dispatch.Call("ssd_step", "cuda", torch.float32, True))
    assert backend.fn([1]) == "[1]"  # imported at the first call


def test_launch_fitting_takes_the_first_tile_that_fits_and_remembers_it(monkeypatch):
    """A tile whose kernel needs more shared memory than the GPU has raises OutOfResources at launch: the
    next candidate runs, later calls go straight to it, and when none fits the error names the kernel."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from mixerswap.kernels import triton_support

    monkeypatch.setattr(triton_support, "_FITTING", {})
    tried = []

    def launch(tile):
        tried.append(tile)
        if tile > 32:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return f"ran with {tile}"

    assert triton_support.launch_fitting(("k", 128), [64, 32, 16], launch) == "ran with 32"
    assert triton_support.launch_fitting(("k", 128), [64, 32, 16], launch) == "ran with 32"
    assert tried == [64, 32, 32]
    with pytest.raises(RuntimeError, match="no tile size of k fits in this GPU's shared memory"):
        triton_support.launch_fitting(("k", 256), [128, 64], launch)
