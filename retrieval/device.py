"""Resolve the compute device once, at the edge of the program."""

from __future__ import annotations

import torch

from retrieval.errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` into a ``torch.device``.

    ``auto`` picks CUDA when available, else CPU. Asking for a device that is not there
    is an :class:`InputError`, not a silent fallback.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {name!r} requested but MPS is not available")
    return device
