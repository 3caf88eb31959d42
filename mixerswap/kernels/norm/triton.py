"""Gated RMSNorm of Mamba-2 in Triton, forward and backward.

Same contract as :func:`~mixerswap.kernels.norm.naive.gated_rmsnorm_ref`, the specification. Per row
and group of ``G`` channels, with ``h = y * silu(z)`` (``h = y`` without a gate)::

    r = 1 / sqrt(mean(h^2) + eps)      n = h * r      out = n * w

and backward, with ``dn = dout * w``::

    dh = r * (dn - n * mean(dn * n))    dw = sum_rows dout * n
    dy = dh * silu(z)                   dz = dh * y * sigmoid(z) * (1 + z * (1 - sigmoid(z)))

One program owns a tile of rows times one group; the forward stores ``r`` (fp32, ``[rows, groups]``)
for the backward, which recomputes ``h``. ``dw`` is summed per row tile into fp32 partials and reduced
by torch. All arithmetic is fp32 (also for fp64 inputs, which the dispatch leaves to the reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_support import interpreting

INTERPRET_BLOCK_M = 16  # rows per program under the interpreter (one fixed tile)


# Only builtins of triton.language, no functions of its jit'd standard library: when triton was
# imported before TRITON_INTERPRET=1 was set, those cannot run in the interpreter. The reduction keeps
# tl.sum's combine function, which the interpreter runs as one numpy sum.
@triton.jit
def _sum(v, axis: tl.constexpr):
    return tl.reduce(v, axis, tl.standard._sum_combine)


@triton.jit
def _load_gated(y_ptr, z_ptr, rows, cols, mask, stride_ym, stride_zm, HAS_Z: tl.constexpr):
    """``(y, z, h)`` in fp32 for a ``[BM, BG]`` tile (``z`` is ``y`` when there is no gate)."""
    y = tl.load(y_ptr + rows * stride_ym + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + rows * stride_zm + cols, mask=mask, other=0.0).to(tl.float32)
        h = y * z / (1.0 + tl.exp(-z))
    else:
        z = y
        h = y
    return y, z, h


@triton.jit
def _gated_rmsnorm_fwd_kernel(
    y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, M, eps,
    stride_ym, stride_zm, stride_om, stride_rm,
    GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Grid ``(cdiv(M, BLOCK_M), groups)``; rows of ``y``, ``z``, ``out`` have unit column stride."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None].to(tl.int64)
    group = tl.program_id(1)
    k = tl.arange(0, BLOCK_G)[None, :]
    cols = group * GROUP + k
    mask = (rows < M) & (k < GROUP)
    _, _, h = _load_gated(y_ptr, z_ptr, rows, cols, mask, stride_ym, stride_zm, HAS_Z)
    rstd = 1.0 / tl.sqrt(_sum(h * h, 1)[:, None] / GROUP + eps)  # [BM, 1]
    w = tl.load(w_ptr + cols, mask=k < GROUP, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_om + cols, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows * stride_rm + group, rstd, mask=rows < M)


@triton.jit
def _gated_rmsnorm_bwd_kernel(
    y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_part_ptr, M,
    stride_ym, stride_zm, stride_rm, stride_dom, stride_dym, stride_dzm, stride_pm,
    GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Grid ``(cdiv(M, BLOCK_M), groups)``; writes ``dy``, ``dz`` and this row tile's ``dw`` partial
    (``dw_part`` ``[cdiv(M, BLOCK_M), D]`` fp32)."""
    pid_m = tl.program_id(0)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None].to(tl.int64)
    k = tl.arange(0, BLOCK_G)[None, :]
    cols = tl.program_id(1) * GROUP + k
    mask = (rows < M) & (k < GROUP)
    y, z, h = _load_gated(y_ptr, z_ptr, rows, cols, mask, stride_ym, stride_zm, HAS_Z)
    rstd = tl.load(rstd_ptr + rows * stride_rm + tl.program_id(1), mask=rows < M, other=0.0)  # [BM, 1]
    w = tl.load(w_ptr + cols, mask=k < GROUP, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + rows * stride_dom + cols, mask=mask, other=0.0).to(tl.float32)
    n = h * rstd
    dn = dout * w
    dh = rstd * (dn - n * (_sum(dn * n, 1)[:, None] / GROUP))
    tl.store(dw_part_ptr + pid_m * stride_pm + cols, _sum(dout * n, 0)[None, :], mask=k < GROUP)
    if HAS_Z:
        sig = 1.0 / (1.0 + tl.exp(-z))
        tl.store(dy_ptr + rows * stride_dym + cols, (dh * z * sig).to(dy_ptr.dtype.element_ty), mask=mask)
        dz = dh * y * sig * (1.0 + z * (1.0 - sig))
        tl.store(dz_ptr + rows * stride_dzm + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dy_ptr + rows * stride_dym + cols, dh.to(dy_ptr.dtype.element_ty), mask=mask)


