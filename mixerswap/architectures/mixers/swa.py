"""Sliding-window attention (``swa``): the teacher's own softmax attention over a bounded window.

Each query sees the last ``window`` tokens (itself included, as ``transformers``' ``sliding_window``)
and the first ``sinks`` tokens of its document (StreamingLLM's attention sinks, Xiao et al. 2023)::

    out_i = W_o softmax_j( softcap(scale * q_i . k_j) )  v_j      j in sinks ∪ (i - window, i]

with the teacher's q/k/v/o, its per-head q/k norms (Qwen3, Gemma-3), its RoPE (the ``(cos, sin)`` its
decoder layer passes, partial rotary included), its score scale (``query_pre_attn_scalar`` of Gemma)
and its logit softcap (Gemma-2). With ``window`` >= the sequence length it *is* the teacher's
attention; for a sliding-window teacher (Mistral, Gemma-2/3 local layers) it is the teacher's layer
with the teacher's window. The cache is a :class:`~mixerswap.architectures.cache.WindowKVLayer`
(ring buffer of ``sinks + window`` slots), so memory is bounded whatever the length; a forward computes
scores for blocks of ``query_block`` queries against their window and the sinks, so prefill and
training memory grows as ``T * (window + block)``, not ``T^2``.

Padding keys (the 2-D mask) and other packed documents (restarting ``position_ids``) are never seen;
sinks are the first *real* tokens of a row or document, so left padding does not take them.
:class:`WindowAttentionMixer` holds what ``linear`` (LoLCATs) shares: projections, norms, RoPE,
and the window masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...kernels.precision import acc_dtype
from ..cache import WindowKVLayer
from .common import AttentionHeadSettings, init_teacher_projections, mixer_inputs
from .contract import Mixer


class WindowAttentionSettings(AttentionHeadSettings):
    """What the teacher's attention dictates, shared by ``swa`` and ``linear``, plus the window."""

    window: int = Field(512, ge=1, description="keys each query sees, itself included")
    scaling: float | None = Field(None, gt=0, description="score scale; None: head_dim ** -0.5")
    softcap: float | None = Field(None, gt=0, description="logit softcap (Gemma-2 attn_logit_softcapping)")


