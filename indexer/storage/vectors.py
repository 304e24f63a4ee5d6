"""Vector stores by id: a searchable one for embeddings, a read-by-id one for the scorer's memories.

Both keep their records in a :class:`~indexer.storage.segments.SegmentLog` (exact float32 rows, or
8-bit codes), which is what ``reconstruct`` reads: a search structure never has to give vectors back,
so approximate FAISS indexes (which cannot remove, or reconstruct only approximately) can take the
flat index's place behind :class:`VectorIndex` without changing its callers.

Ids are the ``images.id`` of the metadata store. Vectors are L2-normalised, so inner product is cosine
similarity. The search structure is chosen by ``index_type`` (``EngineConfig.index_type``): today
``flat``, exact search (``IndexIDMap2(IndexFlatIP)``), built in memory from the records when an index
opens and kept in step with every change; FAISS searches on the GPU when the installed build sees one.

FAISS is imported and the search structure built on the first search, not before: indexing only
writes records (so an indexing run needs no FAISS at all, and pays nothing for a structure it never
searches), and the scorer's memories are coded by :class:`MemoryCodec` in numpy, bit-identical to
FAISS's ``QT_8bit_uniform`` scalar quantizer that wrote the codes of older indexes.
"""

from __future__ import annotations

import logging

from typing import TYPE_CHECKING

import numpy as np

from indexer.errors import IndexCorruptError, InputError
from indexer.storage.segments import SegmentLog

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

INDEX_TYPES = ("flat",)  # search structures VectorIndex can build (EngineConfig.index_type)

# filtered search: up to this many allowed ids, reading their vectors and one matmul beats a FAISS scan with
# an IDSelectorBatch (measured on 100k x 256-d, one query: 1,000 ids 4 ms vs 11 ms; 10,000 ids 74 ms vs 16 ms)
DENSE_FILTER_MAX = 1024


def load_faiss():  # noqa: ANN202 - the faiss module
    """FAISS, imported on first use (a search); a clear error where it is not installed."""
    try:
        import faiss
    except ImportError as exc:
        raise InputError("searching needs FAISS, which is not installed: pip install faiss-cpu "
                         "(or pixquery's 'gpu' extra for the GPU build)") from exc
    return faiss


def gpu_count() -> int:
    get = getattr(load_faiss(), "get_num_gpus", None)
    return int(get()) if get else 0


