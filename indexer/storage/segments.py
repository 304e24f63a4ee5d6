"""Fixed-width records by id (float32 vectors, or 8-bit codes) in immutable, append-only segment files.

A checkpoint writes one new segment per kind that changed: the ids it deletes and the ids and rows it
puts (the net change since the last checkpoint), so the bytes written are proportional to the change,
not to the collection. A record is live when the newest segment that mentions its id puts it.
Segments are never modified: rows are read in place with positional reads (only the rows asked for
are read, and nothing is mapped into the process, so reading a few rows of a 19 GB file of scorer
memories for each query does not grow the resident memory), and a merge (:func:`plan_merge`) rewrites a run of adjacent small segments as one, so a
collection of N rows lives in O(log N) segments and every row is rewritten O(log N) times in all.

Files of one kind ``k``, segment number ``s`` (in a bundle's folder): ``k-s.ids.npy`` (int64 ids
put), ``k-s.rows.npy`` (their rows, one per id) and ``k-s.del.npy`` (int64 ids deleted); a segment's
:class:`SegmentInfo` is what a manifest (``indexer/storage/bundle.py``) records of it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from indexer.errors import IndexCorruptError
from indexer.storage.npyfiles import Rows as _Rows
from indexer.storage.npyfiles import load_array as _load_array
from indexer.storage.npyfiles import save_array as _save_array
from indexer.storage.npyfiles import save_chunks as _save_chunks

MERGE_FACTOR = 8  # a run of this many adjacent segments of one size level is merged into one


@dataclass(frozen=True)
class SegmentInfo:
    number: int  # unique within its folder and kind, increasing in write order
    puts: int
    deletes: int

    def to_dict(self) -> dict:
        return asdict(self)


def segment_files(folder: Path, kind: str, number: int) -> tuple[Path, Path, Path]:
    """(ids, rows, deletions) files of one segment."""
    stem = folder / f"{kind}-{number:08d}"
    return stem.with_suffix(".ids.npy"), stem.with_suffix(".rows.npy"), stem.with_suffix(".del.npy")


def fsync_dir(folder: Path) -> None:
    """Make the names created or renamed in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _level(n: int) -> int:
    return int(math.log(max(n, 1), MERGE_FACTOR))


def plan_merge(sizes: list[int]) -> tuple[int, int] | None:
    """Which run of adjacent segments to merge, given their live sizes in write order, or None.

    The run is the newest segments back to (not including) the first older one on a higher size level
    (``int(log_F(size))``) than any in the run; it is merged once it holds MERGE_FACTOR segments. So
    between two segments of one level there are fewer than MERGE_FACTOR smaller ones, a collection of
    N rows lives in O(F log_F N) segments, and each row is rewritten O(log_F N) times in all."""
    if len(sizes) < MERGE_FACTOR:
        return None
    start, top = len(sizes) - 1, _level(sizes[-1])
    while start > 0 and _level(sizes[start - 1]) <= top:
        start -= 1
        top = max(top, _level(sizes[start]))
    return (start, len(sizes)) if len(sizes) - start >= MERGE_FACTOR else None


