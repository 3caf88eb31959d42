"""The layer plan: which mixer each decoder layer uses, with its settings.

A plan is a list with one entry per layer, serialized in ``config.json`` as
``[{"kind": "attention"}, {"kind": "mamba2", "n_heads": 32, ...}, ...]``. ``attention`` keeps the
teacher's own module; any other kind names a registered mixer whose ``Settings`` model validates
the rest of the entry.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ValidationError

ATTENTION = "attention"


class PlanError(ValueError):
    """The layer plan does not fit the teacher or names an unknown mixer."""


def mixer_registry() -> dict[str, type]:
    """Registered mixer modules by kind name."""
    from .mixers import registered_kinds

    return {name: kind.module for name, kind in registered_kinds().items()}


def mixer_kinds() -> list[str]:
    return [ATTENTION, *mixer_registry()]


def parse_layer(entry: dict, layer_idx: int) -> tuple[str, BaseModel | None]:
    """Validate one plan entry; returns its kind and typed settings (``None`` for attention)."""
    if not isinstance(entry, dict) or "kind" not in entry:
        raise PlanError(f"layer {layer_idx}: a plan entry must be a mapping with a 'kind', got {entry!r}")
    kind = entry["kind"]
    if kind == ATTENTION:
        extra = set(entry) - {"kind"}
        if extra:
            raise PlanError(f"layer {layer_idx}: attention takes no settings, got {sorted(extra)}")
        return kind, None
    registry = mixer_registry()
    if kind not in registry:
        raise PlanError(f"layer {layer_idx}: unknown mixer kind {kind!r}; known: {', '.join(mixer_kinds())}")
    settings = {k: v for k, v in entry.items() if k != "kind"}
    try:
        return kind, registry[kind].Settings(**settings)
    except ValidationError as err:
        raise PlanError(f"layer {layer_idx} ({kind}): {describe_validation_error(err)}") from None


def describe_validation_error(err: ValidationError) -> str:
    """pydantic's errors as one short line: ``field: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())


def validate_plan(plan: Sequence[dict], num_layers: int) -> list[tuple[str, BaseModel | None]]:
    """Check a whole plan against the teacher's layer count; returns the parsed entries."""
    if len(plan) != num_layers:
        raise PlanError(f"the plan has {len(plan)} entries but the teacher has {num_layers} layers")
    return [parse_layer(entry, i) for i, entry in enumerate(plan)]


def describe_plan(plan: Sequence[dict]) -> str:
    """One line such as ``5 layers: attention 0,4 | mamba2 1,2,3``."""
    by_kind: dict[str, list[int]] = {}
    for i, entry in enumerate(plan):
        by_kind.setdefault(entry["kind"], []).append(i)
    parts = [f"{kind} {','.join(map(str, idx))}" for kind, idx in by_kind.items()]
    return f"{len(plan)} layers: " + " | ".join(parts)
