"""Teacher logits kept as top-k, computed once and read back (``teacher_cache`` in a recipe).

Storing ``[B, T, V]`` teacher logits is out of the question for large vocabularies, so a KD stage
with ``teacher_topk: k`` keeps only each token's k largest teacher logits (values and indices).
The loss then treats the teacher as the distribution renormalized over those k tokens (logits of
the other tokens are -inf: probability 0), which is forward KL on the teacher's top-k support, the
usual sparse-KD approximation; with ``k = V`` it is exact. Reverse KL needs the teacher's full
distribution and is refused with top-k.

Packed form: one float tensor ``[..., 2k]`` holding the k values then the k indices (exact in
fp32 for vocabularies below 2^24), so it can be indexed row-wise like logits and expanded chunk
by chunk by :func:`topk_head` inside :func:`~mixerswap.distill.losses.chunked_kd_loss`.

The cache is a folder of one safetensors file per micro-batch, keyed by stage, step and
micro-batch; the data loader is deterministic, so the same key always means the same batch. The
folder's ``cache.json`` records what the logits depend on, and a different teacher or data
setting is an error rather than silently wrong targets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def topk_pack(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., V]`` logits → ``[..., 2k]`` packed top-k (fp32 values, then indices as fp32)."""
    values, indices = logits.float().topk(k, dim=-1)
    return torch.cat([values, indices.float()], dim=-1)


def topk_head(vocab_size: int):
    """A ``teacher_head`` for ``chunked_kd_loss``: packed ``[n, 2k]`` → dense ``[n, V]`` logits, -inf off top-k."""

    def expand(packed: torch.Tensor) -> torch.Tensor:
        k = packed.shape[-1] // 2
        dense = packed.new_full((*packed.shape[:-1], vocab_size), float("-inf"))
        return dense.scatter_(-1, packed[..., k:].long(), packed[..., :k])

    return expand


class TeacherCache:
    """Folder of packed top-k teacher logits per micro-batch; see the module docstring."""

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "cache.json"
        if meta.exists():
            saved = json.loads(meta.read_text())
            if saved != fingerprint:
                changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
                raise ValueError(f"teacher cache {self.folder} was built with different settings ({', '.join(changed)}); "
                                 "use another folder or delete it")
        else:
            meta.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        return load_file(path)["topk"] if path.exists() else None

    def put(self, key: str, packed: torch.Tensor) -> None:
        tmp = self.folder / f".{key}.tmp"
        save_file({"topk": packed.detach().float().contiguous().cpu()}, tmp)
        os.replace(tmp, self._path(key))