def _config(group_size: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_G, num_warps)``: a fixed tile under the interpreter, about 4K elements on GPU."""
    block_g = triton.next_power_of_2(group_size)
    if interpreting():
        return INTERPRET_BLOCK_M, block_g, 1
    return max(1, min(64, 4096 // block_g)), block_g, 4 if block_g <= 1024 else 8


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[M, D]`` view (a copy only when the channels are not contiguous)."""
    t = t.reshape(-1, dim)
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(y, z, weight, group_size, eps):
    """Launch the forward kernel: ``(out [..., D], (y2, z2, weight, rstd))``, the second what a backward needs."""
    dim = y.shape[-1]
    y2 = _rows(y, dim)
    z2 = None if z is None else _rows(z, dim)
    weight = weight.contiguous()
    rows = y2.shape[0]
    block_m, block_g, warps = _config(group_size)
    out = torch.empty((rows, dim), dtype=y.dtype, device=y.device)
    rstd = torch.empty((rows, dim // group_size), dtype=torch.float32, device=y.device)
    _gated_rmsnorm_fwd_kernel[(triton.cdiv(rows, block_m), dim // group_size)](
        y2, z2, weight, out, rstd, rows, eps,
        y2.stride(0), 0 if z2 is None else z2.stride(0), out.stride(0), rstd.stride(0),
        GROUP=group_size, HAS_Z=z is not None, BLOCK_M=block_m, BLOCK_G=block_g, num_warps=warps,
    )
    return out.view(y.shape), (y2, z2, weight, rstd)


class GatedRMSNormFn(torch.autograd.Function):
    """Autograd around the two kernels; ``group_size`` and ``eps`` get no gradient."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        out, saved = _forward(y, z, weight, group_size, eps)
        ctx.save_for_backward(*saved)
        ctx.shape, ctx.group_size = y.shape, group_size
        return out

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        rows, dim = y2.shape
        group_size = ctx.group_size
        block_m, block_g, warps = _config(group_size)
        dout2 = _rows(dout, dim)
        dy = torch.empty((rows, dim), dtype=y2.dtype, device=y2.device)
        dz = None if z2 is None else torch.empty((rows, dim), dtype=z2.dtype, device=y2.device)
        tiles = triton.cdiv(rows, block_m)
        dw_part = torch.empty((tiles, dim), dtype=torch.float32, device=y2.device)
        _gated_rmsnorm_bwd_kernel[(tiles, dim // group_size)](
            y2, z2, weight, rstd, dout2, dy, dz, dw_part, rows,
            y2.stride(0), 0 if z2 is None else z2.stride(0), rstd.stride(0), dout2.stride(0), dy.stride(0),
            0 if dz is None else dz.stride(0), dw_part.stride(0),
            GROUP=group_size, HAS_Z=z2 is not None, BLOCK_M=block_m, BLOCK_G=block_g, num_warps=warps,
        )
        dw = dw_part.sum(0).to(weight.dtype)
        return dy.view(ctx.shape), None if dz is None else dz.view(ctx.shape), dw, None, None


def gated_rmsnorm_triton(
    y: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    *,
    group_size: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Normalize each group of ``group_size`` channels to unit RMS after gating by ``silu(z)``, with
    gradients for ``y``, ``z`` and ``weight``.

    Args:
        y: ``[..., D]``; z: ``[..., D]`` or ``None`` (no gate); weight: ``[D]``.
        group_size: channels per normalization group (Mamba-2 uses one group per head here).
    Returns:
        ``[..., D]`` in ``y.dtype``; the arithmetic is done in fp32.
    """
    dim = y.shape[-1]
    if dim % group_size:
        raise ValueError(f"channel count {dim} is not a multiple of group_size {group_size}")
    if y.numel() == 0:
        return torch.empty_like(y)
    if not torch.is_grad_enabled():  # decoding: the kernel alone, without autograd's bookkeeping per call
        return _forward(y, z, weight, group_size, float(eps))[0]
    return GatedRMSNormFn.apply(y, z, weight, group_size, float(eps))
