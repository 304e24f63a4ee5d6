"""The app's long-lived objects: the Engine (models and index, loaded once) and background indexing jobs.

``engine_factory`` builds every Engine the app uses (the one that serves searches and one per
indexing job). It reads the usual configuration (``PIXQUERY_DB``, ``PIXQUERY_CACHE_DIR``, ...,
which ``pixquery ui`` sets from its flags); tests replace it with one that injects tiny models.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import streamlit as st

from indexer.config import EngineConfig
from indexer.engine import Engine
from retrieval.errors import PixqueryError

log = logging.getLogger("pixquery.ui")

ENV_READ_ONLY = "PIXQUERY_UI_READ_ONLY"  # "1": no indexing from the app (pixquery ui --read-only)


ENV_OFFLINE = "PIXQUERY_OFFLINE"  # "1": never download model weights (pixquery ui --offline)


def default_engine_factory() -> Engine:
    offline = os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes")
    return Engine(EngineConfig(progress=False, offline=offline))


engine_factory: Callable[[], Engine] = default_engine_factory


def read_only() -> bool:
    return os.environ.get(ENV_READ_ONLY, "").strip().lower() in ("1", "true", "yes")


@dataclass
class Loaded:
    """The Engine that serves searches, and the problem found while loading it (shown on the page)."""

    engine: Engine
    problem: PixqueryError | None = None
    generation: int = 0
    stamp: int | None = None  # the vector generation when loaded: a change means another process indexed


@st.cache_resource(show_spinner="Loading the models and the index...", max_entries=2)
def _loaded(generation: int) -> Loaded:
    """One Engine per index generation (a finished indexing job bumps it); models and vectors load once."""
    engine = engine_factory()
    problem = warm_up(engine)
    return Loaded(engine, problem, generation, _stamp(engine))


def warm_up(engine: Engine) -> PixqueryError | None:
    """Load the encoder and the vectors now rather than on the first search; a problem is kept, not raised."""
    if not engine.exists:
        return None
    try:
        engine.image_vectors([])  # opens the store, checks the encoder, loads the vector files
        engine.encoder.encode_texts(["warm up"])
    except PixqueryError as exc:
        return exc
    return None


def _stamp(engine: Engine) -> int | None:
    """The index's committed vector generation (None before there is an index)."""
    try:
        return engine.generation if engine.exists else None
    except PixqueryError:
        return None


def _finished_elsewhere(engine: Engine) -> bool:
    """The index changed on disk and the run that changed it has finished (not one still writing)."""
    try:
        last = engine.stats()["last_run"]
    except PixqueryError:
        return False
    return last is not None and last["finished_at"] is not None


def loaded() -> Loaded:
    """The current Engine; a fresh one after an indexing run (the app's own, or ``pixquery index`` elsewhere)."""
    registry = jobs()
    state = _loaded(registry.generation)
    idle = registry.current is None or not registry.current.running
    if idle and _stamp(state.engine) != state.stamp and _finished_elsewhere(state.engine):
        registry.bump()
        state = _loaded(registry.generation)
    return state


# --- background indexing -------------------------------------------------------------------------
@dataclass
class IndexJob:
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


class Jobs:
    """The app's indexing jobs (one at a time, shared by every browser session)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: IndexJob | None = None
        self.generation = 0  # bumped when a job finishes: sessions then load a fresh Engine
        self.thread: threading.Thread | None = None

    def start(self, folder: str, rebuild: bool = False, factory: Callable[[], Engine] | None = None) -> IndexJob:
        with self.lock:
            if self.current is not None and self.current.running:
                raise RuntimeError("an indexing job is already running")
            job = IndexJob(folder=folder, rebuild=rebuild)
            self.current = job
            build = factory or engine_factory
            self.thread = threading.Thread(target=self._run, args=(job, build), name="pixquery-index", daemon=True)
            self.thread.start()
            return job

    def _run(self, job: IndexJob, build: Callable[[], Engine]) -> None:
        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total

        try:
            with build() as engine:  # its own Engine: own store connection, own vectors
                summary = engine.index(job.folder, rebuild=job.rebuild, on_progress=progress)
            job.summary = {k: v for k, v in summary.__dict__.items()}
        except PixqueryError as exc:
            job.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported on the page, logged in full on the server
            log.error("indexing %s failed:\n%s", job.folder, traceback.format_exc())
            job.error = f"indexing failed unexpectedly ({type(exc).__name__}: {exc}); see the server log"
        finally:
            with self.lock:
                job.finished = time.time()
                self.generation += 1

    def bump(self) -> None:
        """The index changed: every session loads a fresh Engine on its next run."""
        with self.lock:
            self.generation += 1

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


@st.cache_resource
def jobs() -> Jobs:
    return Jobs()
