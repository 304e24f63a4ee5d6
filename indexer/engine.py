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

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from captioning.captioner import Captioner, TextScorer
from indexer import provenance
from indexer.config import EngineConfig
from indexer.errors import IndexNotFoundError, InputError
from indexer.indexing.models import ImageModels
from indexer.indexing.pipeline import Indexer, IndexSummary
from indexer.indexing.recaption import recaption
from indexer.indexing.retag import retag
from indexer.indexing.writer import BatchWriter
from indexer.search.describe import ImageDescription
from indexer.search.duplicates import DuplicateGroup
from indexer.search.ranker import Ranker
from indexer.search.searcher import Searcher, SearchHit
from indexer.storage import legacy
from indexer.storage.bundle import VectorBundle
from indexer.storage.filters import Filters
from indexer.storage.repair import reconcile
from indexer.storage.schema import ImageRow
from indexer.storage.store import Store
from retrieval.encoder import EncoderInfo, GridEncoder, JointEncoder
from retrieval.native.matcher import Matcher
from retrieval.query import FusionWeights
from retrieval.tagging import Tag, Tagger

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "OpenIndex", "SearchHit"]


@dataclass
class OpenIndex:
    """An index as committed: its store and the vectors of the generation the store names."""

    store: Store
    vectors: VectorBundle


