"""LoLCATs linear attention (``linear``): softmax over a local window, linear attention for the rest.

Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models" (2024), built on Hedgehog
(Zhang et al. 2024). Each query ``i`` of head ``h`` mixes two kinds of weights with one normalizer::

    a_ij = w_h exp(s_ij - c_i)          j in (i - window, i]      s = softcap(scale q . k), c_i = max_j s_ij
    a_ij = (1 - w_h) phi(q_i) . phi(k_j)  j <= i - window         w_h = sigmoid(window_factors[h])
    out_i = W_o sum_j a_ij v_j / sum_j a_ij

with the teacher's q/k/v/o, q/k norms, RoPE, scale and softcap (shared with ``swa``), and a learnable
per-head feature map ``phi``: ``hedgehog`` (``softmax([xW, -xW])``), ``t2r`` (``relu(xW)``) or ``elu``
(``elu(xW) + 1``), ``W`` identity-initialized. Keys and values of a key/value head are shared by its
query heads (grouped-query attention); ``phi(k)`` has its own map per key/value head, ``phi(q)`` per
query head. Unlike LoLCATs, ``phi`` reads q and k *before* RoPE: a rotation by the absolute position
inside a non-linear map would make the far part depend on where a sequence starts (left padding, a
shifted prompt give other outputs), and the far tokens have no useful relative phase anyway.

Recurrent form: a :class:`~mixerswap.architectures.cache.WindowKVLayer` keeps the window's keys and
values (ring buffer; the values slot holds ``[v, unrotated k]``) and, beside them, the running state ``S = sum phi(k_j) v_j^T`` ``[B, G, F, D]``
and normalizer ``z = sum phi(k_j)`` ``[B, G, F]`` of every token that has left the window; a token
joins them when the ring overwrites it. Prefill and training: the softmax part runs over blocks of
queries and their window (as ``swa``), the linear part over the call's tokens that left the window is
causal linear attention on keys delayed by ``window`` positions, i.e. :func:`mixerswap.kernels.gla_chunk`
without decay, with a channel of ones beside ``v`` for the normalizer; memory grows as ``T * window``,
not ``T^2`` (the LoLCATs reference is quadratic). Padding and packed documents never leak; with
``window_factors`` at +inf and a window covering the sequence it is the teacher.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import initialization as init

from ... import kernels
from ...kernels.precision import acc_dtype
from ..cache import WindowKVLayer
from .common import mixer_inputs
from .swa import WindowAttentionMixer, WindowAttentionSettings


class LinearSettings(WindowAttentionSettings):
    """One LoLCATs mixer: the teacher's attention shape, the window and the feature map."""

    window: int = Field(64, ge=1, description="keys each query sees through softmax, itself included")
    feature_map: Literal["hedgehog", "t2r", "elu"] = "hedgehog"
    feature_dim: int | None = Field(None, gt=0, description="F: output of the learned map; None: head_dim")
    mix_init: float = Field(0.0, description="initial logit of the softmax share w_h of every head")


