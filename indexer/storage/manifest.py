"""The manifest of a vector generation: which segment files of each kind make up the committed vectors.

``vectors/manifest-G.json`` = {"format", "generation": G, "next_segment": the next free segment number,
"kinds": {kind: {"width", "dtype", "segments": [SegmentInfo, ...]}}}. The database's meta row
``vector_generation`` names the generation the rows belong to (see bundle.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from indexer.errors import IndexCorruptError
from indexer.storage.segments import SegmentLog, fsync_dir

FORMAT = "pixquery-vectors/1"
GENERATION_KEY = "vector_generation"  # meta key: the manifest generation the rows belong to


def manifest_path(folder: Path, generation: int) -> Path:
    return folder / f"manifest-{generation:08d}.json"


def read_manifest(folder: Path, generation: int) -> dict:
    """The manifest of ``generation`` (an empty one for generation 0: a new index)."""
    if generation == 0:
        return {"format": FORMAT, "generation": 0, "next_segment": 1, "kinds": {}}
    path = manifest_path(folder, generation)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise IndexCorruptError(f"the index names vector generation {generation}, but {path} is missing; "
                                f"rebuild it with: pixquery index FOLDER --rebuild") from None
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"cannot read {path}: {exc}; rebuild with: pixquery index FOLDER --rebuild") from exc
    if manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    path = manifest_path(folder, manifest["generation"])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(folder)


def kind_entry(log_: SegmentLog) -> dict:
    return {"width": log_.width, "dtype": log_.dtype.name, "segments": [s.to_dict() for s in log_.segments]}
