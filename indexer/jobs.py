"""Indexing runs on a background thread, one at a time, with progress to poll: shared by the HTTP API
(``indexer/api/``) and the app (``ui/``).

Each run builds its own :class:`~indexer.engine.Engine` (its own store connection and vectors), so the
Engine that serves searches keeps answering from the last committed generation and picks the new one
up as the run's checkpoints commit.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from retrieval.errors import PixqueryError

if TYPE_CHECKING:
    from indexer.engine import Engine

log = logging.getLogger("pixquery.jobs")


class JobRunning(PixqueryError):
    """An indexing run is already going (the API answers 409)."""


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

    def fraction(self) -> float:
        return 0.0 if not self.total else min(1.0, self.done / self.total)

    def to_dict(self) -> dict:
        return {"id": self.id, "folder": self.folder, "rebuild": self.rebuild, "running": self.running,
                "done": self.done, "total": self.total, "fraction": round(self.fraction(), 4),
                "started": self.started, "finished": self.finished, "summary": self.summary, "error": self.error}


class IndexJobs:
    """The indexing runs of one server or app: one at a time. ``generation`` counts finished runs (and
    :meth:`bump` calls), so a reader can tell that the index changed under it."""

    def __init__(self, build: Callable[[], Engine]) -> None:
        self.build = build
        self.lock = threading.Lock()
        self.current: IndexJob | None = None
        self.thread: threading.Thread | None = None
        self.generation = 0
        self._count = 0

    def start(self, folder: str, rebuild: bool = False, build: Callable[[], Engine] | None = None) -> IndexJob:
        """Start indexing ``folder`` with an Engine from ``build`` (default: this registry's); raises
        JobRunning while another run is going."""
        with self.lock:
            if self.current is not None and self.current.running:
                raise JobRunning(f"an indexing run of {self.current.folder} is already going")
            self._count += 1
            job = IndexJob(self._count, folder, rebuild)
            self.current = job
            self.thread = threading.Thread(target=self._run, args=(job, build or self.build),
                                           name="pixquery-index", daemon=True)
            self.thread.start()
            return job

    def _run(self, job: IndexJob, build: Callable[[], Engine]) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            with build() as engine:
                summary = engine.index(job.folder, rebuild=job.rebuild, on_progress=progress)
            job.summary = dict(summary.__dict__)
        except PixqueryError as exc:
            job.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged in full here
            log.error("indexing %s failed:\n%s", job.folder, traceback.format_exc())
            job.error = f"indexing failed unexpectedly ({type(exc).__name__}); see the server log"
        finally:
            with self.lock:
                job.finished = time.time()
                self.generation += 1

    def bump(self) -> None:
        """The index changed outside a run: readers load it again."""
        with self.lock:
            self.generation += 1

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)
