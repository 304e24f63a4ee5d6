"""``pixquery bench ann``: the vector search pixquery would build for N vectors, measured on its own.

N synthetic vectors (real Flickr8k image embeddings of the native encoder, perturbed and mixed:
``indexer/lab/real_vectors.py``; projected when ``--dim`` differs) are written as segment files, as an
index stores them; then the structure :func:`indexer.storage.ann.choose_plan` picks for N is built the
way a commit builds it (``indexer/storage/ann_build.py``: training, adding, tuning nprobe on 200 real
caption queries, writing the file) and opened the way a search process opens it (memory-mapped).
Reported: build time, memory (file, resident structure, the process's resident memory after opening
and after the queries), p50/p99 latency of single k=10 queries through ``VectorIndex.search`` (short
list re-ranked with exact rows read from the segments), and recall@10 of those results against exact
search over the same vectors, on other real caption queries than the tuning ones.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from indexer.lab.bench import machine
from indexer.lab.real_vectors import Bases, mixed_rows, project
from indexer.storage import ann_build
from indexer.storage.ann import AnnIndex, AnnPolicy, choose_plan, exact_top, recall_at
from indexer.storage.segments import SegmentLog
from indexer.storage.vectors import VectorIndex
from retrieval.errors import InputError

SEGMENT_ROWS = 250_000  # rows per segment file written by the bench (an index's merged segments are this big)
TUNE_QUERIES = 200


def rss_mb() -> dict:
    """The process's resident memory now (``/proc/self/status``): total, anonymous, file-backed (MB)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_rows(folder: Path, bases: Bases, n: int, seed: int = 0) -> SegmentLog:
    """``n`` synthetic image vectors as segment files in ``folder`` (ids 1..n)."""
    records = SegmentLog(folder, "images", bases.dim)
    number, pending = 1, 0
    for ids, image, _, _, _ in mixed_rows(bases, n, seed, chunk=50_000):
        records.put(ids, image)
        pending += len(ids)
        if pending >= SEGMENT_ROWS:
            records.write_pending(number)
            number, pending = number + 1, 0
    records.write_pending(number)
    return records


def _scratch_dir(workdir: Path | None) -> Path:
    """A new folder for the benchmark's vectors, in ``workdir`` (made if missing; None: the system's temp)."""
    try:
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="pixquery-bench-ann-", dir=workdir))
    except OSError as exc:
        raise InputError(f"cannot write the benchmark's vectors in {workdir or tempfile.gettempdir()}: "
                         f"{exc.strerror or exc}") from exc


def bench_ann(n: int, bases: Bases, dim: int | None = None, policy: AnnPolicy | None = None,
              queries: int = 500, workdir: Path | None = None, seed: int = 0) -> dict:
    """Build and time the search structure for ``n`` vectors made from ``bases`` (see module doc)."""
    policy = policy or AnnPolicy()
    bases = project(bases, dim or bases.dim)
    dim = bases.dim
    all_queries, _ = bases.query_vectors(TUNE_QUERIES + queries, seed=seed + 1)
    tune_q, eval_q = all_queries[:TUNE_QUERIES], all_queries[TUNE_QUERIES:]
    plan = choose_plan(n, dim, policy)
    tmp = _scratch_dir(workdir)
    try:
        t0 = time.perf_counter()
        records = write_rows(tmp, bases, n, seed)
        rows_s = time.perf_counter() - t0
        infos = list(records.segments)
        del records
        t0 = time.perf_counter()
        info = None
        if plan is not None:
            built = SegmentLog.load(tmp, "images", dim, np.float32, infos)
            info = ann_build.build(built, plan, policy, tmp, len(infos) + 1, tune_q,
                                   f"{TUNE_QUERIES} real caption embeddings (dev captions)")
            del built
        build_s = time.perf_counter() - t0
        before = rss_mb()
        # a search process opens it: segments' id maps, the structure memory-mapped, the rest exact in memory
        t0 = time.perf_counter()
        records = SegmentLog.load(tmp, "images", dim, np.float32, infos)
        index = VectorIndex(records, policy.index_type, use_gpu=False,
                            base=AnnIndex.load(tmp, info) if info is not None else None)
        open_s = time.perf_counter() - t0
        if plan is None:
            build_s, open_s = open_s, open_s  # exact search: building is loading the rows
        opened = rss_mb()
        for q in eval_q[:20]:  # warm up
            index.search(q[None], 10)
        timed, found = [], []
        for i, q in enumerate(eval_q):
            t0 = time.perf_counter()
            _, ids = index.search(q[None], 10)
            timed.append(((time.perf_counter() - t0) * 1000, f"query {i}"))
            found.append(ids[0])
        after = rss_mb()
        truth = exact_top(eval_q, records.chunks(), 10)
        recall = recall_at(found, truth, 10)
        file_bytes = (tmp / info.file).stat().st_size if info is not None else 0
        structure = (plan.resident_bytes(n, dim) if plan is not None else n * dim * 4)
        times = np.sort([ms for ms, _ in timed])
        latency = {"p50_ms": round(float(np.median(times)), 2),
                   "p99_ms": round(float(times[min(len(times) - 1, int(0.99 * len(times)))]), 2)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "n": n, "dim": dim, "vectors": bases.source, "queries": len(eval_q), "k": 10,
        "index": index.describe() | {"vectors": n},
        "build_seconds": round(build_s, 1), "rows_written_seconds": round(rows_s, 1),
        "open_seconds": round(open_s, 3),
        "p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"],
        "recall_at_10": round(recall, 4),
        "memory_mb": {"structure_estimate": round(structure / 2**20, 1),
                      "index_file": round(file_bytes / 2**20, 3),
                      "rss_before_open": before, "rss_after_open": opened, "rss_after_queries": after,
                      "peak_rss": peak_rss_mb()},
        "policy": {"flat_max": policy.flat_max, "memory_mb": policy.memory_mb,
                   "target_recall": policy.target_recall},
        "faiss_threads": _faiss_threads(),
        "machine": machine(),
    }


def _faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def with_index_type(policy: AnnPolicy, index_type: str | None) -> AnnPolicy:
    return replace(policy, index_type=index_type) if index_type else policy
