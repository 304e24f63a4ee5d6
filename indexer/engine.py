"""The composition root: builds the models, the store and the vectors from an :class:`EngineConfig`
and hands them to the rooms that do the work (``indexing/``, ``search/``). It wires; it does not index
or rank itself.

``Engine`` is the Python API that the CLI and the Streamlit app both use::

    from indexer.engine import Engine, EngineConfig
    with Engine(EngineConfig(index_dir="~/photos-index")) as engine:
        engine.index("~/Pictures")
        for hit in engine.search("dog on a park bench", k=5):
            print(hit.score, hit.path)
"""

from __future__ import annotations

import logging
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from captioning.captioner import Captioner, TextScorer
from indexer import inspection, provenance
from indexer.config import EngineConfig
from indexer.errors import IndexNotFoundError, InputError, PixqueryError
from indexer.indexing.writer import BatchWriter
from indexer.engine_models import EngineModels
from indexer.query_models import QueryModels
from indexer.search.duplicates import DuplicateGroup
from indexer.search.ranker import Ranker
from indexer.search.searcher import Searcher, SearchHit, check_id
from indexer.storage import legacy
from indexer.storage.ann import SearchParams
from indexer.storage.bundle import VectorBundle
from indexer.storage.filters import Filters
from indexer.storage.lock import WriteLock
from indexer.storage.doctor import Findings, diagnose
from indexer.storage.repair import reconcile
from indexer.storage.repair import repair as repair_index
from indexer.storage.schema import ImageRow
from indexer.storage.store import Store, safe_url
from indexer.tags import EngineTags, Tagger
from retrieval.encoder import EncoderInfo, JointEncoder
from retrieval.query import FusionWeights

if TYPE_CHECKING:  # indexing and the PyTorch models load when used: a text search may not import torch
    from indexer.indexing.pipeline import IndexSummary
    from retrieval.native.matcher import Matcher

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "OpenIndex", "SearchHit", "SearchParams"]


@dataclass
class OpenIndex:
    """An index as committed: its store and the vectors of the generation the store names."""

    store: Store
    vectors: VectorBundle


