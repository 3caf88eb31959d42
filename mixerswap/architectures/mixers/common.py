"""What every recurrent mixer needs from the call beyond its hidden states: padding and documents."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

class AttentionHeadSettings(BaseModel):
    """What a teacher's attention layer dictates to a mixer that keeps its q/k/v/o: heads, sizes,
    biases, q/k norms. Mixer settings that reuse the teacher's projections extend this."""

    model_config = ConfigDict(extra="forbid")

    n_heads: int = Field(gt=0, description="H: query heads (= teacher)")
    n_kv_heads: int = Field(gt=0, description="G: key/value heads (= teacher); H / G query heads share one")
    head_dim: int = Field(gt=0, description="channels per head (= teacher)")
    qk_norm: bool = Field(False, description="the teacher's per-head RMSNorm on q and k (Qwen3, Gemma-3)")
    norm_eps: float = Field(1e-6, gt=0)
    qkv_bias: bool = False
    out_bias: bool = False

    @model_validator(mode="after")
    def _check_heads(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        return self


@torch.no_grad()
def init_teacher_projections(projections, std: float, norm_weights=()) -> None:
    """Random initialization of what a mixer takes from the teacher's attention: normal projection
    weights, zero biases, norm weights at one (``transformers.initialization``: loaded ones stay)."""
    from transformers import initialization as init

    for proj in projections:
        init.normal_(proj.weight, std=std)
        if proj.bias is not None:
            init.zeros_(proj.bias)
    for weight in norm_weights:
        init.ones_(weight)


# The student passes the 2-D padding mask to its mixers under this keyword (the decoder layers of
# every supported family forward unknown keywords to their attention module). The model reads the mask
# back from the device once per forward: the keyword holds the mask when some token is padding and
# ``None`` when every token is real, so a mixer never synchronizes with the device to find out. The
# keyword being present at all means a mask was given, so restarting ``position_ids`` are not packing.
PADDING_MASK_KWARG = "mixerswap_padding_mask"
# Without a mask, the model reads packed documents from ``position_ids`` once per forward (another
# read-back) and passes their ids ``[B, T]`` (``None``: one document per row) under this keyword.
SEQ_IDX_KWARG = "mixerswap_seq_idx"


def packed_seq_idx(position_ids: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Document ids from ``position_ids`` that restart, as ``transformers`` detects packed sequences.

    A new document starts wherever the position does not follow its predecessor by one. Returns
    ``[B, T]`` ids, or ``None`` when every row holds a single document.
    """
    if position_ids.shape[0] != batch:
        position_ids = position_ids.expand(batch, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    seq_idx = (step != 1).cumsum(-1)
    if bool((seq_idx[:, -1] == 0).all()):
        return None
    return seq_idx


def mixer_inputs(
    kwargs: dict, position_ids: torch.Tensor | None, batch: int, seqlen: int, *, continuing: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The padding mask ``[B, T]`` (1 = real token) for this call's tokens and the document ids.

    Following ``transformers``, packed documents are read from ``position_ids`` only when no padding
    mask was given and there is no cached prefix (a training or scoring call). ``padding`` is ``None``
    when no mask is given: the model decides once for all layers whether its mask has padding (see
    :data:`PADDING_MASK_KWARG`), so a mixer never reads the mask back from the device.
    """
    mask = kwargs.get(PADDING_MASK_KWARG)
    padding = None
    if mask is not None:  # an all-ones mask handed over directly is exact too (x * 1 = x), only slower
        padding = mask[:, -seqlen:].to(torch.float32)
    return padding, documents(kwargs, position_ids, batch, seqlen, continuing=continuing)


def documents(kwargs: dict, position_ids: torch.Tensor | None, batch: int, seqlen: int, *,
              continuing: bool) -> torch.Tensor | None:
    """Packed document ids ``[B, T]`` of this call, or ``None``: those the model found (:data:`SEQ_IDX_KWARG`),
    else read from ``position_ids`` here (a mixer called directly)."""
    if PADDING_MASK_KWARG in kwargs or continuing or seqlen == 1:
        return None
    if SEQ_IDX_KWARG in kwargs:
        return kwargs[SEQ_IDX_KWARG]
    return packed_seq_idx(position_ids, batch) if position_ids is not None else None
