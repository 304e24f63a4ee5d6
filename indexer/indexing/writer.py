"""The one writer of an index: what indexing, ``recaption`` (and a future distributed merge) produce
goes in through :class:`BatchWriter`, which commits it in checkpoints.

A checkpoint writes the vector changes since the last one as new segments and commits them with the
buffered SQL changes in one transaction (``VectorBundle.commit``), so its cost follows the change, not
the collection, and a crash loses at most the work since the last checkpoint.
"""

from __future__ import annotations

import numpy as np

from indexer.storage.bundle import VectorBundle
from indexer.storage.schema import ImageRow, SkippedRow
from indexer.storage.store import Store, WriteBatch

NEXT_ID_KEY = "next_id"  # meta key: the lowest id never used (ids are never reused)


class BatchWriter:
    """Buffers rows, skip records and deletions beside the vector changes made on ``vectors``, and
    checkpoints them every ``checkpoint_every`` rows (and on :meth:`checkpoint`)."""

    def __init__(self, store: Store, vectors: VectorBundle, checkpoint_every: int = 1024) -> None:
        self.store, self.vectors, self.checkpoint_every = store, vectors, max(1, checkpoint_every)
        self.batch = WriteBatch()
        self._since = 0
        used = int(store.get_meta(NEXT_ID_KEY) or 0)
        self._next_id = max(used, store.next_id(), int(vectors.ids().max(initial=0)) + 1)
        self.checkpoints = 0

    def new_id(self) -> int:
        """An id no image of this index has ever had."""
        row_id, self._next_id = self._next_id, self._next_id + 1
        return row_id

    def row(self, row: ImageRow) -> None:
        self.batch.rows.append(row)
        self._next_id = max(self._next_id, int(row.id) + 1)
        self._since += 1

    def classes(self, row_id: int, classes: list[tuple[int, float]]) -> None:
        """Replace the stored classes (tags) of image ``row_id`` (an empty list: it has none)."""
        self.batch.classes[int(row_id)] = list(classes)

    def insert(self, rows: list[dict]) -> None:
        """New image rows in bulk, as {column: value} (ids and paths unused; a synthetic benchmark index)."""
        self.batch.inserts.extend(rows)
        self._next_id = max(self._next_id, max((int(r["id"]) for r in rows), default=0) + 1)
        self._since += len(rows)

    def skip(self, skip: SkippedRow) -> None:
        self.batch.skips.append(skip)

    def unskip(self, path: str) -> None:
        self.batch.unskip.append(path)

    def delete(self, ids: list[int]) -> None:
        """Images that leave the index: their rows and every vector they have."""
        if ids:
            self.vectors.remove(np.asarray(ids, dtype=np.int64))
            self.batch.deletes.extend(int(i) for i in ids)

    def maybe_checkpoint(self) -> None:
        if self._since >= self.checkpoint_every:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Commit everything buffered: vectors first (new segments and a manifest), then the SQL changes
        with the manifest's generation, in one transaction."""
        self.batch.meta[NEXT_ID_KEY] = str(self._next_id)
        self.vectors.commit(self.store, self.batch)
        self.batch = WriteBatch()
        self._since = 0
        self.checkpoints += 1
