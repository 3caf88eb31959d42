"""Gated linear attention with a per-head decay: ``naive.py`` is the specification (backend ``torch``)."""

from ..dispatch import register
from .naive import gla_chunk_ref, gla_step_ref

register("gla_chunk", "torch", gla_chunk_ref, main_arg="v")
register("gla_step", "torch", gla_step_ref, main_arg="v")  # the first argument is the fp32 state
