"""Gated RMSNorm of Mamba-2: ``naive.py`` is the specification (backend ``torch``); ``triton.py`` holds
our fused Triton kernels, forward and backward (backend ``triton``, imported at first use)."""

from .. import triton_support
from ..dispatch import register
from .naive import gated_rmsnorm_ref

register("gated_rmsnorm", "torch", gated_rmsnorm_ref)
triton_support.register_triton("gated_rmsnorm", "mixerswap.kernels.norm.triton", "gated_rmsnorm_triton",
                               dtypes=triton_support.FLOAT_DTYPES, grad=True)