def search_structure(index_type: str, dim: int) -> "faiss.Index":
    """An empty FAISS index of ``index_type`` keyed by external ids."""
    if index_type not in INDEX_TYPES:
        raise InputError(f"unknown vector index type {index_type!r}; choose one of: {', '.join(INDEX_TYPES)}")
    faiss = load_faiss()
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class VectorIndex:
    """Embeddings by id: exact rows in a segment log, searched through a FAISS structure of ``index_type``."""

    def __init__(self, records: SegmentLog, index_type: str = "flat", use_gpu: bool = True) -> None:
        if records.dtype != np.float32:
            raise IndexCorruptError(f"{records.kind} vectors are stored as {records.dtype}, expected float32")
        if index_type not in INDEX_TYPES:
            raise InputError(f"unknown vector index type {index_type!r}; choose one of: {', '.join(INDEX_TYPES)}")
        self.records, self.index_type, self.dim = records, index_type, records.width
        self._index: faiss.Index | None = None  # built from the records on the first search
        self._use_gpu: bool | None = None if use_gpu else False  # None: ask FAISS on the first search
        self._gpu_index: faiss.Index | None = None

    @property
    def index(self) -> "faiss.Index":
        """The FAISS search structure over every live record (built on first use, then kept in step)."""
        if self._index is None:
            index = search_structure(self.index_type, self.dim)
            ids, rows = self.records.all_rows()
            if len(ids):
                index.add_with_ids(np.ascontiguousarray(rows, dtype=np.float32), ids)
            self._index = index
        return self._index

    @property
    def use_gpu(self) -> bool:
        """Whether searches run on a GPU copy (when asked for and the installed FAISS sees a GPU)."""
        if self._use_gpu is None:
            self._use_gpu = gpu_count() > 0
        return self._use_gpu

    @use_gpu.setter
    def use_gpu(self, value: bool) -> None:
        self._use_gpu = bool(value)

    def __len__(self) -> int:
        return len(self.records)

    def ids(self) -> np.ndarray:
        return self.records.ids()

    def contains(self, row_id: int) -> bool:
        return self.records.contains(row_id)

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace the vectors of ``ids``."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) vectors, got {vectors.shape}")
        if not len(ids):
            return
        if self._index is not None:
            faiss = load_faiss()
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._index.add_with_ids(vectors, ids)
        self.records.put(ids, vectors)
        self._gpu_index = None

    def delete(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self._index is not None:
            self._index.remove_ids(load_faiss().IDSelectorBatch(ids))
        self.records.delete(ids)
        self._gpu_index = None

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """(n,) ids -> (n, dim) stored vectors (every id must have one)."""
        mask, rows = self.records.get(ids)
        if not mask.all():
            missing = np.asarray(ids)[~mask][:5].tolist()
            raise KeyError(f"no {self.records.kind} vector for ids {missing}")
        return rows

    def reconstruct_present(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) ids -> (mask (n,) of the ids that have a vector, their (mask.sum(), dim) vectors)."""
        return self.records.get(ids)

    def _searcher(self) -> "faiss.Index":
        if len(self) == 0 or not self.use_gpu:
            return self.index
        if self._gpu_index is None:
            self._gpu_index = load_faiss().index_cpu_to_all_gpus(self.index)
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) queries -> (scores, ids), each (Q, k'), k' = min(k, len); no ``-1`` ids.

        ``ids``: search only these ids (a filter), so k results come back whenever k of them are indexed.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if ids is not None:
            return self._search_among(queries, k, np.unique(np.asarray(ids, dtype=np.int64)))
        k = min(int(k), len(self))
        if k <= 0:
            return _empty(len(queries))
        scores, found = self._searcher().search(queries, k)
        return _drop_missing(scores, found)

    def _search_among(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), len(allowed), len(self))
        if k <= 0:
            return _empty(len(queries))
        if len(allowed) <= DENSE_FILTER_MAX:
            mask, rows = self.reconstruct_present(allowed)  # allowed ids without a vector drop out
            present = allowed[mask]
            k = min(k, len(present))
            if k <= 0:
                return _empty(len(queries))
            sims = queries @ rows.T  # (Q, n)
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sims, top, 1).astype(np.float32), present[top]
        # inside FAISS: IndexIDMap2 applies the selector to the external ids. Selectors run on the CPU
        # index (GPU indexes do not take them), so filtered searches never use the GPU copy.
        faiss = load_faiss()
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        scores, found = self.index.search(queries, k, params=params)
        return _drop_missing(scores, found)


MEMORY_RANGE = 5.0  # decoder memories are layer-normalised: |x| < 5 for all but ~1e-6 of the values


class MemoryCodec:
    """8-bit uniform codes on [-MEMORY_RANGE, MEMORY_RANGE]: 4x smaller than float32; on Flickr8k dev
    they move a caption's log-likelihood by ~0.006 nats out of ~30.

    The arithmetic of FAISS's ``ScalarQuantizer(dim, QT_8bit_uniform)`` trained on that range (the
    codec that wrote every stored memory), in numpy, so that indexing needs no FAISS: a value ``x``
    becomes ``int(255 * clip((x - vmin) / vdiff, 0, 1))`` and a code ``c`` decodes to
    ``vmin + (c + 0.5) / 255 * vdiff`` (for a width that is a multiple of 8, with one rounding, as
    FAISS's SIMD decoder computes it with a fused multiply-add; else with two, as its scalar one does).
    A test checks both directions against FAISS bit for bit.
    """

    def __init__(self, dim: int) -> None:
        self.dim = self.code_size = int(dim)
        self.vmin = np.float32(-MEMORY_RANGE)
        self.vdiff = np.float32(2 * MEMORY_RANGE)

    def compute_codes(self, x: np.ndarray) -> np.ndarray:
        """(n, dim) float32 -> (n, dim) uint8 codes."""
        x = np.asarray(x, dtype=np.float32)
        unit = np.clip((x - self.vmin) / self.vdiff, np.float32(0.0), np.float32(1.0))
        return (np.float32(255.0) * unit).astype(np.uint8)  # truncates, as C's (int) cast

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, dim) uint8 codes -> (n, dim) float32 values."""
        unit = (np.asarray(codes).astype(np.float32) + np.float32(0.5)) / np.float32(255.0)
        if self.dim % 8:
            return self.vmin + unit * self.vdiff
        # float64 holds the float32 product exactly, so one rounding at the end is the fused multiply-add
        return (unit.astype(np.float64) * float(self.vdiff) + float(self.vmin)).astype(np.float32)


def memory_codec(dim: int) -> MemoryCodec:
    """The codec of scorer memories of ``dim`` floats (see :class:`MemoryCodec`)."""
    return MemoryCodec(dim)


class MemoryStore:
    """The caption scorer's per-image decoder memories (S * D floats each, stored as 8-bit codes), read
    by id for the few candidates a query re-scores: nothing is held in memory but the id map."""

    def __init__(self, records: SegmentLog, dim: int) -> None:
        self.records, self.dim = records, dim
        self.codec = memory_codec(dim)
        if records.dtype != np.uint8 or records.width != self.codec.code_size:
            raise IndexCorruptError(f"scorer memories are stored as {records.width} x {records.dtype}, expected "
                                    f"{self.codec.code_size} x uint8")

    def __len__(self) -> int:
        return len(self.records)

    def ids(self) -> np.ndarray:
        return self.records.ids()

    def contains(self, row_id: int) -> bool:
        return self.records.contains(row_id)

    def put(self, ids: np.ndarray, memories: np.ndarray) -> None:
        """Add or replace the memories (n, dim) of ``ids``."""
        memories = np.ascontiguousarray(memories, dtype=np.float32)
        if memories.ndim != 2 or memories.shape[1] != self.dim or len(ids) != len(memories):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) memories, got {memories.shape}")
        if len(ids):
            self.records.put(np.asarray(ids, np.int64), self.codec.compute_codes(memories))

    def put_codes(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Add or replace stored codes as they are (a copy of an image carries its memory along)."""
        self.records.put(np.asarray(ids, np.int64), codes)

    def delete(self, ids: np.ndarray) -> None:
        self.records.delete(np.asarray(ids, np.int64))

    def codes_present(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.records.get(ids)

    def reconstruct_present(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) ids -> (mask of the ids that have a memory, their (mask.sum(), dim) decoded memories)."""
        mask, codes = self.records.get(ids)
        if not len(codes):
            return mask, np.zeros((0, self.dim), np.float32)
        return mask, self.codec.decode(np.ascontiguousarray(codes))


def _empty(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)


def _drop_missing(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop ``-1`` columns (fewer vectors than k; or the index changed under us): shapes stay rectangular."""
    if (ids < 0).any():
        keep = (ids >= 0).all(axis=0)
        scores, ids = scores[:, keep], ids[:, keep]
    return scores, ids
