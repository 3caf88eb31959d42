"""Load the models to evaluate (students or plain HF causal LMs) and name them for tables."""

from __future__ import annotations

from pathlib import Path

from ..convert.checkpoint_io import refuse_non_finite
from ..convert.gguf import hf_model_path
from ..generation import check_model_path, load_model_and_tokenizer


def load_model(path: str | Path, *, dtype: str = "auto", device: str | None = None):
    """``(model, tokenizer or None)`` in eval mode, from a local folder or hub id; a model with NaN or inf
    weights is refused (its scores would mean nothing)."""
    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device, require_tokenizer=False)
    refuse_non_finite(model, str(path))
    return model, tokenizer


def load_config(path: str | Path):
    """The config of a folder, hub id or ``.gguf`` file (read from its dequantized HF folder)."""
    from transformers import AutoConfig

    check_model_path(path)
    return AutoConfig.from_pretrained(hf_model_path(path))


def model_labels(model: str | Path, vs: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """label → ``(path, role)`` with role ``model`` or ``vs``; labels are folder names, made distinct."""
    paths = {"model": str(model), **({"vs": str(vs)} if vs else {})}
    names = {role: Path(p.rstrip("/")).name or role for role, p in paths.items()}
    if len(set(names.values())) < len(names):
        names = {role: f"{name} ({role})" for role, name in names.items()}
    return {names[role]: (p, role) for role, p in paths.items()}
