"""Indexing runs started through the API: one at a time, on a thread, with progress to poll.

Each run uses its own :class:`~indexer.engine.Engine` (its own store connection and vectors), so the
Engine that serves searches keeps answering from the last committed generation and picks the new
one up when the run's checkpoints commit.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from indexer.engine import Engine
from retrieval.errors import PixqueryError

log = logging.getLogger("pixquery.api")


class JobRunning(PixqueryError):
    """An indexing run is already going (HTTP 409)."""


@dataclass
class IndexJob:
    id: int
    folder: str
    rebuild: bool = False
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    summary: dict | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.finished is None

    def to_dict(self) -> dict:
        return {"id": self.id, "folder": self.folder, "rebuild": self.rebuild, "running": self.running,
                "done": self.done, "total": self.total, "fraction": round(self.done / self.total, 4) if self.total else 0.0,
                "started": self.started, "finished": self.finished, "summary": self.summary, "error": self.error}


class IndexJobs:
    """The server's indexing runs (one at a time)."""

    def __init__(self, build: Callable[[], Engine]) -> None:
        self.build = build
        self.lock = threading.Lock()
        self.current: IndexJob | None = None
        self.thread: threading.Thread | None = None
        self._count = 0

    def start(self, folder: str, rebuild: bool = False) -> IndexJob:
        with self.lock:
            if self.current is not None and self.current.running:
                raise JobRunning(f"an indexing run of {self.current.folder} is already going; poll /api/index/job")
            self._count += 1
            job = IndexJob(self._count, folder, rebuild)
            self.current = job
            self.thread = threading.Thread(target=self._run, args=(job,), name="pixquery-api-index", daemon=True)
            self.thread.start()
            return job

    def _run(self, job: IndexJob) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            with self.build() as engine:
                summary = engine.index(job.folder, rebuild=job.rebuild, on_progress=progress)
            job.summary = dict(summary.__dict__)
        except PixqueryError as exc:
            job.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the client, logged in full here
            log.error("indexing %s failed:\n%s", job.folder, traceback.format_exc())
            job.error = f"indexing failed unexpectedly ({type(exc).__name__}); see the server log"
        finally:
            job.finished = time.time()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
