"""Make the database and the vectors agree.

Checkpoints commit vectors and rows together (``bundle.py``), so on an index written by this version
they always agree; an index converted from an older version, or changed by hand, may not. Run when an
index opens for writing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from indexer.storage.bundle import VectorBundle
from indexer.storage.store import Store, WriteBatch

log = logging.getLogger(__name__)


@dataclass
class Repairs:
    stray_vectors: int = 0  # image vectors without a row
    rows_without_vectors: int = 0  # rows deleted (their files are indexed again on the next run)
    stray_caption_vectors: int = 0  # caption vectors of rows without a caption
    stray_memories: int = 0  # scorer memories of rows that are gone

    def __bool__(self) -> bool:
        return any((self.stray_vectors, self.rows_without_vectors, self.stray_caption_vectors, self.stray_memories))


def reconcile(store: Store, vectors: VectorBundle) -> Repairs:
    """Remove vectors without rows and rows without an image vector, and commit that as one checkpoint."""
    vec_ids = set(vectors.ids().tolist())
    row_ids = store.image_ids()
    orphans = np.array(sorted(vec_ids - row_ids), dtype=np.int64)
    missing = sorted(row_ids - vec_ids)
    cap_orphans = np.array(sorted(set(vectors.captions.ids().tolist()) - store.captioned_ids()), dtype=np.int64)
    mem_orphans = np.zeros(0, dtype=np.int64)
    if vectors.memories is not None:
        mem_orphans = np.array(sorted(set(vectors.memories.ids().tolist()) - (row_ids - set(missing))), np.int64)
    repairs = Repairs(len(orphans), len(missing), len(cap_orphans), len(mem_orphans))
    if not repairs:
        return repairs
    vectors.remove(orphans)
    vectors.captions.delete(cap_orphans)
    if vectors.memories is not None:
        vectors.memories.delete(mem_orphans)
    vectors.commit(store, WriteBatch(deletes=missing))
    log.warning("repaired index: %d stray vectors, %d rows without vectors, %d stray caption vectors, "
                "%d stray memories", repairs.stray_vectors, repairs.rows_without_vectors,
                repairs.stray_caption_vectors, repairs.stray_memories)
    return repairs
