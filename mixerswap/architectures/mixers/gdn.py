"""Gated DeltaNet (gated delta rule) mixer shaped to replace an attention layer.

Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (2024), as in the
linear layers of Qwen3-Next; the layer follows ``fla.layers.GatedDeltaNet``::

    q, k, v = silu(conv(W_q h)), silu(conv(W_k h)), ...  (one causal depthwise conv over [q, k, v])
    q, k    = l2norm(q * w_q), l2norm(k * w_k)            (w_q, w_k: the teacher's q/k norm weights, or 1)
    g_t     = -exp(A_log) * softplus(W_a h_t + dt_bias)   (log decay, per head, fp32);  beta_t = sigmoid(W_b h_t + b_b)
    S_t     = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ;   o_t = S_t^T q_t / sqrt(K)
    out     = W_o (rmsnorm_per_head(o) * w_norm * silu(W_g h + b_g))

Heads. ``q`` keeps the teacher's ``H`` query heads, ``k`` and ``v`` its ``G`` key/value heads (the
projections are the teacher's, unrepeated); after the conv each key/value head is repeated for the
``H / G`` query heads of its group, the way grouped-query attention shares them. Every query head
then keeps its own ``[K, V]`` state with its own decay and write strength: ``H`` memories rather
than ``G``, more capacity for the long-context retrieval this kind is for, and the ``[B, T, H, K]``
layout every gated-delta-rule kernel takes.

The parallel path (prefill, training) runs the chunked WY/UT form of
:func:`~mixerswap.kernels.delta_rule.naive.delta_rule_chunk_ref`; decoding runs one recurrent step
per token from the states kept in :class:`~mixerswap.architectures.cache.RecurrentStateLayer`
(``conv`` and ``recurrent``, fixed size, updated in place). Padding (the 2-D mask) gets ``g = 0``,
``beta = 0`` and a zero conv input, so it neither decays nor writes anything; packed documents
(``position_ids`` that restart) never share conv windows or state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from transformers import initialization as init

from ... import kernels
from ...kernels.precision import acc_dtype
from ..cache import RecurrentStateLayer
from .common import AttentionHeadSettings, init_teacher_projections, mixer_inputs
from .contract import Mixer

# The bias b with silu(b) = 1: a gate whose weight is zero then multiplies by exactly one.
SILU_INVERSE_OF_ONE = 1.278464542761074
L2NORM_EPS = 1e-6


class GDNSettings(AttentionHeadSettings):
    """Shape and options of one Gated DeltaNet mixer (one plan entry)."""

    conv_kernel: int = Field(4, ge=1, description="width of the causal depthwise conv on q, k, v (1: none)")
    chunk_size: int = Field(64, ge=1, description="chunk length of the parallel (WY/UT) form")
    conv_activation: Literal["silu", "identity"] = Field(
        "silu", description="after the conv: silu (GDN's own), or identity to keep the teacher's projections")
    dt_min: float = Field(1e-3, gt=0)
    dt_max: float = Field(1e-1, gt=0)
    A_init_min: float = Field(1.0, gt=0)
    A_init_max: float = Field(16.0, gt=0)
    beta_init: float = Field(0.5, gt=0, lt=1, description="write strength every head starts with")

    @model_validator(mode="after")
    def _check(self):
        if self.dt_min > self.dt_max:
            raise ValueError(f"need dt_min <= dt_max, got {self.dt_min} > {self.dt_max}")
        if self.A_init_min > self.A_init_max:
            raise ValueError(f"need A_init_min <= A_init_max, got {self.A_init_min} > {self.A_init_max}")
        return self


class GDNMixer(Mixer):
    """Drop-in replacement for a teacher attention module (same call signature and return shape)."""

    kind = "gdn"
    Settings = GDNSettings
    # As Mamba: the decay parameters stay fp32 and never decay.
    fp32_parameters = ("A_log", "dt_bias")
    no_weight_decay = ("A_log", "dt_bias")
    # What attention has no counterpart for: what ``align`` trains (see :meth:`align_parameters`), at the
    # fast rate (the contract's fast_parameters).
    fast_parameters = ("a_proj.*", "b_proj.*", "A_log", "dt_bias", "conv1d.*", "g_proj.*", "norm_weight")
    # LoLCATs' second step: low-rank adapters on the teacher's projections (align trains the rest).
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    output_projection = "out_proj"
    kernel_ops = ("delta_rule_chunk", "delta_rule_step", "causal_conv1d", "causal_conv1d_step", "gated_rmsnorm")

    def __init__(self, settings: GDNSettings, hidden_size: int, layer_idx: int):
        super().__init__(settings, hidden_size, layer_idx)
        s = settings
        H, G, D = s.n_heads, s.n_kv_heads, s.head_dim
        self.q_dim, self.kv_dim = H * D, G * D
        self.q_proj = nn.Linear(hidden_size, self.q_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=s.qkv_bias)
        conv_dim = self.q_dim + 2 * self.kv_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, s.conv_kernel, groups=conv_dim, padding=s.conv_kernel - 1)
        if s.qk_norm:
            self.q_norm_weight = nn.Parameter(torch.empty(D))
            self.k_norm_weight = nn.Parameter(torch.empty(D))
        self.a_proj = nn.Linear(hidden_size, H, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.b_proj = nn.Linear(hidden_size, H, bias=True)
        self.g_proj = nn.Linear(hidden_size, H * D, bias=True)
        self.norm_weight = nn.Parameter(torch.empty(H * D))
        self.out_proj = nn.Linear(H * D, hidden_size, bias=s.out_bias)

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        """Random initialization (a student built without converted weights): normal projections,
        the rest as :meth:`init_new_parameters`. Uses ``transformers.initialization`` so parameters
        loaded from a checkpoint are left alone."""
        norms = (self.q_norm_weight, self.k_norm_weight) if self.settings.qk_norm else ()
        init_teacher_projections((self.q_proj, self.k_proj, self.v_proj, self.out_proj), std, norms)
        self.init_new_parameters()

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """Initialize what attention has no counterpart for: decay, write strength, conv, gate, norm.

        * decay: ``A`` = U[A_init_min, A_init_max], ``dt`` log-uniform in [dt_min, dt_max] (Mamba-2's and
          GDN's defaults) with ``W_a = 0``: per-token decays ``exp(-A dt)`` from ~0.2 to ~0.999, a
          spread of memory lengths across heads; input dependence is learned in distillation.
        * write strength: ``W_b = 0`` and bias ``logit(beta_init)``: every token writes with the same
          strength at first.
        * conv: identity (last tap 1, no bias), so the first forward sees the projections (after the
          conv activation) of the current token only.
        * gate: ``W_g = 0`` and bias ``b`` with ``silu(b) = 1``, so the output starts as a plain
          per-head RMSNorm: softmax attention returns a convex combination of values per head, and
          normalizing each head is the recurrent analogue of that normalization.
        """
        s = self.settings
        dt = torch.exp(torch.rand(s.n_heads) * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min))
        dt = dt.clamp_min(1e-4)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        init.zeros_(self.a_proj.weight)
        init.copy_(self.A_log, torch.log(torch.empty(s.n_heads).uniform_(s.A_init_min, s.A_init_max)))
        init.zeros_(self.b_proj.weight)
        init.constant_(self.b_proj.bias, math.log(s.beta_init / (1 - s.beta_init)))
        conv_w = torch.zeros_like(self.conv1d.weight)
        conv_w[:, 0, -1] = 1.0
        init.copy_(self.conv1d.weight, conv_w)
        init.zeros_(self.conv1d.bias)
        init.zeros_(self.g_proj.weight)
        init.constant_(self.g_proj.bias, SILU_INVERSE_OF_ONE)
        init.ones_(self.norm_weight)

    def align_parameters(self) -> Iterator[nn.Parameter]:
        """``align`` trains the new parts only (decay, write strength, conv, gate, norm: :attr:`fast_parameters`).

        As LoLCATs' attention transfer: the teacher's q/k/v/o stay as they are (their adaptation is
        the LoRA step, :attr:`lora_targets`); the depthwise conv, identity at first, gives align a
        per-channel reweighting of q and k (its last tap) and a short causal filter to learn.
        """
        return iter(self.parameters_matching(self.fast_parameters))

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the states kept per layer: the conv window and the delta-rule state ``[B, H, K, V]``."""
        s = self.settings
        conv_dim = self.q_dim + 2 * self.kv_dim
        return {"conv": (batch_size, conv_dim, s.conv_kernel - 1),
                "recurrent": (batch_size, s.n_heads, s.head_dim, s.head_dim)}

    def cache_spec(self, batch_size: int, dtype: torch.dtype) -> dict[str, int]:
        """Bytes of state this layer keeps for ``batch_size`` sequences, independent of their length."""
        shapes = self.state_shapes(batch_size)
        return {"conv": math.prod(shapes["conv"]) * torch.empty((), dtype=dtype).element_size(),
                "recurrent": math.prod(shapes["recurrent"]) * 4}  # delta-rule states are kept in fp32

    def _project(self, hidden_states: torch.Tensor, padding: torch.Tensor | None):
        """``[q, k, v]`` before the conv ``[B, T, conv_dim]``, log decay ``g`` and ``beta`` ``[B, T, H]``.

        ``g`` and ``beta`` are in fp32 (fp64 for fp64 inputs), the fp32 ``dt_bias`` and ``A_log``
        added after the projection. At padding everything is zero: no decay, no write, and a zero
        conv input leaves the conv window as if the position were not there.
        """
        qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        acc = acc_dtype(hidden_states.dtype)
        dt = F.softplus(self.a_proj(hidden_states).to(acc) + self.dt_bias.to(acc))
        g = -torch.exp(self.A_log.to(acc)) * dt
        beta = torch.sigmoid(self.b_proj(hidden_states).to(acc))
        if padding is not None:
            qkv = qkv * padding[..., None].to(qkv.dtype)
            g, beta = g * padding[..., None], beta * padding[..., None]
        return qkv, g, beta

    def _heads(self, qkv: torch.Tensor):
        """The conv output ``[..., conv_dim]`` → ``q, k [..., H, K]`` (L2-normalized) and ``v [..., H, V]``."""
        s = self.settings
        q, k, v = torch.split(qkv, [self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        lead = qkv.shape[:-1]
        q = q.reshape(*lead, s.n_heads, s.head_dim)
        k = k.reshape(*lead, s.n_kv_heads, s.head_dim)
        v = v.reshape(*lead, s.n_kv_heads, s.head_dim)
        if s.qk_norm:  # RMSNorm then L2 norm = weighting then L2 norm
            q, k = q * self.q_norm_weight.to(q.dtype), k * self.k_norm_weight.to(k.dtype)
        q, k = _l2norm(q), _l2norm(k)
        rep = s.n_heads // s.n_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """``hidden_states``: ``[B, T, hidden]`` → ``([B, T, hidden], None)`` like an HF attention module.

        ``attention_mask`` (the teacher's 4-D mask) and RoPE (``position_embeddings``) are not used:
        the 2-D padding mask arrives through ``kwargs``, and the decay carries position.
        """
        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        layer: RecurrentStateLayer | None = self.cache_layer(past_key_values)
        has_state = layer is not None and layer.has_state()
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=has_state)

        qkv, g, beta = self._project(hidden_states, padding)
        conv_w = self.conv1d.weight.squeeze(1)
        if has_state and seqlen == 1:
            qkv_t, conv_state = kernels.causal_conv1d_step(qkv[:, 0], layer.states["conv"], conv_w, self.conv1d.bias,
                                                           activation=s.conv_activation)
            q, k, v = self._heads(qkv_t)
            o, state = kernels.delta_rule_step(layer.states["recurrent"], q, k, v, g[:, 0], beta[:, 0])
            o = o[:, None]
        else:
            qkv, conv_state = kernels.causal_conv1d(qkv, conv_w, self.conv1d.bias,
                                                    initial_state=layer.states["conv"] if has_state else None,
                                                    seq_idx=seq_idx, activation=s.conv_activation)
            q, k, v = self._heads(qkv)
            o, state = kernels.delta_rule_chunk(q, k, v, g, beta, chunk_size=s.chunk_size, seq_idx=seq_idx,
                                                initial_state=layer.states["recurrent"] if has_state else None)
        if layer is not None:
            layer.store(seqlen, conv=conv_state, recurrent=state)

        o = o.reshape(batch, seqlen, s.n_heads * s.head_dim).to(hidden_states.dtype)
        o = kernels.gated_rmsnorm(o, None, self.norm_weight, group_size=s.head_dim, eps=s.norm_eps)
        return self.out_proj(o * F.silu(self.g_proj(hidden_states))), None

    def mixing_matrix(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor | None = None,
                      **kwargs) -> torch.Tensor:
        """The token-mixing matrix the delta rule applies to the values, materialized: ``[B, H, T, T]``.

        The output before the norm is linear in the values: ``o_i = sum_j M[h, i, j] v_j`` with
        ``M = (Q K^T o D) (I + A)^{-1} diag(beta) / sqrt(K)``, the WY/UT form of
        :mod:`~mixerswap.kernels.delta_rule.naive` over the whole sequence as one chunk (0 above the
        diagonal and across documents). The counterpart of an attention probability matrix
        (LoLCATs' attention transfer); quadratic in ``T``, for short sequences only.
        """
        from ...kernels.ssd.naive import segsum

        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=False)
        qkv, g, beta = self._project(hidden_states, padding)
        acc = g.dtype
        qkv, _ = kernels.causal_conv1d(qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
                                       activation=s.conv_activation)
        q, k, _ = (t.to(acc).transpose(1, 2) for t in self._heads(qkv))  # [b, h, t, k]
        beta = beta.transpose(1, 2)  # [b, h, t]
        decay = torch.exp(segsum(g.transpose(1, 2)))  # [b, h, i, j]
        if seq_idx is not None:
            decay = decay * (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]
        eye = torch.eye(seqlen, dtype=acc, device=q.device)
        system = eye + (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # I + A
        transfer = torch.linalg.solve_triangular(system, torch.diag_embed(beta), upper=False, unitriangular=True)
        return ((q @ k.transpose(-1, -2)) * decay) @ transfer * s.head_dim**-0.5

    def extra_repr(self) -> str:
        s = self.settings
        return (f"layer_idx={self.layer_idx}, heads={s.n_heads}, kv_heads={s.n_kv_heads}, head_dim={s.head_dim}, "
                f"conv={s.conv_kernel}, chunk={s.chunk_size}, activation={s.conv_activation}")


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` over the last dimension, computed in fp32 (fp64 for fp64), returned in ``x.dtype``."""
    xf = x.to(acc_dtype(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)
