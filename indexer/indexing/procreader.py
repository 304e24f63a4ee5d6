"""Decoding worker processes for the reading stage (see ``reader.py``): read, hash, decode and resize
on other processes, so decoding uses every core instead of one interpreter's. :func:`reading` chooses
between them and reader threads.

Each worker writes the resized picture as raw uint8 (size, size, 3) into a slot of a shared buffer
(a file in ``/dev/shm`` when it has room, else in the temporary folder; the kernel's page cache keeps
it in memory) and sends back only the small facts (hash, size, EXIF date, error). The main process
copies each slot out as soon as it takes the result, in the order the jobs were given, and the model
stage normalises the pixels on the device (bit for bit what the threads' numpy preprocessing gives:
a test compares them). Jobs travel in chunks, so a worker's round trip costs one message per chunk.

Workers are started with ``forkserver`` (``spawn`` where there is none), never forked from the main
process, which runs PyTorch threads (and CUDA); they import only this module's light dependencies
(numpy, PIL), never torch. Content the index already holds (``known_hashes``) is only hashed: the
hashes go to the workers as a sorted array in a file they memory-map.
"""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from indexer.indexing.discover import FileEntry, hash_bytes
from indexer.indexing.reader import (
    Jobs, ReadResult, decode_error, read_bytes, read_in_order, unexpected_error,
)
from retrieval.errors import ImageDecodeError, PixqueryError
from retrieval.images import load_image, to_raw

CHUNK = 16  # files per message to a worker

#: the largest peak resident memory (KiB) any worker process of this process has reported (bench index)
worker_peak_rss_kb = 0


class ReaderError(PixqueryError):
    """A decoding worker process died (out of memory, killed): the run stops; what was checkpointed stays."""


@dataclass(frozen=True)
class PixelSpec:
    """What a worker makes of an image: raw uint8 (size, size, 3), normalised later with mean and std."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)

    @property
    def nbytes(self) -> int:
        return self.size * self.size * 3


# --- the worker side (runs in the worker processes) ---------------------------------------------------
_worker: dict = {}


def _init_worker(buffer: str, slots: int, spec: PixelSpec, known: str | None) -> None:
    _worker["slots"] = np.memmap(buffer, dtype=np.uint8, mode="r+", shape=(slots, *spec.shape))
    _worker["known"] = np.load(known, mmap_mode="r") if known else None
    _worker["spec"] = spec


def _is_known(content_hash: str) -> bool:
    known = _worker["known"]
    if known is None or not len(known):
        return False
    key = np.array([bytes.fromhex(content_hash)], dtype=known.dtype)
    i = int(np.searchsorted(known, key)[0])
    return i < len(known) and known[i] == key[0]


def _read_one(slot: int, path: str, entry: FileEntry | None) -> tuple:
    """-> (the entry with the stat of what was read, content hash, error, width, height, taken_at,
    whether pixels were written to ``slot``, seconds reading and hashing, seconds decoding and resizing):
    what ``reader.read_file`` finds, for the main process to rebuild its result."""
    if entry is not None and entry.problem is not None:
        return entry, None, entry.problem, 0, 0, None, False, 0.0, 0.0
    t0 = time.perf_counter()
    data, entry, error = read_bytes(path, entry)
    if error is not None:
        return entry, None, error, 0, 0, None, False, time.perf_counter() - t0, 0.0
    content_hash = hash_bytes(data)
    t1 = time.perf_counter()
    if _is_known(content_hash):
        return entry, content_hash, None, 0, 0, None, False, t1 - t0, 0.0
    try:
        decoded = load_image(data)
        _worker["slots"][slot] = to_raw(decoded.image, _worker["spec"].size)
    except ImageDecodeError as exc:
        return entry, content_hash, decode_error(exc), 0, 0, None, False, t1 - t0, time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - one odd picture never stops a run
        return entry, content_hash, unexpected_error(exc), 0, 0, None, False, t1 - t0, time.perf_counter() - t1
    return (entry, content_hash, None, decoded.width, decoded.height, decoded.taken_at, True, t1 - t0,
            time.perf_counter() - t1)


def _ready() -> int:
    return 0


def _read_chunk(jobs: list[tuple[int, str, FileEntry | None]]) -> tuple[list[tuple], int]:
    """-> the results of ``jobs``, and this worker's peak resident memory so far (KiB)."""
    return [_read_one(*job) for job in jobs], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- the main side -----------------------------------------------------------------------------------
def _buffer_folder(nbytes: int) -> str | None:
    """``/dev/shm`` when it has room for ``nbytes`` twice over, else None (the temporary folder)."""
    shm = Path("/dev/shm")
    try:
        return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 2 * nbytes else None
    except OSError:
        return None


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


