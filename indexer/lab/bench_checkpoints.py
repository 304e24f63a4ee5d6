"""``pixquery bench checkpoints``: what an indexing checkpoint costs as the collection grows.

Writes N synthetic images (rows, captions, image and caption vectors, scorer memories: what indexing
writes per image, see ``bench_latency.synthetic_rows``) through the indexing writer, one checkpoint per
``every`` images as indexing does, and times each checkpoint. A checkpoint that writes only what
changed costs the same at the end as at the start; one that rewrites every vector file grows with the
collection. The report gives each tenth of the run's checkpoints' median and slowest time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.lab.bench import machine
from indexer.lab.bench_latency import add_synthetic, synthetic_rows
from indexer.storage.schema import utcnow


def bench_checkpoints(config: EngineConfig, n: int, every: int = 1024) -> dict:
    if n < 1 or every < 1:
        raise InputError("--images and --every must be at least 1")
    cfg = replace(config, progress=False)
    with Engine(cfg) as engine:
        if engine.exists:
            raise InputError(f"{cfg.index_dir} already holds an index; bench checkpoints needs an empty folder")
        writer = engine.writer()
        fingerprint, now = engine.encoder.info.fingerprint, utcnow()
        timings: list[tuple[int, float]] = []  # (images after the checkpoint, seconds)
        t_all = time.perf_counter()
        for ids, image, caption, memories, texts in synthetic_rows(engine, n, chunk=every):
            add_synthetic(writer, ids, image, caption, memories, texts, fingerprint, now)
            t0 = time.perf_counter()
            writer.checkpoint()
            timings.append((int(ids[-1]), time.perf_counter() - t0))
        total = time.perf_counter() - t_all
        vectors = writer.vectors
        segments = {log.kind: len(log.segments) for log in vectors._logs()}
    tenth = max(1, len(timings) // 10)
    deciles = []
    for start in range(0, len(timings), tenth):
        part = timings[start:start + tenth]
        deciles.append({"images_up_to": part[-1][0], "checkpoints": len(part),
                        "median_ms": round(1000 * statistics.median(s for _, s in part), 1),
                        "max_ms": round(1000 * max(s for _, s in part), 1)})
    return {"images": n, "every": every, "checkpoints": len(timings), "total_s": round(total, 1),
            "checkpoint_s": round(sum(s for _, s in timings), 1), "by_tenth": deciles,
            "segments": segments, "scorer_memories": engine.scorer is not None, "machine": machine()}
