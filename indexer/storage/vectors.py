"""Vector stores by id: a searchable one for embeddings, a read-by-id one for the scorer's memories.

Both keep their records in a :class:`~indexer.storage.segments.SegmentLog` (exact float32 rows, or
8-bit codes), which is what ``reconstruct`` reads: a search structure never has to give vectors back.

Ids are the ``images.id`` of the metadata store. Vectors are L2-normalised, so inner product is cosine
similarity. A :class:`VectorIndex` searches in two parts:

* the *approximate* part (``indexer/storage/ann.py``), only for large collections: a trained IVF
  structure over the rows of the kind's first segments, loaded memory-mapped from the file the
  manifest names; its short list is re-ranked with the exact rows, and ids changed or deleted since it
  was built are filtered out of it;
* the *exact* part, ``IndexIDMap2(IndexFlatIP)`` in memory: every live row the approximate part does
  not hold (all of them for small collections, else the rows committed since it was built and the
  pending ones), kept in step with every change; FAISS searches it on the GPU when the build sees one.

Both answer with exact cosines; the best k of the union is the result. ``SearchParams`` (nprobe,
refine, exact) tune one query. Which structure a kind gets is decided when the bundle commits
(``VectorBundle``), never here.

FAISS is imported on the first search (``faiss_lazy.py``), and the exact part is built then, not
before: indexing only writes records. The scorer's memories are coded by :class:`MemoryCodec` in
numpy, bit-identical to FAISS's ``QT_8bit_uniform`` scalar quantizer that wrote older indexes' codes.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from indexer.errors import IndexCorruptError
from indexer.storage.ann import INDEX_TYPES, AnnIndex, SearchParams, rerank, shortlist
from indexer.storage.faiss_lazy import faiss, gpu_count
from indexer.storage.segments import SegmentLog
from indexer.storage.search_reads import Preview, RowsRead

log = logging.getLogger(__name__)

__all__ = ["INDEX_TYPES", "DENSE_FILTER_MAX", "MemoryStore", "Preview", "RowsRead", "SearchParams", "VectorIndex",
           "memory_codec"]

# filtered search: up to this many allowed ids, reading their vectors and one matmul beats a FAISS scan with
# an IDSelectorBatch (measured on 100k x 256-d, one query: 1,000 ids 4 ms vs 11 ms; 10,000 ids 74 ms vs 16 ms)
DENSE_FILTER_MAX = 1024


def _flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class VectorIndex:
    """Embeddings by id: exact rows in a segment log, searched exactly, or through an approximate
    structure (``base``) over the rows of the log's first ``len(base.info.covers)`` segments plus an
    exact search of the rest."""

    def __init__(self, records: SegmentLog, index_type: str = "auto", use_gpu: bool = True,
                 base: AnnIndex | None = None) -> None:
        if records.dtype != np.float32:
            raise IndexCorruptError(f"{records.kind} vectors are stored as {records.dtype}, expected float32")
        self.records, self.index_type, self.dim = records, index_type, records.width
        self.base = base
        self.covered = len(base.info.covers) if base is not None else 0
        self._index: faiss.Index | None = None  # the exact part, built on the first search
        # ids the base holds an out-of-date record of (or none): put or deleted after it was built
        self._stale: set[int] = set(records.mentioned_in(self.covered).tolist()) if base is not None else set()
        self._stale_sel: faiss.IDSelector | None = None
        self._stale_arr: np.ndarray | None = None
        self._use_gpu: bool | None = None if use_gpu else False  # None: ask FAISS on the first search
        self._gpu_index: faiss.Index | None = None

    @property
    def index(self) -> faiss.Index:
        """The exact part: every live row the approximate part does not hold (built on first use, then
        kept in step with every change)."""
        if self._index is None:
            index = _flat(self.dim)
            for ids, rows in self.records.chunks(start=self.covered):
                index.add_with_ids(np.ascontiguousarray(rows, dtype=np.float32), ids)
            pending_put, pending_del = self.records.pending()
            gone = np.concatenate([pending_put, pending_del])
            if len(gone):  # the chunks are the committed rows: changes since the last commit go in anew
                index.remove_ids(faiss.IDSelectorBatch(gone))
                mask, rows = self.records.get(pending_put)
                if mask.any():
                    index.add_with_ids(np.ascontiguousarray(rows, dtype=np.float32), pending_put[mask])
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

    @property
    def kind(self) -> str:
        return "flat" if self.base is None else "ivf-pq"

    def describe(self) -> dict:
        """What ``pixquery stats`` shows: the structure, its parameters and the rows searched exactly."""
        out = {"kind": self.kind, "vectors": len(self), "exact_vectors": int(self.index.ntotal)}
        if self.base is not None:
            out.update(self.base.info.describe())
            out["stale_filtered"] = len(self._stale)
        return out

    # --- changing -----------------------------------------------------------------------------
    def _mark_stale(self, ids: np.ndarray) -> None:
        if self.base is not None:
            self._stale.update(ids.tolist())
            self._stale_sel = self._stale_arr = None

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace the vectors of ``ids``."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) vectors, got {vectors.shape}")
        if not len(ids):
            return
        if self._index is not None:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
            self._index.add_with_ids(vectors, ids)
        self.records.put(ids, vectors)
        self._mark_stale(ids)
        self._gpu_index = None

    def delete(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self._index is not None:
            self._index.remove_ids(faiss.IDSelectorBatch(ids))
        self.records.delete(ids)
        self._mark_stale(ids)
        self._gpu_index = None

    # --- reading ------------------------------------------------------------------------------
    def reconstruct(self, ids: np.ndarray, read: RowsRead | None = None) -> np.ndarray:
        """(n,) ids -> (n, dim) stored vectors (every id must have one); ``read``: rows a search of this index
        has just read, used where they hold an id."""
        ids = np.asarray(ids, np.int64)
        if read is not None:
            hit, pos = read.find(ids)
            if hit.any():
                out = np.empty((len(ids), self.dim), np.float32)
                out[hit] = read.rows[pos]
                if not hit.all():
                    out[~hit] = self.reconstruct(ids[~hit])
                return out
        mask, rows = self.records.get(ids)
        if not mask.all():
            missing = np.asarray(ids)[~mask][:5].tolist()
            raise KeyError(f"no {self.records.kind} vector for ids {missing}")
        return rows

    def reconstruct_present(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) ids -> (mask (n,) of the ids that have a vector, their (mask.sum(), dim) vectors)."""
        return self.records.get(ids)

    def _reader(self, read: RowsRead | None) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """What re-ranking reads rows with: the records, through ``read`` where the caller keeps them."""
        return self.records.get if read is None else read.reader(self.records.get)

    def _searcher(self) -> faiss.Index:
        if len(self) == 0 or not self.use_gpu or self.index.ntotal == 0:
            return self.index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
        return self._gpu_index

    def search(self, queries: np.ndarray, k: int, ids: np.ndarray | None = None,
               params: SearchParams | None = None, read: RowsRead | None = None,
               preview: Preview | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) queries -> (scores, ids), each (Q, k'), k' = min(k, len); no ``-1`` ids; scores are
        exact cosines whatever the structure.

        ``ids``: search only these ids (a filter), so k results come back whenever k of them are indexed.
        ``params``: per-query knobs of the approximate structure (ignored by exact search).
        ``read``: keeps the rows the search reads to re-rank (see :class:`RowsRead`); ``preview``: hands out the
        best few early (see :class:`Preview`; a single query through the approximate structure only).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = params or SearchParams()
        if ids is not None:
            return self._search_among(queries, k, np.unique(np.asarray(ids, dtype=np.int64)), params, read, preview)
        k = min(int(k), len(self))
        if k <= 0:
            return _empty(len(queries))
        if self.base is None:
            scores, found = self._searcher().search(queries, k)
            return _drop_missing(scores, found)
        if params.exact:
            return self._brute_force(queries, k, None, read)
        return self._search_both(queries, k, None, params, k, read, preview)

    def _search_among(self, queries: np.ndarray, k: int, allowed: np.ndarray,
                      params: SearchParams, read: RowsRead | None, preview: Preview | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), len(allowed), len(self))
        if k <= 0:
            return _empty(len(queries))
        if len(allowed) <= DENSE_FILTER_MAX:
            mask, rows = self._reader(read)(allowed)  # allowed ids without a vector drop out
            present = allowed[mask]
            k = min(k, len(present))
            if k <= 0:
                return _empty(len(queries))
            sims = queries @ rows.T  # (Q, n)
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sims, top, 1).astype(np.float32), present[top]
        if self.base is None:
            # inside FAISS: IndexIDMap2 applies the selector to the external ids. Selectors run on the CPU
            # index (GPU indexes do not take them), so filtered searches never use the GPU copy.
            sel = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
            scores, found = self.index.search(queries, k, params=sel)
            return _drop_missing(scores, found)
        if params.exact:
            return self._brute_force(queries, k, allowed, read)
        # k come back whenever k allowed ids are indexed (the search widens until they do)
        want = min(k, int(self.records.present(allowed).sum()))
        if want <= 0:
            return _empty(len(queries))
        return self._search_both(queries, want, allowed, params, want, read, preview)

    def _stale_selector(self) -> faiss.IDSelector | None:
        if not self._stale:
            return None
        if self._stale_sel is None:
            self._stale_arr = np.fromiter(self._stale, np.int64, len(self._stale))
            self._stale_sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._stale_arr))
        return self._stale_sel

    def _search_both(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, params: SearchParams,
                     want: int, read: RowsRead | None = None, preview: Preview | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The approximate part's short list (stale ids and, with ``allowed``, other ids filtered out)
        re-ranked exactly, merged with the exact part's best; cells visited widen (x4) until every query
        has ``want`` results or every cell was visited."""
        info = self.base.info
        nprobe = params.nprobe or info.nprobe
        if allowed is not None:  # a filter keeping a share f of the vectors: visit ~1/f times the cells
            nprobe = min(info.nlist, int(np.ceil(nprobe * max(1.0, info.n / max(1, len(allowed))))))
        refine = params.refine or info.refine
        n = shortlist(k, refine)
        keep = [faiss.IDSelectorBatch(allowed)] if allowed is not None else []  # selectors must outlive the search
        stale = self._stale_selector()
        sel = keep[0] if keep else None
        if stale is not None:
            sel = stale if sel is None else faiss.IDSelectorAnd(sel, stale)
        exact = None
        if self.index.ntotal:
            ex_params = faiss.SearchParameters(sel=keep[0]) if keep else None
            exact = self.index.search(queries, min(k, int(self.index.ntotal)), params=ex_params)
        head = shortlist(preview.k, refine) if preview is not None and len(queries) == 1 else n
        while True:
            _, cand = self.base.search(queries, n, nprobe, sel)
            ranked = rerank(queries, cand[:, :head], self._reader(read), k)  # the base's order: the likeliest first
            if head < n:
                preview.callback(_union(ranked[0], exact, 0, preview.k)[1])
                rest = rerank(queries, cand[:, head:], self._reader(read), k)
                ranked = [_union(ranked[0], (rest[0][0][None], rest[0][1][None]), 0, k)]  # both parts' best k
                head = n  # once: a wider search (a filter) re-ranks its whole short list
            results = [_union(r, exact, i, k) for i, r in enumerate(ranked)]
            if min(len(r[1]) for r in results) >= want or nprobe >= info.nlist:
                break
            nprobe *= 4
        del keep
        width = min(len(r[1]) for r in results)
        return (np.stack([r[0][:width] for r in results]).astype(np.float32),
                np.stack([r[1][:width] for r in results]).astype(np.int64))

    def _brute_force(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, read: RowsRead | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over every live row (read in chunks): the oracle, and ``SearchParams(exact=True)``."""
        from indexer.storage.ann import exact_top

        pending_put, pending_del = self.records.pending()

        def chunks():
            for ids, rows in self.records.chunks():
                drop = np.isin(ids, np.concatenate([pending_put, pending_del]))
                if allowed is not None:
                    drop |= ~np.isin(ids, allowed)
                yield ids[~drop], rows[~drop]
            if len(pending_put):
                mask, rows = self.records.get(pending_put)
                ids = pending_put[mask]
                keep = np.isin(ids, allowed) if allowed is not None else np.ones(len(ids), bool)
                yield ids[keep], rows[keep]

        top = exact_top(queries, chunks(), k)
        ranked = rerank(queries, top, self._reader(read), k)
        width = min(len(r[1]) for r in ranked)
        return (np.stack([r[0][:width] for r in ranked]).astype(np.float32),
                np.stack([r[1][:width] for r in ranked]).astype(np.int64))


def _union(approx: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray] | None, q: int, k: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of the approximate part's (re-ranked) and the exact part's results of query ``q``."""
    scores, ids = approx
    if exact is not None:
        es, ei = exact[0][q], exact[1][q]
        ok = ei >= 0
        scores, ids = np.concatenate([scores, es[ok]]), np.concatenate([ids, ei[ok]])
        ids, first = np.unique(ids, return_index=True)  # an id in both: the same exact score
        scores = scores[first]
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], ids[order]


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
