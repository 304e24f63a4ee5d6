"""The incremental indexer: reader threads -> encoder -> writer, in bounded batches.

Per file (see docs/ARCHITECTURE.md for the full decision table):

* path known and size+mtime unchanged  -> nothing is read;
* content hash unchanged (touched)     -> metadata only;
* hash known elsewhere in the index    -> moved/renamed (row keeps id and vector) or copied
                                          (vector copied, never re-embedded);
* otherwise                            -> decoded once, embedded (and captioned) in a batch, stored.

Moves and copies carry the caption and its vector along; an empty caption is never stored.

Rows under the root whose files are gone are deleted from the store and the vector index.
Work is checkpointed: the vector file is saved first, then the buffered SQL changes commit in one
transaction, so a crash loses at most the work since the last checkpoint and ``reconcile``
(run at every open) repairs any difference between the two.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from indexer.discover import FileEntry, discover, hash_bytes
from indexer.errors import InputError
from indexer.store import ImageRow, SkippedRow, Store, utcnow
from indexer.models import ImageModels
from indexer.vectors_bundle import Payload, VectorBundle
from retrieval.errors import ImageDecodeError
from retrieval.images import IMAGE_EXTENSIONS, load_image

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
    seconds: float = 0.0
    images_per_second: float = 0.0
    total_images: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class ReadResult:
    entry: FileEntry | None  # None when a file is re-read for recaptioning
    content_hash: str | None = None
    pixels: torch.Tensor | None = None  # (3, H, W) for the encoder, only when the file needs embedding
    cap_pixels: torch.Tensor | None = None  # (3, H', W') for a captioner with its own preprocessing
    width: int = 0
    height: int = 0
    taken_at: object = None
    error: str | None = None


def _reason_kind(message: str) -> str:
    return message.split("(", 1)[-1].split(":", 1)[0] if "(" in message else "unreadable"


def reconcile(store: Store, vectors: VectorBundle) -> tuple[int, int]:
    """Make the store and the vector indexes agree; returns (vectors removed, rows removed).

    Stray vectors (no row) are removed; rows without an image vector are deleted (their files are
    indexed again on the next run); caption vectors of rows without a caption are removed.
    """
    vec_ids = set(vectors.ids().tolist())
    row_ids = store.image_ids()
    orphans = np.array(sorted(vec_ids - row_ids), dtype=np.int64)
    missing = sorted(row_ids - vec_ids)
    cap_orphans = np.array(sorted(set(vectors.captions.ids().tolist()) - store.captioned_ids()), dtype=np.int64)
    if len(orphans):
        vectors.remove(orphans)
    if len(cap_orphans):
        vectors.captions.remove(cap_orphans)
    mem_orphans = np.zeros(0, dtype=np.int64)
    if vectors.memories is not None:  # scorer memories of rows that are gone
        mem_orphans = np.array(sorted(set(vectors.memories.ids().tolist()) - (row_ids - set(missing))), dtype=np.int64)
        vectors.memories.remove(mem_orphans)
    if missing:
        with store.session() as s:
            store.delete_images(s, missing)
    if len(orphans) or missing or len(cap_orphans):
        log.warning("repaired index: %d stray vectors, %d rows without vectors, %d stray caption vectors",
                    len(orphans), len(missing), len(cap_orphans))
    return len(orphans) + len(cap_orphans) + len(mem_orphans), len(missing)


class Indexer:
    """Runs one incremental indexing pass of a folder into a store and its vector indexes."""

    def __init__(
        self, store: Store, vectors: VectorBundle, models: ImageModels,
        batch_size: int = 32, workers: int = 2, checkpoint_every: int = 1024, progress: bool = True,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.store, self.vectors, self.models = store, vectors, models
        self.on_progress = on_progress  # called as on_progress(files done, files to do) from the running thread
        self.batch_size, self.workers = batch_size, max(1, workers)
        self.checkpoint_every, self.progress = checkpoint_every, progress
        self.encoder_fp = models.encoder.info.fingerprint
        self.captioner_fp = models.captioner.info.fingerprint if models.captioner else None
        self._pending_rows: list[ImageRow] = []
        self._pending_skips: list[SkippedRow] = []
        self._pending_unskip: list[str] = []
        self._pending_deletes: list[int] = []
        self._since_checkpoint = 0

    # --- reading (worker threads) -------------------------------------------------------------
    def _read(self, entry: FileEntry, known_hashes: frozenset[str]) -> ReadResult:
        try:
            with open(entry.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            return ReadResult(entry, error=f"cannot read file ({type(exc).__name__}: {exc.strerror or exc})")
        result = ReadResult(entry, content_hash=hash_bytes(data))
        if result.content_hash in known_hashes:
            return result  # its vectors are already in the index: no decode
        return decode_into(result, data, self.models)

    # --- the run ------------------------------------------------------------------------------
    def run(self, root: str | Path) -> IndexSummary:
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise InputError(f"folder {root_path} does not exist")
        if not root_path.is_dir():
            raise InputError(f"{root_path} is not a folder")
        root_path = root_path.resolve()
        t0 = time.time()
        summary = IndexSummary(root=str(root_path))
        run_id = self.store.start_run(str(root_path))
        files = discover(root_path)
        summary.files_seen = len(files)
        prefix = str(root_path).rstrip(os.sep) + os.sep

        rows = self.store.all_images()
        by_path = {r.path: r for r in rows}
        under_root = {r.path: r for r in rows if r.path.startswith(prefix)}
        on_disk = {f.path for f in files}
        gone = {p: r for p, r in under_root.items() if p not in on_disk}
        if not files and not under_root:
            raise InputError(
                f"no image files found under {root_path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        move_sources: dict[str, list[ImageRow]] = {}
        for r in gone.values():
            move_sources.setdefault(r.content_hash, []).append(r)
        by_hash: dict[str, ImageRow] = {}
        for r in rows:
            by_hash.setdefault(r.content_hash, r)
        skipped_before = {s.path: s for s in self.store.skipped()}
        stash: dict[str, Payload] = {}  # what rows held before this run overwrote them, by their old hash
        next_id = max(self.store.next_id(), int(self.vectors.ids().max(initial=0)) + 1)

        todo: list[FileEntry] = []
        for f in files:
            row = by_path.get(f.path)
            if row is not None and row.byte_size == f.size and row.mtime == f.mtime:
                summary.unchanged += 1
                continue
            prev_skip = skipped_before.get(f.path)
            if row is None and prev_skip and prev_skip.byte_size == f.size and prev_skip.mtime == f.mtime:
                summary.skipped += 1
                kind = _reason_kind(prev_skip.reason)
                summary.skipped_reasons[kind] = summary.skipped_reasons.get(kind, 0) + 1
                continue
            todo.append(f)

        known = frozenset(by_hash)
        batch: list[tuple[ReadResult, int, ImageRow | None]] = []
        reasons: Counter[str] = Counter(summary.skipped_reasons)
        bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not self.progress or not todo)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(n)
            if self.on_progress is not None:
                self.on_progress(done, len(todo))

        if self.on_progress is not None:
            self.on_progress(0, len(todo))

        def payload_of(h: str) -> Payload:
            if h in stash:
                return stash[h]
            src = by_hash[h]
            return self.vectors.payload(src.id, src.caption, src.captioner)

        def keep_old(old: ImageRow) -> None:
            """Remember what ``old`` held before its id gets new content (a later copy may need it)."""
            if old.content_hash not in stash:
                stash[old.content_hash] = self.vectors.payload(old.id, old.caption, old.captioner)

        def row_for(res: ReadResult, row_id: int, caption: str | None, captioner: str | None) -> ImageRow:
            e = res.entry
            return ImageRow(
                id=row_id, path=e.path, content_hash=res.content_hash, byte_size=e.size, mtime=e.mtime,
                width=res.width, height=res.height, file_type=e.file_type, taken_at=res.taken_at,
                indexed_at=utcnow(), encoder=self.encoder_fp, run_id=run_id, caption=caption,
                captioner=captioner if caption else None, captioned_at=utcnow() if caption else None,
            )

        def flush_batch() -> None:
            if not batch:
                return
            out = self.models.run(torch.stack([r.pixels for r, _, _ in batch]),
                                  _stack_or_none([r.cap_pixels for r, _, _ in batch]))
            where, cap_vecs = self.models.embed_captions(out.captions)
            ids = np.array([rid for _, rid, _ in batch], dtype=np.int64)
            replaced = [old for _, _, old in batch if old is not None]
            for old in replaced:
                keep_old(old)
            self.vectors.remove(np.array([old.id for old in replaced], dtype=np.int64))
            self.vectors.add(ids, out.vectors, ids[where], cap_vecs, out.memories)
            for (res, rid, _), caption in zip(batch, out.captions):
                summary.captioned += caption is not None
                self._queue_row(row_for(res, rid, caption, self.captioner_fp))
            summary.embedded += len(batch)
            advance(len(batch))
            batch.clear()
            self._maybe_checkpoint()

        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for res in self._ordered(pool, todo, known):
                    e = res.entry
                    old = by_path.get(e.path)
                    if res.error is not None:
                        reasons[_reason_kind(res.error)] += 1
                        summary.skipped += 1
                        self._pending_skips.append(SkippedRow(path=e.path, reason=res.error, byte_size=e.size,
                                                              mtime=e.mtime, run_id=run_id, at=utcnow()))
                        if old is not None:  # a once-good file became unreadable: drop it from the index
                            gone[e.path] = old
                        advance(1)
                        continue
                    self._pending_unskip.append(e.path)
                    if old is not None and old.content_hash == res.content_hash:
                        summary.touched += 1
                        old.mtime, old.byte_size = e.mtime, e.size
                        self._queue_row(old)
                        advance(1)
                        continue
                    if res.pixels is None:  # content already indexed under another path
                        sources = move_sources.get(res.content_hash)
                        if old is None and sources:
                            src = sources.pop()
                            gone.pop(src.path, None)
                            src.path, src.mtime, src.byte_size = e.path, e.mtime, e.size
                            src.file_type, src.run_id = e.file_type, run_id
                            self._queue_row(src)
                            summary.moved += 1
                        else:
                            payload = payload_of(res.content_hash)
                            src = by_hash[res.content_hash]
                            if old is None:
                                rid, next_id = next_id, next_id + 1
                                summary.copied += 1
                            else:
                                rid = old.id
                                keep_old(old)
                                self.vectors.remove(np.array([rid], dtype=np.int64))
                                summary.changed += 1
                            res.width, res.height, res.taken_at = src.width, src.height, src.taken_at
                            self.vectors.add_one(rid, payload.image, payload.caption_vec, payload.memory)
                            self._queue_row(row_for(res, rid, payload.caption, payload.captioner))
                        advance(1)
                        continue
                    if old is not None:
                        summary.changed += 1
                        batch.append((res, old.id, old))
                    else:
                        summary.new += 1
                        batch.append((res, next_id, None))
                        next_id += 1
                    if len(batch) >= self.batch_size:
                        flush_batch()
                flush_batch()
            # files that disappeared (and were not moved) leave the index
            gone_ids = [r.id for r in gone.values()]
            self.vectors.remove(np.array(gone_ids, dtype=np.int64))
            self._pending_deletes.extend(gone_ids)
            summary.deleted = sum(1 for r in gone.values() if r.path not in on_disk)
            vanished_skips = [p for p in skipped_before if p.startswith(prefix) and p not in on_disk]
            self._pending_unskip.extend(vanished_skips)
            self._checkpoint()
        finally:
            bar.close()
        summary.skipped_reasons = dict(reasons)
        summary.seconds = round(time.time() - t0, 3)
        summary.images_per_second = round(summary.embedded / summary.seconds, 2) if summary.seconds else 0.0
        summary.total_images = len(self.vectors)
        self.store.finish_run(run_id, summary.to_json())
        return summary

    def _ordered(self, pool: ThreadPoolExecutor, todo: list[FileEntry], known: frozenset[str]) -> Iterator[ReadResult]:
        """Read files on the pool, yielding results in order with a bounded number in flight."""
        window = max(self.batch_size * 2, self.workers * 4)
        futures = []
        for entry in todo:
            futures.append(pool.submit(self._read, entry, known))
            if len(futures) >= window:
                yield futures.pop(0).result()
        for fut in futures:
            yield fut.result()

    # --- writing ------------------------------------------------------------------------------
    def _queue_row(self, row: ImageRow) -> None:
        self._pending_rows.append(row)
        self._since_checkpoint += 1

    def _maybe_checkpoint(self) -> None:
        if self._since_checkpoint >= self.checkpoint_every:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Vectors to disk first, then every buffered SQL change in one transaction."""
        self.vectors.save()
        with self.store.session() as s:
            self.store.delete_images(s, self._pending_deletes)
            self.store.clear_skipped(s, self._pending_unskip)
            for row in self._pending_rows:
                s.merge(row)
            for skip in self._pending_skips:
                s.merge(skip)
        self._pending_rows.clear()
        self._pending_skips.clear()
        self._pending_unskip.clear()
        self._pending_deletes.clear()
        self._since_checkpoint = 0


def _stack_or_none(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.stack(tensors)


def decode_into(result: ReadResult, data: bytes, models: ImageModels) -> ReadResult:
    """Decode ``data`` once and preprocess it for every model; errors land in ``result.error``."""
    try:
        decoded = load_image(data)
        result.pixels, result.cap_pixels = models.preprocess(decoded.image)
    except ImageDecodeError as exc:
        result.error = str(exc).replace("<bytes>: ", "")
        return result
    result.width, result.height, result.taken_at = decoded.width, decoded.height, decoded.taken_at
    return result
