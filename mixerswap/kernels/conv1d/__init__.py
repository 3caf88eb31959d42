"""Causal depthwise conv1d: ``naive.py`` is the specification (backend ``torch``);
``causal_conv1d_adapter.py`` runs Dao-AILab's CUDA kernel (backend ``causal_conv1d``) where installed."""

from ..dispatch import register
from . import causal_conv1d_adapter
from .naive import causal_conv1d_ref, causal_conv1d_step_ref

register("causal_conv1d", "torch", causal_conv1d_ref)
register("causal_conv1d_step", "torch", causal_conv1d_step_ref)
if causal_conv1d_adapter.causal_conv1d_fn is not None:
    register("causal_conv1d", "causal_conv1d", causal_conv1d_adapter.causal_conv1d_dao,
             supports=causal_conv1d_adapter.supports)
