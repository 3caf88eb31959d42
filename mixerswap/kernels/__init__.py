"""Sequence-mixing operators behind one dispatch.

Mixers call only the operators exported here:

* ``ssd_chunk_scan(x, dt, A, B, C, *, chunk_size, D, initial_state, seq_idx) -> (y, final_state)``
* ``ssd_step(state, x, dt, A, B, C, D) -> (y, state)``
* ``causal_conv1d(x, weight, bias, *, initial_state, seq_idx, activation) -> (y, final_state)``
* ``causal_conv1d_step(x, state, weight, bias, *, activation) -> (y, state)``
* ``gated_rmsnorm(y, z, weight, *, group_size, eps) -> out``
* ``gla_chunk(q, k, v, g, *, scale, chunk_size, initial_state, seq_idx) -> (o, final_state)``
* ``gla_step(state, q, k, v, g, scale) -> (o, state)``
* ``delta_rule_chunk(q, k, v, g, beta, *, chunk_size, initial_state, seq_idx, scale) -> (o, final_state)``
* ``delta_rule_step(state, q, k, v, g, beta, scale) -> (o, state)``

Each has a pure PyTorch reference in ``<folder>/naive.py`` (``ssd``, ``conv1d``, ``norm``, ``gla``,
``delta_rule``), which is the specification: shapes and semantics are documented there and every
other backend is tested against it.

Backends. Each folder's ``__init__`` registers what lives in it with
``register(op, backend, fn, supports=...)``. Known names: ``torch`` (the reference, always
registered), ``triton`` (ours, in ``<folder>/triton.py``, registered through
:mod:`mixerswap.kernels.triton_support`: imported at first use, chosen by ``auto`` on CUDA, runnable by
name on CPU tensors under ``TRITON_INTERPRET=1``), and the third-party ``mamba_ssm`` (``ssd_chunk_scan``),
``causal_conv1d`` (``causal_conv1d``) and ``fla`` (``gla_chunk``, ``delta_rule_chunk``; packed documents
through :mod:`mixerswap.kernels.varlen`). Third-party packages are imported in
``try/except`` and registered only when they import; they need CUDA. ``supports(call)`` receives a
:class:`Call`: ``device`` (``"cpu"``/``"cuda"``), ``dtype`` of the main input, and ``needs_grad``
(grad mode on and some tensor argument requires grad), so a forward-only kernel is skipped in training.

Selection. ``auto`` takes the first backend, in the order triton, mamba_ssm, causal_conv1d, fla,
torch, whose ``supports`` says yes; the reference always can. A named backend that is not registered
for the op or does not support the call raises :class:`KernelBackendError` naming the op, the backend
and the backends usable for that call. Precedence: the innermost ``use_backend(backend, op=None)``
block (for that op or for all), then the per-op part of the environment variable, then its default.
The choice is cached per (request, op, device type, dtype, needs_grad) and logged once per cache key
(``logger.info`` on ``mixerswap.kernels``). ``resolve(op, *args, **kwargs)`` returns the backend
name and callable for a call (a single probe tensor also works); ``requested_backend(op=None)``
what was asked for.

Environment. ``MIXERSWAP_KERNELS`` is read once, at the first dispatch (``reset()`` forgets it and the
cached choices): a comma-separated list of one optional default (``auto``, the default when unset,
or a backend name) and ``op=backend`` items, e.g. ``MIXERSWAP_KERNELS="auto,ssd_chunk_scan=torch"``
or ``"torch,causal_conv1d=causal_conv1d"``. Unknown backend or operator names raise ``ValueError``.

Autocast. The reference runs with autocast disabled (``torch.autocast(device_type, enabled=False)``
around the call) so its own fp32 accumulation holds under bf16 autocast; other backends manage their
precision themselves.

In-place decoding. ``ssd_step`` and ``causal_conv1d_step`` overwrite ``state`` (``[B, H, P, N]`` fp32
and ``[B, D, K - 1]``) with the state after the token and return that same tensor object, so a cache
allocates its states once. Every backend of these two ops must keep this contract, and so must
``delta_rule_step`` and ``gla_step`` (``[B, H, K, V]`` fp32). The full-sequence
ops never modify their ``initial_state``.
"""

from __future__ import annotations

from . import conv1d, delta_rule, norm, ssd  # noqa: F401  (each folder registers its backends on import)
from . import gla  # noqa: F401  (registers gla_chunk, gla_step)
from .conv1d.naive import causal_conv1d_ref, causal_conv1d_step_ref
from .delta_rule.naive import delta_rule_chunk_ref, delta_rule_recurrent_ref, delta_rule_step_ref
from .dispatch import (
    BACKENDS,
    PRIORITY,
    Call,
    KernelBackendError,
    describe,
    entry_point,
    register,
    registered,
    requested_backend,
    reset,
    resolve,
    unregister,
    use_backend,
)
from .gla.naive import gla_chunk_ref, gla_recurrent_ref, gla_step_ref
from .norm.naive import gated_rmsnorm_ref
from .ssd.naive import ssd_chunk_scan_ref, ssd_recurrent_ref, ssd_step_ref

ssd_chunk_scan = entry_point("ssd_chunk_scan", ssd_chunk_scan_ref)
ssd_step = entry_point("ssd_step", ssd_step_ref)
causal_conv1d = entry_point("causal_conv1d", causal_conv1d_ref)
causal_conv1d_step = entry_point("causal_conv1d_step", causal_conv1d_step_ref)
gated_rmsnorm = entry_point("gated_rmsnorm", gated_rmsnorm_ref)
gla_chunk = entry_point("gla_chunk", gla_chunk_ref)
gla_step = entry_point("gla_step", gla_step_ref)
delta_rule_chunk = entry_point("delta_rule_chunk", delta_rule_chunk_ref)
delta_rule_step = entry_point("delta_rule_step", delta_rule_step_ref)

__all__ = [
    "BACKENDS",
    "PRIORITY",
    "Call",
    "KernelBackendError",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_step",
    "causal_conv1d_step_ref",
    "delta_rule_chunk",
    "delta_rule_chunk_ref",
    "delta_rule_recurrent_ref",
    "delta_rule_step",
    "delta_rule_step_ref",
    "describe",
    "gated_rmsnorm",
    "gated_rmsnorm_ref",
    "gla_chunk",
    "gla_chunk_ref",
    "gla_recurrent_ref",
    "gla_step",
    "gla_step_ref",
    "register",
    "registered",
    "requested_backend",
    "reset",
    "resolve",
    "ssd_chunk_scan",
    "ssd_chunk_scan_ref",
    "ssd_recurrent_ref",
    "ssd_step",
    "ssd_step_ref",
    "unregister",
    "use_backend",
]
