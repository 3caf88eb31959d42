"""``ssd_chunk_scan`` on mamba-ssm's fused Triton kernel ``mamba_chunk_scan_combined``.

Registered as backend ``mamba_ssm`` only when ``mamba_ssm`` imports (CUDA builds). Written against
the signature in state-spaces/mamba ``mamba_ssm/ops/triton/ssd_combined.py``
(``x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, ..., return_final_states``);
it has not been run on a GPU in this repository yet, so the backend tests against the reference
are what to run first on a CUDA machine with mamba-ssm installed.
"""

from __future__ import annotations

import torch

from ..dispatch import cuda_floats, import_optional

mamba_chunk_scan_combined = import_optional("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined",
                                            "mamba_ssm")

supports = cuda_floats  # CUDA tensors in fp16, bf16 or fp32, forward and backward


def ssd_chunk_scan_mamba_ssm(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int = 64,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`~mixerswap.kernels.ssd.naive.ssd_chunk_scan_ref`.

    Our ``x`` ``[B, T, G, P]`` and ``B`` ``[B, T, G, N]`` are shared by the ``R = H / G`` heads of a
    group while ``C`` ``[B, T, H, N]`` is per head. mamba-ssm wants ``x`` per head and ``B``, ``C``
    with the same number of groups, so ``x`` and ``B`` are repeated per head (``ngroups = H``).
    The final state comes back as fp32 ``[B, H, P, N]`` whatever the kernel's state dtype.
    """
    rep = C.shape[2] // x.shape[2]
    x_heads = x.repeat_interleave(rep, dim=2)  # [B, T, H, P]
    B_heads = B.repeat_interleave(rep, dim=2)  # [B, T, H, N]
    y, final_state = mamba_chunk_scan_combined(
        x_heads,
        dt,
        A,
        B_heads,
        C,
        chunk_size,
        D=D,
        initial_states=initial_state,
        seq_idx=None if seq_idx is None else seq_idx.to(torch.int32).contiguous(),
        return_final_states=True,
    )
    return y, final_state.float()
