"""Atomic, resumable distillation checkpoints, with no pickle in them.

A checkpoint folder holds everything needed to continue bit for bit, as tensors in safetensors and
the rest in JSON, so resuming never executes anything read from disk:

* ``student.safetensors``: the student's full state dict (tied copies left out);
* ``optimizer.safetensors``: the optimizer state per parameter, ``{full parameter name}/{key}``;
* ``rng.safetensors``: the torch (and CUDA) generators and numpy's Mersenne-Twister key;
* ``trainer.json``: optimizer ``param_groups`` (parameters by name), scheduler state, the rest of
  the python and numpy generator states;
* ``progress.json``: stage, step, tokens, data loader position, loss history.

Model and optimizer states go through ``torch.distributed.checkpoint.state_dict`` with full state
dicts gathered to rank 0 (and broadcast from rank 0 on resume), so the files are the same whatever
the engine (one process, DDP, FSDP2). Rank 0 writes; random generator states are rank 0's and every
rank restores them. A folder is written as ``step-XXXXXXXX.tmp`` and renamed into place, then the
``latest`` pointer is replaced atomically, so a crash at any moment leaves the previous checkpoint
intact and pointed to.
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
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

KEEP_LAST = 2
FORMAT = 2  # 1: trainer.pt (pickle), never read


class CheckpointError(ValueError):
    """A checkpoint cannot be restored (wrong student, old format, missing files)."""


@dataclass
class Progress:
    """Where training is: stage index, optimizer steps done in that stage, totals."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    tokens_seen: int = 0
    loader_state: dict | None = None
    history: list = field(default_factory=list)
    stage_perplexity: list = field(default_factory=list)  # [{"stage": name, "perplexity": float}] per finished stage


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _options(**kwargs) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def _tied_keys(model) -> dict[str, str]:
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The model's whole state dict on CPU, gathered to rank 0 (other ranks get ``{}``); collective."""
    state = get_model_state_dict(model, options=_options())
    return {k: v for k, v in state.items() if k not in _tied_keys(model)} if is_main() else {}


def load_model_state(model, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`full_model_state`: rank 0's ``state`` goes to every rank; collective."""
    distributed = dist.is_initialized()
    if is_main():
        state = dict(state)
        for target, source in _tied_keys(model).items():
            if target not in state and source in state:
                state[target] = state[source]
        expected = set(get_model_state_dict(model, options=StateDictOptions(cpu_offload=False)).keys()) \
            if not distributed else None
        if expected is not None and set(state) != expected:
            raise CheckpointError(f"checkpoint does not match the student (missing "
                                  f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    set_model_state_dict(model, state, options=_options(broadcast_from_rank0=distributed))


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, json)`` of every random generator of this process."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": [version, list(mt), gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _optimizer_files(model, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Gathered optimizer state as tensors keyed ``name/key`` and JSON param groups (rank 0; collective)."""
    state = get_optimizer_state_dict(model, optimizer, options=_options())
    if not is_main():
        return {}, []
    tensors = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{name}/{key}"] = torch.as_tensor(value).contiguous()
    return tensors, state["param_groups"]


def save_checkpoint(root: Path, model, optimizer, scheduler, progress: Progress) -> Path | None:
    """Write a checkpoint under ``root`` atomically and point ``root/latest`` at it.

    Collective under ``torch.distributed``: every rank calls it, rank 0 writes (and returns the path).
    """
    model_state = full_model_state(model)
    optim_tensors, groups = _optimizer_files(model, optimizer)
    if not is_main():
        return None
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress.global_step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(model_state, str(tmp / "student.safetensors"))
        save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        trainer = {"format": FORMAT, "param_groups": groups, "scheduler": scheduler.state_dict(), "rng": rng_meta}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1, default=_no_tensor))
        (tmp / "progress.json").write_text(json.dumps(asdict(progress), indent=1))
    except BaseException:  # a full disk, an interrupt: the half-written folder goes, the last checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / "latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _no_tensor(value):
    raise TypeError(f"not JSON: {type(value).__name__} {getattr(value, 'shape', '')} in {value!r}")


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_progress(path: Path) -> Progress:
    _check_format(path)
    return Progress(**json.loads((path / "progress.json").read_text()))


def _check_format(path: Path) -> dict:
    trainer = path / "trainer.json"
    if not trainer.exists():
        old = " (it holds a pickled trainer.pt from an older mixerswap, which is never loaded)" \
            if (path / "trainer.pt").exists() else ""
        raise CheckpointError(f"checkpoint {path} has no trainer.json{old}; delete {path.parent.parent} to start over")
    return json.loads(trainer.read_text())


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None) -> None:
    """Restore weights and random generators from ``path``, and the optimizer and scheduler if given.

    Collective under ``torch.distributed``: rank 0 reads the files and broadcasts the states.
    """
    trainer = _check_format(path)
    load_model_state(model, load_file(str(path / "student.safetensors")) if is_main() else {})
    if optimizer is not None:
        state: dict = {}
        if is_main():
            per_param: dict[str, dict] = {}
            for key, value in load_file(str(path / "optimizer.safetensors")).items():
                name, _, field_name = key.rpartition("/")
                per_param.setdefault(name, {})[field_name] = value
            state = {"state": per_param, "param_groups": trainer["param_groups"]}
        set_optimizer_state_dict(model, optimizer, state,
                                 options=_options(broadcast_from_rank0=dist.is_initialized()))
    if scheduler is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(load_file(str(path / "rng.safetensors")), trainer["rng"])
