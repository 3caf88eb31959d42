"""Token lengths as users write them (``1k,4k,16k``) and the model limit they must respect."""

from __future__ import annotations

import re

_LENGTH = re.compile(r"^(\d+)([kKmM]?)$")
_SCALE = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_lengths(spec: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"1k,4k,512"`` → ``[1024, 4096, 512]`` (k = 1024, m = 1024²), order kept, duplicates dropped."""
    if not isinstance(spec, str):
        items = [int(x) for x in spec]
    else:
        items = []
        for part in (p.strip() for p in spec.split(",")):
            match = _LENGTH.match(part)
            if not match:
                raise ValueError(f"bad length {part!r} in {spec!r}; write e.g. 1k,4k,16k or 512,2048")
            items.append(int(match[1]) * _SCALE[match[2].lower()])
    if not items or any(n <= 0 for n in items):
        raise ValueError(f"lengths must be positive integers, got {spec!r}")
    return list(dict.fromkeys(items))


def format_length(n: int) -> str:
    """``4096`` → ``"4k"``; lengths that are not multiples of 1024 stay as they are."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def position_limit(model) -> int | None:
    """``max_position_embeddings`` of a model or config (students mirror their teacher's), or None."""
    return getattr(getattr(model, "config", model), "max_position_embeddings", None)


def check_lengths(model, lengths: list[int], *, extra: int = 0, what: str = "context length") -> None:
    """Raise ``ValueError`` if ``length + extra`` exceeds the position limit of ``model`` (or config)."""
    limit = position_limit(model)
    if limit is None:
        return
    too_long = [n for n in lengths if n + extra > limit]
    if too_long:
        plus = f" + {extra} generated tokens" if extra else ""
        raise ValueError(f"{what} {format_length(max(too_long))}{plus} exceeds the model's limit of {limit} tokens "
                         f"(max_position_embeddings)")
