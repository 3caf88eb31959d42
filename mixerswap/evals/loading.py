"""Load the models to evaluate (students or plain HF causal LMs) and name them for tables."""

from __future__ import annotations

from pathlib import Path

from ..generation import DTYPES, pick_device


def check_model_path(path: str | Path) -> None:
    if not Path(path).is_dir() and str(path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such model folder: {path}")


def load_model(path: str | Path, *, dtype: str = "auto", device: str | None = None):
    """``(model, tokenizer or None)`` in eval mode, from a local folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(path)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(pick_device(device)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def load_config(path: str | Path):
    from transformers import AutoConfig

    check_model_path(path)
    return AutoConfig.from_pretrained(path)


def model_labels(model: str | Path, vs: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """label → ``(path, role)`` with role ``model`` or ``vs``; labels are folder names, made distinct."""
    paths = {"model": str(model), **({"vs": str(vs)} if vs else {})}
    names = {role: Path(p.rstrip("/")).name or role for role, p in paths.items()}
    if len(set(names.values())) < len(names):
        names = {role: f"{name} ({role})" for role, name in names.items()}
    return {names[role]: (p, role) for role, p in paths.items()}
