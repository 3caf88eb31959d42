"""``delta_rule_chunk`` on fla's chunked gated delta rule (``chunk_gated_delta_rule``).

Registered as backend ``fla`` only when ``fla`` (flash-linear-attention) imports; for comparison by
name (``MIXERSWAP_KERNELS=fla`` or ``use_backend("fla")``) and in ``benchmarks/kernel_speed.py``.
Written against ``fla/ops/gated_delta_rule/chunk.py`` of fla 0.6 (``q, k, v, g, beta, scale,
initial_state, output_final_state, cu_seqlens``; ``[B, T, H, K]`` inputs, ``[N, H, K, V]`` states,
normalization of q and k left to the caller as in our op). It has not been run on a GPU in this
repository yet; ``tests/kernels/test_adapters.py`` checks the argument plumbing on CPU.
"""

from __future__ import annotations

import torch

from ..dispatch import cuda_floats, import_optional
from ..varlen import call_varlen

chunk_gated_delta_rule = import_optional("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "fla")

supports = cuda_floats  # CUDA tensors in fp16, bf16 or fp32, forward and backward


def delta_rule_chunk_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`~mixerswap.kernels.delta_rule.naive.delta_rule_chunk_ref` (fla picks its own
    chunk size). Packed documents become fla's variable-length sequences."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    initial_state = None if initial_state is None else initial_state.float()
    tensors = (q.to(v.dtype), k.to(v.dtype), v, g.float(), beta.to(v.dtype))
    return call_varlen(chunk_gated_delta_rule, tensors, initial_state, seq_idx, scale=scale)
