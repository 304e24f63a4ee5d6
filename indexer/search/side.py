"""Side threads: parts of one query that need nothing from each other run at once, on a second core.

Fused ranking (indexer/search/ranker.py) runs two things beside its main thread: the caption vector
search, while the image vector search runs, and the scorer (indexer/search/second_stage.py) on the
candidates the image search puts first, shared out among the side threads as soon as the search knows
them, while the main thread finishes the search, reads the pool's captions, keyword, vector and tag
signals and then runs the match head. Both are native code that releases the GIL (FAISS,
onnxruntime, PyTorch), so the threads really run at the same time. Reading what showing the results
needs is an :class:`Offer`: a side thread done with the scorer takes it while the main thread runs the
match head (native code too), or else the main thread runs it itself afterwards.

A process limited to one core runs nothing beside: :func:`parallel` is False, and callers then do the
work in order in their own thread (speculating there would only add work).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from retrieval.native.ort import usable_cores

MAX_SIDE_THREADS = 4

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _forget_in_child() -> None:
    """A forked child has none of its parent's threads: it starts its own side threads when it needs them."""
    global _executor, _lock
    _executor, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def parallel() -> bool:
    """Whether work handed to :func:`beside` runs at the same time as the caller."""
    return usable_cores() > 1


def side_workers() -> int:
    """How many side threads :func:`beside` runs work on at once (1 without a second core: none, the work runs
    in the caller). The caller keeps a core of its own: one more thread than there are cores only takes turns
    with the others (on 2 cores, the scorer shared by two side threads made fused queries slower:
    docs/BENCHMARKS.md)."""
    return min(MAX_SIDE_THREADS, usable_cores() - 1) if parallel() else 1


def beside(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """``fn(*args, **kwargs)`` on a side thread -> its Future. Without a second core it runs here, now,
    and the Future is already done (its result, or the exception it raised)."""
    if not parallel():
        done: Future = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for the result, as a thread would
            done.set_exception(exc)
        return done
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=side_workers(),
                                           thread_name_prefix="pixquery-side")
        return _executor.submit(fn, *args, **kwargs)


class Offer:
    """``fn(*args)`` run once, by whichever thread gets to it first: a side thread that comes free before the
    caller needs the result, or else the caller itself (:meth:`result` takes back a job no side thread has
    started). For small work that can fill a side thread's idle time but must never wait behind its queue."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._fn, self._args = fn, args
        self._job = beside(fn, *args)

    def result(self) -> Any:
        """The result (the exception ``fn`` raised, raised again), computed here if no side thread started it."""
        if self._job.cancel():  # still queued: nobody will run it now but this thread
            return self._fn(*self._args)
        return self._job.result()
