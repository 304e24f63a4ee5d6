"""One incremental indexing run: reader threads -> model stage -> writer, in bounded batches.

What happens to each file is decided by ``plan.py`` (the decision table of docs/ARCHITECTURE.md);
this module carries the decisions out: it reads files on threads or decoding processes (``reader.py``,
``procreader.py``), runs the models on
batches of new content (``models.py``), copies the vectors of content the index already holds, and
hands everything to the :class:`~indexer.indexing.writer.BatchWriter`, which checkpoints it. Moves
and copies carry the caption and its vectors along; an empty caption is never stored.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from indexer.errors import InputError
from indexer.indexing import plan
from indexer.indexing.discover import FileEntry, discover
from indexer.indexing.models import BatchOutput, ImageModels
from indexer.indexing.procreader import reading
from indexer.indexing.reader import ReadResult
from indexer.indexing.writer import BatchWriter
from indexer.storage.bundle import Payload, VectorBundle
from indexer.storage.schema import ImageRow, SkippedRow, utcnow
from indexer.storage.store import Store
from retrieval.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)


@dataclass
class IndexSummary:
    root: str
    files_seen: int = 0
    new: int = 0
    changed: int = 0
    moved: int = 0
    copied: int = 0
    touched: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    embedded: int = 0
    captioned: int = 0
    tagged: int = 0  # images given at least one tag
    seconds: float = 0.0
    images_per_second: float = 0.0
    total_images: int = 0
    # seconds per stage: read and decode summed over the reader threads or processes; wait (the model
    # stage waiting for readers), model, memories, caption, caption_embed and write on the main thread
    stage_seconds: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False  # stopped early (Ctrl-C): what was done is committed, the next run carries on

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def stack_or_none(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.stack(tensors)


def embed(models: ImageModels, decoded: list[ReadResult],
          codes: bool = False) -> tuple[BatchOutput, np.ndarray, np.ndarray]:
    """The model stage for decoded files -> (outputs, positions of the non-empty captions, their text vectors);
    ``codes``: scorer memories as the index's 8-bit codes (``ImageModels.run``), else float32."""
    out = models.run(models.collate([r.pixels for r in decoded]), stack_or_none([r.cap_pixels for r in decoded]),
                     codes)
    return out, out.caption_where, out.caption_vectors


class Indexer:
    """Runs one incremental indexing pass of a folder into a store and its vectors."""

    def __init__(
        self, store: Store, vectors: VectorBundle, models: ImageModels,
        batch_size: int = 32, workers: int = 2, checkpoint_every: int = 1024, progress: bool = True,
        on_progress: Callable[[int, int], None] | None = None, stop: threading.Event | None = None,
        processes: bool = False,
    ) -> None:
        self.store, self.vectors, self.models = store, vectors, models
        self.stop = stop  # set from outside (Ctrl-C): finish the batch in flight, commit, return
        self.processes = processes  # decode on worker processes (procreader.reading) instead of threads
        self.on_progress = on_progress  # called as on_progress(files done, files to do) from the running thread
        self.batch_size, self.workers = batch_size, max(1, workers)
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.encoder_fp = models.encoder.info.fingerprint
        self.captioner_fp = models.captioner.info.fingerprint if models.captioner else None
        self.tagger_fp = models.tagger_fingerprint

    def run(self, root: str | Path, runner: Callable[["Indexer", Path], "Run"] | None = None) -> IndexSummary:
        """Index ``root``; ``runner(indexer, root)`` builds the run (default :class:`Run`, in this process)."""
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise InputError(f"folder {root_path} does not exist")
        if not root_path.is_dir():
            raise InputError(f"{root_path} is not a folder")
        return (runner or Run)(self, root_path.resolve()).execute()


