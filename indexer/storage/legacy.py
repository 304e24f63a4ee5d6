"""Indexes written before schema 4 kept their vectors in three FAISS files, rewritten whole at every
checkpoint. The first open converts them in place, without re-embedding anything: their rows become
vector generation 1 (``indexer/storage/bundle.py``), committed with the database, and the FAISS files
are deleted only after that commit (so a crash during the conversion leaves them to convert again).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from indexer.errors import IndexCorruptError
from indexer.storage.manifest import FORMAT, GENERATION_KEY, kind_entry, write_manifest
from indexer.storage.segments import SegmentLog, fsync_dir
from indexer.storage.store import Store, WriteBatch

log = logging.getLogger(__name__)

LEGACY_FILES = {"images": "images.faiss", "captions": "captions.faiss", "memories": "memories.faiss"}


def legacy_files(index_dir: Path) -> list[Path]:
    return [index_dir / name for name in LEGACY_FILES.values() if (index_dir / name).exists()]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, rows) of an ``IndexIDMap2`` over a flat (float32) or 8-bit scalar-quantizer index, as stored."""
    from indexer.storage.faiss_lazy import load_faiss

    faiss = load_faiss()  # only an old index needs FAISS to open
    try:
        index = faiss.read_index(str(path))
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexScalarQuantizer):
            rows = faiss.vector_to_array(inner.codes).reshape(len(ids), inner.code_size)
        else:
            rows = inner.reconstruct_n(0, len(ids)) if len(ids) else np.zeros((0, index.d), np.float32)
    except (RuntimeError, AttributeError, ValueError) as exc:
        raise IndexCorruptError(f"cannot read the vector index {path} of an older pixquery: {exc}") from exc
    return ids, rows


def convert(index_dir: Path, folder: Path, store: Store) -> dict:
    """Convert the FAISS files of ``index_dir`` into generation 1 in ``folder``; returns its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds, number = {}, 1
    for kind, name in LEGACY_FILES.items():
        path = index_dir / name
        if not path.exists():
            continue
        ids, rows = _read(path)
        records = SegmentLog(folder, kind, rows.shape[1], rows.dtype)
        if len(ids):
            records.put(ids, rows)
            records.write_pending(number)
            number += 1
        kinds[kind] = kind_entry(records)
        log.info("converted %s: %d vectors", path, len(ids))
    manifest = {"format": FORMAT, "generation": 1, "next_segment": number, "kinds": kinds}
    write_manifest(folder, manifest)
    store.write(WriteBatch(meta={GENERATION_KEY: "1"}))
    remove_leftovers(index_dir)
    return manifest


def remove_leftovers(index_dir: Path) -> None:
    """Delete the FAISS files once their vectors are committed in segments."""
    for path in legacy_files(index_dir):
        path.unlink(missing_ok=True)
    fsync_dir(index_dir)
