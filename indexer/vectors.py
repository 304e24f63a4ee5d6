"""FAISS vector index with stable ids, atomic saves and GPU search when the installed faiss sees a GPU.

Ids are the ``images.id`` of the metadata store. Vectors are L2-normalised, so inner product is
cosine similarity. Exact search (``IndexFlatIP``) is right up to a few hundred thousand images;
approximate indexes (HNSW / IVF-PQ) can replace the inner index without changing this interface.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from indexer.errors import IndexCorruptError

log = logging.getLogger(__name__)


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


class VectorIndex:
    """``IndexIDMap2(IndexFlatIP(dim))``: add/remove/reconstruct by id, search, atomic save."""

    def __init__(self, dim: int, index: faiss.Index | None = None, use_gpu: bool = True) -> None:
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if self.index.d != dim:
            raise IndexCorruptError(f"vector index has dimension {self.index.d}, expected {dim}")
        self.use_gpu = use_gpu and gpu_count() > 0
        self._gpu_index: faiss.Index | None = None

    @classmethod
    def load(cls, path: Path, dim: int, use_gpu: bool = True) -> "VectorIndex":
        if not path.exists():
            return cls(dim, use_gpu=use_gpu)
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexCorruptError(f"cannot read vector index {path}: {exc}") from exc
        return cls(dim, index, use_gpu=use_gpu)

    def save(self, path: Path) -> None:
        """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def contains(self, row_id: int) -> bool:
        try:
            self.index.reconstruct(int(row_id))
        except RuntimeError:
            return False
        return True

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) vectors, got {vectors.shape}")
        if len(ids):
            self.index.add_with_ids(vectors, ids)
            self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        self._gpu_index = None
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids -> (n, dim) stored vectors."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for row, i in enumerate(ids):
            out[row] = self.index.reconstruct(int(i))
        return out

    def _searcher(self) -> faiss.Index:
        if not self.use_gpu or len(self) == 0:
            return self.index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) queries -> (scores, ids), each (Q, k'), k' = min(k, len); no ``-1`` ids."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self._searcher().search(queries, k)
        if (ids < 0).any():  # only when the index changed under us; keep shapes rectangular
            keep = (ids >= 0).all(axis=0)
            scores, ids = scores[:, keep], ids[:, keep]
        return scores, ids
