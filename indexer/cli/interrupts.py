"""Ctrl-C during a long write: the first one asks the run to stop after the batch in flight (it commits
what it did and the command exits 130); a second one stops at once (the last checkpoint is kept)."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def stop_on_interrupt(what: str = "the current batch") -> Iterator[threading.Event]:
    """An event that SIGINT (Ctrl-C) and SIGTERM set, for the block; the previous handlers come back after.
    Outside the main thread (where Python cannot handle signals) the event is simply never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\npixquery: stopping after {what} (press Ctrl-C again to stop at once)", file=sys.stderr,
              flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
