"""Plain-text tables for the terminal (also valid GitHub markdown)."""

from __future__ import annotations

import math


def format_value(value, digits: int = 4) -> str:
    """Numbers to short strings: ints as they are, floats with ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def format_table(headers: list[str], rows: list[list]) -> str:
    """``headers`` and ``rows`` (values of any kind) → aligned markdown table."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def delta(a, b):
    """``a - b`` when both are numbers, else None."""
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return a - b if numbers else None
