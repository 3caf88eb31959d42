"""Gated linear attention with a causal conv on q and k (``gla``, after LAWCAT).

Liu et al., "LAWCAT: Efficient Distillation from Quadratic to Linear Attention with Convolution
across Tokens" (2025): a causal depthwise conv over the query and key projections gives linear
attention the local sharpness softmax has, and a normalized, gated linear attention generalizes
across context lengths::

    q~ = phi(conv(norm(W_q h)))    k~ = phi(conv(norm(W_k h)))    v = W_v h      (norm: teacher's q/k norms)
    S_t = a_t S_{t-1} + k~_t v_t^T        z_t = a_t z_{t-1} + k~_t       a_t = sigmoid(w_h . h_t + b_h)
    o_t = S_t^T q~_t / (z_t . q~_t + eps)   [* 2 sigmoid(W_z h_t), the optional output gate]
    out = W_o o

``a_t`` is one data-dependent decay per query head; keys and values of a key/value head are shared by
its query heads (grouped-query attention), each head keeping its own ``[K, V + 1]`` state (the extra
column is ``z``). RoPE is dropped: the decay carries position. The parallel path runs
:func:`~mixerswap.kernels.gla_chunk` (chunked), decoding :func:`~mixerswap.kernels.gla_step` from the
states of a :class:`~mixerswap.architectures.cache.RecurrentStateLayer` (conv window and state, fixed
size). Padding and packed documents never leak through the conv or the recurrence.
"""

from __future__ import annotations

import math
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
from .swa import rms_norm

FEATURE_MAPS = ("elu", "relu", "softmax")


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Non-negative features of ``x [..., K]`` (so the normalizer is positive): ``elu`` = elu + 1
    (Katharopoulos et al. 2020), ``relu``, ``softmax`` over the head's channels."""
    if kind == "elu":
        return F.elu(x) + 1
    if kind == "relu":
        return F.relu(x)
    if kind == "softmax":
        return torch.softmax(x, dim=-1)
    raise ValueError(f"unknown feature map {kind!r}; use one of {', '.join(FEATURE_MAPS)}")


class GLASettings(AttentionHeadSettings):
    """Shape and options of one gated-linear-attention mixer (one plan entry)."""

    conv: int = Field(4, ge=1, description="width of the causal depthwise conv on q and k (1: no mixing)")
    feature_map: Literal["elu", "relu", "softmax"] = "elu"
    normalize: bool = Field(True, description="divide by q . z (LAWCAT's normalized GLA)")
    output_gate: bool = False
    chunk_size: int = Field(64, ge=1)
    decay_min_len: float = Field(16.0, gt=1, description="shortest memory 1 / (1 - a) among heads at init")
    decay_max_len: float = Field(1024.0, gt=1, description="longest memory among heads at init")

    @model_validator(mode="after")
    def _check(self):
        if self.decay_min_len > self.decay_max_len:
            raise ValueError("need decay_min_len <= decay_max_len")
        return self


