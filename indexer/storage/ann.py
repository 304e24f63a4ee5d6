"""Approximate search for large collections: what to build for a collection's size, building it,
keeping it on disk, and measuring it.

Below ``AnnPolicy.flat_max`` vectors (and while they fit the memory budget) a collection is searched
exactly. Above, :func:`choose_plan` picks an inverted file (IVF, ``nlist`` k-means cells) whose vectors
are 4-bit product-quantizer codes scanned with SIMD ("fast scan", FAISS ``IVF{nlist},PQ{m}x4fs``):
``nlist`` grows with the square root of the collection (as FAISS's guidelines and autofaiss suggest,
in powers of two), ``m`` (bytes per vector = m / 2) is the largest that keeps the codes within the
memory budget. The codes only pick a short list (``refine`` x k candidates); the short list is
re-ranked with the exact float32 rows read from the segment files, so scores are always exact cosines
and an approximate structure never has to give vectors back.

A structure is built once from the rows of a run of segments (the *covered* ones, a prefix of the
kind's segments in write order), written to a file that the manifest names, and opened read-only and
memory-mapped (``IO_FLAG_MMAP``): opening an index reads its header and the coarse centroids, and a
query pages in only the cells it visits. Rows committed after it (in later segments, or pending) are
searched exactly beside it, and the ids those later segments put or delete are filtered out of its
results (an ``IDSelector``), so nothing stale ever comes back. When the rows outside it grow past
``merge_fraction`` of it, the commit *merges* (the file is read, stale ids removed, new rows added
with the same trained quantizers, written again: cost in proportion to the change plus one file
copy); when the collection outgrows its cells (a plan with twice the cells), it is trained again.

At build time recall@10 against exact search is measured on a sample of queries, and the cheapest
``nprobe`` (cells visited per query) and short-list length that reach ``AnnPolicy.target_recall`` on
it become the defaults; they and the recall are recorded in the manifest (``pixquery stats``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from indexer.errors import AnnFileError
from indexer.storage.faiss_lazy import faiss

log = logging.getLogger(__name__)

INDEX_TYPES = ("auto", "flat", "ivf")  # auto: exact up to flat_max vectors, IVF above; flat: always exact
ANN_VERSION = 1  # of the file and its manifest entry; another version is rebuilt, never trusted
FLAT_MAX = 20_000  # auto: collections up to this size are searched exactly (measured: docs/BENCHMARKS.md)
MIN_ANN = 256  # fewer vectors than this are always searched exactly (too few to train on)
NLIST_PER_SQRT = 2.0  # cells ~ this x sqrt(n), a power of two (FAISS suggests 4-16 x; 2 keeps training cheap on 2 cores)
POINTS_PER_CELL = 40  # training sample per cell (FAISS warns below 39)
MAX_TRAIN = 120_000
NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)
REFINE = 10  # short list: refine x k candidates for the first ten results (see shortlist), re-ranked exactly
SHORTLIST_MIN = 64


@dataclass(frozen=True)
class AnnPolicy:
    """When and how a searchable kind gets an approximate structure (``EngineConfig.ann``)."""

    index_type: str = "auto"
    flat_max: int = FLAT_MAX
    memory_mb: int = 1024  # the most one kind's resident search structure may take
    merge_fraction: float = 0.05  # merge rows committed after the structure once they exceed this share of it
    merge_min: int = 2048
    target_recall: float = 0.97  # recall@10 on the build sample that the default nprobe must reach
    recall_queries: int = 200
    refine: int = REFINE

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            from indexer.errors import InputError

            raise InputError(f"unknown vector index type {self.index_type!r}; choose one of: {', '.join(INDEX_TYPES)}")


@dataclass(frozen=True)
class SearchParams:
    """Per-query knobs of approximate search (None: the index's default, tuned at build time).

    ``nprobe``: IVF cells visited (more: higher recall, slower); ``refine``: short-list size as a multiple
    of k, re-ranked with the exact vectors; ``exact``: ignore the approximate structure (brute force)."""

    nprobe: int | None = None
    refine: int | None = None
    exact: bool = False


@dataclass(frozen=True)
class AnnPlan:
    nlist: int
    m: int  # product-quantizer sub-vectors, 4 bits each: m / 2 bytes per vector
    train_size: int

    @property
    def factory(self) -> str:
        return f"IVF{self.nlist},PQ{self.m}x4fs"

    def resident_bytes(self, n: int, dim: int) -> int:
        """Codes and ids of ``n`` vectors plus the coarse centroids (the structure's memory)."""
        return n * (math.ceil(self.m / 2) + 8) + self.nlist * dim * 4 + dim * 16 * 4


def choose_plan(n: int, dim: int, policy: AnnPolicy) -> AnnPlan | None:
    """The approximate structure for ``n`` vectors of ``dim`` (None: search exactly)."""
    budget = policy.memory_mb << 20
    if policy.index_type == "flat" or n < MIN_ANN:
        return None
    if policy.index_type == "auto" and n <= policy.flat_max and n * dim * 4 <= budget:
        return None
    nlist = 2 ** max(0, round(math.log2(NLIST_PER_SQRT * math.sqrt(n))))
    while nlist > 1 and nlist * POINTS_PER_CELL > n:  # enough points to train every cell
        nlist //= 2
    train_size = min(n, max(nlist * POINTS_PER_CELL, 30_000), MAX_TRAIN)
    # bytes per code: start at 4 dimensions per 4-bit sub-vector, halve while over the memory budget
    m = _divisor_at_most(dim, max(1, dim // 4))
    while AnnPlan(nlist, m, train_size).resident_bytes(n, dim) > budget and m > 1:
        m = _divisor_at_most(dim, m // 2)
    return AnnPlan(nlist, m, train_size)


def _divisor_at_most(dim: int, x: int) -> int:
    return max(d for d in range(1, max(1, x) + 1) if dim % d == 0)


@dataclass
class AnnInfo:
    """What the manifest records of one kind's approximate structure."""

    file: str  # in the vectors folder
    covers: list[int]  # segment numbers whose rows it holds (a prefix of the kind's segments)
    n: int  # vectors in it
    dim: int
    nlist: int
    m: int
    nprobe: int  # default cells per query (tuned at training)
    refine: int
    bytes: int  # file size (checked at open)
    trained_n: int  # collection size when it was trained
    train_seconds: float
    recall_at_10: float | None  # at nprobe, against exact search, measured when trained
    recall_queries: int
    recall_source: str  # what the sample queries were
    version: int = ANN_VERSION
    merged: int = 0  # merges since training
    extra: dict = field(default_factory=dict)

    @property
    def factory(self) -> str:
        return AnnPlan(self.nlist, self.m, 0).factory

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AnnInfo":
        return cls(**d)

    def describe(self) -> dict:
        return {"kind": "ivf-pq", "factory": self.factory, "nlist": self.nlist, "pq_bytes": math.ceil(self.m / 2),
                "nprobe": self.nprobe, "refine": self.refine, "approximate_vectors": self.n,
                "file_mb": round(self.bytes / 1e6, 1), "trained_at_n": self.trained_n,
                "train_seconds": self.train_seconds, "merges": self.merged,
                "recall_at_10": self.recall_at_10, "recall_queries": self.recall_queries,
                "recall_queries_from": self.recall_source}


class AnnIndex:
    """A trained structure over the covered rows, opened read-only (memory-mapped)."""

    def __init__(self, index: faiss.Index, info: AnnInfo, path: Path | None = None) -> None:
        self.index, self.info, self.path = index, info, path
        self.ivf = faiss.extract_index_ivf(index)

    @classmethod
    def load(cls, folder: Path, info: AnnInfo) -> "AnnIndex":
        path = folder / info.file
        fix = ("pixquery index FOLDER (any indexing run) rebuilds it from the stored vectors; "
               "searches fail until then")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise AnnFileError(f"the approximate search index {path} is missing ({exc.strerror}); {fix}") from None
        if size != info.bytes:
            raise AnnFileError(f"the approximate search index {path} has {size} bytes, the manifest says "
                               f"{info.bytes}: it is damaged; {fix}")
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            raise AnnFileError(f"the approximate search index {path} cannot be read: it is damaged "
                               f"({str(exc).splitlines()[0][:200]}); {fix}") from None
        ivf = faiss.extract_index_ivf(index) if isinstance(index, faiss.IndexIVF) or hasattr(index, "nlist") else None
        if ivf is None or index.d != info.dim or index.ntotal != info.n or ivf.nlist != info.nlist:
            raise AnnFileError(f"the approximate search index {path} does not hold what the manifest says "
                               f"({info.n} vectors of {info.dim}, {info.nlist} cells); {fix}")
        return cls(index, info, path)

    def search(self, queries: np.ndarray, n: int, nprobe: int, sel: faiss.IDSelector | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersIVF(nprobe=max(1, min(int(nprobe), self.info.nlist)), sel=sel)
        return self.index.search(queries, n, params=params)


# --- building -----------------------------------------------------------------------------------------
def _quiet_training(index: faiss.Index) -> None:
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10
    ivf.cp.min_points_per_centroid = 1  # the sample is sized on purpose; no warnings
    ivf.cp.max_points_per_centroid = 1 << 20
    try:
        pq = faiss.downcast_index(ivf).pq
        pq.cp.min_points_per_centroid = 1
    except AttributeError:
        pass


def train(plan: AnnPlan, dim: int, sample: np.ndarray) -> faiss.Index:
    """An empty structure of ``plan``, trained on ``sample`` (rows)."""
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    _quiet_training(index)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def add_chunks(index: faiss.Index, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    for ids, rows in chunks:
        index.add_with_ids(np.ascontiguousarray(rows, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))


def write(index: faiss.Index, path: Path) -> int:
    """Write ``index`` to ``path`` (a temporary name, fsynced, then renamed); returns its size."""
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path.stat().st_size


def merge(folder: Path, base: AnnInfo, stale: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]]
          ) -> faiss.Index:
    """``base``'s structure (read into memory) without ``stale`` ids and with the rows of ``chunks`` added."""
    path = folder / base.file
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise AnnFileError(f"the approximate search index {path} cannot be read: {str(exc).splitlines()[0][:200]}")
    if len(stale):
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(stale, dtype=np.int64)))
    add_chunks(index, chunks)
    return index


# --- searching with exact re-ranking --------------------------------------------------------------------
def shortlist(k: int, refine: int) -> int:
    """Candidates re-ranked exactly for the best ``k``: ``refine`` per result for the first ten, two per
    result beyond (recall@100 with 2.8 x k: 0.97 on 200,000 real-mixed vectors; with 10 x k: 0.98 at
    three times the cost), at least SHORTLIST_MIN."""
    return max(refine * min(k, 10) + 2 * max(k - 10, 0), SHORTLIST_MIN, k)


def rerank(queries: np.ndarray, candidates: np.ndarray, rows_of: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
           k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query, its candidates (ids, ``-1`` = none) re-scored exactly with the rows ``rows_of``
    returns ((mask, rows) for ids) -> [(scores, ids) best first, at most k], one per query. Candidates
    without a row (not live any more) drop out."""
    flat = candidates[candidates >= 0]
    uniq = np.unique(flat)
    mask, rows = rows_of(uniq)
    uniq = uniq[mask]
    out = []
    for q, cand in zip(queries, candidates):
        cand = np.unique(cand[cand >= 0])
        pos = np.searchsorted(uniq, cand)
        pos = np.minimum(pos, max(len(uniq) - 1, 0))
        keep = (len(uniq) > 0) & (uniq[pos] == cand) if len(uniq) else np.zeros(len(cand), bool)
        cand, pos = cand[keep], pos[keep]
        sims = np.einsum("ij,j->i", rows[pos], q) if len(pos) else np.zeros(0, np.float32)  # no BLAS threads
        top = np.argsort(-sims, kind="stable")[:k]
        out.append((sims[top].astype(np.float32), cand[top]))
    return out


# --- measuring ------------------------------------------------------------------------------------------
def exact_top(queries: np.ndarray, chunks: Iterator[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """(Q, k) ids of the exact top-k inner products over every (ids, rows) chunk (a brute-force pass)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for ids, rows in chunks:
        sims = queries @ np.ascontiguousarray(rows, dtype=np.float32).T  # (Q, c)
        s = np.concatenate([best_s, sims], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(ids, sims.shape)], axis=1)
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, 1)
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def recall_at(found: list[np.ndarray], truth: list[np.ndarray] | np.ndarray, k: int = 10) -> float:
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) / max(1, min(k, len(t))) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0


def tune(search: Callable[[np.ndarray, int, int, int], list[np.ndarray]], queries: np.ndarray,
         truth: list[np.ndarray] | np.ndarray, nlist: int, target: float, refine: int = REFINE, k: int = 10
         ) -> tuple[int, int, float]:
    """The cheapest (nprobe, refine) found whose recall@k on ``queries`` reaches ``target`` -> (nprobe,
    refine, recall); else the best found. Cells visited grow along the ladder (up to a quarter of them)
    with a short list of ``refine`` x k, stopping when recall no longer grows (the short list is what
    limits it then); then the same with a short list twice, then four times as long."""
    best = (nlist, refine, 0.0)
    ladder = [p for p in NPROBE_LADDER if p <= max(1, nlist // 4)] or [1]
    for r in (refine, 2 * refine, 4 * refine):
        history: list[float] = []
        for nprobe in ladder:
            recall = recall_at(search(queries, k, nprobe, r), truth, k)
            if recall > best[2]:
                best = (nprobe, r, recall)
            if recall >= target:
                return nprobe, r, recall
            history.append(recall)
            if len(history) >= 4 and history[-1] - history[-4] < 0.002:
                break  # plateau
    return best


def build_info(file: str, covers: list[int], index: faiss.Index, plan: AnnPlan, dim: int, size: int,
               seconds: float, nprobe: int, refine: int, recall: float | None, queries: int, source: str) -> AnnInfo:
    return AnnInfo(file=file, covers=covers, n=int(index.ntotal), dim=dim, nlist=plan.nlist, m=plan.m,
                   nprobe=nprobe, refine=refine, bytes=size, trained_n=int(index.ntotal),
                   train_seconds=round(seconds, 1), recall_at_10=None if recall is None else round(recall, 4),
                   recall_queries=queries, recall_source=source)


def merged_info(base: AnnInfo, file: str, covers: list[int], index: faiss.Index, size: int) -> AnnInfo:
    return replace(base, file=file, covers=covers, n=int(index.ntotal), bytes=size, merged=base.merged + 1)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
