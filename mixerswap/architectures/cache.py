"""One cache for a hybrid stack: key/value tensors for attention layers, fixed-size states for the rest.

``HybridMixerCache`` is a ``transformers`` ``DynamicCache`` whose attention layers are the library's
own (full or sliding-window, exactly as the teacher would build them) and whose replaced layers are
:class:`RecurrentStateLayer` objects. Attention code keeps calling ``cache.update(k, v, layer_idx)``;
mixers read and write their layer's states directly. The recurrent layer also counts the tokens it
has seen, so ``get_seq_length()`` is right whichever layer is asked, and ``generate()``'s batch
operations (beam reordering, repeat for sampling several sequences) act on both kinds of layer.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import CacheLayerMixin


class RecurrentStateLayer(CacheLayerMixin):
    """Named fixed-size states of one recurrent mixer layer (e.g. ``conv`` and ``ssm`` for Mamba-2)."""

    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.states: dict[str, torch.Tensor] = {}
        self.seen_tokens = 0

    def __repr__(self):
        shapes = {name: tuple(t.shape) for name, t in self.states.items()}
        return f"RecurrentStateLayer(seen_tokens={self.seen_tokens}, states={shapes})"

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a recurrent mixer layer keeps no key/value tensors; its mixer writes `states` directly")

    def has_state(self) -> bool:
        return bool(self.states)

    def set_states(self, new_tokens: int, **states: torch.Tensor) -> None:
        """Store the states after ``new_tokens`` more tokens."""
        self.states.update(states)
        self.seen_tokens += new_tokens
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return next(iter(self.states.values())).shape[0] if self.states else -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def _map(self, fn) -> None:
        self.states = {name: fn(t) for name, t in self.states.items()}

    def reset(self) -> None:
        self._map(torch.zeros_like)
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a recurrent state cannot be rolled back (assisted decoding is not supported)")

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        pass


class HybridMixerCache(DynamicCache):
    """KV layers for the plan's attention layers, :class:`RecurrentStateLayer` for the others.

    Args:
        teacher_config: the teacher's config; decides full vs sliding-window KV layers.
        recurrent_layers: indices of the layers whose mixer keeps recurrent states.
    """

    def __init__(self, teacher_config: PreTrainedConfig, recurrent_layers: list[int] | set[int]):
        super().__init__(config=teacher_config)
        for idx in recurrent_layers:
            self.layers[idx] = RecurrentStateLayer()

    def recurrent_layer(self, layer_idx: int) -> RecurrentStateLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, RecurrentStateLayer):
            raise TypeError(f"cache layer {layer_idx} is {type(layer).__name__}, not a recurrent state layer")
        return layer

    def nbytes(self) -> int:
        return cache_nbytes(self)


def cache_nbytes(cache) -> int:
    """Bytes held by any ``transformers`` cache: keys and values, plus recurrent states of ours."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, RecurrentStateLayer):
            total += layer.nbytes()
        else:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
    return total
