"""``gla_chunk`` on fla's chunked gated linear attention with one decay per head (``chunk_simple_gla``).

Registered as backend ``fla`` only when ``fla`` (flash-linear-attention) imports; for comparison by
name (``MIXERSWAP_KERNELS=fla`` or ``use_backend("fla")``) and in ``benchmarks/kernel_speed.py``.
Written against ``fla/ops/simple_gla/chunk.py`` of fla 0.6 (``q, k, v, g, scale, initial_state,
output_final_state, cu_seqlens``; ``[B, T, H, K]`` inputs, ``[N, H, K, V]`` states): the same
recurrence as our reference, so only the packing of documents differs. It has not been run on a GPU
in this repository yet; ``tests/kernels/test_adapters.py`` checks the argument plumbing on CPU.
"""

from __future__ import annotations

import torch

from ..dispatch import cuda_floats, import_optional
from ..varlen import call_varlen

chunk_simple_gla = import_optional("fla.ops.simple_gla", "chunk_simple_gla", "fla")

supports = cuda_floats  # CUDA tensors in fp16, bf16 or fp32, forward and backward


def gla_chunk_fla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`~mixerswap.kernels.gla.naive.gla_chunk_ref` (fla picks its own chunk size,
    which changes nothing but round-off). Packed documents become fla's variable-length sequences."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    initial_state = None if initial_state is None else initial_state.float()
    return call_varlen(chunk_simple_gla, (q.to(v.dtype), k.to(v.dtype), v, g.float()), initial_state, seq_idx,
                       scale=scale)
