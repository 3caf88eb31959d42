"""Every kind's cache layer: the bytes it reports are the bytes it holds, and decoding updates it in place."""

import gc
import types

import pytest
import torch

from mixerswap.architectures.cache import MixerCacheLayer, cache_nbytes

from .conftest import FAMILIES, KINDS, random_ids


def attribute_tensors(obj) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj.__dict__`` through dicts, lists and tuples."""
    found, stack = [], [vars(obj)]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, bytes, int, float, bool)


def referenced_tensors(obj) -> list[torch.Tensor]:
    """Every tensor the garbage collector can reach from ``obj``, whatever holds it (kind-independent)."""
    found, seen, stack = [], set(), [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, OPAQUE):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        else:
            stack.extend(gc.get_referents(item))
    return found


def storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def pointers(layer) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in attribute_tensors(layer)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_reported_bytes_are_held_bytes_and_decode_is_in_place(family, kind, student):
    model = student(family, kind, "hybrid", torch.float32)
    mixer_layers = list(model.mixer_layers())
    with torch.no_grad():
        out = model(random_ids(2, 9), use_cache=True)
        cache = out.past_key_values
        held = {}
        for step in range(4):  # after the prefill, then after each of 3 decode steps
            for i in mixer_layers:
                layer = cache.mixer_layer(i)
                assert isinstance(layer, MixerCacheLayer)
                reported = layer.nbytes()
                assert reported > 0
                assert reported == storage_bytes(attribute_tensors(layer)), f"layer {i}, step {step}"
                assert reported == storage_bytes(referenced_tensors(layer)), f"layer {i}, step {step}"
                if step == 0:
                    held[i] = pointers(layer)
                else:
                    assert pointers(layer) == held[i], f"layer {i}: decode step {step} allocated new state"
            kv = sum(storage_bytes([layer.keys, layer.values]) for j, layer in enumerate(cache.layers)
                     if j not in mixer_layers)
            assert cache_nbytes(cache) == kv + sum(cache.mixer_layer(i).nbytes() for i in mixer_layers)
            assert cache.get_seq_length() == 9 + step
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