class SWASettings(WindowAttentionSettings):
    """One sliding-window attention mixer."""

    sinks: int = Field(0, ge=0, description="first tokens every query also sees (attention sinks)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as ``transformers`` applies it, on the first ``cos.shape[-1]`` channels (partial rotary, Phi-3).

    ``x``: ``[B, T, heads, D]``; ``cos``, ``sin``: ``[B, T, rotary_dim]`` (the decoder layer's
    ``position_embeddings``, attention scaling of llama3/yarn RoPE already folded in).
    """
    cos, sin = cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dimension in fp32 (as Qwen3's and Gemma-3's q/k norms);
    ``weight`` is the effective multiplier (Gemma's ``1 + w`` already folded in by the converter)."""
    xf = x.float() if x.dtype != torch.float64 else x
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
    return out.to(x.dtype)


def document_rank(real: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` rank of each token among the real tokens of its document before it (0 for the first)."""
    count = real.long().cumsum(1)
    rank = count - real.long()
    if seq_idx is None:
        return rank
    steps = torch.arange(real.shape[1], device=real.device).expand_as(seq_idx)
    starts = seq_idx != F.pad(seq_idx, (1, 0), value=-1)[:, :-1]
    first = torch.where(starts, steps, 0).cummax(1).values  # index of each token's document start
    return rank - rank.gather(1, first)


def _sink_tokens(real: torch.Tensor, rank: torch.Tensor, sinks: int,
                 packed: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The call's sink tokens (real, rank below ``sinks``) per row: positions ``[B, M]`` and which are real
    ``[B, M]`` (rows with fewer than ``M`` are padded with position 0), or ``None`` when there are none.

    A row of one document has at most ``sinks`` of them, so ``M = sinks`` needs no look at the data; only
    packed documents (each with its own sinks) count them, which reads the count back from the device."""
    is_sink = real & (rank < sinks)
    count = (int(is_sink.sum(1).max()) if packed else min(sinks, real.shape[1])) if sinks else 0
    if count == 0:
        return None
    position = torch.argsort((~is_sink).to(torch.int8), dim=1, stable=True)[:, :count]  # sinks first, in order
    found = torch.arange(count, device=real.device)[None, :] < is_sink.sum(1, keepdim=True)
    return torch.where(found, position, 0), found


class WindowAttentionMixer(Mixer):
    """The teacher's projections, norms and RoPE, and the masks of a windowed attention (shared base)."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    output_projection = "o_proj"
    kernel_ops = ()
    query_block = 256  # queries per block of a forward (see query_blocks)

    def __init__(self, settings: WindowAttentionSettings, hidden_size: int, layer_idx: int):
        super().__init__(settings, hidden_size, layer_idx)
        s = settings
        self.q_proj = nn.Linear(hidden_size, s.n_heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, s.n_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, s.n_kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.n_heads * s.head_dim, hidden_size, bias=s.out_bias)
        if s.qk_norm:
            self.q_norm_weight = nn.Parameter(torch.empty(s.head_dim))
            self.k_norm_weight = nn.Parameter(torch.empty(s.head_dim))
        self.scale = s.scaling if s.scaling is not None else s.head_dim**-0.5

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        norms = (self.q_norm_weight, self.k_norm_weight) if self.settings.qk_norm else ()
        init_teacher_projections((self.q_proj, self.k_proj, self.v_proj, self.o_proj), std, norms)

    def new_cache_layer(self) -> WindowKVLayer:
        return WindowKVLayer(self.settings.window, getattr(self.settings, "sinks", 0))

    def project_unrotated(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``q [B, T, H, D]``, ``k``, ``v`` ``[B, T, G, D]`` as the teacher computes them, before RoPE."""
        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seqlen, s.n_heads, s.head_dim)
        k = self.k_proj(hidden_states).view(batch, seqlen, s.n_kv_heads, s.head_dim)
        v = self.v_proj(hidden_states).view(batch, seqlen, s.n_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = rms_norm(q, self.q_norm_weight, s.norm_eps), rms_norm(k, self.k_norm_weight, s.norm_eps)
        return q, k, v

    def project(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, ...]:
        """``q [B, T, H, D]``, ``k``, ``v`` ``[B, T, G, D]`` as the teacher computes them (norms, then RoPE)."""
        q, k, v = self.project_unrotated(hidden_states)
        return (*self.rotate(q, k, position_embeddings), v)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's RoPE on ``q`` and ``k`` ``[B, T, heads, D]``."""
        if position_embeddings is None:
            raise ValueError(f"layer {self.layer_idx} ({self.kind}) reuses the teacher's RoPE and needs the "
                             "position_embeddings (cos, sin) its decoder layer passes")
        cos, sin = position_embeddings
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``q [B, H, T, D]`` · ``k [B, G, S, D]`` → scaled, softcapped scores ``[B, H, T, S]``."""
        rep = self.settings.n_heads // self.settings.n_kv_heads
        return self.scores_grouped(q, k.repeat_interleave(rep, dim=1))  # every query head its own key head

    def scores_grouped(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled, softcapped scores ``q [B, G, R, D]`` · ``k [B, G, S, D]`` → ``[B, G, R, S]``: ``R`` query rows per
        key/value head (a decode step's ``H / G`` query heads, keys not repeated; :meth:`scores` repeats them)."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        softcap = self.settings.softcap
        return torch.tanh(scores / softcap) * softcap if softcap is not None else scores

    def cached_masks(self, real: torch.Tensor, seq_idx: torch.Tensor | None, start: int,
                     layer: WindowKVLayer | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Which held slots each query of this call sees (``[B, T, S + W]``, or ``None`` without a cache),
        and each token's rank among its document's real tokens ``[B, T]``."""
        rank = document_rank(real, seq_idx)
        if layer is None or not layer.has_state():
            return None, rank
        cached = layer.visible(torch.arange(start, start + real.shape[1], device=real.device))
        return cached, rank + layer.real_count[:, None]

    def query_blocks(self, seqlen: int, whole: bool = False):
        """``(a, b, lo)`` per block of queries ``[a, b)`` of this call, ``lo`` the first of the call's tokens
        their window reaches: a forward holds ``[B, H, block, block + window]`` scores, not ``[B, H, T, T]``.
        ``whole``: one block (a mixing matrix is ``[T, T]`` anyway)."""
        step = seqlen if whole else max(1, self.query_block)
        for a in range(0, seqlen, step):
            yield a, min(seqlen, a + step), 0 if whole else max(0, a - self.settings.window + 1)

    def band_mask(self, real: torch.Tensor, seq_idx: torch.Tensor | None, rank: torch.Tensor, a: int, b: int,
                  lo: int, sinks: int = 0) -> torch.Tensor:
        """``[B, b - a, b - lo]``: which of the call's tokens ``[lo, b)`` the queries ``[a, b)`` see (causal,
        in the window or a sink, real, same document)."""
        i = torch.arange(a, b, device=real.device)
        j = torch.arange(lo, b, device=real.device)
        causal = (i[:, None] >= j[None, :])[None]
        in_window = (i[:, None] - j[None, :] < self.settings.window)[None] | (rank[:, lo:b] < sinks)[:, None, :]
        mask = causal & in_window & real[:, None, lo:b]
        if seq_idx is not None:
            mask = mask & (seq_idx[:, a:b, None] == seq_idx[:, None, lo:b])
        return mask

    @staticmethod
    def kept(real: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """The tokens a cache keeps after this call: real ones of the row's last document."""
        return real if seq_idx is None else real & (seq_idx == seq_idx[:, -1:])


class SlidingWindowMixer(WindowAttentionMixer):
    """Softmax attention over ``sinks`` + the last ``window`` tokens; see the module docstring."""

    kind = "swa"
    Settings = SWASettings

    def _attend(self, hidden_states, position_ids, past_key_values, kwargs, *, probs_only=False):
        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        layer: WindowKVLayer | None = None if probs_only else self.cache_layer(past_key_values)
        has_state = layer is not None and layer.has_state()
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=has_state)
        if has_state and seqlen == 1:
            return self._step(hidden_states, layer, padding, kwargs)
        real = padding.bool() if padding is not None else torch.ones(batch, seqlen, dtype=torch.bool,
                                                                     device=hidden_states.device)
        q, k, v = self.project(hidden_states, kwargs.get("position_embeddings"))
        acc = acc_dtype(hidden_states.dtype)
        q, k, v = (t.transpose(1, 2).to(acc) for t in (q, k, v))  # [B, heads, T, D]
        start = layer.seen_tokens if has_state else 0
        cached, rank = self.cached_masks(real, seq_idx, start, layer)
        # this call's sinks, for blocks whose window starts after them (only a call longer than the window has those)
        sinks = _sink_tokens(real, rank, s.sinks, seq_idx is not None) if seqlen > s.window else None
        if sinks is not None:
            position, found = sinks
            index = position[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            sink_keys, sink_values = k.gather(2, index), v.gather(2, index)
            sink_doc = None if seq_idx is None else seq_idx.gather(1, position)
        if cached is not None:
            held_keys, held_values = layer.keys.to(acc), layer.values.to(acc)
        rep = s.n_heads // s.n_kv_heads
        outs = []
        for a, b, lo in self.query_blocks(seqlen, whole=probs_only):
            keys, values, masks = [k[:, :, lo:b]], [v[:, :, lo:b]], [self.band_mask(real, seq_idx, rank, a, b, lo,
                                                                                    s.sinks)]
            if sinks is not None and lo > 0:
                seen = (found & (position < lo))[:, None, :].expand(-1, b - a, -1)  # those in [lo, b) are in the band
                if seq_idx is not None:
                    seen = seen & (seq_idx[:, a:b, None] == sink_doc[:, None, :])
                keys.insert(0, sink_keys)
                values.insert(0, sink_values)
                masks.insert(0, seen)
            if cached is not None:
                keys.insert(0, held_keys)
                values.insert(0, held_values)
                masks.insert(0, cached[:, a:b])
            keys, values, mask = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, 2)
            scores = self.scores(q[:, :, a:b], keys).masked_fill(~mask[:, None], torch.finfo(acc).min)
            probs = torch.softmax(scores, dim=-1) * mask[:, None].any(-1, keepdim=True)  # a query that sees nothing gets 0
            if probs_only:
                return probs
            outs.append(torch.matmul(probs, values.repeat_interleave(rep, dim=1)))  # [B, H, b - a, D]
        if layer is not None:
            kept = None if padding is None and seq_idx is None else self.kept(real, seq_idx)
            layer.write(k.to(hidden_states.dtype), v.to(hidden_states.dtype), kept, rank)
        out = torch.cat(outs, 2).transpose(1, 2).reshape(batch, seqlen, s.n_heads * s.head_dim)
        return self.o_proj(out.to(hidden_states.dtype))

    def _step(self, hidden_states, layer: WindowKVLayer, padding: torch.Tensor | None, kwargs) -> torch.Tensor:
        """One decoding token: written into the cache first (its ring slot is the one the query no longer
        reaches), then attending over the held slots; query heads grouped per key/value head, so neither
        the cache nor a repeat of it is copied."""
        s = self.settings
        batch = hidden_states.shape[0]
        acc = acc_dtype(hidden_states.dtype)
        q, k, v = self.project(hidden_states, kwargs.get("position_embeddings"))  # [B, 1, heads, D]
        real = None if padding is None else padding.bool()  # [B, 1]
        index = layer.seen_tokens
        layer.write(k.transpose(1, 2), v.transpose(1, 2), real, layer.real_count[:, None] if s.sinks else None)
        seen = layer.visible_from(index)  # [B, S + W]
        q = q.view(batch, s.n_kv_heads, -1, s.head_dim).to(acc)  # [B, G, H / G, D]
        scores = self.scores_grouped(q, layer.keys.to(acc))  # [B, G, H / G, S + W]
        scores = scores.masked_fill(~seen[:, None, None], torch.finfo(acc).min)
        probs = torch.softmax(scores, dim=-1)
        if real is not None:  # a padding query may see nothing at all: it gets 0, as in a forward
            probs = probs * seen.any(-1)[:, None, None, None]
        out = torch.matmul(probs, layer.values.to(acc))  # [B, G, H / G, D]
        return self.o_proj(out.reshape(batch, 1, s.n_heads * s.head_dim).to(hidden_states.dtype))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                **kwargs) -> tuple[torch.Tensor, None]:
        """``hidden_states [B, T, hidden]`` → ``([B, T, hidden], None)``; scores and softmax in fp32 (fp64
        for fp64). ``attention_mask`` (the teacher's 4-D mask) is not used: the window, sinks, padding
        and documents make the mask here, the same at prefill and at every decode step."""
        return self._attend(hidden_states, position_ids, past_key_values, kwargs), None

    def mixing_matrix(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor | None = None,
                      **kwargs) -> torch.Tensor:
        """The attention probabilities ``[B, H, T, T]`` (0 outside the window, sinks and document)."""
        return self._attend(hidden_states, position_ids, None, kwargs, probs_only=True)

    def extra_repr(self) -> str:
        s = self.settings
        return (f"layer_idx={self.layer_idx}, heads={s.n_heads}, kv_heads={s.n_kv_heads}, head_dim={s.head_dim}, "
                f"window={s.window}, sinks={s.sinks}")