class LinearAttentionMixer(WindowAttentionMixer):
    """Sliding-window softmax + linear attention (LoLCATs); see the module docstring."""

    kind = "linear"
    Settings = LinearSettings
    kernel_ops = ("gla_chunk",)
    fp32_parameters = ("window_factors",)
    no_weight_decay = ("window_factors",)
    fast_parameters = ("feature_map_q", "feature_map_k", "window_factors")

    def __init__(self, settings: LinearSettings, hidden_size: int, layer_idx: int):
        super().__init__(settings, hidden_size, layer_idx)
        s = settings
        self.feature_dim = s.feature_dim or s.head_dim
        self.feature_map_q = nn.Parameter(torch.empty(s.n_heads, s.head_dim, self.feature_dim))
        self.feature_map_k = nn.Parameter(torch.empty(s.n_kv_heads, s.head_dim, self.feature_dim))
        self.window_factors = nn.Parameter(torch.empty(s.n_heads))

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        super().init_parameters(std)
        self.init_new_parameters()

    @torch.no_grad()
    def init_new_parameters(self) -> None:
        """Feature maps start as the identity (``phi`` sees the teacher's q and k, as in LoLCATs),
        the softmax share at ``sigmoid(mix_init)`` in every head."""
        s = self.settings
        init.copy_(self.feature_map_q, torch.eye(s.head_dim, self.feature_dim).expand(s.n_heads, -1, -1))
        init.copy_(self.feature_map_k, torch.eye(s.head_dim, self.feature_dim).expand(s.n_kv_heads, -1, -1))
        init.constant_(self.window_factors, s.mix_init)

    def align_parameters(self):
        """The new parts only (LoLCATs' attention transfer): feature maps and mixing factors
        (:attr:`fast_parameters`)."""
        return self.parameters_matching(self.fast_parameters)

    def new_cache_layer(self) -> WindowKVLayer:
        return WindowKVLayer(self.settings.window, 0)

    def features(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x [B, heads, T, D]`` → ``phi(x) [B, heads, T, F']`` (``F' = 2F`` for hedgehog)."""
        batch, heads, seqlen, dim = x.shape  # per head [B * T, D] @ [D, F], no copy of the weights per row
        x = torch.bmm(x.transpose(0, 1).reshape(heads, batch * seqlen, dim), weight.to(x.dtype))
        x = x.view(heads, batch, seqlen, weight.shape[-1]).transpose(0, 1)
        kind = self.settings.feature_map
        if kind == "hedgehog":
            return torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
        if kind == "t2r":
            return F.relu(x)
        return F.elu(x) + 1

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, H, ...]`` → ``[B, G, H / G, ...]`` (the query heads of each key/value head)."""
        return t.unflatten(1, (self.settings.n_kv_heads, -1))

    def _mix(self, hidden_states, position_ids, past_key_values, kwargs, *, matrix_only=False):
        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        layer: WindowKVLayer | None = None if matrix_only else self.cache_layer(past_key_values)
        has_state = layer is not None and layer.has_state()
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=has_state)
        if has_state and seqlen == 1:
            return self._step(hidden_states, layer, padding, kwargs)
        real = padding.bool() if padding is not None else torch.ones(batch, seqlen, dtype=torch.bool,
                                                                     device=hidden_states.device)
        q_raw, k_raw, v = self.project_unrotated(hidden_states)
        q, k = self.rotate(q_raw, k_raw, kwargs.get("position_embeddings"))
        acc = acc_dtype(hidden_states.dtype)
        q, k, v, q_raw, k_raw = (t.transpose(1, 2).to(acc) for t in (q, k, v, q_raw, k_raw))  # [B, heads, T, D]
        start = layer.seen_tokens if has_state else 0
        cached, rank = self.cached_masks(real, seq_idx, start, layer)
        share = torch.sigmoid(self.window_factors.to(acc))[None, :, None, None]
        rest = torch.sigmoid(-self.window_factors.to(acc))[None, :, None, None]  # 1 - share, exactly 0 at +inf
        phi_q = self.features(q_raw, self.feature_map_q)
        phi_k = self.features(k_raw, self.feature_map_k)
        rep = s.n_heads // s.n_kv_heads
        if matrix_only:
            return self._weights(q, k, phi_q, phi_k, real, seq_idx, rank, share, rest)
        if cached is not None:  # the ring holds [v, unrotated k] as its values (see _update_cache)
            held_k, (held_v, held_k_raw) = layer.keys.to(acc), layer.values.to(acc).split(s.head_dim, dim=-1)
            phi_held = self.features(held_k_raw, self.feature_map_k).repeat_interleave(rep, dim=1)
        numerators, denominators = [], []
        for a, b, lo in self.query_blocks(seqlen):  # the window: softmax weights over [lo, b) (and the ring)
            soft = self.band_mask(real, seq_idx, rank, a, b, lo)
            keys, values = k[:, :, lo:b], v[:, :, lo:b]
            if cached is not None:
                keys, values = torch.cat([held_k, keys], 2), torch.cat([held_v, values], 2)
                soft = torch.cat([cached[:, a:b], soft], 2)
            scores = self.scores(q[:, :, a:b], keys).masked_fill(~soft[:, None], torch.finfo(acc).min)
            weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * soft[:, None] * share
            if cached is not None:  # ring tokens already out of the query's window: linear weights
                far = (layer.valid[:, None, :] & ~cached[:, a:b])[:, None]
                linear = torch.matmul(phi_q[:, :, a:b], phi_held.transpose(-1, -2)) * far * rest
                weights = weights + F.pad(linear, (0, b - lo))
            numerators.append(torch.matmul(weights, values.repeat_interleave(rep, dim=1)))
            denominators.append(weights.sum(-1, keepdim=True))
        older = self._older_linear(phi_q, phi_k, v, real, seq_idx)  # this call's tokens out of the window
        numerator = torch.cat(numerators, 2) + rest * older[..., :-1]
        denominator = torch.cat(denominators, 2) + rest * older[..., -1:]
        if has_state:  # everything that left the window before this call
            phi_q_grouped = self._grouped(phi_q)  # [B, G, H / G, T, F']
            kv, k_sum = layer.states["kv"].to(acc), layer.states["k_sum"].to(acc)
            numerator = numerator + rest * torch.einsum("bgrtf,bgfd->bgrtd", phi_q_grouped, kv).flatten(1, 2)
            denominator = denominator + rest * torch.einsum("bgrtf,bgf->bgrt", phi_q_grouped, k_sum).flatten(1, 2)[..., None]
        out = numerator / denominator.clamp_min(torch.finfo(acc).tiny)  # a padded query: 0 / 0 → 0
        if layer is not None:
            kept = None if padding is None and seq_idx is None else self.kept(real, seq_idx)
            self._update_cache(layer, k, v, k_raw, kept, rank, hidden_states.dtype)
        out = out.transpose(1, 2).reshape(batch, seqlen, s.n_heads * s.head_dim).to(hidden_states.dtype)
        return self.o_proj(out)

    def _older_linear(self, phi_q, phi_k, v, real, seq_idx) -> torch.Tensor:
        """``sum_j phi(q_i) . phi(k_j) [v_j, 1]`` over this call's real tokens ``j <= i - window`` of ``i``'s
        document: ``[B, H, T, D + 1]`` (numerator and normalizer). It is causal linear attention with keys
        and values delayed by ``window`` positions, so :func:`~mixerswap.kernels.gla_chunk` computes it
        (no decay) in ``O(T)`` memory; a delayed key from an earlier document is zeroed, and the
        kernel's ``seq_idx`` drops the state at each document start."""
        s = self.settings
        batch, heads, seqlen, _ = phi_q.shape
        if seqlen <= s.window:  # nothing of this call has left the window yet (every decoding step)
            return phi_q.new_zeros(batch, heads, seqlen, v.shape[-1] + 1)
        shift = s.window
        keep = real[:, : seqlen - shift].to(phi_k.dtype)
        if seq_idx is not None:
            keep = keep * (seq_idx[:, shift:] == seq_idx[:, : seqlen - shift])
        keys = phi_k[:, :, : seqlen - shift] * keep[:, None, :, None]
        values = torch.cat([v, torch.ones_like(v[..., :1])], -1)[:, :, : seqlen - shift]
        keys, values = (F.pad(t, (0, 0, shift, 0)).repeat_interleave(heads // t.shape[1], dim=1).transpose(1, 2)
                        for t in (keys, values))  # [B, T, H, .]: position i holds token i - window
        decay = phi_q.new_zeros(batch, seqlen, heads)
        out, _ = kernels.gla_chunk(phi_q.transpose(1, 2), keys, values, decay, scale=1.0, seq_idx=seq_idx)
        return out.transpose(1, 2)

    def _weights(self, q, k, phi_q, phi_k, real, seq_idx, rank, share, rest) -> torch.Tensor:
        """The normalized mixing weights ``[B, H, T, T]`` of a call without a cache (for ``mixing_matrix``)."""
        s = self.settings
        seqlen = q.shape[2]
        soft = self.band_mask(real, seq_idx, rank, 0, seqlen, 0)
        i = torch.arange(seqlen, device=real.device)
        older = (i[:, None] - i[None, :] >= s.window)[None] & real[:, None, :]
        if seq_idx is not None:
            older = older & (seq_idx[:, :, None] == seq_idx[:, None, :])
        scores = self.scores(q, k).masked_fill(~soft[:, None], torch.finfo(q.dtype).min)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * soft[:, None] * share
        linear = torch.matmul(phi_q, phi_k.repeat_interleave(s.n_heads // s.n_kv_heads, dim=1).transpose(-1, -2))
        weights = weights + linear * older[:, None] * rest
        return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)

    def _update_cache(self, layer: WindowKVLayer, k, v, k_raw, kept, rank, dtype) -> None:
        """Fold the tokens that leave the window into the running state (in the accumulation dtype of
        ``k``), then write the new ones (in ``dtype``): rotated keys, and ``[v, unrotated k]`` as values,
        since the feature map reads unrotated keys when a token joins the state."""
        s = self.settings
        seqlen = k.shape[2]
        passed = max(seqlen - s.window, 0)  # new tokens already out of the window when the call ends
        gone_k, gone_v = k_raw[:, :, :passed], v[:, :, :passed]
        gone = kept[:, :passed] if kept is not None else torch.ones_like(v[:, 0, :passed, 0], dtype=torch.bool)
        leaving = layer.leaving(seqlen)
        if leaving is not None:
            _, old_values, old_valid = leaving
            old_v, old_k = old_values.to(v.dtype).split(s.head_dim, dim=-1)
            gone_k, gone_v = torch.cat([old_k, gone_k], 2), torch.cat([old_v, gone_v], 2)
            gone = torch.cat([old_valid, gone], 1)
        phi_k = self.features(gone_k, self.feature_map_k) * gone[:, None, :, None]
        kv = torch.einsum("bgtf,bgtd->bgfd", phi_k, gone_v)
        k_sum = phi_k.sum(2)
        if layer.has_state():
            kv, k_sum = kv + layer.states["kv"], k_sum + layer.states["k_sum"]
        layer.store(kv=kv, k_sum=k_sum)
        layer.write(k.to(dtype), torch.cat([v, k_raw], -1).to(dtype), kept, rank)

    def _step(self, hidden_states, layer: WindowKVLayer, padding: torch.Tensor | None, kwargs) -> torch.Tensor:
        """One decoding token, the forward's arithmetic in another order: the token the ring overwrites (out of
        the query's window) joins the running state first, the new one is written, then the softmax part
        runs over the ring and the linear part over the state, query heads grouped per key/value head."""
        s = self.settings
        batch, dtype = hidden_states.shape[0], hidden_states.dtype
        acc = acc_dtype(dtype)
        q_raw, k_raw, v = self.project_unrotated(hidden_states)  # [B, 1, heads, D]
        q, k = self.rotate(q_raw, k_raw, kwargs.get("position_embeddings"))
        index = layer.seen_tokens
        kv, k_sum = layer.states["kv"], layer.states["k_sum"]  # [B, G, F', D], [B, G, F']
        if index >= s.window:  # the ring is full: its slot for this token holds the one leaving the window
            slot = index % s.window
            old_v, old_k = layer.values[:, :, slot, None].to(acc).split(s.head_dim, dim=-1)  # [B, G, 1, D]
            phi_old = self.features(old_k, self.feature_map_k) * layer.valid[:, None, slot, None, None]
            kv.add_(phi_old.transpose(-1, -2) @ old_v)
            k_sum.add_(phi_old[:, :, 0])
        real = None if padding is None else padding.bool()
        layer.write(k.transpose(1, 2).to(dtype), torch.cat([v, k_raw], -1).transpose(1, 2).to(dtype), real, None)

        seen = layer.visible_from(index)[:, None, None]  # [B, 1, 1, W]
        grouped = (batch, s.n_kv_heads, -1, s.head_dim)
        scores = self.scores_grouped(q.view(grouped).to(acc), layer.keys.to(acc))  # [B, G, H / G, W]
        scores = scores.masked_fill(~seen, torch.finfo(acc).min)
        share = torch.sigmoid(self.window_factors.to(acc)).view(s.n_kv_heads, -1, 1)
        rest = torch.sigmoid(-self.window_factors.to(acc)).view(s.n_kv_heads, -1, 1)  # 1 - share, exactly 0 at +inf
        weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * seen * share
        numerator = weights @ layer.values[..., : s.head_dim].to(acc)  # [B, G, H / G, D]
        denominator = weights.sum(-1, keepdim=True)
        phi_q = self.features(q_raw.transpose(1, 2).to(acc), self.feature_map_q)  # [B, H, 1, F']
        phi_q = phi_q.view(batch, s.n_kv_heads, -1, phi_q.shape[-1])
        numerator = numerator + rest * (phi_q @ kv.to(acc))
        denominator = denominator + rest * (phi_q @ k_sum.to(acc)[..., None])
        out = numerator / denominator.clamp_min(torch.finfo(acc).tiny)  # a padded query: 0 / 0 → 0
        return self.o_proj(out.reshape(batch, 1, s.n_heads * s.head_dim).to(dtype))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """``hidden_states [B, T, hidden]`` → ``([B, T, hidden], None)``; weights, state and normalizer in
        fp32 (fp64 for fp64 inputs). The teacher's 4-D ``attention_mask`` is not used."""
        return self._mix(hidden_states, position_ids, past_key_values, kwargs), None

    def mixing_matrix(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor | None = None,
                      **kwargs) -> torch.Tensor:
        """The normalized weights ``a_ij / sum_j a_ij`` ``[B, H, T, T]`` (rows sum to 1, like attention)."""
        return self._mix(hidden_states, position_ids, None, kwargs, matrix_only=True)

    def extra_repr(self) -> str:
        s = self.settings
        return (f"layer_idx={self.layer_idx}, heads={s.n_heads}, kv_heads={s.n_kv_heads}, head_dim={s.head_dim}, "
                f"window={s.window}, feature_map={s.feature_map}, feature_dim={self.feature_dim}")