class SegmentLog:
    """The records of one kind: live ids, their rows (read from segment files or not yet written), and
    the changes since the last checkpoint.

    ``width`` and ``dtype``: the shape of one row (float32 vectors of the index dimension, or uint8
    codes). Reads never load a whole segment unless asked to (:meth:`all_rows`).
    """

    def __init__(self, folder: Path, kind: str, width: int, dtype: np.dtype | type = np.float32) -> None:
        self.folder, self.kind, self.width, self.dtype = folder, kind, int(width), np.dtype(dtype)
        self.segments: list[SegmentInfo] = []
        self._maps: list[_Rows] = []  # rows of each segment, read by position
        # the live records in segments: sorted ids, and where each one's row is (segment index, row)
        self._keys = np.zeros(0, np.int64)
        self._seg = np.zeros(0, np.int32)
        self._row = np.zeros(0, np.int64)
        self._pending: dict[int, np.ndarray | None] = {}  # id -> row put, or None: deleted

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, kind: str, width: int, dtype: np.dtype | type,
             infos: list[SegmentInfo]) -> "SegmentLog":
        log = cls(folder, kind, width, dtype)
        log._replay(infos)
        return log

    def _replay(self, infos: list[SegmentInfo]) -> None:
        """Rebuild the live map from ``infos`` (segments in write order)."""
        self.segments, self._maps = list(infos), []
        ids_parts, seg_parts, row_parts = [], [], []
        for s, info in enumerate(infos):
            ids_path, rows_path, del_path = segment_files(self.folder, self.kind, info.number)
            if info.deletes:
                dels = _load_array(del_path, mmap=False).astype(np.int64)
                ids_parts.append(dels)
                seg_parts.append(np.full(len(dels), s, np.int32))
                row_parts.append(np.full(len(dels), -1, np.int64))  # deleted
            if info.puts:
                ids = _load_array(ids_path, mmap=False).astype(np.int64)
                rows = _Rows.open(rows_path, self.width, self.dtype)
                if len(ids) != info.puts or rows.shape != (info.puts, self.width) or rows.dtype != self.dtype:
                    raise IndexCorruptError(
                        f"vector segment {rows_path} holds {rows.shape} {rows.dtype}, expected "
                        f"({info.puts}, {self.width}) {self.dtype}; run pixquery index FOLDER --rebuild")
                ids_parts.append(ids)
                seg_parts.append(np.full(len(ids), s, np.int32))
                row_parts.append(np.arange(len(ids), dtype=np.int64))
                self._maps.append(rows)
            else:
                self._maps.append(_Rows.empty(self.width, self.dtype))
        if not ids_parts:
            self._keys, self._seg, self._row = np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
            return
        ids, seg, row = np.concatenate(ids_parts), np.concatenate(seg_parts), np.concatenate(row_parts)
        # the last event of each id wins (events are in write order, a segment's deletions before its puts)
        last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
        live = last[row[last] >= 0]
        order = np.argsort(ids[live], kind="stable")
        self._keys, self._seg, self._row = ids[live][order], seg[live][order], row[live][order]

    # --- reading ------------------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """Sorted ids of every live record, changes since the last checkpoint included."""
        if not self._pending:
            return self._keys.copy()
        pending = np.fromiter(self._pending, np.int64, len(self._pending))
        base = self._keys[~np.isin(self._keys, pending)]
        put = np.array([i for i, r in self._pending.items() if r is not None], np.int64)
        return np.sort(np.concatenate([base, put]))

    def __len__(self) -> int:
        if not self._pending:
            return len(self._keys)
        return len(self.ids())

    def _locate(self, ids: np.ndarray) -> np.ndarray:
        """Position of each id in the live map, -1 where it is not there."""
        if not len(self._keys):
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self._keys, ids), len(self._keys) - 1)
        return np.where(self._keys[pos] == ids, pos, -1)

    def contains(self, row_id: int) -> bool:
        row_id = int(row_id)
        if row_id in self._pending:
            return self._pending[row_id] is not None
        return bool(self._locate(np.array([row_id], np.int64))[0] >= 0)

    def present(self, ids: np.ndarray) -> np.ndarray:
        """(n,) mask of the ``ids`` that have a live record (nothing is read)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        mask = self._locate(ids) >= 0
        if self._pending:
            for n, i in enumerate(ids.tolist()):
                if i in self._pending:
                    mask[n] = self._pending[i] is not None
        return mask

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask (n,) of the ids that have a record, their rows (mask.sum(), width)), in the order given."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.width), self.dtype)
        mask = np.zeros(len(ids), bool)
        from_segments = np.ones(len(ids), bool)
        if self._pending:
            for n, i in enumerate(ids.tolist()):
                if i in self._pending:
                    from_segments[n] = False
                    row = self._pending[i]
                    if row is not None:
                        out[n], mask[n] = row, True
        where = np.flatnonzero(from_segments)
        pos = self._locate(ids[where])
        hit = pos >= 0
        where, pos = where[hit], pos[hit]
        segs = self._seg[pos]
        for s in np.unique(segs).tolist():
            sel = segs == s
            rows = self._row[pos[sel]]
            order = np.argsort(rows)  # ascending offsets: runs of adjacent rows are read at once
            out[where[sel][order]] = self._maps[s].take(rows[order])
        mask[where] = True
        return mask, out[mask]

    def all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted ids, their rows) of every live record, each segment read front to back once."""
        ids = self.ids()
        return ids, self.get(ids)[1]

    def chunks(self, size: int = 65536, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, rows) of the live records stored in segments ``start:`` (pending changes left out), in
        chunks of at most ``size`` rows read front to back: for passes over a large collection that
        must not hold it in memory at once."""
        for s in range(start, len(self.segments)):
            pos = np.flatnonzero(self._seg == s)
            if not len(pos):
                continue
            order = np.argsort(self._row[pos], kind="stable")
            pos = pos[order]
            for lo in range(0, len(pos), size):
                part = pos[lo:lo + size]
                yield self._keys[part], self._maps[s].take(self._row[part])

    def live_in(self, start: int) -> np.ndarray:
        """Sorted ids of the live records stored in segments ``start:`` (pending changes left out)."""
        return self._keys[self._seg >= start]

    def mentioned_in(self, start: int) -> np.ndarray:
        """Sorted ids that segments ``start:`` put or delete (whatever they held before is out of date)."""
        parts = [np.zeros(0, np.int64)]
        for info in self.segments[start:]:
            ids_path, _, del_path = segment_files(self.folder, self.kind, info.number)
            if info.puts:
                parts.append(_load_array(ids_path, mmap=False).astype(np.int64))
            if info.deletes:
                parts.append(_load_array(del_path, mmap=False).astype(np.int64))
        return np.unique(np.concatenate(parts))

    def pending(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids put, ids deleted) since the last checkpoint."""
        put = np.array(sorted(i for i, r in self._pending.items() if r is not None), np.int64)
        deleted = np.array(sorted(i for i, r in self._pending.items() if r is None), np.int64)
        return put, deleted

    # --- changing -----------------------------------------------------------------------------
    def put(self, ids: np.ndarray, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.width or len(rows) != len(ids):
            raise ValueError(f"expected ({len(ids)}, {self.width}) rows, got {rows.shape}")
        rows = rows.astype(self.dtype, copy=False)
        for i, row in zip(np.asarray(ids, np.int64).tolist(), rows):
            self._pending[i] = np.array(row, copy=True)

    def delete(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if not len(ids):
            return
        stored = set(ids[self._locate(ids) >= 0].tolist())
        for i in ids.tolist():
            if i in stored:
                self._pending[i] = None
            else:
                self._pending.pop(i, None)  # put since the last checkpoint only: nothing to delete on disk

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    # --- checkpoints --------------------------------------------------------------------------
    # A checkpoint writes new files, then applies them to the live map in memory (no file is read back),
    # so its cost follows the change. Until the bundle's manifest and the SQL transaction commit, the
    # files are not part of the index; if that fails, the bundle reloads the committed state (:meth:`reload`).

    def write_pending(self, number: int) -> SegmentInfo | None:
        """Write the changes since the last checkpoint as segment ``number`` (files fsynced) and make it
        part of this log; None when nothing changed."""
        if not self._pending:
            return None
        puts = np.array(sorted(i for i, r in self._pending.items() if r is not None), np.int64)
        dels = np.array(sorted(i for i, r in self._pending.items() if r is None), np.int64)
        ids_path, rows_path, del_path = segment_files(self.folder, self.kind, number)
        rows = None
        if len(puts):
            rows = np.stack([self._pending[i] for i in puts.tolist()]).astype(self.dtype, copy=False)
            _save_array(rows_path, rows)
            _save_array(ids_path, puts)
        if len(dels):
            _save_array(del_path, dels)
        info = SegmentInfo(number, len(puts), len(dels))
        # the live map: drop every changed id, then insert the ones put, pointing into the new segment
        changed = np.sort(np.concatenate([puts, dels]))
        pos = self._locate(changed)
        keep = np.ones(len(self._keys), bool)
        keep[pos[pos >= 0]] = False
        keys, seg, row = self._keys[keep], self._seg[keep], self._row[keep]
        at = np.searchsorted(keys, puts)
        s = len(self.segments)
        self._keys = np.insert(keys, at, puts)
        self._seg = np.insert(seg, at, np.full(len(puts), s, np.int32))
        self._row = np.insert(row, at, np.arange(len(puts), dtype=np.int64))
        self.segments.append(info)
        self._maps.append(_Rows.open(rows_path, self.width, self.dtype) if len(puts)
                          else _Rows.empty(self.width, self.dtype))
        self._pending.clear()
        return info

    def merge(self, start: int, stop: int, number: int) -> SegmentInfo:
        """Rewrite segments ``start:stop`` (adjacent, in write order) as segment ``number`` and put it in
        their place: their live rows, and the ids they delete that no row of theirs puts back (those may
        still hide older records; a merge from the first segment on drops them)."""
        if self._pending:
            raise RuntimeError("write the pending changes before merging segments")
        # the live rows, segment by segment front to back, streamed to the new file (a merge of memory
        # segments at a million images moves gigabytes: never all in memory at once)
        pos = np.flatnonzero((self._seg >= start) & (self._seg < stop))
        pos = pos[np.lexsort((self._row[pos], self._seg[pos]))]
        ids = self._keys[pos]
        deleted = [_load_array(segment_files(self.folder, self.kind, info.number)[2], mmap=False)
                   for info in self.segments[start:stop] if info.deletes]
        dels = (np.setdiff1d(np.concatenate(deleted).astype(np.int64), ids) if deleted and start > 0
                else np.zeros(0, np.int64))
        ids_path, rows_path, del_path = segment_files(self.folder, self.kind, number)
        if len(ids):
            step = max(1, (64 << 20) // max(1, self.width * self.dtype.itemsize))

            def chunks() -> Iterator[np.ndarray]:
                for lo in range(0, len(pos), step):
                    part = pos[lo:lo + step]
                    segs = self._seg[part]
                    for s in np.unique(segs).tolist():  # in order: pos is sorted by segment
                        yield self._maps[s].take(self._row[part[segs == s]])

            _save_chunks(rows_path, (len(ids), self.width), self.dtype, chunks())
            _save_array(ids_path, ids)
        if len(dels):
            _save_array(del_path, dels)
        info = SegmentInfo(number, len(ids), len(dels))
        self._row[pos] = np.arange(len(ids), dtype=np.int64)
        self._seg[pos] = start
        self._seg[self._seg >= stop] -= stop - start - 1
        merged = _Rows.open(rows_path, self.width, self.dtype) if len(ids) else _Rows.empty(self.width, self.dtype)
        self._maps[start:stop] = [merged]
        self.segments[start:stop] = [info]
        return info

    def live_sizes(self) -> list[int]:
        """Live records per segment, in write order (what :func:`plan_merge` looks at)."""
        if not self.segments:
            return []
        return [int(c) for c in np.bincount(self._seg, minlength=len(self.segments))]

    def reload(self, infos: list[SegmentInfo]) -> None:
        """Forget pending changes and go back to exactly ``infos`` (a checkpoint that did not commit)."""
        self._pending.clear()
        self._replay(infos)

    def files(self) -> set[Path]:
        """Every file of this kind's current segments."""
        out: set[Path] = set()
        for info in self.segments:
            ids_path, rows_path, del_path = segment_files(self.folder, self.kind, info.number)
            if info.puts:
                out |= {ids_path, rows_path}
            if info.deletes:
                out.add(del_path)
        return out
