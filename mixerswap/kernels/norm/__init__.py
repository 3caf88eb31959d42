"""Gated RMSNorm of Mamba-2: ``naive.py`` is the specification (backend ``torch``)."""

from ..dispatch import register
from .naive import gated_rmsnorm_ref

register("gated_rmsnorm", "torch", gated_rmsnorm_ref)