class ProcessReader:
    """``workers`` decoding processes and ``window`` shared slots (files decoded ahead of the model stage)."""

    def __init__(self, workers: int, spec: PixelSpec, known_hashes: frozenset[str] | None, window: int) -> None:
        self.spec, self.slots = spec, max(int(window), CHUNK)
        self._dir = tempfile.mkdtemp(prefix="pixquery-read-", dir=_buffer_folder(self.slots * spec.nbytes))
        buffer = str(Path(self._dir) / "pixels.u8")
        self._pixels = np.memmap(buffer, dtype=np.uint8, mode="w+", shape=(self.slots, *spec.shape))
        known = None
        if known_hashes:
            known = str(Path(self._dir) / "known.npy")
            np.save(known, np.sort(np.array([bytes.fromhex(h) for h in known_hashes], dtype="S32")))
        self._pool = ProcessPoolExecutor(max(1, workers), mp_context=_context(), initializer=_init_worker,
                                         initargs=(buffer, self.slots, spec, known))
        self._start(max(1, workers))

    def _start(self, workers: int) -> None:
        """Start every worker now, with the main script hidden: a new process imports the ``__main__``
        module it is given, and a user's script that indexes without an ``if __name__ == "__main__"``
        guard would index again inside each worker. A module run with ``-m`` is imported by name (its
        guard holds) and stays visible."""
        main = sys.modules.get("__main__")
        hide = main is not None and getattr(main, "__spec__", None) is None and hasattr(main, "__file__")
        saved = main.__dict__.pop("__file__") if hide else None
        try:
            for fut in [self._pool.submit(_ready) for _ in range(workers)]:
                fut.result()
        except BrokenProcessPool as exc:
            self.close()
            raise ReaderError(f"the decoding worker processes could not start ({exc}); use --readers threads") \
                from None
        finally:
            if hide:
                main.__file__ = saved

    def __enter__(self) -> "ProcessReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        del self._pixels
        shutil.rmtree(self._dir, ignore_errors=True)

    def read_in_order(self, jobs: Jobs) -> Iterator[ReadResult]:
        """Read ``(path, entry)`` jobs, yielding results in the order given."""
        free = list(range(self.slots - 1, -1, -1))
        pending: deque[tuple[Future, list[tuple[int, str, FileEntry | None]]]] = deque()
        chunk: list[tuple[int, str, FileEntry | None]] = []

        def submit() -> None:
            pending.append((self._pool.submit(_read_chunk, list(chunk)), list(chunk)))
            chunk.clear()

        try:
            for path, entry in jobs:
                while not free:
                    if chunk:
                        submit()
                    yield from self._take(pending.popleft(), free)
                chunk.append((free.pop(), path, entry))
                if len(chunk) >= CHUNK:
                    submit()
            if chunk:
                submit()
            while pending:
                yield from self._take(pending.popleft(), free)
        finally:  # closed early (a run stopped): chunks not started yet are dropped
            for future, _ in pending:
                future.cancel()

    def _take(self, item: tuple[Future, list], free: list[int]) -> Iterator[ReadResult]:
        import torch

        global worker_peak_rss_kb
        future, jobs = item
        try:
            results, peak_kb = future.result()
        except BrokenProcessPool as exc:
            raise ReaderError(f"a decoding worker process died ({exc}); the images checkpointed so far are "
                              f"indexed: run the same command again to go on (or use --readers threads)") from None
        worker_peak_rss_kb = max(worker_peak_rss_kb, peak_kb)
        out = []
        for (slot, _, _), (entry, content_hash, error, width, height, taken_at, decoded, read_s, decode_s) \
                in zip(jobs, results):
            res = ReadResult(entry, content_hash=content_hash, error=error, width=width, height=height,
                             taken_at=taken_at, read_s=read_s, decode_s=decode_s)
            if decoded:
                res.pixels = torch.from_numpy(np.array(self._pixels[slot]))  # a copy: the slot is reused
            free.append(slot)
            out.append(res)
        return iter(out)


@contextmanager
def reading(models: "ImageModels", workers: int, known_hashes: frozenset[str] | None, window: int,
            processes: bool = False) -> Iterator[Callable[[Jobs], Iterator[ReadResult]]]:
    """A function that reads jobs in order: on ``workers`` decoding processes when ``processes`` is set
    and the models take raw pixels (:meth:`ImageModels.pixel_spec`), else on ``workers`` threads."""
    spec = models.pixel_spec() if processes else None
    if spec is not None:
        with ProcessReader(workers, spec, known_hashes, window) as reader:
            yield reader.read_in_order
        return
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield lambda jobs: read_in_order(pool, jobs, models, known_hashes, window)
