"""Mamba-2 (SSD) mixer shaped to replace an attention layer.

Dao & Gu, "Transformers are SSMs" (2024); the attention-to-Mamba mapping follows Wang et al.,
"The Mamba in the Llama" (2024) and Bick et al., "Transformers to SSMs" (MOHAWK, 2024)::

    x = conv(W_v h)   B = conv(W_k h)   C = conv(W_q h)     (one causal depthwise conv over [x, B, C])
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T ;  y_t = S_t C_t + D x_t
    out = W_o gated_rmsnorm(y, z)

``x`` and ``B`` keep the teacher's ``G`` key/value heads and ``C`` its ``H`` query heads: the ``H / G``
heads of a group share ``x`` and ``B`` (grouped-query attention without repeated projections), each
with its own ``dt`` and ``A``, so each head still keeps its own ``[P, N]`` state.

The parallel path (prefill, training) runs the chunked SSD scan; the decode path runs one
recurrent step per token from the states kept in :class:`~mixerswap.architectures.cache.RecurrentStateLayer`.
Padding (from the 2-D attention mask) and packed documents (from ``position_ids`` that restart,
the ``transformers`` packing convention) never leak through the conv or the recurrence.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import initialization as init

from ... import kernels
from ...kernels.precision import acc_dtype
from ..cache import RecurrentStateLayer
from .common import mixer_inputs
from .contract import Mixer


class Mamba2Settings(BaseModel):
    """Shape and options of one Mamba-2 mixer (one plan entry)."""

    model_config = ConfigDict(extra="forbid")

    n_heads: int = Field(gt=0, description="H: heads (= teacher query heads); C has H heads")
    n_groups: int = Field(gt=0, description="G: groups (= teacher key/value heads); x and B have G heads")
    head_dim: int = Field(gt=0, description="P: channels per head of x and y (= teacher head_dim)")
    d_state: int = Field(gt=0, description="N: state size per head (= teacher head_dim)")
    conv_kernel: int = Field(4, ge=1)
    chunk_size: int = Field(64, ge=1)
    conv_activation: Literal["silu", "identity"] = "silu"
    norm: Literal["gated", "rms", "none"] = "gated"
    norm_group: Literal["head", "layer"] = Field(
        "head", description="channels one output norm spans: each head's, or all H * P (Granite-4's, Bamba's)")
    bc_norm: bool = Field(False, description="per-head RMSNorm on B and C (teachers with q/k norms)")
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    A_init_min: float = 1.0
    A_init_max: float = 16.0

    @model_validator(mode="after")
    def _check(self):
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_groups ({self.n_groups})")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError("need 0 < dt_min <= dt_max")
        return self


class Mamba2Mixer(Mixer):
    """Drop-in replacement for a teacher attention module (same call signature and return shape)."""

    kind = "mamba2"
    Settings = Mamba2Settings
    # Mamba keeps A, D and the dt bias in fp32 and never decays them (mamba_ssm's ``_no_weight_decay``).
    fp32_parameters = ("A_log", "D", "dt_proj.bias")
    no_weight_decay = ("A_log", "D", "dt_proj.bias")
    fast_parameters = ("A_log", "D", "dt_proj.bias", "conv1d.*")
    lora_targets = ("x_proj", "b_proj", "c_proj", "z_proj", "out_proj")
    output_projection = "out_proj"
    kernel_ops = ("ssd_chunk_scan", "ssd_step", "causal_conv1d", "causal_conv1d_step", "gated_rmsnorm")

    def __init__(self, settings: Mamba2Settings, hidden_size: int, layer_idx: int):
        super().__init__(settings, hidden_size, layer_idx)
        s = settings
        H, G, P, N = s.n_heads, s.n_groups, s.head_dim, s.d_state
        self.x_dim, self.b_dim, self.c_dim = G * P, G * N, H * N
        self.x_proj = nn.Linear(hidden_size, self.x_dim, bias=s.qkv_bias)
        self.b_proj = nn.Linear(hidden_size, self.b_dim, bias=s.qkv_bias)
        self.c_proj = nn.Linear(hidden_size, self.c_dim, bias=s.qkv_bias)
        self.dt_proj = nn.Linear(hidden_size, H, bias=True)  # its bias is Mamba's dt_bias
        conv_dim = self.x_dim + self.b_dim + self.c_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, s.conv_kernel, groups=conv_dim, padding=s.conv_kernel - 1)
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        if s.norm == "gated":
            self.z_proj = nn.Linear(hidden_size, H * P, bias=True)
        if s.norm != "none":
            self.norm_weight = nn.Parameter(torch.empty(H * P))
        if s.bc_norm:
            self.b_norm_weight = nn.Parameter(torch.empty(N))
            self.c_norm_weight = nn.Parameter(torch.empty(N))
        self.out_proj = nn.Linear(H * P, hidden_size, bias=s.out_bias)

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        """Random Mamba-2 initialization (used when a student is built without converted weights).

        Uses ``transformers.initialization`` so parameters loaded from a checkpoint are left alone.
        """
        s = self.settings
        for proj in (self.x_proj, self.b_proj, self.c_proj, self.out_proj):
            init.normal_(proj.weight, std=std)
            if proj.bias is not None:
                init.zeros_(proj.bias)
        self.init_ssm_parameters()
        conv_w = torch.zeros_like(self.conv1d.weight)
        conv_w[:, 0, -1] = 1.0
        init.copy_(self.conv1d.weight, conv_w)
        init.zeros_(self.conv1d.bias)
        if s.bc_norm:
            init.ones_(self.b_norm_weight)
            init.ones_(self.c_norm_weight)

    @torch.no_grad()
    def init_ssm_parameters(self) -> None:
        """Initialize what attention has no counterpart for: A, dt, D, the gate and the output norm.

        * ``A`` = -U[A_init_min, A_init_max] and ``dt`` log-uniform in [dt_min, dt_max] (Mamba-2's
          defaults): per-token decays ``exp(dt A)`` from ~0.2 to ~0.999 give the heads a spread of
          memory lengths, from a few tokens to thousands, much like attention heads of a trained model.
          ``dt_proj.weight`` starts at zero, so dt first depends on the head only and learns input
          dependence during distillation.
        * ``D`` = 0: attention has no skip path; a nonzero D would initially let ``y`` be dominated by
          the current token's value.
        * gate: ``z_proj`` weight 0 and bias 1, so ``silu(z)`` is the same constant on every channel
          and the gated norm starts as a plain per-head RMSNorm.
        * norm weight 1, one group per head: softmax attention returns a convex combination of
          values per head; normalizing each head's output is the recurrent analogue of that
          normalization, which an unnormalized linear recurrence lacks.
        """
        s = self.settings
        dt = torch.exp(torch.rand(s.n_heads) * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min))
        dt = dt.clamp_min(1e-4)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init.zeros_(self.dt_proj.weight)
        init.copy_(self.A_log, torch.log(torch.empty(s.n_heads).uniform_(s.A_init_min, s.A_init_max)))
        init.zeros_(self.D)
        if s.norm == "gated":
            init.zeros_(self.z_proj.weight)
            init.ones_(self.z_proj.bias)
        if s.norm != "none":
            init.ones_(self.norm_weight)

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the recurrent states kept per layer (conv window and SSM state)."""
        s = self.settings
        conv_dim = self.x_dim + self.b_dim + self.c_dim
        return {"conv": (batch_size, conv_dim, s.conv_kernel - 1), "ssm": (batch_size, s.n_heads, s.head_dim, s.d_state)}

    def cache_spec(self, batch_size: int, dtype: torch.dtype) -> dict[str, int]:
        """Bytes of state this layer keeps for ``batch_size`` sequences, independent of their length."""
        shapes = self.state_shapes(batch_size)
        conv = math.prod(shapes["conv"]) * torch.empty((), dtype=dtype).element_size()
        ssm = math.prod(shapes["ssm"]) * 4  # SSM states are kept in fp32
        return {"conv": conv, "ssm": ssm}

    def _split_xbc(self, xbc: torch.Tensor):
        x, B, C = torch.split(xbc, [self.x_dim, self.b_dim, self.c_dim], dim=-1)
        s = self.settings
        if s.bc_norm:
            B = kernels.gated_rmsnorm(B, None, self.b_norm_weight.repeat(s.n_groups), group_size=s.d_state, eps=s.norm_eps)
            C = kernels.gated_rmsnorm(C, None, self.c_norm_weight.repeat(s.n_heads), group_size=s.d_state, eps=s.norm_eps)
        lead = x.shape[:-1]
        return (
            x.reshape(*lead, s.n_groups, s.head_dim),
            B.reshape(*lead, s.n_groups, s.d_state),
            C.reshape(*lead, s.n_heads, s.d_state),
        )

    def _project(self, hidden_states: torch.Tensor, padding: torch.Tensor | None):
        """``[x, B, C]`` before the conv ``[B, T, conv_dim]`` and ``dt`` ``[B, T, H]``, zeroed at padding.

        ``dt`` is in fp32 (fp64 for fp64 inputs): a padded position with dt = 0 neither decays nor
        writes the state, and its zeroed input leaves the conv window as if it were not there.
        """
        xbc = torch.cat([self.x_proj(hidden_states), self.b_proj(hidden_states), self.c_proj(hidden_states)], -1)
        acc = acc_dtype(hidden_states.dtype)
        # the dt bias is kept in fp32 (fp32_parameters): add it after the projection, in fp32
        dt = F.softplus(F.linear(hidden_states, self.dt_proj.weight).to(acc) + self.dt_proj.bias.to(acc))
        if padding is not None:
            xbc = xbc * padding[..., None].to(xbc.dtype)
            dt = dt * padding[..., None]
        return xbc, dt

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """``hidden_states``: ``[B, T, hidden]`` → ``([B, T, hidden], None)`` like an HF attention module.

        ``attention_mask`` (the teacher's 4-D mask) is not used: the 2-D padding mask arrives through
        ``kwargs`` from :class:`~mixerswap.architectures.modeling.MixerSwapForCausalLM`.
        """
        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        layer: RecurrentStateLayer | None = self.cache_layer(past_key_values)
        has_state = layer is not None and layer.has_state()
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=has_state)

        xbc, dt = self._project(hidden_states, padding)
        A = -torch.exp(self.A_log.to(dt.dtype))
        conv_w = self.conv1d.weight.squeeze(1)

        if has_state and seqlen == 1:
            xbc_t, conv_state = kernels.causal_conv1d_step(
                xbc[:, 0], layer.states["conv"], conv_w, self.conv1d.bias, activation=s.conv_activation
            )
            x, B, C = self._split_xbc(xbc_t)
            y, ssm_state = kernels.ssd_step(layer.states["ssm"], x, dt[:, 0], A, B, C, self.D)
            y = y[:, None]
        else:
            xbc, conv_state = kernels.causal_conv1d(
                xbc,
                conv_w,
                self.conv1d.bias,
                initial_state=layer.states["conv"] if has_state else None,
                seq_idx=seq_idx,
                activation=s.conv_activation,
            )
            x, B, C = self._split_xbc(xbc)
            y, ssm_state = kernels.ssd_chunk_scan(
                x,
                dt,
                A,
                B,
                C,
                chunk_size=s.chunk_size,
                D=self.D,
                initial_state=layer.states["ssm"] if has_state else None,
                seq_idx=seq_idx,
            )
        if layer is not None:
            layer.store(seqlen, conv=conv_state, ssm=ssm_state)

        y = y.reshape(batch, seqlen, s.n_heads * s.head_dim).to(hidden_states.dtype)
        if s.norm != "none":
            z = self.z_proj(hidden_states) if s.norm == "gated" else None
            group = s.head_dim if s.norm_group == "head" else s.n_heads * s.head_dim
            y = kernels.gated_rmsnorm(y, z, self.norm_weight, group_size=group, eps=s.norm_eps)
        return self.out_proj(y), None

    def mixing_matrix(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor | None = None,
                      **kwargs) -> torch.Tensor:
        """The token-mixing matrix the SSD applies to ``x``, materialized: ``[B, H, T, T]``.

        ``M[h, i, j] = C_i . B_j * exp(sum_{k=j+1..i} dt_k A_h) * dt_j`` for ``j <= i`` (0 above the
        diagonal and across documents), so ``y_i = sum_j M[h, i, j] x_j + D x_i``. It is the
        counterpart of an attention probability matrix (MOHAWK's matrix orientation); quadratic in
        ``T``, for short sequences only.
        """
        from ...kernels.ssd.naive import segsum

        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=False)
        xbc, dt = self._project(hidden_states, padding)
        acc = dt.dtype
        xbc, _ = kernels.causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
                                       activation=s.conv_activation)
        _, B, C = self._split_xbc(xbc)
        rep = s.n_heads // s.n_groups
        B = B.to(acc).repeat_interleave(rep, dim=2)  # [b, t, h, n]
        decay = torch.exp(segsum((dt * -torch.exp(self.A_log.to(acc))).transpose(1, 2)))  # [b, h, i, j]
        if seq_idx is not None:
            decay = decay * (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]
        scores = torch.einsum("bihn,bjhn->bhij", C.to(acc), B)
        return scores * decay * dt.transpose(1, 2)[:, :, None, :]

    def extra_repr(self) -> str:
        s = self.settings
        return (f"layer_idx={self.layer_idx}, heads={s.n_heads}, groups={s.n_groups}, head_dim={s.head_dim}, "
                f"d_state={s.d_state}, conv={s.conv_kernel}, chunk={s.chunk_size}, norm={s.norm}")
