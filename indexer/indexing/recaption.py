"""``recaption``: caption every indexed image again (after a captioner change), image vectors untouched.

Each image is read and decoded once more; its new caption, caption vector, the caption's confidence,
its tags and the scorer's memory go
through the same :class:`~indexer.indexing.writer.BatchWriter` as indexing, so the work is checkpointed
the same way (a crash loses at most the images since the last checkpoint, which keep their old captions).

A recaption in progress is recorded in ``meta`` (:data:`IN_PROGRESS_KEY`: the captioner and when it
started), committed with its first checkpoint; a recaption with the same captioner that finds it carries
on, leaving out the images that captioner already captioned since then, so repeated kills still make
progress. The record is cleared when a recaption finishes.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from tqdm import tqdm

from indexer.indexing.models import ImageModels
from indexer.indexing.pipeline import stack_or_none
from indexer.indexing.reader import ReadResult, reread_in_batches
from indexer.indexing.writer import BatchWriter
from indexer.storage.bundle import VectorBundle
from indexer.storage.schema import ImageRow, utcnow
from indexer.storage.store import Store


IN_PROGRESS_KEY = "recaption_in_progress"  # meta: JSON {"captioner": fingerprint, "since": ISO time}, or ""


@dataclass
class RecaptionCounts:
    images: int = 0
    captioned: int = 0
    failed: int = 0  # files that could not be read or decoded: they keep their old caption
    already_done: int = 0  # captioned by an interrupted recaption with the same captioner
    interrupted: bool = False  # stopped early (Ctrl-C): run again to carry on
    tagged: int = 0  # images given at least one tag

    def to_dict(self) -> dict:
        return {"images": self.images, "captioned": self.captioned, "failed": self.failed,
                "already_done": self.already_done, "interrupted": self.interrupted, "tagged": self.tagged}


def _in_progress(store: Store, fingerprint: str) -> datetime | None:
    """When the interrupted recaption by ``fingerprint`` started (None: there is none to carry on)."""
    raw = store.get_meta(IN_PROGRESS_KEY)
    try:
        record = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("captioner") != fingerprint:
        return None
    try:
        return datetime.fromisoformat(record["since"])
    except (KeyError, TypeError, ValueError):
        return None


def recaption(store: Store, vectors: VectorBundle, models: ImageModels, batch_size: int = 32, workers: int = 2,
              checkpoint_every: int = 1024, progress: bool = True,
              stop: threading.Event | None = None) -> RecaptionCounts:
    """New captions, caption vectors and scorer memories for every indexed image (``stop``: when set,
    the batch in flight is finished and committed, and the counts say ``interrupted``)."""
    fingerprint = models.captioner.info.fingerprint
    rows = store.all_images()
    counts = RecaptionCounts(images=len(rows))
    writer = BatchWriter(store, vectors, checkpoint_every)
    since = _in_progress(store, fingerprint)
    if since is None:
        since = utcnow()
        writer.batch.meta[IN_PROGRESS_KEY] = json.dumps({"captioner": fingerprint, "since": since.isoformat()})
    else:
        done = [r for r in rows if r.captioner == fingerprint and r.captioned_at is not None
                and r.captioned_at >= since]
        counts.already_done = len(done)
        done_ids = {r.id for r in done}
        rows = [r for r in rows if r.id not in done_ids]
    bar = tqdm(total=len(rows), desc="captioning", unit="img", disable=not progress or not rows)

    def flush(pending: list[tuple[ImageRow, ReadResult]]) -> None:
        if not pending:
            return
        out = models.caption_only(models.collate([r.pixels for _, r in pending]),
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
        writer.maybe_checkpoint()

    try:
        for batch, failed, stopped in reread_in_batches(rows, models, workers, batch_size, stop):
            counts.failed += failed
            bar.update(failed)
            flush(batch)
            counts.interrupted = stopped
        if not counts.interrupted:
            writer.batch.meta[IN_PROGRESS_KEY] = ""  # finished: the next recaption starts afresh
        writer.checkpoint()
    finally:
        bar.close()
    return counts
