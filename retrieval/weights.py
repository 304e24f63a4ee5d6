"""Weight files of pixquery's own models: where shipped ones live, and atomic saving."""

from __future__ import annotations

from pathlib import Path

import torch

from retrieval.errors import ModelLoadError


def save_payload(payload: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a weight file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def resolve_weights(spec: str, shipped_dir: Path, what: str, command: str) -> Path:
    """``spec`` is the name of a file shipped in ``shipped_dir`` (without ``.pt``) or a path to one.

    ``what`` names the model in messages ("native encoder"); ``command`` is how users make their own.
    """
    candidate = Path(spec).expanduser()
    if candidate.suffix == ".pt" or candidate.is_file():
        if not candidate.is_file():
            raise ModelLoadError(f"{what} weights {candidate} do not exist")
        return candidate
    shipped = shipped_dir / f"{spec}.pt"
    if not shipped.is_file():
        known = sorted(p.stem for p in shipped_dir.glob("*.pt"))
        raise ModelLoadError(f"unknown {what} {spec!r}; shipped: {', '.join(known) or 'none'} "
                             f"(or give the path of a file made by '{command}')")
    return shipped
