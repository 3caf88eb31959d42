"""Gated linear attention with a per-head decay.

``naive.py`` is the specification (backend ``torch``); ``triton.py`` holds our Triton kernels (backend
``triton``: the chunked form with its backward, and the in-place decoding step, forward only),
imported at their first use through :mod:`mixerswap.kernels.triton_support`; ``fla_adapter.py`` runs
fla's ``chunk_simple_gla`` (backend ``fla``) where flash-linear-attention is installed.
"""

from .. import triton_support
from ..dispatch import register
from . import fla_adapter
from .naive import gla_chunk_ref, gla_step_ref

register("gla_chunk", "torch", gla_chunk_ref, main_arg="v")
register("gla_step", "torch", gla_step_ref, main_arg="v")  # the first argument is the fp32 state
triton_support.register_triton("gla_chunk", "mixerswap.kernels.gla.triton", "gla_chunk_triton")
triton_support.register_triton("gla_step", "mixerswap.kernels.gla.triton", "gla_step_triton", grad=False)
if fla_adapter.chunk_simple_gla is not None:
    register("gla_chunk", "fla", fla_adapter.gla_chunk_fla, supports=fla_adapter.supports, main_arg="v")
