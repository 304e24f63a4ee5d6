"""One writer per index: an OS lock on ``<index folder>/write.lock``.

Whatever writes an index (indexing, ``recaption``, ``doctor --repair``, ``--rebuild``) holds the lock
for the whole run; searches never take it (they read the last committed checkpoint, see
``bundle.py``), and only the holder deletes vector files. The lock is ``fcntl.flock`` on an open file:
the kernel releases it when the process ends, however it ends (a ``kill -9`` leaves nothing stuck),
and a second process that asks for it either waits or gets :class:`IndexBusyError` naming the holder.
The file itself stays (deleting a lock file that someone holds would let a third process in).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import IO

from indexer.errors import IndexBusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (documented in docs/RELIABILITY.md)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = "write.lock"


class WriteLock:
    """The write lock of the index in ``folder``; not re-entrant (one per Engine)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fh: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def holder(self) -> str:
        """Who holds (or last held) the lock, as its file says: "pid 123 (pixquery index ...) since ..."."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return text or "another process"

    def _try(self, fh: IO[str]) -> bool:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def acquire(self, wait: bool | float = False, poll: float = 0.2) -> None:
        """Take the lock. ``wait``: False: raise :class:`IndexBusyError` at once if another process holds
        it; True: wait as long as it takes; a number: wait that many seconds, then raise."""
        if self._fh is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # never truncated before we hold it: the holder's note stays readable
        if fcntl is None:
            self._fh = fh
            return
        try:
            if not self._try(fh):
                if wait is False:
                    raise IndexBusyError(self._busy_message())
                log.warning("waiting for %s to finish writing this index", self.holder())
                deadline = None if wait is True else time.monotonic() + float(wait)
                while not self._try(fh):
                    if deadline is not None and time.monotonic() > deadline:
                        raise IndexBusyError(self._busy_message(waited=float(wait)))
                    time.sleep(poll)
        except BaseException:
            fh.close()
            raise
        fh.seek(0)
        fh.truncate()
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:4]))
        fh.write(f"pid {os.getpid()} ({command}) since {datetime.now().isoformat(timespec='seconds')}\n")
        fh.flush()
        self._fh = fh

    def _busy_message(self, waited: float | None = None) -> str:
        after = f" after waiting {waited:g} s" if waited is not None else ""
        return (f"another pixquery process is writing the index in {self.path.parent}{after}: {self.holder()}. "
                f"Wait for it to finish, or pass --wait to wait for it; searches keep working meanwhile")

    def release(self) -> None:
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        try:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        finally:
            fh.close()

    def __enter__(self) -> "WriteLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
