"""``pixquery bench latency``: per-query latency of every ranking mode on a large synthetic index.

The index is built directly (no images), through the indexing writer with bulk row inserts: N rows
made from real Flickr8k embeddings of the native encoder, perturbed and mixed
(``indexer/lab/real_vectors.py``): image and caption vectors, the real caption text of the image each
row is mostly made of (so the keyword index has real captions), and that image's real scorer memory.
The queries are real captions of the Flickr8k dev images, different ones for every mode and pass
(each timing includes embedding its query). Without
Flickr8k (``--gaussian``, and the tests), random unit vectors, synthetic Flickr-style captions and
random memories stand in, with the fixed queries below. The models are the real ones: each query is parsed, embedded by the text tower,
searched and (in fused mode) re-scored by the caption decoder and the match head, through ``Engine.search`` with
the models already loaded (a running app or API user; ``bench search`` measures cold processes).
The modes take turns query by query, so a stall of the machine does not land on one mode only, and
each mode's slowest timings are reported with their queries.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.lab.bench import machine
from indexer.lab.real_vectors import Bases, gaussian_bases, mixed_rows
from indexer.storage.schema import ImageRow, utcnow
from indexer.storage.vectors import memory_codec
from retrieval.query import MODES

QUERIES = (
    "a dog running on the grass", "two children playing in the water", "a man riding a bike on a dirt road",
    "a girl in a pink dress", "people walking down a busy street", "a black dog jumping over a log",
    "a surfer riding a wave", "a woman sitting on a park bench", "a brown dog with a ball in its mouth",
    "a skier going down a snowy hill", "a boy climbing a rock wall", "two dogs playing in the snow",
    "a crowd watching a concert", "a football player in a red uniform", "a little girl on a swing",
    "beach -people", "dog grass^2", '"park bench" -snow', "a cat on a sofa", "a red car parked by a building",
)
def synthetic_rows(engine: Engine, n: int, seed: int = 0, chunk: int = 5000, bases: Bases | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, list[str]]]:
    """Chunks of ``n`` synthetic images: (ids, unit image vectors, unit caption vectors, scorer memories as
    8-bit codes or None, captions), with ids 1..n, made from ``bases`` (real embeddings; None: random
    ones of the engine's dimension)."""
    scorer = engine.scorer
    code = memory_codec(int(np.prod(scorer.memory_shape))).code_size if scorer is not None else None
    if bases is None:
        bases = gaussian_bases(engine.encoder.dim, memory_code=code, seed=seed)
    if bases.dim != engine.encoder.dim:
        raise InputError(f"the benchmark's vectors have {bases.dim} dimensions, the encoder {engine.encoder.dim}")
    codes = bases.memory_codes if code and bases.memory_codes is not None and bases.memory_codes.shape[1] == code else None
    rng = np.random.default_rng(seed + 7)
    for ids, image, caption, base, texts in mixed_rows(bases, n, seed, chunk):
        memories = None
        if code:
            memories = codes[base] if codes is not None else rng.integers(64, 192, (len(ids), code), dtype=np.uint8)
        yield ids, image, caption, memories, texts


def synthetic_row(row_id: int, caption: str, fingerprint: str, now: datetime) -> ImageRow:
    return ImageRow(**synthetic_columns(row_id, caption, fingerprint, now))


def synthetic_columns(row_id: int, caption: str, fingerprint: str, now: datetime) -> dict:
    return dict(id=row_id, path=f"/synthetic/{row_id:07d}.jpg", content_hash=f"{row_id:064x}", byte_size=1,
                mtime=0.0, width=640, height=480, file_type="jpg", indexed_at=now, encoder=fingerprint,
                caption=caption, captioner="synthetic", captioned_at=now)


def add_synthetic(writer, ids: np.ndarray, image: np.ndarray, caption: np.ndarray,  # noqa: ANN001 - BatchWriter
                  memories: np.ndarray | None, texts: list[str], fingerprint: str, now: datetime) -> None:
    """One chunk of synthetic images into ``writer`` (vectors, memory codes, rows inserted in bulk)."""
    writer.vectors.add(ids, image, ids, caption)
    if memories is not None and writer.vectors.memories is not None:
        writer.vectors.memories.put_codes(ids, memories)
    writer.insert([synthetic_columns(i, t, fingerprint, now) for i, t in zip(ids.tolist(), texts)])


def build_synthetic_index(engine: Engine, n: int, seed: int = 0, chunk: int = 20_000,
                          bases: Bases | None = None, log: Callable[[str], None] | None = None) -> None:
    """Fill an empty index with ``n`` synthetic images (rows, captions, vectors, memories), through the
    same writer as indexing, one checkpoint per ``chunk`` images (approximate search structures are
    built and merged by those checkpoints, as when indexing)."""
    writer = engine.writer()
    fingerprint, now = engine.encoder.info.fingerprint, utcnow()
    t0 = time.perf_counter()
    for ids, image, caption, memories, texts in synthetic_rows(engine, n, seed, chunk, bases):
        add_synthetic(writer, ids, image, caption, memories, texts, fingerprint, now)
        writer.checkpoint()
        if log is not None:
            log(f"{int(ids[-1])} of {n} images, {time.perf_counter() - t0:.0f} s")


def latency_summary(timed: list[tuple[float, str]], slowest: int = 3) -> dict:
    """[(milliseconds, query), ...] -> p50, p99 (the timing at sorted position int(0.99 n), 0-based:
    the slowest of 100, the fourth-slowest of 400), the count, and the ``slowest`` timings with their
    queries (to tell a slow kind of query from a stall)."""
    if not timed:
        raise ValueError("no timings")
    ordered = sorted(timed)  # by time (then query)
    times = [ms for ms, _ in ordered]
    worst = ordered[::-1][:slowest]
    return {"p50_ms": round(statistics.median(times), 1),
            "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 1),
            "n": len(times), "slowest": [[round(ms, 1), q] for ms, q in worst]}


def bench_latency(index_dir: Path, n: int, config: EngineConfig, passes: int = 5,
                  modes: tuple[str, ...] = MODES, bases: Bases | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Build (or reuse) a synthetic index of ``n`` images at ``index_dir`` and time warm searches.
    ``bases``: the real embeddings to build from and take queries from (None: random, fixed queries)."""
    cfg = EngineConfig(**{**config.__dict__, "index_dir": index_dir, "progress": False})
    # per pass, the queries of each mode: with real captions, new ones for every mode and pass, so every
    # timing includes embedding the query (the text tower keeps recent queries: a text one mode just ran
    # would be free for the next)
    if bases is not None:
        rng = np.random.default_rng(11)
        n_q = len(QUERIES)
        pick = rng.permutation(bases.queries)[:3 + n_q * len(modes) * passes]
        texts = [bases.texts[i] for i in pick.tolist()]
        warm = texts[:3]
        rounds = [{m: texts[3 + (p * len(modes) + j) * n_q:][:n_q] for j, m in enumerate(modes)}
                  for p in range(passes)]
    else:
        warm, rounds = list(QUERIES[:3]), [{m: list(QUERIES) for m in modes}] * passes
    from indexer.lab.bench_ann import peak_rss_mb, rss_mb
    from indexer.lab.evaluate import rater_name

    with Engine(cfg) as engine:
        built = None
        if not engine.exists:
            t0 = time.perf_counter()
            build_synthetic_index(engine, n, bases=bases, log=log)
            built = round(time.perf_counter() - t0, 1)
            engine.close()  # search as a fresh process would: the committed index, opened from its files
        engine.prepare_fast_queries()  # what indexing leaves behind: the torch-free query models, where possible
        engine.warm_keywords()  # what the API and the app do when they start
        rss_before = rss_mb()
        n_indexed = engine.stats()["images"]
        for q in warm:  # warm up: models, FAISS, SQLite pages
            for mode in modes:
                engine.search(q, k=10, mode=mode)
        # modes interleaved query by query, so that a stall of the machine falls on every mode alike
        timed: dict[str, list[tuple[float, str]]] = {mode: [] for mode in modes}
        cpu: dict[str, list[float]] = {mode: [] for mode in modes}  # CPU time of the process, every thread
        for queries in rounds:
            for i in range(len(QUERIES)):
                for mode in modes:
                    q = queries[mode][i]
                    t0, c0 = time.perf_counter(), time.process_time()
                    engine.search(q, k=10, mode=mode)
                    timed[mode].append(((time.perf_counter() - t0) * 1000, q))
                    cpu[mode].append((time.process_time() - c0) * 1000)
        rss_after = rss_mb()
        per_mode = {mode: {**latency_summary(timed[mode]), "cpu_p50_ms": round(statistics.median(cpu[mode]), 1)}
                    for mode in modes}
        ranker = engine.ranker()
        scorer, matcher = ranker.scorer, ranker.matcher
        structures = {kind: getattr(ranker.vectors, kind).describe() for kind in ("images", "captions")}
        runtime = engine.query_runtime()
    report = {"images": n_indexed, "build_seconds": built, "k": 10, "pool": cfg.pool, "query_models": runtime,
              "rerank_depth": cfg.rerank_depth, "likelihood": scorer is not None,
              "rater": rater_name(scorer), "match": matcher is not None,
              "vectors": bases.source if bases is not None else "gaussian",
              "queries": ("Flickr8k dev captions, new for every mode and pass" if bases is not None
                          else "20 fixed queries, repeated each pass"),
              "modes": per_mode, "vector_index": structures,
              "memory_mb": {"rss_before_queries": rss_before, "rss_after_queries": rss_after,
                            "peak_rss": peak_rss_mb()},
              "machine": machine()}
    if "image" in per_mode and "fused" in per_mode:
        report["fused_over_image_p50"] = round(per_mode["fused"]["p50_ms"] / per_mode["image"]["p50_ms"], 2)
        report["fused_over_image_p99"] = round(per_mode["fused"]["p99_ms"] / per_mode["image"]["p99_ms"], 2)
    return report
