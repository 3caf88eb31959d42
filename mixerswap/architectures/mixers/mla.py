"""Multi-head latent attention (MLA) shaped to replace an attention layer, with a latent-only cache.

DeepSeek-AI, "DeepSeek-V2" (2024, section 2.1); the conversion from GQA follows Meng et al.,
"TransMLA" (2025) and Ji et al., "MHA2MLA" (2025). Per token ``x`` and query head ``h``::

    c     = kv_down(x)                      [kv_rank]            the latent (optional RMSNorm)
    k_r   = RoPE(k_rope_proj(x))            [rope_heads, rope_dim]  decoupled RoPE key
    q     = q_proj(x) = [q_nope | q_rope]   [H, nope_dim + rope_dim]  (optional per-head RMSNorm),
            q_rope rotated by RoPE
    score = scaling * (q_nope_h . (W_uk_h c_j) + q_rope_h . k_r[g(h)]_j)    (optional tanh softcap)
    out   = o_proj(concat_h sum_j p_hj W_uv_h c_j)

``g(h) = h // (H / rope_heads)``: a RoPE key head is shared by ``H / rope_heads`` query heads.
DeepSeek shares one RoPE key (``rope_heads = 1``); a GQA teacher converted exactly needs one per
key/value head (``rope_heads = G``): the teacher's keys carry RoPE on all their rotary dims and a
RoPE key shared by the heads of different groups cannot reproduce the different keys of those groups
(TransMLA's exact construction likewise keeps the rotated key part per KV head). The converter
(:mod:`mixerswap.convert.mla`) therefore uses ``rope_heads = G``; ``1`` is accepted for models built
or trained as DeepSeek's.

**The cache holds only ``c`` and ``k_r``**: ``(kv_rank + rope_heads * rope_dim)`` values per token
and layer (:class:`LatentCacheLayer`). Two compute paths give the same function:

* *expanded* (prefill, training): up-project ``K_nope = W_uk c`` and ``V = W_uv c`` for every key
  and run ordinary attention (``scaled_dot_product_attention``; explicit scores with a softcap);
* *absorbed* (decode): fold ``W_uk_h`` into the query (``q_lat_h = W_uk_h^T q_nope_h``, ``[kv_rank]``),
  attend over the cached latents directly, and apply ``W_uv_h`` after the weighted sum, so no key or
  value is ever materialized per cached token.

RoPE is the teacher's: the decoder layer passes its ``position_embeddings = (cos, sin)`` (llama3
scaling, Gemma-3's local/global bases and Phi-3's partial rotary are already in them; ``cos`` has
the teacher's rotary width ``r``, in the rotate-half layout of ``transformers``). The RoPE part of
this mixer uses ``rope_dim / 2`` of the teacher's ``r / 2`` frequencies, ``rope_freqs`` (default:
the first, i.e. highest, ones), with their channel pairs ``(f, f + r / 2)`` laid out as
``[f_1..f_m, f_1 + r/2 .. f_m + r/2]``: again rotate-half, so it rotates exactly as the teacher does.
A frequency may appear more than once (then ``rope_dim`` may exceed ``r``): a shared RoPE key
(``rope_heads = 1``) of a converted GQA teacher carries a frequency pair of several rotated KV
heads (TransMLA's RoRoPE, see :mod:`mixerswap.convert.mla`). ``q_norm_dims`` lets the query norm take
its RMS over the teacher's own head channels (the first ones) when the RoPE query channels are
combinations of them.

Masking is attention's: causal over cache positions, a sliding window on the layers where the
teacher has one (``kv > q - window``, as ``transformers``), padding from the 2-D mask
(:data:`~mixerswap.architectures.mixers.common.PADDING_MASK_KWARG`) and packed documents from
``position_ids`` that restart (:func:`~mixerswap.architectures.mixers.common.packed_seq_idx`).
The teacher's 4-D ``attention_mask`` is not read: its size follows the teacher's cache layers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import initialization as init

from ...kernels.precision import acc_dtype
from ..cache import MixerCacheLayer
from .common import PADDING_MASK_KWARG, documents
from .contract import Mixer


class MLASettings(BaseModel):
    """Shape and options of one MLA mixer (one plan entry)."""

    model_config = ConfigDict(extra="forbid")

    n_heads: int = Field(gt=0, description="H: query heads (= teacher query heads)")
    kv_rank: int = Field(gt=0, description="latent width cached per token")
    rope_dim: int = Field(gt=0, description="RoPE channels per query head and per RoPE key head (even)")
    rope_heads: int = Field(gt=0, description="RoPE key heads (1 = DeepSeek's shared key; teacher KV heads)")
    nope_dim: int = Field(ge=0, description="query/key channels per head without RoPE (read from the latent)")
    v_head_dim: int = Field(gt=0, description="value channels per head")
    rope_freqs: list[int] | None = Field(
        None, description="indices of the teacher's RoPE frequencies kept (rope_dim / 2 of them); None = the first")
    scaling: float | None = Field(None, gt=0, description="score scale; None = (nope_dim + rope_dim) ** -0.5")
    softcap: float | None = Field(None, gt=0, description="tanh softcap of the scores (Gemma-2)")
    sliding_window: int | None = Field(None, gt=0, description="the teacher's window, on sliding_layers")
    sliding_layers: list[int] | None = Field(None, description="layers the window applies to; None = every layer")
    q_norm: bool = Field(False, description="per-head RMSNorm of q (teachers with q/k norms)")
    q_norm_dims: int | None = Field(
        None, gt=0, description="query channels the q norm's RMS is taken over (the first ones); None = the whole head")
    k_norm: bool = Field(False, description="RMSNorm of each RoPE key head (exact conversion of q/k-norm teachers)")
    latent_norm: bool = Field(False, description="RMSNorm of the latent before it is cached (DeepSeek)")
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    exact: bool = Field(False, description="converted by the exact GQA→MLA construction (no compression)")
    rope_select: Literal["high", "norm", "rorope"] = Field(
        "high", description="how the converter chose the RoPE channels (mixerswap.convert.mla); the mixer itself "
                            "reads only rope_heads, rope_dim and rope_freqs")
    kv_weights: Literal["output", "balance"] = Field(
        "output", description="how the converter weighted the rows of [K_nope; V] it factorized (mixerswap.convert.mla):"
                              " output-aware, or TransMLA's key/value balance alone; the mixer does not read it")
    cache_block: int = Field(64, gt=0, description="tokens per allocation of the cache (decode writes in place)")

    @model_validator(mode="after")
    def _check(self):
        if self.rope_dim % 2:
            raise ValueError(f"rope_dim must be even (RoPE rotates channel pairs), got {self.rope_dim}")
        if self.n_heads % self.rope_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of rope_heads ({self.rope_heads})")
        if self.rope_freqs is not None and len(self.rope_freqs) != self.rope_dim // 2:
            raise ValueError(f"rope_freqs has {len(self.rope_freqs)} entries, need rope_dim / 2 = {self.rope_dim // 2}")
        if self.rope_freqs is not None and min(self.rope_freqs, default=0) < 0:
            raise ValueError("rope_freqs must be non-negative frequency indices")
        if self.q_norm_dims is not None and self.q_norm_dims > self.nope_dim + self.rope_dim:
            raise ValueError(f"q_norm_dims {self.q_norm_dims} exceeds the query head's "
                             f"{self.nope_dim + self.rope_dim} channels")
        return self


class LatentCacheLayer(MixerCacheLayer):
    """The latents ``[B, capacity, kv_rank]`` and RoPE keys ``[B, capacity, rope_heads, rope_dim]`` of one layer.

    Full layers keep every token; storage grows in blocks of ``block`` tokens, so a decode step writes
    its token in place and reallocates only when a block is full (``capacity = block * ceil(tokens / block)``).
    Sliding-window layers keep the last ``window - 1`` tokens, as the teacher's sliding KV layer does
    (capacity at most ``window - 1``); each step copies the kept tail into the same storage.
    :meth:`nbytes` is what the storages hold, ``(kv_rank + rope_heads * rope_dim) * element size * capacity * B``.
    """

    def __init__(self, window: int | None = None, block: int = 64, **kwargs):
        super().__init__()
        self.keep = None if window is None else window - 1
        self.block = block
        self.latent: torch.Tensor | None = None
        self.rope_key: torch.Tensor | None = None
        self.held = 0  # valid tokens at the start of the storage

    def __repr__(self):
        shape = None if self.latent is None else tuple(self.latent.shape)
        return f"LatentCacheLayer(seen_tokens={self.seen_tokens}, held={self.held}, latent={shape}, keep={self.keep})"

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.latent, self.rope_key) if t is not None]

    @property
    def capacity(self) -> int:
        return 0 if self.latent is None else self.latent.shape[1]

    def _reserve(self, tokens: int, latent: torch.Tensor, rope_key: torch.Tensor) -> None:
        """Make room for ``tokens`` tokens, keeping the held ones (reallocates only when needed)."""
        if (self.latent is not None and self.capacity >= tokens and self.latent.shape[0] == latent.shape[0]
                and self.latent.dtype == latent.dtype and self.latent.device == latent.device):
            return
        capacity = self.block * math.ceil(tokens / self.block)
        if self.keep is not None:
            capacity = min(capacity, max(self.keep, 1))
        batch = latent.shape[0]
        new_latent = latent.new_zeros(batch, capacity, latent.shape[-1])
        new_rope = rope_key.new_zeros(batch, capacity, *rope_key.shape[2:])
        if self.latent is not None and self.held and self.latent.shape[0] == batch:
            new_latent[:, : self.held].copy_(self.latent[:, : self.held])
            new_rope[:, : self.held].copy_(self.rope_key[:, : self.held])
        self.latent, self.rope_key = new_latent, new_rope

    def update_latent(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Add this call's tokens; returns every key this call attends to and the cache position of the first.

        Args:
            latent: ``[B, T, kv_rank]``; rope_key: ``[B, T, rope_heads, rope_dim]`` (RoPE applied).
        Returns:
            ``(latents [B, N, kv_rank], rope keys [B, N, rope_heads, rope_dim], start)``: the held tokens
            followed by the new ones, the first at cache position ``start``.
        """
        new = latent.shape[1]
        start = self.seen_tokens - self.held
        if self.keep is None:
            self._reserve(self.held + new, latent, rope_key)
            self.latent[:, self.held : self.held + new].copy_(latent)
            self.rope_key[:, self.held : self.held + new].copy_(rope_key)
            self.held += new
            keys = self.latent[:, : self.held], self.rope_key[:, : self.held]
        else:
            if self.held:
                keys = (torch.cat([self.latent[:, : self.held], latent], 1),
                        torch.cat([self.rope_key[:, : self.held], rope_key], 1))
            else:
                keys = latent, rope_key
            kept = min(self.keep, keys[0].shape[1])
            self._reserve(kept, latent, rope_key)
            if kept:
                self.latent[:, :kept].copy_(keys[0][:, -kept:])
                self.rope_key[:, :kept].copy_(keys[1][:, -kept:])
            self.held = kept
        self.seen_tokens += new
        self.is_initialized = True
        return keys[0], keys[1], start

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
        self.seen_tokens = self.held = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in self.tensors():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def _reallocate(self, fn) -> None:  # the batch size changes: new tensors are unavoidable
        if self.latent is not None:
            self.latent, self.rope_key = fn(self.latent).contiguous(), fn(self.rope_key).contiguous()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reallocate(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reallocate(lambda t: t[indices, ...])

    @property
    def batch_size(self) -> int:
        return -1 if self.latent is None else self.latent.shape[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dims: int | None = None) -> torch.Tensor:
    """RMSNorm over the last dim in fp32 (fp64 for fp64), as the teachers' q/k norms compute it; with ``dims``,
    the RMS of the first ``dims`` channels scales all of them."""
    acc = acc_dtype(x.dtype)
    h = x.to(acc)
    h = h * torch.rsqrt(h[..., :dims].pow(2).mean(-1, keepdim=True) + eps)
    return (h * weight.to(acc)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [B, T, heads, r]`` with ``cos``, ``sin`` ``[B, T, r]`` (rotate-half layout)."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


class MLAMixer(Mixer):
    """Drop-in replacement for a teacher attention module; see the module docstring."""

    kind = "mla"
    Settings = MLASettings
    lora_targets = ("q_proj", "kv_down", "k_rope_proj", "o_proj")
    output_projection = "o_proj"
    kernel_ops = ()
    # "auto": absorbed for single-token steps with a cache, expanded otherwise; tests force either one.
    path: Literal["auto", "expanded", "absorbed"] = "auto"

    def __init__(self, settings: MLASettings, hidden_size: int, layer_idx: int):
        super().__init__(settings, hidden_size, layer_idx)
        s = settings
        H = s.n_heads
        self.qk_dim = s.nope_dim + s.rope_dim
        self.scaling = s.scaling if s.scaling is not None else self.qk_dim ** -0.5
        sliding = s.sliding_window is not None and (s.sliding_layers is None or layer_idx in s.sliding_layers)
        self.window = s.sliding_window if sliding else None
        self.q_proj = nn.Linear(hidden_size, H * self.qk_dim, bias=s.qkv_bias)
        self.kv_down = nn.Linear(hidden_size, s.kv_rank, bias=s.qkv_bias)
        self.k_rope_proj = nn.Linear(hidden_size, s.rope_heads * s.rope_dim, bias=s.qkv_bias)
        # without a no-RoPE part (exact conversion of a fully rotary teacher) keys are all RoPE key
        self.k_up = nn.Linear(s.kv_rank, H * s.nope_dim, bias=False) if s.nope_dim else None
        self.v_up = nn.Linear(s.kv_rank, H * s.v_head_dim, bias=False)
        self.o_proj = nn.Linear(H * s.v_head_dim, hidden_size, bias=s.out_bias)
        if s.q_norm:
            self.q_norm = nn.Parameter(torch.empty(self.qk_dim))
        if s.k_norm:
            self.k_norm = nn.Parameter(torch.empty(s.rope_dim))
        if s.latent_norm:
            self.latent_norm = nn.Parameter(torch.empty(s.kv_rank))
        self._freq_index: dict[tuple, torch.Tensor] = {}  # (rotary width, device) -> kept channels of cos/sin

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        """Random initialization (a student built without converted weights); loaded weights are left alone."""
        for proj in (self.q_proj, self.kv_down, self.k_rope_proj, self.k_up, self.v_up, self.o_proj):
            if proj is None:
                continue
            init.normal_(proj.weight, std=std)
            if proj.bias is not None:
                init.zeros_(proj.bias)
        for name in ("q_norm", "k_norm", "latent_norm"):
            if hasattr(self, name):
                init.ones_(getattr(self, name))

    def new_cache_layer(self) -> LatentCacheLayer:
        return LatentCacheLayer(window=self.window, block=self.settings.cache_block)

    def cache_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes this layer caches per token and sequence: ``(kv_rank + rope_heads * rope_dim) * element size``."""
        s = self.settings
        return (s.kv_rank + s.rope_heads * s.rope_dim) * torch.empty((), dtype=dtype).element_size()

    def _rope(self, x: torch.Tensor, position_embeddings) -> torch.Tensor:
        """RoPE on ``x`` ``[B, T, heads, rope_dim]`` with the kept frequencies of the teacher's ``(cos, sin)``."""
        return _rotate(x, *self._rope_tables(position_embeddings))

    def _rope_tables(self, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept frequencies of the teacher's ``(cos, sin)``: ``[B, T, rope_dim]`` each."""
        if position_embeddings is None:
            raise ValueError(f"layer {self.layer_idx} (mla) needs the teacher's RoPE position_embeddings=(cos, sin)")
        cos, sin = position_embeddings
        s = self.settings
        width = cos.shape[-1]
        if s.rope_dim > width and s.rope_freqs is None:
            raise ValueError(f"layer {self.layer_idx} (mla): rope_dim {s.rope_dim} exceeds the teacher's rotary "
                             f"width {width}")
        if s.rope_dim != width or s.rope_freqs is not None:
            freqs = s.rope_freqs if s.rope_freqs is not None else list(range(s.rope_dim // 2))
            if max(freqs) >= width // 2:
                raise ValueError(f"layer {self.layer_idx} (mla): rope_freqs {freqs} beyond the teacher's "
                                 f"{width // 2} frequencies")
            index = self._freq_index.get((width, cos.device))
            if index is None:  # built once: a tensor from host data is a blocking copy on CUDA
                index = torch.tensor(freqs + [f + width // 2 for f in freqs], device=cos.device)
                self._freq_index[(width, cos.device)] = index
            cos, sin = cos.index_select(-1, index), sin.index_select(-1, index)
        return cos, sin

    def _project(self, hidden_states: torch.Tensor, position_embeddings):
        """Queries ``(q_nope [B, T, H, nope], q_rope [B, T, H, rope])``, latents and RoPE keys of this call."""
        s = self.settings
        batch, seqlen, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seqlen, s.n_heads, self.qk_dim)
        if s.q_norm:
            q = rms_norm(q, self.q_norm, s.norm_eps, s.q_norm_dims)
        q_nope, q_rope = q.split([s.nope_dim, s.rope_dim], dim=-1)
        cos, sin = self._rope_tables(position_embeddings)
        q_rope = _rotate(q_rope, cos, sin)
        latent = self.kv_down(hidden_states)
        if s.latent_norm:
            latent = rms_norm(latent, self.latent_norm, s.norm_eps)
        k_rope = self.k_rope_proj(hidden_states).view(batch, seqlen, s.rope_heads, s.rope_dim)
        if s.k_norm:
            k_rope = rms_norm(k_rope, self.k_norm, s.norm_eps)
        k_rope = _rotate(k_rope, cos, sin)
        return q_nope, q_rope, latent, k_rope

    def _allowed(self, batch: int, seqlen: int, keys: int, past: int, start: int, kwargs: dict,
                 position_ids: torch.Tensor | None, device) -> torch.Tensor | None:
        """``[B, T, N]`` bool: query ``t`` (cache position ``past + t``) may attend to key ``n`` (``start + n``);
        ``None`` when every query sees every key (a decode step without padding: the last query of a causal
        mask sees all keys, and a window layer holds no key beyond its window)."""
        mask = kwargs.get(PADDING_MASK_KWARG)
        in_window = self.window is None or past + seqlen - 1 - start < self.window  # the oldest key, last query
        if seqlen == 1 and mask is None and in_window and start + keys == past + 1:
            return None
        q_pos = torch.arange(past, past + seqlen, device=device)[:, None]
        k_pos = torch.arange(start, start + keys, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.window is not None:
            allowed = allowed & (k_pos > q_pos - self.window)
        allowed = allowed.expand(batch, seqlen, keys)
        if mask is not None:
            mask = mask.to(device=device, dtype=torch.bool)
            if mask.shape[1] < keys:  # a mask of the new tokens only: the cached ones were real
                mask = torch.cat([mask.new_ones(batch, keys - mask.shape[1]), mask], 1)
            allowed = allowed & mask[:, None, -keys:]
        else:
            seq_idx = documents(kwargs, None if position_ids is None else position_ids.to(device), batch, seqlen,
                                continuing=past > 0)
            if seq_idx is not None:
                allowed = allowed & (seq_idx[:, :, None] == seq_idx[:, None, :])
        return allowed

    def _probabilities(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Scaled, softcapped, masked scores ``[B, H, T, N]`` → probabilities (softmax in fp32 or wider).

        Masked entries get the dtype's minimum, not ``-inf``: a fully masked row (a padding query)
        becomes uniform instead of NaN, and its output is never read.
        """
        s = self.settings
        acc = acc_dtype(scores.dtype)
        scores = scores.to(acc) * self.scaling
        if s.softcap is not None:
            scores = torch.tanh(scores / s.softcap) * s.softcap
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], torch.finfo(acc).min)
        return torch.softmax(scores, dim=-1)

    def _rope_scores(self, q_rope: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """``q_rope [B, T, H, r]`` . ``k_rope [B, N, Gr, r]`` → ``[B, H, T, N]`` (heads grouped per RoPE key head)."""
        batch, seqlen, heads, r = q_rope.shape
        groups = k_rope.shape[2]
        q = q_rope.view(batch, seqlen, groups, heads // groups, r).permute(0, 2, 3, 1, 4)  # [B, Gr, H / Gr, T, r]
        scores = torch.matmul(q.reshape(batch, groups, -1, r), k_rope.permute(0, 2, 3, 1))  # [B, Gr, H / Gr * T, N]
        return scores.view(batch, heads, seqlen, -1)

    def _attend(self, q_nope, q_rope, latent, k_rope, allowed, absorbed: bool, return_probs: bool = False):
        """Attention over ``N`` cached or new tokens → per-head outputs ``[B, T, H * v_head_dim]``."""
        s = self.settings
        batch, seqlen = q_nope.shape[:2]
        H = s.n_heads
        if not absorbed and not return_probs and s.softcap is None:
            return self._attend_fused(q_nope, q_rope, latent, k_rope, allowed)
        scores = self._rope_scores(q_rope, k_rope)
        if s.nope_dim and absorbed:  # per head [B * T, nope] @ [nope, kv_rank], then [B, H * T, kv_rank] @ [B, kv_rank, N]
            q_latent = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, batch * seqlen, s.nope_dim),
                                    self.k_up.weight.view(H, s.nope_dim, s.kv_rank))
            q_latent = q_latent.view(H, batch, seqlen, s.kv_rank).transpose(0, 1).reshape(batch, H * seqlen, -1)
            scores = scores + torch.bmm(q_latent, latent.transpose(1, 2)).view(scores.shape)
        elif s.nope_dim:
            k_nope = self.k_up(latent).view(batch, -1, H, s.nope_dim)
            scores = scores + torch.einsum("bthd,bnhd->bhtn", q_nope, k_nope)
        probs = self._probabilities(scores, allowed)
        if return_probs:
            return probs
        probs = probs.to(latent.dtype)
        if absorbed:  # [B, H * T, N] @ [B, N, kv_rank], then per head [B * T, kv_rank] @ [kv_rank, v]
            mixed = torch.bmm(probs.view(batch, H * seqlen, -1), latent).view(batch, H, seqlen, s.kv_rank)
            mixed = mixed.transpose(0, 1).reshape(H, batch * seqlen, s.kv_rank)
            out = torch.bmm(mixed, self.v_up.weight.view(H, s.v_head_dim, s.kv_rank).transpose(1, 2))
            out = out.view(H, batch, seqlen, s.v_head_dim).permute(1, 2, 0, 3)
        else:
            v = self.v_up(latent).view(batch, -1, H, s.v_head_dim)
            out = torch.einsum("bhtn,bnhv->bthv", probs, v)
        return out.reshape(batch, seqlen, H * s.v_head_dim)

    def _attend_fused(self, q_nope, q_rope, latent, k_rope, allowed) -> torch.Tensor:
        """The expanded path through ``scaled_dot_product_attention`` (fused kernels, no ``[T, N]`` fp32
        scores held for the backward on CUDA): keys ``[W_uk c | k_r]`` per head, values ``W_uv c``."""
        s = self.settings
        batch, seqlen, H = q_nope.shape[:3]
        keys = latent.shape[1]
        q = torch.cat([q_nope, q_rope], -1) if s.nope_dim else q_rope
        k_rope = k_rope.repeat_interleave(H // s.rope_heads, dim=2)
        k = torch.cat([self.k_up(latent).view(batch, keys, H, s.nope_dim), k_rope], -1) if s.nope_dim else k_rope
        v = self.v_up(latent).view(batch, keys, H, s.v_head_dim)
        if allowed is not None:
            # a query that may see no key (padding) attends uniformly, as the explicit path does, instead of NaN
            allowed = (allowed | ~allowed.any(-1, keepdim=True))[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=allowed, scale=self.scaling)
        return out.transpose(1, 2).reshape(batch, seqlen, H * s.v_head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """``hidden_states``: ``[B, T, hidden]`` → ``([B, T, hidden], None)`` like an HF attention module.

        ``kwargs["position_embeddings"]`` must be the teacher's RoPE ``(cos, sin)`` for these tokens.
        """
        batch, seqlen, _ = hidden_states.shape
        q_nope, q_rope, latent, k_rope = self._project(hidden_states, kwargs.get("position_embeddings"))
        layer: LatentCacheLayer | None = self.cache_layer(past_key_values)
        past = 0
        if layer is not None:
            past = layer.seen_tokens
            latent, k_rope, start = layer.update_latent(latent, k_rope)
        else:
            start = 0
        allowed = self._allowed(batch, seqlen, latent.shape[1], past, start, kwargs, position_ids,
                                hidden_states.device)
        absorbed = self.path == "absorbed" or (self.path == "auto" and layer is not None and seqlen == 1)
        y = self._attend(q_nope, q_rope, latent, k_rope, allowed, absorbed)
        return self.o_proj(y), None

    def mixing_matrix(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor | None = None,
                      **kwargs) -> torch.Tensor:
        """The attention probabilities ``[B, H, T, T]`` (no cache), for matrix alignment."""
        batch, seqlen, _ = hidden_states.shape
        q_nope, q_rope, latent, k_rope = self._project(hidden_states, kwargs.get("position_embeddings"))
        allowed = self._allowed(batch, seqlen, seqlen, 0, 0, kwargs, position_ids, hidden_states.device)
        return self._attend(q_nope, q_rope, latent, k_rope, allowed, absorbed=False, return_probs=True)

    def extra_repr(self) -> str:
        s = self.settings
        return (f"layer_idx={self.layer_idx}, heads={s.n_heads}, kv_rank={s.kv_rank}, "
                f"rope={s.rope_heads}x{s.rope_dim}, nope_dim={s.nope_dim}, v_head_dim={s.v_head_dim}, "
                f"window={self.window}, exact={s.exact}")
