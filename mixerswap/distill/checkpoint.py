"""Atomic, resumable distillation checkpoints.

A checkpoint folder holds everything needed to continue bit for bit: the student's weights, the
optimizer and scheduler states, the data loader position, every random generator's state and the
progress counters. It is written as ``step-XXXXXXXX.tmp`` and renamed into place, then the
``latest`` pointer is replaced atomically, so a crash at any moment leaves the previous
checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

KEEP_LAST = 2


@dataclass
class Progress:
    """Where training is: stage index, optimizer steps done in that stage, totals."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    tokens_seen: int = 0
    loader_state: dict | None = None
    history: list = field(default_factory=list)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, model, optimizer, scheduler, progress: Progress) -> Path:
    """Write a checkpoint under ``root`` atomically and point ``root/latest`` at it."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress.global_step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "student.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "trainer.pt")
    (tmp / "progress.json").write_text(json.dumps(asdict(progress), indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / "latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_progress(path: Path) -> Progress:
    return Progress(**json.loads((path / "progress.json").read_text()))


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> None:
    """Restore weights and random generators from ``path``, and the optimizer and scheduler if given."""
    missing, unexpected = load_model(model, str(path / "student.safetensors"), strict=False)
    if unexpected or [k for k in missing if k not in getattr(model, "all_tied_weights_keys", {})]:
        raise ValueError(f"checkpoint {path} does not match the student (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    state = torch.load(path / "trainer.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
