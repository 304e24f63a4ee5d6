"""The app's long-lived objects: the Engine (models and index, loaded once) and background indexing jobs.

``engine_factory`` builds every Engine the app uses (the one that serves searches and one per
indexing job). It reads the usual configuration (``PIXQUERY_DB``, ``PIXQUERY_CACHE_DIR``, ...,
which ``pixquery ui`` sets from its flags); tests replace it with one that injects tiny models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import streamlit as st

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.jobs import IndexJobs
from retrieval.errors import PixqueryError

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
    """Load the encoder, the vectors and the keyword statistics now rather than on the first search; a
    problem is kept, not raised."""
    if not engine.exists:
        return None
    try:
        engine.image_vectors([])  # opens the store, checks the encoder, loads the vector files
        engine.encoder.encode_texts(["warm up"])
        engine.warm_keywords()
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
@st.cache_resource
def jobs() -> IndexJobs:
    """The app's indexing runs (one at a time, shared by every browser session), each with an Engine from
    ``engine_factory`` as it is when the run starts."""
    return IndexJobs(lambda: engine_factory())
