"""Gated delta rule of Gated DeltaNet: ``naive.py`` is the specification (backend ``torch``)."""

from ..dispatch import register
from .naive import delta_rule_chunk_ref, delta_rule_step_ref

register("delta_rule_chunk", "torch", delta_rule_chunk_ref)
register("delta_rule_step", "torch", delta_rule_step_ref, main_arg="q")  # the first argument is the fp32 state
