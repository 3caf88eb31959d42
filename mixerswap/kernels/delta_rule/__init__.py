"""Gated delta rule of Gated DeltaNet: ``naive.py`` is the specification (backend ``torch``).

``triton.py`` holds our kernels (backend ``triton``): the chunked WY/UT form with a Triton forward and
backward (``delta_rule_chunk``), and the one-token decode step updating the state in place
(``delta_rule_step``, no autograd). It is imported at the first call; ``auto`` picks it on CUDA, and on
CPU tensors it runs by name under ``TRITON_INTERPRET=1`` (see :mod:`mixerswap.kernels.triton_support`).
``fla_adapter.py`` runs fla's ``chunk_gated_delta_rule`` (backend ``fla``) where flash-linear-attention
is installed.
"""

from .. import triton_support
from ..dispatch import register
from . import fla_adapter
from .naive import delta_rule_chunk_ref, delta_rule_step_ref

register("delta_rule_chunk", "torch", delta_rule_chunk_ref)
register("delta_rule_step", "torch", delta_rule_step_ref, main_arg="q")  # the first argument is the fp32 state
triton_support.register_triton("delta_rule_chunk", "mixerswap.kernels.delta_rule.triton", "delta_rule_chunk_triton")
triton_support.register_triton("delta_rule_step", "mixerswap.kernels.delta_rule.triton", "delta_rule_step_triton",
                               grad=False)
if fla_adapter.chunk_gated_delta_rule is not None:
    register("delta_rule_chunk", "fla", fla_adapter.delta_rule_chunk_fla, supports=fla_adapter.supports)
