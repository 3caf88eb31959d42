"""What our Triton kernels need from their surroundings, shared by every operator folder.

Each operator folder keeps its Triton code in ``<op>/triton.py`` and registers it from its
``__init__`` with :func:`register_triton`. The module is imported at the first call, not at package
import, for two reasons: importing triton costs start-up time that a CPU-only user should not pay, and
``TRITON_INTERPRET=1`` (which runs the kernels on CPU tensors, for the tests) is read by ``triton.jit``
when a kernel is *defined*, so it must be set before the module is imported.

Where the backend runs: on CUDA tensors always; on CPU tensors only while ``TRITON_INTERPRET=1`` and
only when asked for by name (``MIXERSWAP_KERNELS=triton`` or ``use_backend("triton")``): ``auto`` never
picks the interpreter, which is orders of magnitude slower than the reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterable

import torch

from .dispatch import Call, register

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def installed() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1``: kernels then run on CPU tensors through triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def lazy(module: str, name: str) -> Callable:
    """``module.name``, imported at the first call."""
    target: list[Callable] = []

    def run(*args, **kwargs):
        if not target:
            target.append(getattr(importlib.import_module(module), name))
        return target[0](*args, **kwargs)

    run.__name__ = run.__qualname__ = name
    return run


def register_triton(op: str, module: str, name: str, *, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
                    grad: bool = True) -> None:
    """Register ``module.name`` as backend ``triton`` of ``op`` when triton is installed.

    It supports CUDA tensors of ``dtypes`` (and, under ``TRITON_INTERPRET=1``, CPU ones), with autograd
    when ``grad``; ``auto`` chooses it on CUDA only.
    """
    if not installed():
        return
    dtypes = tuple(dtypes)

    def supports(call: Call) -> bool:
        on_device = call.device == "cuda" or (call.device == "cpu" and interpreting())
        return on_device and call.dtype in dtypes and (grad or not call.needs_grad)

    def auto(call: Call) -> bool:
        return call.device == "cuda" and supports(call)

    register(op, "triton", lazy(module, name), supports=supports, auto=auto)


_FITTING: dict[tuple, object] = {}


def launch_fitting(key: tuple, candidates: Iterable, launch: Callable) -> object:
    """Run ``launch(candidate)`` with the first of ``candidates`` (largest tiles first) whose kernels fit in
    this GPU's shared memory, and remember it under ``key`` (the kernel and the shapes that set its tiles).

    Shared memory per block differs between GPUs (about 227 KiB on an H100, 163 KiB on an A100, 99 KiB on
    consumer cards) and between triton versions, so the tiles are not fixed in advance: triton raises
    ``OutOfResources`` at launch, before the kernel runs and writes anything, and the next candidate is
    tried. Returns what ``launch`` returned.
    """
    from triton.runtime.errors import OutOfResources

    candidates = list(candidates)
    if key in _FITTING:
        candidates = [_FITTING[key]]
    error = None
    for candidate in candidates:
        try:
            result = launch(candidate)
        except OutOfResources as err:
            error = err
            continue
        _FITTING[key] = candidate
        return result
    raise RuntimeError(f"no tile size of {key[0]} fits in this GPU's shared memory (tried {candidates}): {error}")
