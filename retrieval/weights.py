"""Saving weight files of pixquery's own models (where shipped ones live: ``retrieval/shipped.py``)."""

from __future__ import annotations

from pathlib import Path

import torch



def save_payload(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a weight file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
