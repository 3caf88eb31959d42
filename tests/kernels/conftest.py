"""Every kernel test starts and ends with the real registry, no MIXERSWAP_KERNELS and nothing cached."""

import pytest

from mixerswap.kernels import dispatch, triton_support

# Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set in tests/conftest.py without CUDA).
requires_triton = pytest.mark.skipif(
    not triton_support.installed() or not (triton_support.interpreting() or __import__("torch").cuda.is_available()),
    reason="triton is not installed (pip install triton) or cannot run here",
)


@pytest.fixture(autouse=True)
def clean_dispatch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    registry = {op: dict(backends) for op, backends in dispatch._REGISTRY.items()}
    main_args = dict(dispatch._MAIN_ARG)
    dispatch.reset()
    yield
    dispatch._REGISTRY.clear()
    dispatch._REGISTRY.update(registry)
    dispatch._MAIN_ARG.clear()
    dispatch._MAIN_ARG.update(main_args)
    dispatch.reset()
