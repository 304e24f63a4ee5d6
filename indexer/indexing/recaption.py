"""``recaption``: caption every indexed image again (after a captioner change), image vectors untouched.

Each image is read and decoded once more; its new caption, caption vector, the caption's confidence,
its tags and the scorer's memory go
through the same :class:`~indexer.indexing.writer.BatchWriter` as indexing, so the work is checkpointed
the same way (a crash loses at most the images since the last checkpoint, which keep their old captions).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from indexer.indexing.models import ImageModels
from indexer.indexing.pipeline import stack_or_none
from indexer.indexing.reader import ReadResult, read_in_order
from indexer.indexing.writer import BatchWriter
from indexer.storage.bundle import VectorBundle
from indexer.storage.schema import ImageRow, utcnow
from indexer.storage.store import Store


@dataclass
class RecaptionCounts:
    images: int = 0
    captioned: int = 0
    failed: int = 0  # files that could not be read or decoded: they keep their old caption
    tagged: int = 0  # images given at least one tag

    def to_dict(self) -> dict:
        return {"images": self.images, "captioned": self.captioned, "failed": self.failed, "tagged": self.tagged}


def recaption(store: Store, vectors: VectorBundle, models: ImageModels, batch_size: int = 32, workers: int = 2,
              checkpoint_every: int = 1024, progress: bool = True) -> RecaptionCounts:
    """New captions, caption vectors and scorer memories for every indexed image."""
    fingerprint = models.captioner.info.fingerprint
    rows = store.all_images()
    counts = RecaptionCounts(images=len(rows))
    writer = BatchWriter(store, vectors, checkpoint_every)
    by_id = {r.id: r for r in rows}
    bar = tqdm(total=len(rows), desc="captioning", unit="img", disable=not progress)
    pending: list[tuple[ImageRow, ReadResult]] = []

    def flush() -> None:
        if not pending:
            return
        out = models.caption_only(torch.stack([r.pixels for _, r in pending]),
                                  stack_or_none([r.cap_pixels for _, r in pending]))
        ids = np.array([row.id for row, _ in pending], dtype=np.int64)
        vectors.set_captions(ids, ids[out.caption_where], out.caption_vectors)
        vectors.set_memories(ids, out.memories)
        for k, ((row, _), cap) in enumerate(zip(pending, out.captions)):
            row.caption, row.captioner = cap, fingerprint if cap else None
            row.captioned_at = utcnow() if cap else None
            row.caption_confidence = out.confidence[k]
            counts.captioned += cap is not None
            if out.classes is not None:
                row.tagger = models.tagger_fingerprint
                writer.classes(row.id, out.classes[k])
                counts.tagged += bool(models.tagger.tags(out.classes[k]))
            writer.row(row)
        bar.update(len(pending))
        pending.clear()
        writer.maybe_checkpoint()

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            jobs = ((r.path, None) for r in rows)
            for row, res in zip(rows, read_in_order(pool, jobs, models, None, max(batch_size * 2, workers * 4))):
                if res.error is not None:
                    counts.failed += 1
                    bar.update(1)
                    continue
                pending.append((by_id[row.id], res))
                if len(pending) >= batch_size:
                    flush()
            flush()
        writer.checkpoint()
    finally:
        bar.close()
    return counts