class Engine:
    """One index (a folder of vector files and a metadata database, see EngineConfig) and the models to use it.

    Models are built on first use from the config, unless injected (tests, the app, evaluations).
    """

    def __init__(self, config: EngineConfig | None = None, encoder: JointEncoder | None = None,
                 captioner: Captioner | None = None, scorer: TextScorer | None = None,
                 tagger: Tagger | None = None) -> None:
        self.config = config or EngineConfig()
        self._encoder, self._captioner, self._scorer = encoder, captioner, scorer
        self._encoder_injected = encoder is not None
        self._matcher: Matcher | None = None
        self._matcher_checked = False
        self._tagger: Tagger | None = tagger
        self._tagger_checked = tagger is not None
        self._confidence = None
        self._store: Store | None = None
        self._vectors: VectorBundle | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._vectors = None

    @property
    def exists(self) -> bool:
        return Store.exists(self.config.url)

    def _store_for(self, create: bool) -> Store:
        if self._store is None:
            if not create and not self.exists:
                raise IndexNotFoundError(
                    f"no index at {self.config.db_url or self.config.index_dir}; build one with: pixquery index "
                    f"FOLDER (or point --db / PIXQUERY_DB at an existing index)")
            self.config.index_dir.mkdir(parents=True, exist_ok=True)
            self._store = Store(self.config.url)
        return self._store

    def open(self, create: bool = False) -> OpenIndex:
        """The index as last committed (``create``: a new, empty one if there is none), after checking
        that the configured encoder may use it. Vectors load once and reload when another process
        commits a newer generation."""
        store = self._store_for(create)
        provenance.check_encoder(store, self.config.encoder, lambda: self.encoder.info, self._encoder_injected)
        if self._vectors is None or self._vectors.stale(store):
            info = provenance.built_with(store)
            scorer = self.scorer
            memory_dim = int(np.prod(scorer.memory_shape)) if scorer is not None else None
            self._vectors = VectorBundle.open(self.config.vectors_dir, store, info.dim if info else self.encoder.dim,
                                              memory_dim, self.config.index_type)
        return OpenIndex(store, self._vectors)

    @property
    def index_info(self) -> EncoderInfo | None:
        """Provenance of the encoder that built this index (None for a new, empty index)."""
        return provenance.built_with(self._store_for(create=False))

    def drop(self) -> None:
        """Delete this index (its database's tables or file, and its vector files; never any image)."""
        if self.exists:
            store = self._store_for(create=False)
            if self.config.db_file is None:
                store.drop_all()
        self.close()
        db = self.config.db_file
        if db is not None:
            for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                path.unlink(missing_ok=True)
        shutil.rmtree(self.config.vectors_dir, ignore_errors=True)
        if self.config.index_dir.is_dir():
            legacy.remove_leftovers(self.config.index_dir)

    # --- models ------------------------------------------------------------------------------
    def _device(self):  # noqa: ANN202 - torch.device
        from retrieval.device import resolve_device

        return resolve_device(self.config.device)

    @property
    def encoder(self) -> JointEncoder:
        if self._encoder is None:
            from retrieval.factory import create_encoder

            name = self.config.encoder
            if name is None:
                built = self.index_info if self.exists else None
                name = built.name if built else self.config.default_encoder
            self._encoder = create_encoder(name, device=self._device(), cache_dir=self.config.cache_dir / "models",
                                           offline=self.config.offline)
        return self._encoder

    def build_captioner(self, name: str) -> Captioner:
        """The captioner called ``name``, on this engine's device and cache (the one place captioners are built)."""
        from captioning.factory import create_captioner

        return create_captioner(name, device=self._device(), cache_dir=self.config.cache_dir / "models",
                                offline=self.config.offline)

    @property
    def captioner(self) -> Captioner | None:
        """The captioner for new images (None when captions are switched off). A native captioner beside
        the native encoder never loads its own tower: the model stage hands it the encoder's grid."""
        if self._captioner is None and self.config.captioner:
            self._captioner = self.build_captioner(self.config.captioner)
        return self._captioner

    @property
    def scorer(self) -> TextScorer | None:
        """The caption decoder that rates query text against images (None: off, or the encoder has no grid)."""
        if self._scorer is None and self.config.scorer and isinstance(self.encoder, GridEncoder):
            scorer = self.build_captioner(self.config.scorer)
            if not isinstance(scorer, TextScorer):
                raise InputError(f"{self.config.scorer} cannot rate text against images; the scorer must be "
                                 f"a native captioner (or none)")
            self._scorer = scorer
        return self._scorer

    @property
    def matcher(self) -> Matcher | None:
        """The match head beside the scorer (None: off, no scorer, or trained on another scorer's memories)."""
        if not self._matcher_checked and self.config.matcher and self.scorer is not None:
            encoder = self.encoder  # a scorer implies the native encoder, whose text tower (and cache) is shared
            matcher = Matcher(self.config.matcher, device=self._device(),  # may raise ModelLoadError: exit 4
                              text_tower=getattr(encoder, "text_tower", None))
            self._matcher_checked = True
            self._matcher = matcher if provenance.matcher_fits(matcher, self.scorer) else None
        return self._matcher

    @property
    def tagger(self) -> Tagger | None:
        """The tagger (None: off, or the encoder is not the native one, whose tower it classifies)."""
        if not self._tagger_checked:
            self._tagger_checked = True
            encoder = self.encoder
            if self.config.tagger and isinstance(encoder, GridEncoder) and hasattr(encoder, "text_tower"):
                # the native encoder: its tower's classifier gives the tags, its text tower embeds queries
                from retrieval.native.tagger import create_tagger

                self._tagger = create_tagger(self.config.tagger, text_tower=encoder.text_tower,  # may raise: exit 4
                                             device=self._device())
        return self._tagger

    @property
    def confidence_model(self):  # noqa: ANN201 - captioning.confidence.ConfidenceModel | None
        """The model that rates captions (None: off, or no tagger to rate them with)."""
        if self._confidence is None and self.config.confidence and self.tagger is not None:
            from captioning.confidence import ConfidenceModel

            self._confidence = ConfidenceModel(self.config.confidence.removeprefix("native:"))
        return self._confidence

    def models(self) -> ImageModels:
        """The model stage of indexing: encoder, captioner, scorer, tagger and confidence behind one call per batch."""
        return ImageModels(self.encoder, self.captioner, self.config.decode, self.scorer, self.tagger,
                           self.confidence_model)

    # --- writing -----------------------------------------------------------------------------
    def writer(self) -> BatchWriter:
        """Everything that writes this index goes through one of these (see indexing/writer.py): opens
        (creating) the index, repairs what an older version left inconsistent, and adopts the scorer."""
        index = self.open(create=True)
        meta = provenance.record_models(self.encoder.info, self.captioner.info if self.captioner else None,
                                        index.store)
        meta.update(provenance.record_tagging(self.tagger, self.confidence_model))
        if meta:
            index.store.set_meta(meta)
        reconcile(index.store, index.vectors)
        provenance.adopt_scorer(index.store, index.vectors, self.scorer)
        index.vectors.collect_garbage()
        return BatchWriter(index.store, index.vectors)

    def index(self, root: str | Path, rebuild: bool = False,
              on_progress: Callable[[int, int], None] | None = None) -> IndexSummary:
        """Index ``root`` incrementally (``rebuild``: drop this index first and start over).

        ``on_progress(done, total)`` is called from this thread as files are processed (the app's progress bar).
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InputError(f"folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
        if rebuild:
            self.drop()
        writer = self.writer()
        indexer = Indexer(writer.store, writer.vectors, self.models(), batch_size=self.config.batch_size,
                          workers=self.config.workers, progress=self.config.progress, on_progress=on_progress)
        return indexer.run(root)

    def recaption(self) -> dict:
        """Caption every indexed image again with the configured captioner (image vectors untouched);
        the scorer's memories are written again too.

        Returns counts: {"images", "captioned", "failed"}; unreadable files keep their old caption.
        """
        if self.captioner is None:
            raise InputError("no captioner is configured (--captioner NAME)")
        self._store_for(create=False)
        writer = self.writer()
        counts = recaption(writer.store, writer.vectors, self.models(), batch_size=self.config.batch_size,
                           workers=self.config.workers, progress=self.config.progress)
        writer.store.set_meta({"captioner": json.dumps(self.captioner.info.to_dict())})
        return counts.to_dict()

    def retag(self, everything: bool = False) -> dict:
        """Tag the indexed images that lack the configured tagger's tags (``everything``: all of them),
        and rate the captions they have; captions and vectors untouched (what an index from before tags needs).

        Returns counts: {"images", "tagged", "rated", "failed"}; unreadable files keep what they had.
        """
        self._store_for(create=False)
        if self.tagger is None:
            raise InputError("no tagger: tags need the native encoder and a tagger (--tagger, PIXQUERY_TAGGER)")
        writer = self.writer()
        return retag(writer.store, writer.vectors, self.models(), batch_size=self.config.batch_size,
                     workers=self.config.workers, progress=self.config.progress, everything=everything).to_dict()

    # --- search ------------------------------------------------------------------------------
    def ranker(self) -> Ranker:
        """The ranker over this index (the likelihood and match signals only when the stored memories
        are the scorer's; the tags signal only when the index has tags)."""
        index = self.open()
        tagger = self.tagger if index.store.get_meta("tagger") else None
        if not provenance.scorer_matches(index.store, self.scorer):
            return Ranker(index.store, index.vectors, tagger=tagger)
        return Ranker(index.store, index.vectors, self.scorer, self.matcher, tagger)

    def searcher(self) -> Searcher:
        ranker = self.ranker()
        return Searcher(ranker, self.encoder, pool=self.config.pool, depth=self.config.rerank_depth,
                        confidence_threshold=provenance.confidence_threshold(ranker.store))

    def search(self, text: str | None = None, image: str | Path | None = None, k: int = 10, mode: str = "fused",
               weights: FusionWeights | None = None, filters: Filters | None = None,
               threshold: float | None = None) -> list[SearchHit]:
        """Top ``k`` images for a text query and/or an example image, best first.

        ``mode``: one of ``retrieval.query.MODES`` (``fused`` combines every signal, see
        indexer/search/ranker.py); ``weights``: the fused mode's weights (default: tuned on Flickr8k dev);
        ``filters``: only images that match; ``threshold``: leave out hits whose score is below it.
        """
        return self.searcher().search(text, image, k, mode, weights, filters, threshold)

    def search_vectors(self, queries: np.ndarray, k: int, mode: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """Rank the index for (Q, dim) query vectors by one vector signal -> (scores, ids), each (Q, <=k)."""
        if mode not in ("image", "caption"):
            raise InputError(f"search_vectors ranks by image or caption vectors, not {mode!r}")
        vectors = self.open().vectors
        return (vectors.images if mode == "image" else vectors.captions).search(queries, k)

    def more_like_this(self, image: int | str | Path, k: int = 10, filters: Filters | None = None) -> list[SearchHit]:
        """The ``k`` indexed images most like indexed ``image`` (an id or a path), itself left out, best first."""
        return self.searcher().more_like_this(image, k, filters)

    def duplicates(self, threshold: float = 0.95, k: int = 10) -> list[DuplicateGroup]:
        """Groups of exact copies (same bytes) and near copies (image similarity >= ``threshold``).

        ``k``: neighbours looked at per image; summarise the groups with ``indexer.search.duplicates.summarize``.
        """
        return Searcher(Ranker(*self._opened()), self.encoder).duplicates(threshold, k)

    def _opened(self) -> tuple[Store, VectorBundle]:
        index = self.open()
        return index.store, index.vectors

    # --- inspection --------------------------------------------------------------------------
    def stats(self) -> dict:
        store = self._store_for(create=False)
        last = store.last_run()
        info = self.index_info
        size = sum(p.stat().st_size for p in self.config.index_dir.rglob("*") if p.is_file())
        captioner, scorer = store.get_meta("captioner"), store.get_meta("scorer")
        tagger, confidence = store.get_meta("tagger"), store.get_meta("confidence")
        threshold = provenance.confidence_threshold(store)
        return {
            "index_dir": str(self.config.index_dir),
            "database": self.config.db_url or "sqlite",
            "images": store.count_images(),
            "captioned": len(store.captioned_ids()),
            "skipped": len(store.skipped()),
            "encoder": info.to_dict() if info else None,
            "captioner": json.loads(captioner) if captioner else None,
            "scorer": json.loads(scorer) if scorer else None,
            "tags": {"tagger": json.loads(tagger) if tagger else None, **store.tag_counts()},
            "caption_confidence": {"model": json.loads(confidence) if confidence else None,
                                   **store.confidence_counts(threshold)},
            "vector_index": {"type": self.config.index_type,
                             "generation": int(store.get_meta("vector_generation") or 0)},
            "index_bytes": size,
            "last_run": None if last is None else {
                "root": last.root, "started_at": last.started_at.isoformat(timespec="seconds"),
                "finished_at": last.finished_at.isoformat(timespec="seconds") if last.finished_at else None,
                "summary": json.loads(last.summary) if last.summary else None,
            },
        }

    def paths(self) -> dict[int, str]:
        """{id: path} of every indexed image."""
        return {r.id: r.path for r in self._store_for(create=False).all_images()}

    def image_vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored image embeddings of ``ids`` -> (n, dim)."""
        return self.open().vectors.images.reconstruct(np.asarray(ids, dtype=np.int64))

    def describe(self, ids: Sequence[int] | None = None) -> list[ImageDescription]:
        """Caption, caption confidence, tags and alt text of images ``ids`` (None: every indexed image), in
        id order; what exports read (an uncertain caption is never alt text, see ImageDescription)."""
        store = self._store_for(create=False)
        rows = sorted((store.all_images() if ids is None else store.images_by_ids([int(i) for i in ids]).values()),
                      key=lambda r: r.id)
        tags = self.tags([r.id for r in rows])
        threshold = provenance.confidence_threshold(store)
        return [ImageDescription.of(r, tags.get(r.id), threshold) for r in rows]

    def untagged(self) -> int:
        """How many indexed images have no tags yet (an index from before tags: ``pixquery retag`` adds them)."""
        return self._store_for(create=False).tag_counts()["untagged"]

    def tags(self, ids: Sequence[int]) -> dict[int, list[Tag]]:
        """{id: its tags, most likely first} of those ``ids`` that have any."""
        store = self._store_for(create=False)
        tagger = self.tagger
        if tagger is None or not store.get_meta("tagger"):
            return {}
        out = {}
        for i, cls in store.classes_by_ids(ids).items():
            found = tagger.tags(cls)
            if found:
                out[i] = found
        return out

    def image(self, id: int) -> ImageRow | None:
        """Everything the index holds about image ``id`` (None when no such id is indexed)."""
        return self._store_for(create=False).images_by_ids([int(id)]).get(int(id))

    def skipped_files(self) -> list[dict]:
        return [{"path": s.path, "reason": s.reason} for s in self._store_for(create=False).skipped()]

    @property
    def generation(self) -> int:
        """The vector generation last committed (changes whenever an indexing checkpoint commits)."""
        return int(self._store_for(create=False).get_meta("vector_generation") or 0)
