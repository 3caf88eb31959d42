"""Which positions of a batch a loss counts: pure functions of the batch, no model involved.

A batch holds ``input_ids [B, T]`` and optionally ``position_ids [B, T]`` (restarting at 0 where a
packed document starts), ``attention_mask [B, T]`` (0 = padding, left or right) and ``labels [B, T]``
(the token ids, -100 on tokens that are read but not learned: prompts, user turns).

* :func:`next_token_labels`: the target of each position, -100 where there is none.
* :func:`prediction_mask`: where a next-token loss counts; KD and CE both count exactly these.
* :func:`token_mask`: the real tokens, for losses on each token's own hidden state.
"""

from __future__ import annotations

import torch

IGNORE = -100


def next_token_labels(batch: dict) -> torch.Tensor:
    """``[B, T]`` int64 targets: position t predicts token t+1 (``labels[t+1]`` when the batch has
    labels, else ``input_ids[t+1]``); -100 at the last position, where t+1 starts a packed document
    (``position_ids[t+1] == 0``), and where token t or token t+1 is padding."""
    ids = batch["input_ids"]
    labels = batch.get("labels")
    source = ids if labels is None else labels
    targets = torch.full_like(source, IGNORE)
    targets[:, :-1] = source[:, 1:]
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False
    positions = batch.get("position_ids")
    if positions is not None:  # the next token opens another document: nothing here predicts it
        valid[:, :-1] &= positions[:, 1:] != 0
    mask = batch.get("attention_mask")
    if mask is not None:
        real = mask.bool()
        valid &= real
        valid[:, :-1] &= real[:, 1:]
    return targets.masked_fill(~valid, IGNORE)


def prediction_mask(batch: dict) -> torch.Tensor:
    """``[B, T]`` float32, 1 exactly where :func:`next_token_labels` is not -100: the positions whose
    output distribution a KD or CE loss compares (labels ``[-100, -100, 13, 14, 15]`` give
    ``[0, 1, 1, 1, 0]``: positions 1-3 predict 13-15, position 4 predicts nothing)."""
    return (next_token_labels(batch) != IGNORE).float()


def token_mask(batch: dict) -> torch.Tensor:
    """``[B, T]`` float32, 1 at real (non-padding) tokens, prompt tokens included: for per-token
    hidden-state losses, where every token the model reads has a state worth matching."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(batch["input_ids"], dtype=torch.float32)
    return mask.float()
