"""Backend registry and selection for the kernel operators (the rules are in the package docstring).

Each operator folder registers its backends here at import time; :func:`entry_point` builds the entry
point that mixers call. Selection is a dictionary lookup after the first call for a given
``(op, device type, dtype, needs_grad)``, so decoding one token at a time pays almost nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger("mixerswap.kernels")

ENV_VAR = "MIXERSWAP_KERNELS"
REFERENCE = "torch"
THIRD_PARTY = ("mamba_ssm", "causal_conv1d", "fla")
# Order tried by ``auto``: our kernels, then third-party ones, then the reference.
PRIORITY = ("triton", *THIRD_PARTY, REFERENCE)
BACKENDS = (REFERENCE, "triton", *THIRD_PARTY)


class KernelBackendError(RuntimeError):
    """A requested backend is unknown, not installed, or cannot run the call."""


@dataclass(frozen=True)
class Call:
    """What a backend's ``supports`` predicate sees of one call.

    ``device`` is ``"cpu"`` or ``"cuda"`` (``torch.device.type``), ``dtype`` that of the main input
    (``x`` of the SSD and conv ops, ``y`` of the norm), ``needs_grad`` whether autograd records the
    call (grad mode on and some tensor argument requires grad).
    """

    op: str
    device: str
    dtype: torch.dtype
    needs_grad: bool

    def __str__(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')} {'with' if self.needs_grad else 'without'} grad"


@dataclass(frozen=True)
class _Backend:
    fn: Callable
    supports: Callable[[Call], bool]
    auto: Callable[[Call], bool]


def _always(call: Call) -> bool:
    return True


CUDA_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def cuda_floats(call: Call) -> bool:
    """What the third-party CUDA kernels take: CUDA tensors in fp16, bf16 or fp32, forward and backward."""
    return call.device == "cuda" and call.dtype in CUDA_FLOATS


def import_optional(module: str, name: str, backend: str) -> Callable | None:
    """``module.name`` of an optional package, or ``None`` when it is missing or fails to load (a CUDA
    build on a machine without CUDA): a backend that cannot load never breaks ``import mixerswap``."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as err:
        logger.debug("%s backend unavailable for %s: %s", backend, name, err)
        return None


_REGISTRY: dict[str, dict[str, _Backend]] = {}
_MAIN_ARG: dict[str, tuple[int, str]] = {}  # op -> position and name of the main input
_CHOICES: dict[tuple, tuple[str, Callable]] = {}  # (request, op, device, dtype, needs_grad) -> choice
_env: tuple[str, dict[str, str]] | None = None  # parsed MIXERSWAP_KERNELS: (global, per op)
# Innermost first: (backend, op or None for all ops) pushed by use_backend.
_overrides: contextvars.ContextVar[tuple[tuple[str, str | None], ...]] = contextvars.ContextVar(
    "mixerswap_kernel_overrides", default=()
)


def register(op: str, backend: str, fn: Callable, supports: Callable[[Call], bool] = _always,
             main_arg: str | None = None, auto: Callable[[Call], bool] | None = None) -> None:
    """Register ``fn`` as ``backend`` of ``op``; ``supports(call: Call) -> bool`` says when it can run.

    ``supports`` may look only at the fields of :class:`Call`, because the choice is cached on them.
    ``auto(call)`` (default: ``supports``) says when ``auto`` may choose it; a backend that can run a
    call only slowly (the Triton interpreter on CPU) is usable by name but not chosen automatically.
    ``main_arg`` (given with the ``torch`` reference) names the argument whose device and dtype
    describe the call; by default the first parameter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == REFERENCE or op not in _MAIN_ARG:
        params = list(inspect.signature(fn).parameters)
        name = main_arg or params[0]
        _MAIN_ARG[op] = (params.index(name), name)
    _REGISTRY.setdefault(op, {})[backend] = _Backend(fn, supports, auto or supports)
    _CHOICES.clear()


def unregister(op: str, backend: str) -> None:
    """Remove a registered backend (tests register fakes and take them away again)."""
    del _REGISTRY[op][backend]
    if not _REGISTRY[op]:
        del _REGISTRY[op], _MAIN_ARG[op]
    _CHOICES.clear()


def registered(op: str) -> list[str]:
    """The backends registered for ``op`` (those whose package imported), in ``auto``'s order."""
    _check_op(op, "registered")
    return [name for name in PRIORITY if name in _REGISTRY[op]]


def reset() -> None:
    """Forget the parsed environment variable and every cached choice (read again at the next call)."""
    global _env
    _env = None
    _CHOICES.clear()


