"""``.npy`` files written safely (a temporary name, fsynced, renamed; or streamed in chunks) and read
by position: :class:`Rows` reads chosen rows of a 2-d array with ``os.pread`` from its data offset, so
nothing is mapped into the process and only the bytes asked for are read."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from indexer.errors import IndexCorruptError


def save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def save_chunks(path: Path, shape: tuple[int, int], dtype: np.dtype, chunks: Iterator[np.ndarray]) -> None:
    """Write an ``.npy`` of ``shape`` from row chunks (in order), without holding it all in memory."""
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
        for chunk in chunks:
            fh.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            written += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    if written != shape[0]:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"wrote {written} rows to {path}, expected {shape[0]}")
    tmp.replace(path)


def load_array(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"cannot read vector segment {path}: {exc}; "
                                f"run pixquery index FOLDER --rebuild to make the index again") from exc


PREAD_MAX = 32  # scattered rows read with one system call each up to this many, through a short-lived map above


class Rows:
    """The rows of one segment file, read by position (``os.pread``) from the array's data offset."""

    def __init__(self, path: Path | None, shape: tuple[int, int], dtype: np.dtype, offset: int = 0) -> None:
        self.path, self.shape, self.dtype, self.offset = path, shape, np.dtype(dtype), offset
        self.row_bytes = shape[1] * self.dtype.itemsize
        self._fd: int | None = None

    @classmethod
    def open(cls, path: Path, expect_width: int, expect_dtype: np.dtype) -> "Rows":
        header = load_array(path, mmap=True)  # reads the header only; nothing is paged in
        rows = cls(path, header.shape if header.ndim == 2 else (len(header), -1), header.dtype,
                   int(getattr(header, "offset", 0)))
        del header
        # held open from now on: a writer that deletes an old generation's files (garbage collection)
        # never takes them from a reader that loaded that generation
        rows._fileno()
        return rows

    @classmethod
    def empty(cls, width: int, dtype: np.dtype) -> "Rows":
        return cls(None, (0, width), dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def _fileno(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):  # rows are read at random: no read-ahead around them
                    os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError as exc:
                raise IndexCorruptError(f"cannot read vector segment {self.path}: {exc}; "
                                        f"run pixquery index FOLDER --rebuild to make the index again") from exc
        return self._fd

    def _pread(self, start: int, count: int) -> bytes:
        want = count * self.row_bytes
        data = os.pread(self._fileno(), want, self.offset + start * self.row_bytes)
        if len(data) != want:
            raise IndexCorruptError(f"vector segment {self.path} is shorter than its header says "
                                    f"(rows {start}..{start + count}); run pixquery index FOLDER --rebuild")
        return data

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (one read)."""
        if stop <= start:
            return np.zeros((0, self.shape[1]), self.dtype)
        return np.frombuffer(self._pread(start, stop - start), self.dtype).reshape(stop - start, self.shape[1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted positions ``rows``: one read per run of adjacent rows (a read per row when
        they are scattered, as a query's candidates are), one read of the span when they are dense,
        a short-lived map when there are many scattered ones."""
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return np.zeros((0, self.shape[1]), self.dtype)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if len(rows) * 4 >= hi - lo:  # dense: read the span and pick
            return self.block(lo, hi)[rows - lo]
        if len(rows) > PREAD_MAX:
            return self._mapped(rows)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        runs = list(zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(rows)]]).tolist()))
        self._prefetch(rows, runs)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        for a, b in runs:
            out[a:b] = self.block(int(rows[a]), int(rows[a]) + (b - a))
        return out

    def _prefetch(self, rows: np.ndarray, runs: list[tuple[int, int]]) -> None:
        """Ask the kernel for every run of ``rows`` at once before reading any (POSIX_FADV_WILLNEED starts the
        reads and returns): rows not in the page cache then arrive in about one disk round trip, not one
        per run (10 scattered memories of a million-image index: 2.0 ms instead of 2.8, and 2.5 ms instead
        of 11 at the 90th percentile). Only for the few rows read one system call each: a search's many
        vector rows are mostly cached, where a call per run would cost more than it saves."""
        if len(runs) < 2 or not hasattr(os, "posix_fadvise"):
            return
        fd = self._fileno()
        for a, b in runs:
            os.posix_fadvise(fd, self.offset + int(rows[a]) * self.row_bytes, (b - a) * self.row_bytes,
                             os.POSIX_FADV_WILLNEED)

    def _mapped(self, rows: np.ndarray) -> np.ndarray:
        """Many scattered rows: the file mapped for this call only (a page fault per row instead of a
        system call and a Python step), copied out and unmapped, so no page stays resident."""
        fd = self._fileno()
        size = self.offset + self.shape[0] * self.row_bytes
        if os.fstat(fd).st_size < size:
            raise IndexCorruptError(f"vector segment {self.path} is shorter than its header says; "
                                    f"run pixquery index FOLDER --rebuild")
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        if hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_RANDOM)  # a page fault reads its page, not a read-ahead window around it
        try:
            view = np.frombuffer(mm, self.dtype, count=self.shape[0] * self.shape[1], offset=self.offset)
            out = view.reshape(self.shape)[rows]
            del view
        finally:
            mm.close()
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
