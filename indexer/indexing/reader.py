"""The reading stage of indexing: each file is read once, hashed, and decoded only when its content is new.

Two ways to run it, chosen by ``procreader.reading``:

* reader threads (the default on a CPU), with PIL and numpy only: a torch operation on a reader thread
  would start an OpenMP team there that competes with the model stage for the cores
  (docs/BENCHMARKS.md);
* decoding worker processes (``procreader.py``; the default on a GPU, where decoding must keep up with
  thousands of images a second): they hand over raw uint8 pixels through shared memory and the model
  stage normalises them on the device.

This module imports no torch: the worker processes import it.
"""

from __future__ import annotations

import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
import threading
from typing import TYPE_CHECKING, BinaryIO, Iterable, Iterator, Protocol, Sequence, TypeVar

from indexer.indexing.discover import MAX_FILE_BYTES, FileEntry, hash_bytes
from retrieval.errors import ImageDecodeError
from retrieval.images import load_image

if TYPE_CHECKING:
    import torch

# "ImageModels" (indexer/indexing/models.py) is named in annotations but not imported: models.py imports
# this module (through procreader.py), and the rooms keep no import cycles

READERS = ("auto", "threads", "processes")  # EngineConfig.readers

Jobs = Iterable[tuple[str, "FileEntry | None"]]


@dataclass
class ReadResult:
    entry: FileEntry | None  # None when an indexed image is read again (recaption)
    content_hash: str | None = None
    pixels: "torch.Tensor | None" = None  # encoder pixels, only when the file needs embedding: (3, H, W)
    # normalised float32, or (H, W, 3) raw uint8 from a worker process (normalised by the model stage)
    cap_pixels: "torch.Tensor | None" = None  # (3, H', W') for a captioner with its own preprocessing
    width: int = 0
    height: int = 0
    taken_at: object = None
    error: str | None = None
    read_s: float = 0.0  # seconds spent reading and hashing the file (on a reader thread or process)
    decode_s: float = 0.0  # seconds spent decoding and preprocessing it


def _open_file(path: str) -> BinaryIO:
    """Open ``path`` for reading without blocking (a file swapped for a pipe must not hang the run)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    return os.fdopen(fd, "rb")


def read_bytes(path: str, entry: FileEntry | None) -> tuple[bytes | None, FileEntry | None, str | None]:
    """(the file's bytes, its entry with the stat of what was read, None) or (None, entry, why not).

    The stat before and after the read must agree: a file deleted, truncated or rewritten while it is
    read is skipped this time (its record keeps the stat it was listed with, so the next run reads it again).
    """
    try:
        with _open_file(path) as fh:
            before = os.fstat(fh.fileno())
            if not stat.S_ISREG(before.st_mode):
                return None, entry, "not a regular file (a pipe, socket or device)"
            if before.st_size > MAX_FILE_BYTES:
                return None, entry, f"file too large to index ({before.st_size / 2**20:,.0f} MiB)"
            data = fh.read(MAX_FILE_BYTES + 1)
            after = os.fstat(fh.fileno())
    except FileNotFoundError:
        return None, entry, "file vanished before it was read (FileNotFoundError)"
    except OSError as exc:
        return None, entry, f"cannot read file ({type(exc).__name__}: {exc.strerror or exc})"
    if after.st_nlink == 0:
        return None, entry, "file was deleted or replaced while it was read (read again on the next run)"
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
        return None, entry, "file changed while it was read (read again on the next run)"
    if entry is not None and (entry.size, entry.mtime) != (after.st_size, after.st_mtime):
        entry = replace(entry, size=after.st_size, mtime=after.st_mtime)  # changed since it was listed
    if not data:
        return None, entry, "empty file (0 bytes)"
    return data, entry, None


def decode_error(exc: ImageDecodeError) -> str:
    return str(exc).replace("<bytes>: ", "")


def unexpected_error(exc: Exception) -> str:
    return f"not a readable image ({type(exc).__name__}: {exc})"


def decode_into(result: ReadResult, data: bytes, models: ImageModels) -> ReadResult:
    """Decode ``data`` once and preprocess it for every model; errors land in ``result.error``."""
    t0 = time.perf_counter()
    try:
        decoded = load_image(data)
        result.pixels, result.cap_pixels = models.preprocess(decoded.image)
    except ImageDecodeError as exc:
        result.error = decode_error(exc)
        return result
    except Exception as exc:  # noqa: BLE001 - one odd picture never stops a run (e.g. a model's resize refusing it)
        result.error = unexpected_error(exc)
        return result
    finally:
        result.decode_s = time.perf_counter() - t0
    result.width, result.height, result.taken_at = decoded.width, decoded.height, decoded.taken_at
    return result


def read_file(path: str, entry: FileEntry | None, models: ImageModels,
              known_hashes: frozenset[str] | None = None) -> ReadResult:
    """Read ``path`` once: hash it, and decode it unless its hash is in ``known_hashes`` (content the index
    already holds, whose vectors are copied instead)."""
    if entry is not None and entry.problem is not None:
        return ReadResult(entry, error=entry.problem)
    t0 = time.perf_counter()
    data, entry, error = read_bytes(path, entry)
    if error is not None:
        return ReadResult(entry, error=error, read_s=time.perf_counter() - t0)
    result = ReadResult(entry, content_hash=hash_bytes(data))
    result.read_s = time.perf_counter() - t0
    if known_hashes is not None and result.content_hash in known_hashes:
        return result  # its vectors are already in the index: no decode
    return decode_into(result, data, models)


def read_in_order(pool: ThreadPoolExecutor, jobs: Jobs, models: ImageModels,
                  known_hashes: frozenset[str] | None, window: int) -> Iterator[ReadResult]:
    """Read ``(path, entry)`` jobs on ``pool``, yielding results in order, at most ``window`` in flight."""
    futures = []
    try:
        for path, entry in jobs:
            futures.append(pool.submit(read_file, path, entry, models, known_hashes))
            if len(futures) >= window:
                yield futures.pop(0).result()
        while futures:
            yield futures.pop(0).result()
    finally:  # closed early (a run stopped): reads not started yet are dropped
        for fut in futures:
            fut.cancel()


class _HasPath(Protocol):
    path: str


Row = TypeVar("Row", bound=_HasPath)


def reread_in_batches(rows: Sequence[Row], models: ImageModels, workers: int, batch_size: int,
                      stop: threading.Event | None = None
                      ) -> Iterator[tuple[list[tuple[Row, ReadResult]], int, bool]]:
    """Read the files of indexed ``rows`` again (``recaption``, ``retag``), in order, on ``workers``
    threads, and yield ``(batch, failed, stopped)``: full batches of ``(row, read)``, then what is left
    (possibly empty); ``failed``: the files that could not be read or decoded since the last yield (they
    keep what they had); ``stopped`` (last yield only): ``stop`` was set, checked after each file."""
    pending: list[tuple[Row, ReadResult]] = []
    failed, stopped = 0, False
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reads = read_in_order(pool, ((r.path, None) for r in rows), models, None, max(batch_size * 2, workers * 4))
        for row, res in zip(rows, reads):
            if res.error is not None:
                failed += 1
            else:
                pending.append((row, res))
                if len(pending) >= batch_size:
                    yield pending, failed, False
                    pending, failed = [], 0
            if stop is not None and stop.is_set():
                stopped = True
                reads.close()
                break
        yield pending, failed, stopped
