"""What one search hands on besides its results: the rows it read to re-rank (:class:`RowsRead`), for the
same query's later steps, and its best few as soon as they are known (:class:`Preview`).
``indexer/storage/vectors.py`` fills both; fused ranking (``indexer/search/ranker.py``) asks for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


class RowsRead:
    """The stored rows one search read to re-rank its short list (sorted ids, their rows), kept for the same
    query's later steps: :meth:`VectorIndex.reconstruct` takes them from here instead of reading them again
    (fused ranking reads its pool's image vectors right after the image search re-ranked them)."""

    def __init__(self) -> None:
        self.ids = np.zeros(0, np.int64)
        self.rows = np.zeros((0, 0), np.float32)

    def reader(self, rows_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
               ) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """``rows_of`` (sorted ids -> (mask, rows)) that also keeps what it returns (with what it kept before)."""
        def read(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            mask, rows = rows_of(ids)
            got = np.asarray(ids, np.int64)[mask]
            if len(self.ids):  # a short list re-ranked in parts, or again wider: one row per id, sorted
                both, first = np.unique(np.concatenate([self.ids, got]), return_index=True)
                self.ids, self.rows = both, np.concatenate([self.rows, rows])[first]
            else:
                self.ids, self.rows = got, rows
            return mask, rows
        return read

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) ids -> (mask (n,) of those read, positions in :attr:`rows` of the ids read)."""
        if not len(self.ids) or not len(ids):
            return np.zeros(len(ids), bool), np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        hit = self.ids[pos] == ids
        return hit, pos[hit]


@dataclass
class Preview:
    """Asks a search for its best ``k`` as soon as they are known: a long short list (a fused query's pool of
    100) is re-ranked in two parts, the part that a search for ``k`` would re-rank first, and
    ``callback(ids)`` (best first) is called in between; the search's results are the same as without it.
    Fused ranking starts its second stage there, while the rest of the short list is re-ranked."""

    k: int
    callback: Callable[[np.ndarray], None]
