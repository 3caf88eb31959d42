"""Causal depthwise conv1d: ``naive.py`` is the specification (backend ``torch``); ``triton.py`` holds
our Triton kernels (backend ``triton``: full pass with autograd, and the in-place decode step, forward
only), imported at first use; ``causal_conv1d_adapter.py`` runs Dao-AILab's CUDA kernel (backend
``causal_conv1d``) where installed."""

from .. import triton_support
from ..dispatch import register
from . import causal_conv1d_adapter
from .naive import causal_conv1d_ref, causal_conv1d_step_ref

register("causal_conv1d", "torch", causal_conv1d_ref)
register("causal_conv1d_step", "torch", causal_conv1d_step_ref)
triton_support.register_triton("causal_conv1d", "mixerswap.kernels.conv1d.triton", "causal_conv1d_triton",
                               dtypes=triton_support.FLOAT_DTYPES, grad=True)
triton_support.register_triton("causal_conv1d_step", "mixerswap.kernels.conv1d.triton", "causal_conv1d_step_triton",
                               dtypes=triton_support.FLOAT_DTYPES, grad=False)
if causal_conv1d_adapter.causal_conv1d_fn is not None:
    register("causal_conv1d", "causal_conv1d", causal_conv1d_adapter.causal_conv1d_dao,
             supports=causal_conv1d_adapter.supports)
