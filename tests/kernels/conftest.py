"""Every kernel test starts and ends with the real registry, no MIXERSWAP_KERNELS and nothing cached."""

import pytest

from mixerswap.kernels import dispatch


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
