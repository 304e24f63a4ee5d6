"""``pixquery bench latency``: per-query latency of every ranking mode on a large synthetic index.

The index is built directly (no images): N rows with synthetic Flickr-style captions (so the
keyword index has a realistic vocabulary), random unit image and caption vectors, and random
scorer memories. The models are the real ones: each query is parsed, embedded by the text tower,
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
from typing import Iterator

import numpy as np

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.lab.bench import machine
from indexer.storage.schema import ImageRow, utcnow
from retrieval.query import MODES

QUERIES = (
    "a dog running on the grass", "two children playing in the water", "a man riding a bike on a dirt road",
    "a girl in a pink dress", "people walking down a busy street", "a black dog jumping over a log",
    "a surfer riding a wave", "a woman sitting on a park bench", "a brown dog with a ball in its mouth",
    "a skier going down a snowy hill", "a boy climbing a rock wall", "two dogs playing in the snow",
    "a crowd watching a concert", "a football player in a red uniform", "a little girl on a swing",
    "beach -people", "dog grass^2", '"park bench" -snow', "a cat on a sofa", "a red car parked by a building",
)
_ADJ = "black white brown red blue young little small large happy wet muddy fluffy tall old".split()
_NOUN = ("dog man woman boy girl child people crowd surfer skier cyclist cat horse bird player "
         "couple family puppy biker climber").split()
_VERB = ("running jumping sitting standing walking playing riding swimming climbing looking smiling "
         "skiing surfing resting lying").split()
_PREP = "on in near through across under beside over along into".split()
_PLACE = ("grass beach water snow street field park bench road rock wall pool sand river hill "
          "mountain building crowd stage court").split()


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = lambda words: np.asarray(words)[rng.integers(len(words), size=n)]  # noqa: E731
    parts = zip(pick(_ADJ), pick(_NOUN), pick(_VERB), pick(_PREP), pick(_ADJ), pick(_PLACE))
    return [f"a {a} {n_} is {v} {p} the {a2} {pl}" for a, n_, v, p, a2, pl in parts]


def synthetic_rows(engine: Engine, n: int, seed: int = 0, chunk: int = 5000
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, list[str]]]:
    """Chunks of ``n`` synthetic images: (ids, unit image vectors, unit caption vectors, scorer memories or
    None, captions), with ids 1..n."""
    rng = np.random.default_rng(seed)
    captions = synthetic_captions(n, seed)
    dim = engine.encoder.dim
    scorer = engine.scorer
    memory_dim = int(np.prod(scorer.memory_shape)) if scorer is not None else None
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    for start in range(0, n, chunk):
        ids = np.arange(start + 1, min(n, start + chunk) + 1, dtype=np.int64)
        image = unit(rng.standard_normal((len(ids), dim)).astype(np.float32))
        caption = unit(rng.standard_normal((len(ids), dim)).astype(np.float32))
        memories = None
        if memory_dim:
            memories = np.clip(rng.standard_normal((len(ids), memory_dim)), -4, 4).astype(np.float32)
        yield ids, image, caption, memories, captions[start:start + len(ids)]


def synthetic_row(row_id: int, caption: str, fingerprint: str, now: datetime) -> ImageRow:
    return ImageRow(id=row_id, path=f"/synthetic/{row_id:07d}.jpg", content_hash=f"{row_id:064x}", byte_size=1,
                    mtime=0.0, width=640, height=480, file_type="jpg", indexed_at=now, encoder=fingerprint,
                    caption=caption, captioner="synthetic", captioned_at=now)


def build_synthetic_index(engine: Engine, n: int, seed: int = 0, chunk: int = 5000) -> None:
    """Fill an empty index with ``n`` synthetic images (rows, captions, vectors, memories), through the
    same writer as indexing, one checkpoint per ``chunk`` images."""
    writer = engine.writer()
    fingerprint, now = engine.encoder.info.fingerprint, utcnow()
    for ids, image, caption, memories, texts in synthetic_rows(engine, n, seed, chunk):
        writer.vectors.add(ids, image, ids, caption, memories)
        for i, text in zip(ids.tolist(), texts):
            writer.row(synthetic_row(i, text, fingerprint, now))
        writer.checkpoint()


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
                  modes: tuple[str, ...] = MODES) -> dict:
    """Build (or reuse) a synthetic index of ``n`` images at ``index_dir`` and time warm searches."""
    cfg = EngineConfig(**{**config.__dict__, "index_dir": index_dir, "progress": False})
    with Engine(cfg) as engine:
        built = None
        if not engine.exists:
            t0 = time.perf_counter()
            build_synthetic_index(engine, n)
            built = round(time.perf_counter() - t0, 1)
        n_indexed = engine.stats()["images"]
        for q in QUERIES[:3]:  # warm up: models, FAISS, SQLite pages
            for mode in modes:
                engine.search(q, k=10, mode=mode)
        # modes interleaved query by query, so that a stall of the machine falls on every mode alike
        timed: dict[str, list[tuple[float, str]]] = {mode: [] for mode in modes}
        for _ in range(passes):
            for q in QUERIES:
                for mode in modes:
                    t0 = time.perf_counter()
                    engine.search(q, k=10, mode=mode)
                    timed[mode].append(((time.perf_counter() - t0) * 1000, q))
        per_mode = {mode: latency_summary(timed[mode]) for mode in modes}
        ranker = engine.ranker()
        scorer, matcher = ranker.scorer, ranker.matcher
    report = {"images": n_indexed, "build_seconds": built, "k": 10, "pool": cfg.pool,
              "rerank_depth": cfg.rerank_depth, "likelihood": scorer is not None, "match": matcher is not None,
              "modes": per_mode,
              "machine": machine()}
    if "image" in per_mode and "fused" in per_mode:
        report["fused_over_image_p50"] = round(per_mode["fused"]["p50_ms"] / per_mode["image"]["p50_ms"], 2)
        report["fused_over_image_p99"] = round(per_mode["fused"]["p99_ms"] / per_mode["image"]["p99_ms"], 2)
    return report
