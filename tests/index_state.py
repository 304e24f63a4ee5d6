"""What an index holds, by file path (ids differ between builds): the oracle that an index equals a clean build."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import TinyEncoder
from indexer.config import EngineConfig
from indexer.engine import Engine


def snapshot(index_dir: Path, decimals: int = 5) -> dict:
    """{"rows": {path: (hash, size, width, height, caption, image vector, caption vector)}, "skipped": {...},
    "ids": number of rows, "unique_paths": number of distinct paths}, read as a searcher reads it."""
    engine = Engine(EngineConfig(index_dir=index_dir, progress=False, captioner=None), encoder=TinyEncoder())
    try:
        index = engine.open()
        rows = index.store.all_images()
        ids = np.array([r.id for r in rows], dtype=np.int64)
        images = index.vectors.images.reconstruct(ids) if len(ids) else np.zeros((0, 16), np.float32)
        have, caps = index.vectors.captions.reconstruct_present(ids)
        cap_of = dict(zip(ids[have].tolist(), caps))
        state = {}
        for r, vec in zip(rows, images):
            cap = cap_of.get(r.id)
            state[r.path] = (r.content_hash, r.byte_size, r.width, r.height, r.caption,
                             tuple(np.round(vec, decimals).tolist()),
                             None if cap is None else tuple(np.round(cap, decimals).tolist()))
        return {"rows": state, "skipped": {s.path: s.reason for s in index.store.skipped()},
                "ids": len(rows), "unique_paths": len({r.path for r in rows}),
                "vectors": len(index.vectors), "caption_vectors": len(index.vectors.captions)}
    finally:
        engine.close()
