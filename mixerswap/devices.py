"""Where work runs when the user does not say: the one rule every command shares."""

from __future__ import annotations

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a :class:`torch.device`; without one, CUDA when available, else the CPU."""
    if device is not None and str(device):
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
