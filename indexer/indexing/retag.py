"""``retag``: tags and caption confidence for indexed images, without captioning them again.

What an index from before tags needs (or one tagged by another tagger): each image is read and decoded
once more and the image tower runs on it (no beam search, so about twice as fast as ``recaption``);
its classes, and the confidence of the caption it already has, go through the same
:class:`~indexer.indexing.writer.BatchWriter` as indexing, checkpointed the same way (a crash loses at
most the images since the last checkpoint, which are simply tagged by the next run).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from tqdm import tqdm

from indexer.errors import InputError
from indexer.indexing.models import ImageModels
from indexer.indexing.reader import ReadResult, reread_in_batches
from indexer.indexing.writer import BatchWriter
from indexer.storage.bundle import VectorBundle
from indexer.storage.schema import ImageRow
from indexer.storage.store import Store


@dataclass
class RetagCounts:
    images: int = 0  # images looked at (all, or those without this tagger's tags)
    tagged: int = 0  # of them, given at least one tag
    rated: int = 0  # captions given a confidence
    failed: int = 0  # files that could not be read or decoded: they keep what they had
    interrupted: bool = False  # stopped early (Ctrl-C): run again to carry on (tagged images are kept)

    def to_dict(self) -> dict:
        return {"images": self.images, "tagged": self.tagged, "rated": self.rated, "failed": self.failed,
                "interrupted": self.interrupted}


def retag(store: Store, vectors: VectorBundle, models: ImageModels, batch_size: int = 32, workers: int = 2,
          checkpoint_every: int = 1024, progress: bool = True, everything: bool = False,
          stop: threading.Event | None = None) -> RetagCounts:
    """Tag (and rate the captions of) the images that lack this tagger's tags or whose caption has no
    confidence yet; ``everything``: all of them. ``stop``: when set, the batch in flight is finished and
    committed, and the counts say ``interrupted``."""
    if models.tagger is None:
        raise InputError("tags need the native encoder's image tower (this index was built with another encoder)")
    fingerprint = models.tagger_fingerprint
    rate = models.confidence is not None
    rows = [r for r in store.all_images()
            if everything or r.tagger != fingerprint or (rate and r.caption and r.caption_confidence is None)]
    counts = RetagCounts(images=len(rows))
    writer = BatchWriter(store, vectors, checkpoint_every)
    bar = tqdm(total=len(rows), desc="tagging", unit="img", disable=not progress)

    def flush(pending: list[tuple[ImageRow, ReadResult]]) -> None:
        if not pending:
            return
        classes, confidence = models.tag_only(models.collate([r.pixels for _, r in pending]),
                                              [row.caption for row, _ in pending])
        for (row, _), cls, conf in zip(pending, classes, confidence):
            row.tagger, row.caption_confidence = fingerprint, conf
            writer.classes(row.id, cls)
            writer.row(row)
            counts.tagged += bool(models.tagger.tags(cls))
            counts.rated += conf is not None
        bar.update(len(pending))
        writer.maybe_checkpoint()

    try:
        for batch, failed, stopped in reread_in_batches(rows, models, workers, batch_size, stop):
            counts.failed += failed
            bar.update(failed)
            flush(batch)
            counts.interrupted = stopped
        writer.checkpoint()
    finally:
        bar.close()
    return counts
