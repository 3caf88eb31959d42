"""benchmarks/gpu_prepare.py: which wheels a GPU machine without internet must be given (no download here)."""

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def prepare():
    return load_benchmark("gpu_prepare")


def test_the_closure_follows_extras_and_markers_to_the_installed_versions(prepare):
    from importlib import metadata

    needed = prepare.requirement_closure("mixerswap", {"dev"}, "3.12")
    for name in ("torch", "transformers", "pydantic", "pydantic-core", "accelerate", "lm-eval", "pytest-xdist"):
        assert needed[name] == metadata.version(name), name
    assert "peft" in needed  # dev -> mixerswap[eval,data,lora] -> peft: an extra of an extra
    assert "mamba-ssm" not in needed  # the cuda extra is not asked for
    assert set(prepare.requirement_closure("mixerswap", set(), "3.12")) < set(needed)


def test_only_what_the_image_lacks_travels(prepare):
    image = prepare.image_packages()
    assert {"torch", "triton", "transformers", "accelerate", "numpy"} <= image
    missing = prepare.missing_on_image("3.12", image, frozenset({"dev"}))
    assert {"pydantic", "pydantic-core", "lm-eval"} <= set(missing)
    assert not {"torch", "triton", "transformers", "mixerswap"} & set(missing)
    assert not set(missing) & image
