"""Building, merging and measuring one kind's approximate structure from its segment rows (the
commit of ``indexer/storage/bundle.py`` calls these; so does ``pixquery bench ann``).

Everything reads the rows in chunks (``SegmentLog.chunks``), so a million 1024-d vectors (4 GB) are
never in memory at once: the training sample, one chunk, and the structure's codes are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from indexer.storage.faiss_lazy import faiss
from indexer.storage.ann import (AnnInfo, AnnPlan, AnnPolicy, Timer, add_chunks, build_info, exact_top, merge,
                                 merged_info, rerank, shortlist, train, write)
from indexer.storage.ann import tune as tune_search
from indexer.storage.segments import SegmentLog

log = logging.getLogger(__name__)

K = 10  # recall@K is what is measured and tuned


def ann_file(kind: str, number: int) -> str:
    return f"{kind}-{number:08d}.ann.faiss"


def _sample_ids(ids: np.ndarray, n: int, seed: int) -> np.ndarray:
    if n >= len(ids):
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))


def build(records: SegmentLog, plan: AnnPlan, policy: AnnPolicy, folder: Path, number: int,
          queries: np.ndarray | None = None, source: str | None = None, seed: int = 0) -> AnnInfo:
    """Train ``plan`` on a sample of ``records`` (every segment, no pending changes), add every live row,
    tune the default nprobe on ``queries`` (None: a sample of the rows themselves, each one's own id left
    out of both rankings), and write the file ``ann_file(kind, number)`` in ``folder``."""
    if records.dirty:
        raise RuntimeError("write the pending changes before building an approximate structure")
    timer = Timer()
    ids = records.ids()
    _, sample = records.get(_sample_ids(ids, plan.train_size, seed))
    index = train(plan, records.width, sample)
    del sample
    add_chunks(index, records.chunks())
    log.info("%s: trained %s on %d of %d vectors in %.1f s", records.kind, plan.factory, plan.train_size,
             len(ids), timer.seconds)
    if queries is None:
        query_ids = _sample_ids(ids, policy.recall_queries, seed + 1)
        queries = records.get(query_ids)[1]
        source = f"{len(query_ids)} stored {records.kind} vectors, each one's own id left out"
    else:
        query_ids = None
        queries = np.ascontiguousarray(queries[:policy.recall_queries], dtype=np.float32)
    nprobe, refine, recall = tune(index, records, queries, query_ids, plan.nlist, policy)
    name = ann_file(records.kind, number)
    size = write(index, folder / name)
    info = build_info(name, [s.number for s in records.segments], index, plan, records.width, size,
                      timer.seconds, nprobe, refine, recall, len(queries), source or "given queries")
    log.info("%s: %s nprobe %d recall@10 %.3f, built in %.1f s", records.kind, plan.factory, nprobe, recall,
             timer.seconds)
    return info


def merge_into(records: SegmentLog, base: AnnInfo, folder: Path, number: int) -> AnnInfo:
    """``base`` with the ids its later segments put or delete taken out and their live rows put in,
    written as ``ann_file(kind, number)``; the trained quantizers (and the recorded recall) stay."""
    covered = len(base.covers)
    stale = records.mentioned_in(covered)
    index = merge(folder, base, stale, records.chunks(start=covered))
    name = ann_file(records.kind, number)
    size = write(index, folder / name)
    return merged_info(base, name, [s.number for s in records.segments], index, size)


def approximate_top(index: faiss.Index, records: SegmentLog, queries: np.ndarray, k: int, nprobe: int,
                    refine: int) -> list[np.ndarray]:
    """Ids of the best ``k`` per query through ``index``'s short list re-ranked with the exact rows."""
    params = faiss.SearchParametersIVF(nprobe=max(1, nprobe))
    _, cand = index.search(queries, shortlist(k, refine), params=params)
    return [ids for _, ids in rerank(queries, cand, records.get, k)]


def tune(index: faiss.Index, records: SegmentLog, queries: np.ndarray, query_ids: np.ndarray | None,
         nlist: int, policy: AnnPolicy) -> tuple[int, int, float]:
    """(default nprobe, default refine, their recall@10 against exact search on ``queries``); with
    ``query_ids`` each query's own id is left out of both rankings (the queries are stored rows)."""
    extra = 1 if query_ids is not None else 0
    truth = exact_top(queries, records.chunks(), K + extra)
    if query_ids is not None:
        truth = [_without(t, i, K) for t, i in zip(truth, query_ids)]

    def search(q: np.ndarray, k: int, nprobe: int, refine: int) -> list[np.ndarray]:
        found = approximate_top(index, records, q, k + extra, nprobe, refine)
        if query_ids is None:
            return found
        return [_without(f, i, k) for f, i in zip(found, query_ids)]

    return tune_search(search, queries, truth, nlist, policy.target_recall, policy.refine, K)


def _without(ids: np.ndarray, own: int, k: int) -> np.ndarray:
    return ids[ids != own][:k]
