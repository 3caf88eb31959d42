"""Sequence-mixing operators behind one dispatch.

Mixers call only the functions exported here. Each operator has a pure PyTorch reference in
``<op>/naive.py`` (the specification, always available) and may have faster backends registered
beside it. ``MIXERSWAP_KERNELS=torch|triton|auto`` (default ``auto``) picks the backend; ``auto``
takes the fastest registered backend that supports the tensors' device and falls back to torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .conv1d.naive import causal_conv1d_ref, causal_conv1d_step_ref
from .norm.naive import gated_rmsnorm_ref
from .ssd.naive import ssd_chunk_scan_ref, ssd_recurrent_ref, ssd_step_ref

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "triton")
# op name -> backend name -> (implementation, predicate on the first tensor argument)
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable]]] = {}
_announced: set[tuple[str, str]] = set()


def register(op: str, backend: str, fn: Callable, supports: Callable = lambda tensor: True) -> None:
    """Register ``fn`` as ``backend`` for ``op``; ``supports(tensor)`` says whether it can run on it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    _REGISTRY.setdefault(op, {})[backend] = (fn, supports)


def requested_backend() -> str:
    choice = os.environ.get("MIXERSWAP_KERNELS", "auto").strip().lower()
    if choice not in (*BACKENDS, "auto"):
        raise ValueError(f"MIXERSWAP_KERNELS={choice!r} is not one of torch, triton, auto")
    return choice


def resolve(op: str, tensor) -> tuple[str, Callable]:
    """The backend name and implementation that would run ``op`` on ``tensor`` now."""
    impls = _REGISTRY[op]
    choice = requested_backend()
    if choice != "auto":
        if choice not in impls:
            raise RuntimeError(f"MIXERSWAP_KERNELS={choice}: operator {op!r} has no {choice} backend "
                               f"(available: {', '.join(impls)}); set MIXERSWAP_KERNELS=auto")
        name = choice
    else:
        name = next(b for b in reversed(BACKENDS) if b in impls and impls[b][1](tensor))
    if (op, name) not in _announced:
        _announced.add((op, name))
        logger.info("kernel %s uses backend %s", op, name)
    return name, impls[name][0]


def _dispatch(op: str) -> Callable:
    def call(*args, **kwargs):
        return resolve(op, args[0])[1](*args, **kwargs)

    call.__name__ = op
    call.__doc__ = f"Dispatching entry point for ``{op}``; see the torch reference for the contract."
    return call


for _op, _fn in {
    "ssd_chunk_scan": ssd_chunk_scan_ref,
    "ssd_step": ssd_step_ref,
    "causal_conv1d": causal_conv1d_ref,
    "causal_conv1d_step": causal_conv1d_step_ref,
    "gated_rmsnorm": gated_rmsnorm_ref,
}.items():
    register(_op, "torch", _fn)

ssd_chunk_scan = _dispatch("ssd_chunk_scan")
ssd_step = _dispatch("ssd_step")
causal_conv1d = _dispatch("causal_conv1d")
causal_conv1d_step = _dispatch("causal_conv1d_step")
gated_rmsnorm = _dispatch("gated_rmsnorm")

__all__ = [
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_step",
    "causal_conv1d_step_ref",
    "gated_rmsnorm",
    "gated_rmsnorm_ref",
    "register",
    "resolve",
    "ssd_chunk_scan",
    "ssd_chunk_scan_ref",
    "ssd_recurrent_ref",
    "ssd_step",
    "ssd_step_ref",
]
