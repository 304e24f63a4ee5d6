"""Time per checkpoint of the pre-rooms code (commit 21b1569, run against a checkout of it) as a synthetic index grows:
the same synthetic rows as `pixquery bench checkpoints` (indexer/lab/bench_checkpoints.py), written the way the
old pipeline checkpointed (Indexer._checkpoint: VectorBundle.save() rewrites every FAISS file, then one SQL
transaction merges the rows). Usage, from a checkout of that commit (git worktree add ../before-rooms 21b1569):
    PYTHONPATH=../before-rooms python docs/scripts/checkpoints_before_rooms.py INDEX_DIR 100000"""
import json, statistics, sys, time
from pathlib import Path

import numpy as np

from indexer.bench_latency import synthetic_captions
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.store import ImageRow, utcnow

index_dir, n = Path(sys.argv[1]), int(sys.argv[2])
every = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
engine = Engine(EngineConfig(index_dir=index_dir, progress=False))
store = engine._open(create=True)
store.set_meta({"encoder": json.dumps(engine.encoder.info.to_dict())})
vectors = engine._vector_index(store)
engine._adopt_scorer(store, vectors)
rng = np.random.default_rng(0)
captions = synthetic_captions(n, 0)
dim, fp, now = engine.encoder.dim, engine.encoder.info.fingerprint, utcnow()
unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
timings = []
t_all = time.perf_counter()
for start in range(0, n, every):
    ids = np.arange(start + 1, min(n, start + every) + 1, dtype=np.int64)
    image = unit(rng.standard_normal((len(ids), dim)).astype(np.float32))
    caption = unit(rng.standard_normal((len(ids), dim)).astype(np.float32))
    memories = np.clip(rng.standard_normal((len(ids), vectors.memories.dim)), -4, 4).astype(np.float32)
    vectors.add(ids, image, ids, caption, memories)
    rows = [ImageRow(id=int(i), path=f"/synthetic/{i:07d}.jpg", content_hash=f"{i:064x}", byte_size=1, mtime=0.0,
                     width=640, height=480, file_type="jpg", indexed_at=now, encoder=fp, caption=captions[i - 1],
                     captioner="synthetic", captioned_at=now) for i in ids]
    t0 = time.perf_counter()
    vectors.save()  # what Indexer._checkpoint did: every vector file whole ...
    with store.session() as s:  # ... then the buffered rows in one transaction
        for row in rows:
            s.merge(row)
    timings.append((int(ids[-1]), time.perf_counter() - t0))
    print(timings[-1], flush=True, file=sys.stderr)
tenth = max(1, len(timings) // 10)
deciles = [{"images_up_to": part[-1][0], "checkpoints": len(part),
            "median_ms": round(1000 * statistics.median(s for _, s in part), 1),
            "max_ms": round(1000 * max(s for _, s in part), 1)}
           for part in (timings[i:i + tenth] for i in range(0, len(timings), tenth))]
print(json.dumps({"code": "21b1569 (before the rooms)", "images": n, "every": every, "checkpoints": len(timings),
                  "total_s": round(time.perf_counter() - t_all, 1),
                  "checkpoint_s": round(sum(s for _, s in timings), 1), "by_tenth": deciles}))