class GLAMixer(Mixer):
    """Drop-in replacement for a teacher attention module; see the module docstring."""

    kind = "gla"
    Settings = GLASettings
    fp32_parameters = ("gate_proj.bias",)
    no_weight_decay = ("gate_proj.bias",)
    fast_parameters = ("conv1d.*", "*gate_proj.*")  # the decay gate and the output gate
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    output_projection = "o_proj"
    kernel_ops = ("gla_chunk", "gla_step", "causal_conv1d", "causal_conv1d_step")
    eps = 1e-6

    def __init__(self, settings: GLASettings, hidden_size: int, layer_idx: int):
        super().__init__(settings, hidden_size, layer_idx)
        s = settings
        self.q_dim, self.k_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        self.q_proj = nn.Linear(hidden_size, self.q_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.k_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.k_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(self.q_dim, hidden_size, bias=s.out_bias)
        conv_dim = self.q_dim + self.k_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, s.conv, groups=conv_dim, padding=s.conv - 1)
        self.gate_proj = nn.Linear(hidden_size, s.n_heads, bias=True)
        if s.output_gate:
            self.out_gate_proj = nn.Linear(hidden_size, self.q_dim, bias=True)
        if s.qk_norm:
            self.q_norm_weight = nn.Parameter(torch.empty(s.head_dim))
            self.k_norm_weight = nn.Parameter(torch.empty(s.head_dim))

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        norms = (self.q_norm_weight, self.k_norm_weight) if self.settings.qk_norm else ()
        init_teacher_projections((self.q_proj, self.k_proj, self.v_proj, self.o_proj), std, norms)
        self.init_new_parameters()

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """What attention has no counterpart for: conv, decay gate, output gate.

        * conv: the identity (last tap 1, bias 0), so the untrained mixer sees the teacher's q and k.
        * decay: ``gate_proj`` weight 0 and per-head biases with memories ``1 / (1 - a)`` spread
          log-uniformly over [decay_min_len, decay_max_len] (deterministic), a spread of local and
          long-range heads like a trained attention layer's; input dependence is learned.
        * output gate: weight 0, bias 0, so ``2 sigmoid(z) = 1``: it starts as no gate.
        """
        s = self.settings
        conv_w = torch.zeros_like(self.conv1d.weight)
        conv_w[:, 0, -1] = 1.0
        init.copy_(self.conv1d.weight, conv_w)
        init.zeros_(self.conv1d.bias)
        lengths = torch.logspace(math.log10(s.decay_min_len), math.log10(s.decay_max_len), s.n_heads)
        decay = 1 - 1 / lengths
        init.zeros_(self.gate_proj.weight)
        init.copy_(self.gate_proj.bias, torch.log(decay) - torch.log1p(-decay))  # logit
        if s.output_gate:
            init.zeros_(self.out_gate_proj.weight)
            init.zeros_(self.out_gate_proj.bias)

    def align_parameters(self):
        """The new parts only (LoLCATs' attention transfer): conv, gates (:attr:`fast_parameters`)."""
        return self.parameters_matching(self.fast_parameters)

    def state_shapes(self, batch_size: int) -> dict[str, tuple[int, ...]]:
        s = self.settings
        shapes = {"state": (batch_size, s.n_heads, s.head_dim, s.head_dim + 1)}
        if s.conv > 1:
            shapes["conv"] = (batch_size, self.q_dim + self.k_dim, s.conv - 1)
        return shapes

    def _features(self, qk: torch.Tensor, conv_state, seq_idx, step: bool):
        """``[q, k]`` before the conv → feature-mapped ``q [.., H, K]``, ``k [.., G, K]`` and the conv state."""
        s = self.settings
        weight = self.conv1d.weight.squeeze(1)
        if s.conv == 1:
            qk, conv_state = qk * weight[:, 0] + self.conv1d.bias, None
        elif step:
            qk, conv_state = kernels.causal_conv1d_step(qk, conv_state, weight, self.conv1d.bias)
        else:
            qk, conv_state = kernels.causal_conv1d(qk, weight, self.conv1d.bias, initial_state=conv_state,
                                                   seq_idx=seq_idx)
        q, k = torch.split(qk, [self.q_dim, self.k_dim], dim=-1)
        q = q.unflatten(-1, (s.n_heads, s.head_dim))
        k = k.unflatten(-1, (s.n_kv_heads, s.head_dim))
        return feature_map(q, s.feature_map), feature_map(k, s.feature_map), conv_state

    def _inputs(self, hidden_states: torch.Tensor, padding: torch.Tensor | None):
        """``[q, k]`` before the conv (teacher norms applied), ``v`` with the normalizer's ones column
        ``[B, T, G, V + 1]``, log decays ``g [B, T, H]`` and the padding weights; zero at padding."""
        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seqlen, s.n_heads, s.head_dim)
        k = self.k_proj(hidden_states).view(batch, seqlen, s.n_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = rms_norm(q, self.q_norm_weight, s.norm_eps), rms_norm(k, self.k_norm_weight, s.norm_eps)
        qk = torch.cat([q.flatten(-2), k.flatten(-2)], -1)
        v = self.v_proj(hidden_states).view(batch, seqlen, s.n_kv_heads, s.head_dim)
        v = F.pad(v, (0, 1), value=1.0)  # the normalizer's column of ones
        acc = acc_dtype(hidden_states.dtype)
        # the gate bias is kept in fp32 (fp32_parameters): add it after the projection, in fp32
        g = F.logsigmoid(F.linear(hidden_states, self.gate_proj.weight).to(acc) + self.gate_proj.bias.to(acc))
        weight = None
        if padding is not None:
            weight = padding[..., None].to(hidden_states.dtype)
            qk, v, g = qk * weight, v * weight[..., None], g * padding[..., None]
        return qk, v, g, weight

    def _output(self, o: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """``o [B, T, H, V + 1]`` → normalized, gated, projected ``[B, T, hidden]``."""
        s = self.settings
        acc = acc_dtype(hidden_states.dtype)
        o = o.to(acc)
        y = o[..., :-1] / (o[..., -1:] + self.eps) if s.normalize else o[..., :-1]
        y = y.flatten(-2).to(hidden_states.dtype)
        if s.output_gate:
            y = y * 2 * torch.sigmoid(self.out_gate_proj(hidden_states))
        return self.o_proj(y)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """``hidden_states [B, T, hidden]`` → ``([B, T, hidden], None)``; the state is kept in fp32 (fp64
        for fp64 inputs). ``attention_mask`` (4-D) and RoPE are not used."""
        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        layer: RecurrentStateLayer | None = self.cache_layer(past_key_values)
        has_state = layer is not None and layer.has_state()
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=has_state)
        qk, v, g, weight = self._inputs(hidden_states, padding)
        step = has_state and seqlen == 1
        conv_state = layer.states.get("conv") if has_state else None
        if step:
            q, k, conv_state = self._features(qk[:, 0], conv_state, None, step=True)
        else:
            q, k, conv_state = self._features(qk, conv_state, seq_idx, step=False)
        if weight is not None:  # phi(0) need not be 0: a padded key must write nothing
            k = k * (weight[:, 0] if step else weight)[..., None]
        rep = s.n_heads // s.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
        if step:
            o, state = kernels.gla_step(layer.states["state"], q, k, v[:, 0], g[:, 0], scale=1.0)
            o = o[:, None]
        else:
            o, state = kernels.gla_chunk(q, k, v, g, scale=1.0, chunk_size=s.chunk_size,
                                         initial_state=layer.states["state"] if has_state else None, seq_idx=seq_idx)
        if layer is not None:
            states = {"state": state} if conv_state is None else {"state": state, "conv": conv_state}
            layer.store(seqlen, **states)
        return self._output(o, hidden_states), None

    def mixing_matrix(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor | None = None,
                      **kwargs) -> torch.Tensor:
        """``M [B, H, T, T]`` with ``o_i = sum_j M[h, i, j] v_j``: ``q~_i . k~_j prod_{j<s<=i} a_s``,
        divided by the normalizer (a row sums to ~1, like attention probabilities)."""
        from ...kernels.ssd.naive import segsum

        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=False)
        qk, _, g, weight = self._inputs(hidden_states, padding)
        q, k, _ = self._features(qk, None, seq_idx, step=False)
        if weight is not None:
            k = k * weight[..., None]
        acc = g.dtype
        k = k.repeat_interleave(s.n_heads // s.n_kv_heads, dim=-2)
        decay = torch.exp(segsum(g.transpose(1, 2)))  # [b, h, i, j]
        if seq_idx is not None:
            decay = decay * (seq_idx[:, :, None] == seq_idx[:, None, :])[:, None]
        matrix = torch.einsum("bihk,bjhk->bhij", q.to(acc), k.to(acc)) * decay
        if s.normalize:
            matrix = matrix / (matrix.sum(-1, keepdim=True) + self.eps)
        return matrix

    def extra_repr(self) -> str:
        s = self.settings
        return (f"layer_idx={self.layer_idx}, heads={s.n_heads}, kv_heads={s.n_kv_heads}, head_dim={s.head_dim}, "
                f"conv={s.conv}, feature_map={s.feature_map}, chunk={s.chunk_size}")