def _check_name(backend: str, where: str) -> str:
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"{where}: unknown kernel backend {backend!r}; use auto, {', '.join(BACKENDS)}")
    return backend


def _check_op(op: str, where: str) -> str:
    if op not in _REGISTRY:
        raise ValueError(f"{where}: unknown kernel operator {op!r}; known: {', '.join(sorted(_REGISTRY))}")
    return op


def _parse_env() -> tuple[str, dict[str, str]]:
    """``MIXERSWAP_KERNELS="auto,ssd_chunk_scan=torch"``: one optional default, then ``op=backend`` items."""
    raw = os.environ.get(ENV_VAR, "")
    where = f"{ENV_VAR}={raw!r}"
    default, per_op = None, {}
    for item in filter(None, (part.strip().lower() for part in raw.split(","))):
        if "=" in item:
            op, _, backend = (s.strip() for s in item.partition("="))
            per_op[_check_op(op, where)] = _check_name(backend, where)
        elif default is None:
            default = _check_name(item, where)
        else:
            raise ValueError(f"{where}: more than one default backend ({default}, {item})")
    return default or "auto", per_op


def _env_selection() -> tuple[str, dict[str, str]]:
    global _env
    if _env is None:
        _env = _parse_env()
    return _env


def requested_backend(op: str | None = None) -> str:
    """The backend asked for (``auto`` or a name), globally or for ``op``: innermost
    :func:`use_backend` first, then the per-op part of the environment variable, then its default."""
    for backend, scope in _overrides.get():
        if scope is None or scope == op:
            return backend
    default, per_op = _env_selection()
    return per_op.get(op, default) if op is not None else default


@contextlib.contextmanager
def use_backend(backend: str, op: str | None = None) -> Iterator[None]:
    """Within the block, run ``op`` (every operator if ``None``) with ``backend`` (or ``auto``)."""
    _check_name(backend, "use_backend")
    if op is not None:
        _check_op(op, "use_backend")
    token = _overrides.set(((backend, op), *_overrides.get()))
    try:
        yield
    finally:
        _overrides.reset(token)


def describe(op: str, *args, **kwargs) -> Call:
    """The :class:`Call` for ``op`` on these arguments; with a single probe tensor, that tensor."""
    position, name = _MAIN_ARG[op]
    main = args[position] if len(args) > position else kwargs.get(name)
    if not isinstance(main, torch.Tensor):
        main = next((a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if main is None:
            raise TypeError(f"kernel {op}: no tensor argument to choose a backend for")
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in itertools.chain(args, kwargs.values())
    )
    return Call(op, main.device.type, main.dtype, needs_grad)


def _without_autocast(fn: Callable, device: str) -> Callable:
    """Run a reference with autocast off: under bf16 autocast its fp32 einsums would run in bf16."""
    def run(*args, **kwargs):
        if not torch.is_autocast_enabled(device):  # entering the context costs more than a small decode step
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    run.__wrapped__ = fn
    return run


def _choose(call: Call, request: str) -> tuple[str, Callable]:
    impls = _REGISTRY[call.op]
    if request == "auto":
        name = next(b for b in PRIORITY if b in impls and (b == REFERENCE or impls[b].auto(call)))
    else:
        usable = [b for b in PRIORITY if b in impls and impls[b].supports(call)]
        if request not in usable:
            why = "does not support" if request in impls else "is not installed or has no kernel for"
            raise KernelBackendError(
                f"kernel {call.op}: backend {request!r} {why} {call}; usable here: {', '.join(usable) or 'none'} "
                f"(set {ENV_VAR}=auto or {call.op}=<one of those>)"
            )
        name = request
    fn = impls[name].fn
    return name, _without_autocast(fn, call.device) if name == REFERENCE else fn


def resolve(op: str, *args, **kwargs) -> tuple[str, Callable]:
    """The backend name and the callable that ``op`` runs for these arguments (or one probe tensor)."""
    _check_op(op, "resolve")
    call = describe(op, *args, **kwargs)
    request = requested_backend(op)
    key = (request, op, call.device, call.dtype, call.needs_grad)
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _choose(call, request)
        logger.debug("kernel %s (%s, requested %s) uses backend %s", op, call, request, choice[0])
    return choice


def entry_point(op: str, reference: Callable) -> Callable:
    """The public entry point of ``op``: resolve the backend for the arguments, then run it."""
    def run(*args, **kwargs):
        return resolve(op, *args, **kwargs)[1](*args, **kwargs)

    run.__name__ = run.__qualname__ = op
    run.__doc__ = f"Dispatching entry point of ``{op}``; the contract is that of the reference:\n\n{reference.__doc__}"
    run.__signature__ = inspect.signature(reference)
    return run