class Run:
    """The state of one run: what the index held when it started, and what the run has done so far.

    Two stages can be replaced (``indexing/distributed.py`` runs them on a Ray cluster): :meth:`_read`
    (files -> read, hashed, decoded results, in order) and :meth:`_embed` (the model stage of a batch).
    Everything else (the decisions, ids, copies, writes) stays here.
    """

    def __init__(self, indexer: Indexer, root: Path) -> None:
        self.ix, self.root = indexer, root
        self.t0 = time.time()
        self.summary = IndexSummary(root=str(root))
        self.reasons: Counter[str] = Counter()
        self.writer = BatchWriter(indexer.store, indexer.vectors, indexer.checkpoint_every)
        self.batch: list[tuple[ReadResult, int, ImageRow | None]] = []
        self.stash: dict[str, Payload] = {}  # what rows held before this run replaced their content, by old hash
        self.stash_tags: dict[str, tuple[ImageRow, list[tuple[int, float]] | None]] = {}  # ... their tags, likewise
        self.done = 0
        self.bar: tqdm | None = None
        self.stages: Counter[str] = Counter()

    # --- the run ------------------------------------------------------------------------------
    def execute(self) -> IndexSummary:
        ix, s = self.ix, self.summary
        self.run_id = ix.store.start_run(str(self.root))
        files = discover(self.root)
        s.files_seen = len(files)
        rows = ix.store.all_images()
        self.by_path = {r.path: r for r in rows}
        self.by_hash: dict[str, ImageRow] = {}
        for r in rows:
            self.by_hash.setdefault(r.content_hash, r)
        triage = plan.triage(str(self.root), files, rows, ix.store.skipped())
        if not files and not triage.gone:
            raise InputError(f"no image files found under {self.root} "
                             f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.gone = dict(triage.gone)
        self.move_sources: dict[str, list[ImageRow]] = {}
        for r in self.gone.values():
            self.move_sources.setdefault(r.content_hash, []).append(r)
        s.unchanged = len(triage.unchanged)
        for _, reason in triage.skipped_before:
            self._count_skip(reason)
        todo = triage.to_read
        self.total = len(todo)
        self.bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not ix.progress or not todo)
        try:
            self._advance(0)
            models_before = Counter(ix.models.seconds)
            with closing(self._read(todo, frozenset(self.by_hash))) as reads:  # readers stop on errors too
                while True:
                    t0 = time.perf_counter()
                    res = next(reads, None)
                    self.stages["wait"] += time.perf_counter() - t0
                    if res is None:
                        break
                    self.stages["read"] += res.read_s
                    self.stages["decode"] += res.decode_s
                    self._handle(res)
                    if ix.stop is not None and ix.stop.is_set():
                        s.interrupted = True
                        reads.close()  # files queued for reading are dropped
                        break
            self._flush()
            if not s.interrupted:
                # files that disappeared (and were not moved) leave the index; after an interruption they
                # stay until a run sees the whole folder (one may be a move not reached yet)
                self.writer.delete([r.id for r in self.gone.values()])
                on_disk = {f.path for f in files}
                s.deleted = sum(1 for r in self.gone.values() if r.path not in on_disk)
                for path in triage.vanished_skips:
                    self.writer.unskip(path)
            t0 = time.perf_counter()
            self.writer.checkpoint()
            self.stages["write"] += time.perf_counter() - t0
            self.stages.update(Counter(ix.models.seconds) - models_before)
        finally:
            self.bar.close()
        s.stage_seconds = {k: round(v, 3) for k, v in sorted(self.stages.items())}
        s.skipped_reasons = dict(self.reasons)
        s.seconds = round(time.time() - self.t0, 3)
        s.images_per_second = round(s.embedded / s.seconds, 2) if s.seconds else 0.0
        s.total_images = len(ix.vectors)
        ix.store.finish_run(self.run_id, s.to_json())
        return s

    def _read(self, todo: list[FileEntry], known: frozenset[str]) -> Iterator[ReadResult]:
        """Each file of ``todo``, in order: read and hashed, and decoded when its hash is not ``known``."""
        ix = self.ix
        window = max(ix.batch_size * 2, ix.workers * 4)
        with reading(ix.models, ix.workers, known, window, ix.processes) as read:
            yield from read((f.path, f) for f in todo)

    def _advance(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if self.ix.on_progress is not None:
            self.ix.on_progress(self.done, self.total)

    def _count_skip(self, reason: str) -> None:
        self.summary.skipped += 1
        self.reasons[plan.reason_kind(reason)] += 1

    # --- one file -----------------------------------------------------------------------------
    def _handle(self, res: ReadResult) -> None:
        e, s, w = res.entry, self.summary, self.writer
        old = self.by_path.get(e.path)
        decision = plan.decide(res.error, res.content_hash, old, self.by_hash, self.move_sources)
        if decision.kind == "skipped":
            self._count_skip(res.error)
            w.skip(SkippedRow(path=e.path, reason=res.error, byte_size=e.size, mtime=e.mtime, run_id=self.run_id,
                              at=utcnow()))
            if old is not None:  # a once-good file became unreadable: it leaves the index
                self.gone[e.path] = old
            self._advance(1)
            return
        w.unskip(e.path)
        if decision.kind == "touched":
            s.touched += 1
            old.mtime, old.byte_size = e.mtime, e.size
            w.row(old)
        elif decision.kind == "moved":
            src = decision.source
            self.move_sources[res.content_hash].remove(src)
            self.gone.pop(src.path, None)
            src.path, src.mtime, src.byte_size = e.path, e.mtime, e.size
            src.file_type, src.run_id = e.file_type, self.run_id
            w.row(src)
            s.moved += 1
        elif not decision.embed:  # copied, or changed to content the index holds: its vectors are copied
            payload = self._payload_of(res.content_hash)
            if old is None:
                row_id = w.new_id()
                s.copied += 1
            else:
                row_id = old.id
                self._keep_old(old)
                s.changed += 1
            src = decision.source
            res.width, res.height, res.taken_at = src.width, src.height, src.taken_at
            self.ix.vectors.add_payload(row_id, payload)
            tagged, classes = self._tags_of(res.content_hash)
            row = self._row(res, row_id, payload.caption, payload.captioner)
            row.caption_confidence, row.tagger = tagged.caption_confidence, tagged.tagger
            w.row(row)
            w.classes(row_id, classes if classes is not None else [])  # a changed file's old tags go
        else:
            if old is not None:
                s.changed += 1
                self.batch.append((res, old.id, old))
            else:
                s.new += 1
                self.batch.append((res, w.new_id(), None))
            if len(self.batch) >= self.ix.batch_size:
                self._flush()
            return
        self._advance(1)
        w.maybe_checkpoint()

    def _payload_of(self, content_hash: str) -> Payload:
        if content_hash in self.stash:
            return self.stash[content_hash]
        src = self.by_hash[content_hash]
        return self.ix.vectors.payload(src.id, src.caption, src.captioner)

    def _keep_old(self, old: ImageRow) -> None:
        """Remember what ``old`` held before its id gets new content (a later copy may need it)."""
        if old.content_hash not in self.stash:
            self.stash[old.content_hash] = self.ix.vectors.payload(old.id, old.caption, old.captioner)
            self.stash_tags[old.content_hash] = (ImageRow(caption_confidence=old.caption_confidence,
                                                          tagger=old.tagger),
                                                 self.ix.store.classes_by_ids([old.id]).get(old.id, [])
                                                 if old.tagger else None)

    def _tags_of(self, content_hash: str) -> tuple[ImageRow, list[tuple[int, float]] | None]:
        """The caption confidence and tagger (on a row) and the classes (None: never tagged) that the
        indexed image with this content holds, for a copy to carry along."""
        if content_hash in self.stash_tags:
            return self.stash_tags[content_hash]
        src = self.by_hash[content_hash]
        classes = self.ix.store.classes_by_ids([src.id]).get(src.id, []) if src.tagger else None
        return src, classes

    def _row(self, res: ReadResult, row_id: int, caption: str | None, captioner: str | None,
             confidence: float | None = None, tagger: str | None = None) -> ImageRow:
        e = res.entry
        return ImageRow(
            id=row_id, path=e.path, content_hash=res.content_hash, byte_size=e.size, mtime=e.mtime,
            width=res.width, height=res.height, file_type=e.file_type, taken_at=res.taken_at,
            indexed_at=utcnow(), encoder=self.ix.encoder_fp, run_id=self.run_id, caption=caption,
            captioner=captioner if caption else None, captioned_at=utcnow() if caption else None,
            caption_confidence=confidence if caption else None, tagger=tagger,
        )

    # --- a batch of new content ---------------------------------------------------------------
    def _flush(self) -> None:
        if not self.batch:
            return
        ix, batch = self.ix, self.batch
        out, where, cap_vecs = self._embed(batch)
        t0 = time.perf_counter()
        ids = np.array([rid for _, rid, _ in batch], dtype=np.int64)
        for _, _, old in batch:
            if old is not None:
                self._keep_old(old)
        ix.vectors.add(ids, out.vectors, ids[where], cap_vecs, out.memories)
        for k, ((res, rid, old), caption) in enumerate(zip(batch, out.captions)):
            self.summary.captioned += caption is not None
            self.writer.row(self._row(res, rid, caption, self.ix.captioner_fp, out.confidence[k],
                                      self.ix.tagger_fp if out.classes is not None else None))
            if out.classes is not None:
                self.summary.tagged += bool(ix.models.tagger.tags(out.classes[k]))
                self.writer.classes(rid, out.classes[k])
            elif old is not None:  # new content, no tagger: the old content's tags go
                self.writer.classes(rid, [])
        self.summary.embedded += len(batch)
        self._advance(len(batch))
        self.batch = []
        self.writer.maybe_checkpoint()
        self.stages["write"] += time.perf_counter() - t0

    def _embed(self, batch: list[tuple[ReadResult, int, ImageRow | None]]
               ) -> tuple[BatchOutput, np.ndarray, np.ndarray]:
        """The model stage of a batch -> (its outputs, positions of the non-empty captions, their vectors)."""
        return embed(self.ix.models, [res for res, _, _ in batch], codes=True)