class Engine(EngineModels, EngineTags):
    """One index (a folder of vector files and a metadata database, see EngineConfig) and the models to use it.

    Models are built on first use from the config, unless injected (tests, the app, evaluations).
    Recaption, retag, tags and caption confidence: indexer/tags.py.
    """

    def __init__(self, config: EngineConfig | None = None, encoder: JointEncoder | None = None,
                 captioner: Captioner | None = None, scorer: TextScorer | None = None,
                 tagger: Tagger | None = None) -> None:
        self.config = config or EngineConfig()
        self._encoder, self._captioner, self._scorer = encoder, captioner, scorer
        self._encoder_injected = encoder is not None
        self._injected = any(m is not None for m in (encoder, captioner, scorer, tagger))
        self._lite: QueryModels | None = None  # torch-free query models (indexer/query_models.py)
        self._lite_checked = False
        self._matcher: Matcher | None = None
        self._matcher_checked = False
        self._init_tags(tagger)
        self._store: Store | None = None
        self._vectors: VectorBundle | None = None
        self._lock: WriteLock | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._close_index()
        if self._lock is not None:
            self._lock.release()

    def _close_index(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._vectors = None

    # --- the write lock (indexer/storage/lock.py) ----------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the index's write lock for the block (released after it unless it was held before).
        Another process writing the index: :class:`~indexer.errors.IndexBusyError`, or a wait
        (``EngineConfig.wait_for_lock``)."""
        held = self._lock is not None and self._lock.held
        self._take_lock()
        try:
            yield
        finally:
            if not held:
                self._release_lock()

    def _take_lock(self) -> None:
        if self._lock is None:
            self._lock = WriteLock(self.config.index_dir)
        self._lock.acquire(wait=self.config.wait_for_lock)
        if self._vectors is not None:
            self._vectors.owner = True

    def _release_lock(self) -> None:
        if self._vectors is not None:
            self._vectors.owner = False
        if self._lock is not None:
            self._lock.release()

    @property
    def exists(self) -> bool:
        return Store.exists(self.config.url)

    def _store_for(self, create: bool) -> Store:
        if self._store is None:
            if not create and not self.exists:
                raise IndexNotFoundError(
                    f"no index at {safe_url(self.config.db_url) if self.config.db_url else self.config.index_dir}; "
                    f"build one with: pixquery index "
                    f"FOLDER (or point --db / PIXQUERY_DB at an existing index)")
            self.config.index_dir.mkdir(parents=True, exist_ok=True)
            self._store = Store(self.config.url)
        return self._store

    def store(self) -> Store:
        """The index's metadata store (IndexNotFoundError when there is no index)."""
        return self._store_for(create=False)

    def open(self, create: bool = False, repair: bool = False) -> OpenIndex:
        """The index as last committed (``create``: a new, empty one if there is none), after checking
        that the configured encoder may use it. Vectors load once and reload when another process
        commits a newer generation. ``repair``: an approximate search file that is missing or damaged is
        left out (rebuilt at the next commit) instead of raising ``AnnFileError`` (what writers do)."""
        store = self._store_for(create)
        lite = self._lite if self._encoder is None and self._scorer is None else None
        provenance.check_encoder(store, self.config.encoder, lambda: (lite.encoder if lite else self.encoder).info,
                                 self._encoder_injected)
        if self._vectors is None or self._vectors.stale(store):
            info = provenance.built_with(store)
            scorer = lite.scorer if lite else self.scorer
            memory_dim = int(np.prod(scorer.memory_shape)) if scorer is not None else None
            self._vectors = VectorBundle.open(self.config.vectors_dir, store, info.dim if info else self.encoder.dim,
                                              memory_dim, policy=self.config.ann_policy, repair=repair)
        return OpenIndex(store, self._vectors)

    @property
    def index_info(self) -> EncoderInfo | None:
        """Provenance of the encoder that built this index (None for a new, empty index)."""
        return provenance.built_with(self._store_for(create=False))

    def drop(self) -> None:
        """Delete this index (its database's tables or file, and its vector files; never any image)."""
        with self.writing():
            self._drop()

    def _drop(self) -> None:
        if self.exists:
            store = self._store_for(create=False)
            if self.config.db_file is None:
                store.drop_all()
        self._close_index()
        db = self.config.db_file
        if db is not None:
            for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                path.unlink(missing_ok=True)
        shutil.rmtree(self.config.vectors_dir, ignore_errors=True)
        if self.config.index_dir.is_dir():
            legacy.remove_leftovers(self.config.index_dir)

    # --- writing -----------------------------------------------------------------------------
    def writer(self) -> BatchWriter:
        """Everything that writes this index goes through one of these (see indexing/writer.py): opens
        (creating) the index, repairs what an older version left inconsistent, and adopts the scorer.
        Takes the index's write lock (held until :meth:`close`, or the end of :meth:`writing`)."""
        self.config.index_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        if self._vectors is not None and not self._vectors.repair:
            self._vectors = None  # a writer opens with repair (a damaged approximate index is rebuilt)
        index = self.open(create=True, repair=True)
        index.vectors.owner = True
        meta = provenance.record_models(self.encoder.info, self.captioner.info if self.captioner else None,
                                        index.store)
        meta.update(provenance.record_tagging(self.tagger, self.confidence_model))
        if meta:
            index.store.set_meta(meta)
        reconcile(index.store, index.vectors)
        provenance.adopt_scorer(index.store, index.vectors, self.scorer)
        index.vectors.collect_garbage()
        return BatchWriter(index.store, index.vectors, self.config.checkpoint_every)

    def index(self, root: str | Path, rebuild: bool = False,
              on_progress: Callable[[int, int], None] | None = None,
              stop: threading.Event | None = None) -> IndexSummary:
        """Index ``root`` incrementally (``rebuild``: drop this index first and start over).

        ``on_progress(done, total)`` is called from this thread as files are processed (the app's progress bar).
        ``stop``: when set (Ctrl-C), the run embeds the batch in flight, commits, and returns a summary with
        ``interrupted`` true; what it did is kept, and the next run carries on from there.
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InputError(f"folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
        with self.writing():
            if rebuild:
                self._drop()
            from indexer.indexing.pipeline import Indexer

            writer = self.writer()
            indexer = Indexer(writer.store, writer.vectors, self.models(), batch_size=self.batch_size,
                              workers=self.workers, checkpoint_every=self.config.checkpoint_every,
                              progress=self.config.progress, on_progress=on_progress, stop=stop,
                              processes=self.read_processes)
            summary = indexer.run(root)
        self.prepare_fast_queries()
        return summary

    # --- consistency -------------------------------------------------------------------------
    def doctor(self, repair: bool = False) -> tuple[Findings, list[str], list[str]]:
        """Check this index under its write lock (indexer/storage/doctor.py); ``repair``: fix what can be fixed
        and check again. Returns (findings after any repair, fixed, not fixed). Needs a model only for captions."""
        store = self._store_for(create=False)
        with self.writing():
            findings, vectors = diagnose(store, self.config.vectors_dir)
            if not repair or findings.consistent and not findings.stray_files:
                return findings, [], []
            if vectors is None:
                return findings, [], ["the index records no encoder, so its vectors cannot be read: rebuild it "
                                      "with pixquery index FOLDER --rebuild"]
            vectors.owner = True
            embed = self._caption_embedder() if findings.missing_caption_vectors else None
            fixed, not_fixed = repair_index(store, vectors, findings, embed)
            self._vectors = None  # read again from what is committed now
            after, _ = diagnose(store, self.config.vectors_dir)
        return after, fixed, not_fixed

    def _caption_embedder(self) -> Callable[[list[str]], np.ndarray] | None:
        try:
            return self.encoder.encode_texts
        except PixqueryError as exc:
            log.warning("cannot embed captions (%s)", exc)
            return None

    # --- search ------------------------------------------------------------------------------
    def ranker(self) -> Ranker:
        """The ranker over this index (the likelihood and match signals only when the stored memories
        are the scorer's; the tags signal only when the index has tags). Text queries are answered by the
        torch-free models where they are ready (indexer/query_models.py)."""
        lite = self._lite_models()
        index = self.open()
        tagger = (lite.tagger if lite else self.tagger) if index.store.get_meta("tagger") else None
        scorer = lite.scorer if lite else self.scorer
        if not provenance.scorer_matches(index.store, scorer):
            return Ranker(index.store, index.vectors, tagger=tagger)
        return Ranker(index.store, index.vectors, scorer, lite.matcher if lite else self.matcher, tagger)

    def searcher(self) -> Searcher:
        ranker, lite = self.ranker(), self._lite_models()
        return Searcher(ranker, lite.encoder if lite else self.encoder, pool=self.config.pool,
                        depth=self.config.rerank_depth, confidence_threshold=provenance.confidence_threshold(ranker.store))

    def search(self, text: str | None = None, image: str | Path | None = None, k: int = 10, mode: str = "fused",
               weights: FusionWeights | None = None, filters: Filters | None = None,
               threshold: float | None = None, positive_ids: Sequence[int] = (),
               negative_ids: Sequence[int] = (), params: SearchParams | None = None) -> list[SearchHit]:
        """Top ``k`` images for a text query and/or an example image, best first.

        ``mode``: one of ``retrieval.query.MODES`` (``fused`` combines every signal, see
        indexer/search/ranker.py); ``weights``: the fused mode's weights (default: tuned on Flickr8k dev);
        ``filters``: only images that match (``Filters(where=("price<50",))`` for catalogue fields);
        ``threshold``: leave out hits whose score is below it; ``positive_ids`` / ``negative_ids``:
        relevance feedback, images marked good / bad (the query moves towards the good and away from the
        bad, and near copies of the bad are left out; good images alone, without text, also work);
        ``params``: knobs of the approximate vector search of large indexes (``SearchParams(nprobe=...,
        refine=..., exact=...)``; default: the index's own, tuned when it was built).
        """
        return self.searcher().search(text, image, k, mode, weights, filters, threshold, positive_ids, negative_ids,
                                      params)

    def explain(self, hits: list[SearchHit], text: str | None, mode: str = "fused", filters: Filters | None = None,
                positive_ids: Sequence[int] = (), negative_ids: Sequence[int] = ()) -> list:
        """A readable reason for each of ``hits`` of a search with these arguments
        (:class:`indexer.search.explain.Explanation`: matched words, what each signal added, filters)."""
        from indexer.search.explain import explain

        catalogue = self._store_for(create=False).catalogue_texts([h.id for h in hits])
        return explain(hits, text, mode, filters, catalogue, positive_ids, negative_ids)

    def search_vectors(self, queries: np.ndarray, k: int, mode: str = "image",
                       params: SearchParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rank the index for (Q, dim) query vectors by one vector signal -> (scores, ids), each (Q, <=k)."""
        if mode not in ("image", "caption"):
            raise InputError(f"search_vectors ranks by image or caption vectors, not {mode!r}")
        vectors = self.open().vectors
        return (vectors.images if mode == "image" else vectors.captions).search(queries, k, params=params)

    def more_like_this(self, image: int | str | Path, k: int = 10, filters: Filters | None = None) -> list[SearchHit]:
        """The ``k`` indexed images most like indexed ``image`` (an id or a path), itself left out, best first."""
        store, vectors = self._opened()
        return Searcher(Ranker(store, vectors, tagger=self._index_tagger(store)), self.encoder,
                        confidence_threshold=provenance.confidence_threshold(store)).more_like_this(image, k, filters)

    def duplicates(self, threshold: float = 0.95, k: int = 10) -> list[DuplicateGroup]:
        """Groups of exact copies (same bytes) and near copies (image similarity >= ``threshold``).

        ``k``: neighbours looked at per image; summarise the groups with ``indexer.search.duplicates.summarize``.
        """
        return Searcher(Ranker(*self._opened()), self.encoder).duplicates(threshold, k)

    def warm_keywords(self) -> None:
        """Read the keyword index's term statistics now, so that no search waits for them (0.27 s at a
        million captions): what a long-lived process (the API, the app) does when it starts."""
        keywords = self.store().keywords
        if keywords is not None:
            keywords.warm()

    def _opened(self) -> tuple[Store, VectorBundle]:
        index = self.open()
        return index.store, index.vectors

    # --- inspection --------------------------------------------------------------------------
    def stats(self) -> dict:
        """What is in the index and which models made it (see indexer/inspection.py)."""
        return inspection.stats(self._store_for(create=False), self.config)

    def rows(self, filters: Filters | None = None) -> list[ImageRow]:
        """Every indexed image's row, by id (only the images that pass ``filters`` when given)."""
        store = self._store_for(create=False)
        ids = store.filter_ids(filters) if filters is not None else None
        if ids is None:
            return sorted(store.all_images(), key=lambda r: r.id)
        found = store.images_by_ids(ids.tolist())
        return [found[i] for i in sorted(found)]

    def paths(self) -> dict[int, str]:
        """{id: path} of every indexed image."""
        return {r.id: r.path for r in self._store_for(create=False).all_images()}

    def image_vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored image embeddings of ``ids`` -> (n, dim); InputError for an id that has none."""
        ids = np.asarray([check_id(i) for i in np.asarray(ids).reshape(-1).tolist()], dtype=np.int64)
        try:
            return self.open().vectors.images.reconstruct(ids)
        except KeyError as exc:
            raise InputError(f"{exc.args[0]} in this index") from None

    def image(self, id: int) -> ImageRow | None:
        """Everything the index holds about image ``id`` (None when no such id is indexed); InputError
        for anything that is not an id (a string, a path, a float, a negative or oversized number)."""
        row_id = check_id(id)
        return self._store_for(create=False).images_by_ids([row_id]).get(row_id)

    # --- catalogue metadata --------------------------------------------------------------------
    @property
    def catalogue(self) -> inspection.Catalogue:
        """Imported catalogue fields (SKU, price, ...): import, list, look up, drop (indexer/inspection.py)."""
        return inspection.Catalogue(self._store_for(create=False))

    def skipped_files(self) -> list[dict]:
        return [{"path": s.path, "reason": s.reason} for s in self._store_for(create=False).skipped()]

    @property
    def generation(self) -> int:
        """The vector generation last committed (changes whenever an indexing checkpoint commits)."""
        return int(self._store_for(create=False).get_meta("vector_generation") or 0)
