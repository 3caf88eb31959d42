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
:class:`WindowKVLayer` holds the keys and values of a bounded window (plus attention sinks) in a ring
buffer allocated once, and optional fixed-size running states beside it (linear attention's sums).
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


class WindowKVLayer(MixerCacheLayer):
    """Keys and values of the last ``window`` tokens and the first ``sinks`` tokens of each row, bounded.

    Slots ``[0, sinks)`` hold each row's first ``sinks`` real tokens (attention sinks, filled per row,
    so left padding does not take them); slots ``sinks + (i % window)`` form a ring buffer holding the
    token at absolute index ``i`` (its position in the row, padding included) while ``i`` is among the
    last ``window``. All tensors are allocated at the first write and written in place afterwards, so
    the bytes held do not depend on the sequence length.

    Tensors (``S`` = sinks, ``W`` = window, ``G`` key/value heads, ``D`` head size):

    * ``keys``, ``values``: ``[B, G, S + W, D]`` (keys after RoPE, as attention sees them);
    * ``valid``: ``[B, S + W]`` bool, whether a slot holds a real token; a sink token is valid in its
      sink slot only, never also in the ring, so no token is attended twice;
    * ``slot_index``: ``[S + W]`` long, the absolute index of the token in each ring slot (-1 when
      empty; sink slots keep -1 and are always in reach);
    * ``real_count``: ``[B]`` long, real tokens seen per row (the rank of the next real token);
    * ``states``: optional named fixed-size states of the mixer (e.g. linear attention's running
      state and normalizer), kept like :class:`RecurrentStateLayer`'s.
    """

    def __init__(self, window: int, sinks: int = 0, **kwargs):
        super().__init__()
        if window < 1 or sinks < 0:
            raise ValueError(f"a window cache needs window >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
        self.window, self.sinks = window, sinks
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.slot_index: torch.Tensor | None = None
        self.real_count: torch.Tensor | None = None
        self.sure_real = 0  # real tokens every row has seen at least (counted on the host: calls without padding)
        self.states: dict[str, torch.Tensor] = {}

    def __repr__(self):
        return (f"WindowKVLayer(window={self.window}, sinks={self.sinks}, seen_tokens={self.seen_tokens}, "
                f"keys={None if self.keys is None else tuple(self.keys.shape)})")

    def tensors(self) -> list[torch.Tensor]:
        held = [self.keys, self.values, self.valid, self.slot_index, self.real_count, *self.states.values()]
        return [t for t in held if t is not None]

    def has_state(self) -> bool:
        return self.keys is not None and self.seen_tokens > 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0] if self.keys is not None else -1

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        batch, heads, _, head_dim = keys.shape
        slots = self.sinks + self.window
        self.keys = keys.new_zeros(batch, heads, slots, head_dim)
        self.values = values.new_zeros(batch, heads, slots, values.shape[-1])
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=keys.device)
        self.slot_index = torch.full((slots,), -1, dtype=torch.long, device=keys.device)
        self.real_count = torch.zeros(batch, dtype=torch.long, device=keys.device)
        self.sure_real = 0

    def visible(self, query_index: torch.Tensor) -> torch.Tensor | None:
        """``[B, T, S + W]`` which held slots the queries at absolute indices ``query_index [T]`` see
        (a ring slot while its token is within ``window`` of the query, a sink always), or ``None``."""
        if not self.has_state():
            return None
        in_reach = query_index[:, None] - self.slot_index[None, :] < self.window
        in_reach[:, : self.sinks].fill_(True)
        return self.valid[:, None, :] & in_reach[None]

    def visible_from(self, query_index: int) -> torch.Tensor:
        """``[B, S + W]`` which held slots one query at absolute index ``query_index`` sees (a decode step
        that already wrote its own token: :meth:`visible` without building an index tensor)."""
        in_reach = self.slot_index > query_index - self.window
        in_reach[: self.sinks].fill_(True)
        return self.valid & in_reach

    def leaving(self, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The held ring entries the next ``new_tokens`` tokens overwrite: keys, values ``[B, G, n, D]``
        and ``valid [B, n]`` (``None`` before the first write)."""
        if not self.has_state():
            return None
        n = min(new_tokens, self.window)
        slots = self.sinks + (torch.arange(self.seen_tokens, self.seen_tokens + n, device=self.keys.device) % self.window)
        return self.keys[:, :, slots], self.values[:, :, slots], self.valid[:, slots]

    def write(self, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor | None, rank: torch.Tensor) -> None:
        """Record ``T`` new tokens in place: ``keys``/``values`` ``[B, G, T, D]``, ``real [B, T]`` bool
        (false at padding and for tokens of a document that ended in this call; ``None``: every token is
        real) and ``rank [B, T]`` each token's rank among its row's real tokens (sinks are the ranks
        below ``sinks``; unused without sinks). Nothing here reads a value back from the device."""
        if self.keys is None or self.keys.shape[0] != keys.shape[0]:
            self._allocate(keys, values)
        seqlen = keys.shape[2]
        may_sink = self.sinks and self.sure_real < self.sinks  # a rank below sinks is still possible
        if may_sink:
            self._write_sinks(keys, values, real, rank)
        n = min(seqlen, self.window)
        first = self.seen_tokens + seqlen - n  # absolute index of the first token kept in the ring
        start = self.sinks + first % self.window
        index = torch.arange(first, first + n, device=self.keys.device)
        # the n ring slots in order: one slice when they do not wrap around (always for one token)
        slots = slice(start, start + n) if start + n <= self.sinks + self.window else self.sinks + index % self.window
        self.keys[:, :, slots] = keys[:, :, -n:].to(self.keys.dtype)
        self.values[:, :, slots] = values[:, :, -n:].to(self.values.dtype)
        if may_sink:
            kept = rank[:, -n:] >= self.sinks
            self.valid[:, slots] = kept if real is None else real[:, -n:] & kept
        elif real is None and isinstance(slots, slice):
            self.valid[:, slots].fill_(True)
        elif real is None:
            self.valid[:, slots] = True
        else:
            self.valid[:, slots] = real[:, -n:]
        self.slot_index[slots] = index
        if real is None:
            self.real_count += seqlen
            self.sure_real += seqlen
        else:
            self.real_count += real.sum(1)
        self.seen_tokens += seqlen
        self.is_initialized = True

    def _write_sinks(self, keys, values, real, rank) -> None:
        """Put each row's real tokens of rank ``s < sinks`` into sink slot ``s`` (at most one token per slot
        and row): a gather and a select per slot, not a ``nonzero``, so the host never waits for the device."""
        sink = torch.arange(self.sinks, device=rank.device)
        match = rank[:, :, None] == sink  # [B, T, S]
        if real is not None:
            match = match & real[:, :, None]
        found = match.any(1)  # [B, S]
        step = match.to(torch.int8).argmax(1)  # [B, S]: the token of each sink slot (0 where there is none)
        for held, new in ((self.keys, keys), (self.values, values)):
            index = step[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[-1])
            chosen = new.gather(2, index).to(held.dtype)  # [B, G, S, D]
            held[:, :, : self.sinks] = torch.where(found[:, None, :, None], chosen, held[:, :, : self.sinks])
        self.valid[:, : self.sinks] |= found

    def store(self, **states: torch.Tensor) -> None:
        """Keep the mixer's named fixed-size states (copied into the held tensors after the first call)."""
        for name, value in states.items():
            held = self.states.get(name)
            if held is None or held.shape != value.shape or held.dtype != value.dtype or held.device != value.device:
                self.states[name] = value.detach().clone(memory_format=torch.contiguous_format)
            elif held is not value:
                held.copy_(value)

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()
        if self.slot_index is not None:
            self.slot_index.fill_(-1)
        self.seen_tokens = self.sure_real = 0

    def _per_row(self) -> list[str]:
        return ["keys", "values", "valid", "real_count"]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in [getattr(self, name) for name in self._per_row()] + list(self.states.values()):
            if t is not None:
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def _reallocate(self, fn) -> None:  # the batch size changes: new tensors are unavoidable
        for name in self._per_row():
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)).contiguous())
        self.states = {name: fn(t).contiguous() for name, t in self.states.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reallocate(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reallocate(lambda t: t[indices, ...])

    def offload(self):
        for name in (*self._per_row(), "slot_index"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))
        self.states = {name: t.to("cpu", non_blocking=True) for name, t in self.states.items()}


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
