"""``meanpool``: a toy mixer kind defined and registered from outside the package, to prove the contract.

Causal mean pooling over the document's values, i.e. attention whose probabilities are uniform over
the past::

    out_t = W_o mean_{s <= t} W_v h_s        (per head; padding and other documents excluded)

The converter copies the teacher's ``W_v`` (value heads repeated per query head, as GQA shares them)
and ``W_o``. The cache keeps the running sum of values and the running count of tokens, updated in
place. Everything the package needs from a kind is here: settings, module, cache layer, converter and
one :func:`register_mixer` call; nothing in ``mixerswap`` knows this file exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import PreTrainedConfig
from transformers import initialization as init

from mixerswap.architectures.cache import MixerCacheLayer
from mixerswap.architectures.mixers import Mixer, MixerKind, register_mixer
from mixerswap.architectures.mixers.common import mixer_inputs
from mixerswap.convert.adapters import AttentionWeights
from mixerswap.convert.converters import AttentionLayout, LayerStats, MixerConverter


class MeanPoolSettings(BaseModel):
    """Shape of one mean-pooling mixer; all of it follows from the teacher's attention."""

    model_config = ConfigDict(extra="forbid")

    n_heads: int = Field(gt=0, description="H: output heads (= teacher query heads)")
    n_kv_heads: int = Field(gt=0, description="G: teacher value heads, repeated H / G times")
    head_dim: int = Field(gt=0, description="P: channels per head")
    v_bias: bool = False
    out_bias: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        return self


class RunningMeanLayer(MixerCacheLayer):
    """The running sum of values ``[B, H * P]`` and token count ``[B, 1]`` of one layer, updated in place."""

    def __init__(self, **kwargs):
        super().__init__()
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.total, self.count) if t is not None]

    def has_state(self) -> bool:
        return self.total is not None and self.seen_tokens > 0

    def store(self, new_tokens: int, total: torch.Tensor, count: torch.Tensor) -> None:
        """Keep copies the first time, copy into the held tensors afterwards (their storage never changes)."""
        if self.total is None or self.total.shape != total.shape or self.total.dtype != total.dtype:
            self.total, self.count = total.detach().clone(), count.detach().clone()
        else:
            self.total.copy_(total)
            self.count.copy_(count)
        self.seen_tokens += new_tokens
        self.is_initialized = True

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in self.tensors():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.total is not None:
            self.total, self.count = (t.repeat_interleave(repeats, dim=0) for t in (self.total, self.count))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.total is not None:
            self.total, self.count = self.total[indices].contiguous(), self.count[indices].contiguous()

    def offload(self):
        if self.total is not None:
            self.total, self.count = self.total.to("cpu"), self.count.to("cpu")


def _document_cumsum(x: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """Inclusive cumulative sum over ``T`` of ``x [B, T, D]`` restarting at each document of ``seq_idx [B, T]``."""
    total = x.cumsum(1)
    if seq_idx is None:
        return total
    steps = torch.arange(x.shape[1], device=x.device).expand_as(seq_idx)
    starts = seq_idx != F.pad(seq_idx, (1, 0), value=-1)[:, :-1]
    first = torch.where(starts, steps, 0).cummax(1).values  # index of each token's document start
    before = (total - x).gather(1, first[..., None].expand_as(x))  # running sum just before that start
    return total - before


class MeanPoolMixer(Mixer):
    """``out_t = W_o mean_{s <= t} W_v h_s``; see the module docstring."""

    kind = "meanpool"
    Settings = MeanPoolSettings
    lora_targets = ("v_proj", "out_proj")
    output_projection = "out_proj"
    kernel_ops = ()

    def __init__(self, settings: MeanPoolSettings, hidden_size: int, layer_idx: int):
        super().__init__(settings, hidden_size, layer_idx)
        width = settings.n_heads * settings.head_dim
        self.v_proj = nn.Linear(hidden_size, width, bias=settings.v_bias)
        self.out_proj = nn.Linear(width, hidden_size, bias=settings.out_bias)

    @torch.no_grad()
    def init_parameters(self, std: float = 0.02) -> None:
        for proj in (self.v_proj, self.out_proj):
            init.normal_(proj.weight, std=std)
            if proj.bias is not None:
                init.zeros_(proj.bias)

    def new_cache_layer(self) -> RunningMeanLayer:
        return RunningMeanLayer()

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        """``hidden_states [B, T, hidden]`` → ``([B, T, hidden], None)``; sums kept in fp32 (fp64 for fp64)."""
        batch, seqlen, _ = hidden_states.shape
        layer: RunningMeanLayer | None = self.cache_layer(past_key_values)
        has_state = layer is not None and layer.has_state()
        padding, seq_idx = mixer_inputs(kwargs, position_ids, batch, seqlen, continuing=has_state)
        acc = torch.promote_types(hidden_states.dtype, torch.float32)
        v = self.v_proj(hidden_states).to(acc)
        weight = torch.ones(batch, seqlen, 1, dtype=acc, device=v.device)
        if padding is not None:
            weight = padding[..., None].to(acc)
            v = v * weight
        if has_state and seqlen == 1:  # the recurrent step, in place
            layer.total.add_(v[:, 0])
            layer.count.add_(weight[:, 0])
            layer.seen_tokens += 1
            mean = (layer.total / layer.count.clamp_min(1))[:, None]
        else:
            total, count = _document_cumsum(v, seq_idx), _document_cumsum(weight, seq_idx)
            if has_state:
                total, count = total + layer.total[:, None], count + layer.count[:, None]
            mean = total / count.clamp_min(1)
            if layer is not None:
                layer.store(seqlen, total[:, -1], count[:, -1])
        return self.out_proj(mean.to(hidden_states.dtype)), None


class MeanPoolConverter(MixerConverter):
    """Attention → mean pooling: the value and output projections carry over, queries and keys are dropped."""

    tunable = frozenset()

    def settings(self, teacher_config: PreTrainedConfig, layout: AttentionLayout,
                 overrides: dict | None = None) -> MeanPoolSettings:
        self.check_overrides(MeanPoolMixer.kind, overrides)
        shape = layout.shape
        return MeanPoolSettings(n_heads=shape.num_heads, n_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                                v_bias=layout.qkv_bias, out_bias=layout.out_bias)

    def from_attention(self, attn: AttentionWeights, settings: MeanPoolSettings, teacher_config: PreTrainedConfig, *,
                       stats: LayerStats | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        rep = settings.n_heads // settings.n_kv_heads
        P = settings.head_dim

        def per_query_head(t: torch.Tensor) -> torch.Tensor:  # [G * P, ...] → [H * P, ...]
            return t.reshape(settings.n_kv_heads, P, *t.shape[1:]).repeat_interleave(rep, 0).flatten(0, 1)

        state = {"v_proj.weight": per_query_head(attn.v), "out_proj.weight": attn.o}
        if settings.v_bias:
            bias = attn.v_bias if attn.v_bias is not None else attn.v.new_zeros(attn.v.shape[0])
            state["v_proj.bias"] = per_query_head(bias)
        if settings.out_bias:
            state["out_proj.bias"] = attn.o_bias
        return {name: t.contiguous() for name, t in state.items()}


MEANPOOL = register_mixer(MixerKind(MeanPoolMixer, MeanPoolConverter()), replace=True)
