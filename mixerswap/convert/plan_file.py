"""Layer plans from a YAML file (``mixerswap convert T --plan plan.yaml``) or from ``--to`` shorthands.

Schema (every key but ``layers`` optional)::

    # plan.yaml: attention in layers 0 and 8, Mamba-2 with longer chunks elsewhere
    default: {kind: mamba2, chunk_size: 128}   # layers no entry names (without it, name every layer)
    layers:
      - {layers: "0,8", kind: attention}
      - {layers: "12-15", kind: mamba2, conv_kernel: 2}   # ranges are inclusive; -1 is the last layer

``layers`` takes an index, a list of indices, or a string of comma-separated indices and inclusive
ranges (``"0-3,8,-2--1"``). Each entry's other keys are the kind's tunable settings, completed from
the teacher by the kind's converter; an entry's settings are its own (those of ``default`` apply
only to the layers no entry names). Errors name the entry or the layer and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..architectures.plan import ATTENTION, PlanError

TOP_KEYS = {"default", "layers"}


def _indices(spec, num_layers: int, where: str) -> list[int]:
    if isinstance(spec, bool):
        raise PlanError(f"{where}: 'layers' must be indices or ranges, got {spec!r}")
    if isinstance(spec, int):
        parts = [str(spec)]
    elif isinstance(spec, list):
        parts = [str(p) for p in spec]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        raise PlanError(f"{where}: 'layers' must be an index, a list or a string like '0-3,8', got {spec!r}")
    out = []
    for part in parts:
        try:
            if "-" in part.lstrip("-"):
                head = "-" if part.startswith("-") else ""
                lo, hi = part.lstrip("-").split("-", 1)
                lo, hi = int(head + lo), int(hi)
                bounds = [lo, hi]
            else:
                bounds = [int(part)]
        except ValueError:
            raise PlanError(f"{where}: cannot read layer range {part!r}; write e.g. 0-3 or 8") from None
        for idx in bounds:
            if not -num_layers <= idx < num_layers:
                raise PlanError(f"{where}: layer {idx} is out of range for a teacher with {num_layers} layers "
                                f"(valid: 0..{num_layers - 1})")
        lo, hi = (b % num_layers for b in (bounds[0], bounds[-1]))
        if hi < lo:
            raise PlanError(f"{where}: range {part!r} runs backwards")
        out.extend(range(lo, hi + 1))
    return out


def _entry(raw, where: str) -> tuple[str, dict]:
    if not isinstance(raw, dict) or "kind" not in raw:
        raise PlanError(f"{where}: needs a 'kind' (attention or a mixer kind), got {raw!r}")
    settings = {k: v for k, v in raw.items() if k not in ("kind", "layers")}
    if raw["kind"] == ATTENTION and settings:
        raise PlanError(f"{where}: attention takes no settings, got {sorted(settings)}")
    return raw["kind"], settings


def parse_plan_spec(spec: dict, num_layers: int) -> list[tuple[str, dict]]:
    """A plan mapping (the YAML's content) → per layer ``(kind, user settings)``."""
    if not isinstance(spec, dict):
        raise PlanError("a plan file must be a mapping with a 'layers' list (and optionally 'default')")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise PlanError(f"unknown plan key(s) {sorted(unknown)}; known: {', '.join(sorted(TOP_KEYS))}")
    entries = spec.get("layers") or []
    if not isinstance(entries, list):
        raise PlanError("plan 'layers' must be a list of {layers: ..., kind: ...} entries")
    chosen: dict[int, tuple[str, dict]] = {}
    owner: dict[int, int] = {}
    for n, raw in enumerate(entries):
        where = f"plan entry {n + 1}"
        if not isinstance(raw, dict) or "layers" not in raw:
            raise PlanError(f"{where}: needs 'layers' (e.g. '0-3') and 'kind', got {raw!r}")
        kind, settings = _entry(raw, where)
        for idx in _indices(raw["layers"], num_layers, where):
            if idx in chosen:
                raise PlanError(f"layer {idx} is in plan entries {owner[idx] + 1} and {n + 1}; ranges must not overlap")
            chosen[idx], owner[idx] = (kind, settings), n
    default = spec.get("default")
    if default is not None:
        default = _entry({"kind": default} if isinstance(default, str) else default, "plan default")
    missing = [i for i in range(num_layers) if i not in chosen]
    if missing and default is None:
        raise PlanError(f"layer {missing[0]} is in no plan entry ({len(missing)} layer(s) uncovered); "
                        "add it to an entry or give a 'default'")
    return [chosen.get(i, default) for i in range(num_layers)]


def read_plan_file(path: str | Path, num_layers: int) -> list[tuple[str, dict]]:
    """Read and check a plan YAML file; see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan file {path} not found")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PlanError(f"plan file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    try:
        return parse_plan_spec(spec, num_layers)
    except PlanError as err:
        raise PlanError(f"{path}: {err}") from None


def shorthand_plan(num_layers: int, to: str, kept: list[int], settings: dict | None) -> list[tuple[str, dict]]:
    """``--to KIND`` with the kept attention layers → per layer ``(kind, user settings)``."""
    return [(ATTENTION, {}) if i in kept else (to, dict(settings or {})) for i in range(num_layers)]
