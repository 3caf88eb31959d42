"""Which layers keep attention: explicit indices, an evenly spaced ratio, or none."""

from __future__ import annotations

from collections.abc import Sequence


class LayerSelectionError(ValueError):
    """Bad ``--attention-layers`` / ``--keep-attention`` values."""


def parse_layer_list(text: str) -> list[int]:
    """``"0,8,16"`` → ``[0, 8, 16]``; empty string → ``[]``."""
    text = text.strip()
    if not text:
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise LayerSelectionError(f"attention layers must be comma-separated integers, got {text!r}") from None


def attention_count(num_layers: int, keep_attention: float) -> int:
    """How many of ``num_layers`` keep attention for ``--keep-attention F``: F x layers rounded to the nearest,
    but at least one when F > 0 (0.1 of 5 layers keeps one, not none); 0 keeps none."""
    if not 0.0 <= keep_attention <= 1.0:
        raise LayerSelectionError(f"--keep-attention must be a fraction in [0, 1], got {keep_attention}")
    return max(1, int(round(keep_attention * num_layers))) if keep_attention > 0 else 0


def evenly_spaced(num_layers: int, count: int) -> list[int]:
    """``count`` indices spread over ``num_layers``, each at the middle of its equal-width stretch.

    12 layers, 3 kept → 2, 6, 10: the first and last layers are replaced as often as any other,
    rather than always keeping layer 0.
    """
    return [int((j + 0.5) * num_layers / count) for j in range(count)]


def select_attention_layers(
    num_layers: int,
    *,
    keep_attention: float | None = None,
    attention_layers: Sequence[int] | None = None,
) -> list[int]:
    """Sorted indices of the layers that keep the teacher's attention.

    Args:
        num_layers: the teacher's layer count.
        keep_attention: fraction of layers to keep in [0, 1], spread evenly (see :func:`attention_count`).
        attention_layers: explicit indices; negative indices count from the end like Python.
    Give at most one; with neither, every layer is replaced.
    """
    if keep_attention is not None and attention_layers is not None:
        raise LayerSelectionError("give either --keep-attention or --attention-layers, not both")
    if attention_layers is not None:
        chosen = []
        for idx in attention_layers:
            if not -num_layers <= idx < num_layers:
                raise LayerSelectionError(
                    f"attention layer index {idx} is out of range for a teacher with {num_layers} layers "
                    f"(valid: 0..{num_layers - 1})"
                )
            chosen.append(idx % num_layers)
        if len(set(chosen)) != len(chosen):
            raise LayerSelectionError(f"attention layer indices repeat: {list(attention_layers)}")
        return sorted(chosen)
    if keep_attention is None:
        return []
    count = attention_count(num_layers, keep_attention)
    return evenly_spaced(num_layers, count) if count else []
