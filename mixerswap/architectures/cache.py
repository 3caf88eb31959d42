"""One cache for a hybrid stack: key/value tensors for attention layers, a layer of its own for each mixer.

``HybridMixerCache`` is a ``transformers`` ``DynamicCache`` whose attention layers are the library's
own (full or sliding-window, exactly as the teacher would build them) and whose replaced layers are
built by their mixers (:meth:`~mixerswap.architectures.mixers.contract.Mixer.new_cache_layer`), each
a :class:`MixerCacheLayer`. Attention code keeps calling ``cache.update(k, v, layer_idx)``; mixers
read and write their own layer. Every mixer layer

* reports the bytes it holds exactly (:meth:`MixerCacheLayer.nbytes` counts the storages of the
  tensors it keeps, each once);
* counts the tokens it has seen, so ``get_seq_length()`` is right whichever layer is asked;
* follows ``generate()``'s batch operations (beam reordering, repeats for several samples).

:class:`RecurrentStateLayer` holds fixed-size named states (e.g. Mamba-2's ``conv`` and ``ssm``):
allocated once at the first forward and updated in place afterwards, so decoding allocates no new
state tensors and the states keep their addresses (what CUDA graphs need).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import CacheLayerMixin


def storage_nbytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class MixerCacheLayer(CacheLayerMixin):
    """Base of the cache layers that mixers build. Subclasses list the tensors they hold in ``tensors()``."""

    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.seen_tokens = 0

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        return storage_nbytes(self.tensors())

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} keeps no attention key/value tensors; its mixer writes it directly")

    def has_state(self) -> bool:
        return self.seen_tokens > 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(f"{type(self).__name__} cannot be rolled back (assisted decoding is not supported)")

    def prefetch(self):
        pass


class RecurrentStateLayer(MixerCacheLayer):
    """Named fixed-size states of one recurrent mixer layer, allocated once, updated in place."""

    def __init__(self, **kwargs):
        super().__init__()
        self.states: dict[str, torch.Tensor] = {}

    def __repr__(self):
        shapes = {name: tuple(t.shape) for name, t in self.states.items()}
        return f"RecurrentStateLayer(seen_tokens={self.seen_tokens}, states={shapes})"

    def tensors(self) -> list[torch.Tensor]:
        return list(self.states.values())

    def has_state(self) -> bool:
        return bool(self.states) and self.seen_tokens > 0

    def store(self, new_tokens: int, **states: torch.Tensor) -> None:
        """Record the states after ``new_tokens`` more tokens.

        The first call keeps (a contiguous copy of) each state; later calls copy into the held tensors,
        so their storage never changes. A state a kernel already updated in place is left as is.
        """
        for name, value in states.items():
            held = self.states.get(name)
            if held is None or held.shape != value.shape or held.dtype != value.dtype or held.device != value.device:
                self.states[name] = value.detach().clone(memory_format=torch.contiguous_format)
            elif held is not value:
                held.copy_(value)
        self.seen_tokens += new_tokens
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return next(iter(self.states.values())).shape[0] if self.states else -1

    def reset(self) -> None:
        for t in self.states.values():
            t.zero_()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in self.states.values():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def _reallocate(self, fn) -> None:  # the batch size changes: new tensors are unavoidable
        self.states = {name: fn(t).contiguous() for name, t in self.states.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reallocate(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reallocate(lambda t: t[indices, ...])

    def offload(self):
        for name, t in self.states.items():
            self.states[name] = t.to("cpu", non_blocking=True)


class HybridMixerCache(DynamicCache):
    """KV layers for the plan's attention layers, the mixers' own layers for the others.

    Args:
        teacher_config: the teacher's config; decides full vs sliding-window KV layers.
        mixer_layers: ``{layer index: cache layer}`` built by each replaced layer's mixer.
    """

    def __init__(self, teacher_config: PreTrainedConfig, mixer_layers: dict[int, MixerCacheLayer]):
        super().__init__(config=teacher_config)
        for idx, layer in mixer_layers.items():
            if not isinstance(layer, MixerCacheLayer):
                raise TypeError(f"layer {idx}: a mixer's cache layer must be a MixerCacheLayer, got {type(layer).__name__}")
            self.layers[idx] = layer

    def mixer_layer(self, layer_idx: int, expected: type = MixerCacheLayer) -> MixerCacheLayer:
        layer = self.layers[layer_idx]
        if not isinstance(layer, expected):
            raise TypeError(f"cache layer {layer_idx} is {type(layer).__name__}, not {expected.__name__}")
        return layer

    def nbytes(self) -> int:
        return cache_nbytes(self)


def cache_nbytes(cache) -> int:
    """Bytes held by any ``transformers`` cache: keys and values, plus our mixers' layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, MixerCacheLayer):
            total += layer.nbytes()
        else:
            total += storage_nbytes([getattr(layer, "keys", None), getattr(layer, "values", None)])
    return total
