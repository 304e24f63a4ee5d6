"""The composition root: builds encoder, store and vector index from an :class:`EngineConfig`.

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from indexer.config import EngineConfig
from indexer.duplicates import DuplicateGroup, find_duplicates
from indexer.errors import EncoderMismatchError, IndexNotFoundError, InputError
from indexer.models import ImageModels
from indexer.pipeline import Indexer, IndexSummary, ReadResult, decode_into, reconcile
from indexer.query import MODES, Filters, FusionWeights, ParsedQuery
from indexer.query_parser import parse_query
from indexer.ranking import Ranker, query_vector
from indexer.store import ImageRow, Store, utcnow
from indexer.vectors_bundle import VectorBundle
from captioning.captioner import Captioner
from retrieval.encoder import EncoderInfo, JointEncoder

log = logging.getLogger(__name__)

def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"unknown ranking mode {mode!r}; choose one of: {', '.join(MODES)}")


@dataclass(frozen=True)
class SearchHit:
    id: int
    path: str
    score: float
    width: int
    height: int
    file_type: str
    caption: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # per signal, e.g. {"image": 0.31}

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": round(self.score, 6), "caption": self.caption,
                "width": self.width, "height": self.height, "file_type": self.file_type,
                "scores": {k: round(v, 6) for k, v in self.scores.items()}}


class Engine:
    """One index (a folder: SQLite database and vector files, see EngineConfig) and the models to use it."""

    def __init__(self, config: EngineConfig | None = None, encoder: JointEncoder | None = None,
                 captioner: Captioner | None = None, scorer: Captioner | None = None) -> None:
        self.config = config or EngineConfig()
        # injected (tests, the app) or built lazily from the config
        self._encoder = encoder
        self._captioner = captioner
        self._scorer: Captioner | None = scorer
        self._matcher = None  # captioning.matcher.Matcher, built with the first ranker
        self._matcher_checked = False
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

    @property
    def exists(self) -> bool:
        return self.config.db_path.exists()

    def _open(self, create: bool) -> Store:
        if self._store is None:
            if not create and not self.exists:
                raise IndexNotFoundError(
                    f"no index at {self.config.index_dir}; build one with: pixquery index FOLDER "
                    f"(or point --db / PIXQUERY_DB at an existing index)"
                )
            self.config.index_dir.mkdir(parents=True, exist_ok=True)
            self._store = Store(self.config.db_url)
        return self._store

    @property
    def index_info(self) -> EncoderInfo | None:
        """Provenance of the encoder that built this index (None for a new, empty index)."""
        raw = self._open(create=False).get_meta("encoder")
        return EncoderInfo(**json.loads(raw)) if raw else None

    # --- models ------------------------------------------------------------------------------
    @property
    def encoder(self) -> JointEncoder:
        if self._encoder is None:
            from retrieval.device import resolve_device
            from retrieval.factory import create_encoder

            name = self.config.encoder
            if name is None:
                built_with = self.index_info if self.exists else None
                name = built_with.name if built_with else self.config.default_encoder
            self._encoder = create_encoder(name, device=resolve_device(self.config.device),
                                           cache_dir=self.config.cache_dir / "models", offline=self.config.offline)
        return self._encoder

    @property
    def captioner(self) -> Captioner | None:
        """The captioner for new images (None when captions are switched off)."""
        if self._captioner is None and self.config.captioner:
            from captioning.captioner import create_captioner
            from retrieval.device import resolve_device

            # a native captioner next to the native encoder never loads its own tower: ImageModels
            # hands it the encoder's grid
            self._captioner = create_captioner(self.config.captioner, device=resolve_device(self.config.device),
                                               cache_dir=self.config.cache_dir / "models", offline=self.config.offline)
        return self._captioner

    @property
    def scorer(self) -> Captioner | None:
        """The caption decoder that rates query text against images (None: off, or not a native setup)."""
        if self._scorer is None and self.config.scorer and hasattr(self.encoder, "grid"):
            from captioning.captioner import create_captioner
            from retrieval.device import resolve_device

            scorer = create_captioner(self.config.scorer, device=resolve_device(self.config.device),
                                      cache_dir=self.config.cache_dir / "models", offline=self.config.offline)
            if not hasattr(scorer, "log_likelihood"):
                raise InputError(f"{self.config.scorer} cannot rate text against images; the scorer must be "
                                 f"a native captioner (or none)")
            self._scorer = scorer
        return self._scorer

    @property
    def matcher(self):  # noqa: ANN201 - captioning.matcher.Matcher | None
        """The match head beside the scorer (None: off, no scorer, or trained on another scorer's memories)."""
        if not self._matcher_checked and self.config.matcher and self.scorer is not None:
            from captioning.matcher import Matcher
            from retrieval.device import resolve_device

            # a scorer implies the native encoder (see scorer), whose text tower and its cache are shared
            matcher = Matcher(self.config.matcher, device=resolve_device(self.config.device),  # may raise: exit 4
                              text_tower=getattr(self.encoder, "text_tower", None))
            self._matcher_checked = True
            scorer_sha = self.scorer.info.weights_sha256
            if matcher.scorer_sha256 != scorer_sha or matcher.memory_dim != int(np.prod(self.scorer.memory_shape)):
                log.warning("the match head %s was trained on the memories of another scorer than %s; "
                            "fused ranking runs without it", matcher.name, self.scorer.info.name)
            else:
                self._matcher = matcher
        return self._matcher

    def _models(self) -> ImageModels:
        return ImageModels(self.encoder, self.captioner, self.config.decode, self.scorer)

    def _scorer_matches(self, store: Store) -> bool:
        """Whether the stored memories were written by the configured scorer."""
        raw = store.get_meta("scorer")
        return self.scorer is not None and raw is not None and json.loads(raw)["fingerprint"] == \
            self.scorer.info.fingerprint

    def _adopt_scorer(self, store: Store, vectors: VectorBundle) -> None:
        """Before writing memories: a different scorer's memories are dropped (``recaption`` refills them)."""
        if self.scorer is None or vectors.memories is None or self._scorer_matches(store):
            return
        if len(vectors.memories):
            log.warning("the scorer changed; dropping %d stored memories (run pixquery recaption to refill them)",
                        len(vectors.memories))
            vectors.memories.remove(vectors.memories.ids())
        store.set_meta({"scorer": json.dumps({**self.scorer.info.to_dict(),
                                              "fingerprint": self.scorer.info.fingerprint})})

    def _check_encoder(self, store: Store) -> None:
        raw = store.get_meta("encoder")
        if raw is None:
            return
        built = EncoderInfo(**json.loads(raw))
        if self.config.encoder is not None and self.config.encoder != built.name and self._encoder is None:
            raise EncoderMismatchError(
                f"this index was built with encoder {built.name!r}, not {self.config.encoder!r}; "
                f"search without --encoder, use another --db, or rebuild with: pixquery index FOLDER --rebuild "
                f"--encoder {self.config.encoder}"
            )
        mine = self.encoder.info
        if mine.fingerprint != built.fingerprint:
            raise EncoderMismatchError(
                f"this index was built with {built.fingerprint}, but the encoder now is {mine.fingerprint}; "
                f"its vectors are not comparable. Rebuild with: pixquery index FOLDER --rebuild"
            )

    def _vector_index(self, store: Store) -> VectorBundle:
        if self._vectors is None:
            info = self.index_info
            dim = info.dim if info else self.encoder.dim
            scorer = self.scorer
            mem_dim = int(np.prod(scorer.memory_shape)) if scorer is not None else None
            self._vectors = VectorBundle.load(self.config.vectors_path, self.config.caption_vectors_path, dim,
                                              self.config.memory_path, mem_dim)
            removed = reconcile(store, self._vectors)
            if any(removed):
                self._vectors.save()
        return self._vectors

    # --- indexing ----------------------------------------------------------------------------
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
        store = self._open(create=True)
        self._check_encoder(store)
        if store.get_meta("encoder") is None:
            store.set_meta({"encoder": json.dumps(self.encoder.info.to_dict())})
        if self.captioner is not None:
            store.set_meta({"captioner": json.dumps(self.captioner.info.to_dict())})
        vectors = self._vector_index(store)
        self._adopt_scorer(store, vectors)
        indexer = Indexer(store, vectors, self._models(), batch_size=self.config.batch_size,
                          workers=self.config.workers, progress=self.config.progress, on_progress=on_progress)
        return indexer.run(root)

    def recaption(self) -> dict:
        """Caption every indexed image again with the configured captioner (image vectors untouched);
        the scorer's memories are written again too.

        Returns counts: {"images", "captioned", "failed"}; unreadable files keep their old caption.
        """
        store, vectors = self._ready()
        self._adopt_scorer(store, vectors)
        models = self._models()
        if models.captioner is None:
            raise InputError("no captioner is configured (--captioner NAME)")
        fp = models.captioner.info.fingerprint
        rows = store.all_images()
        counts = {"images": len(rows), "captioned": 0, "failed": 0}
        bar = tqdm(total=len(rows), desc="captioning", unit="img", disable=not self.config.progress)
        for start in range(0, len(rows), self.config.batch_size):
            chunk, ok = rows[start:start + self.config.batch_size], []
            for row in chunk:
                try:
                    data = Path(row.path).read_bytes()
                except OSError:
                    counts["failed"] += 1
                    continue
                res = decode_into(ReadResult(entry=None), data, models)
                if res.error is None:
                    ok.append((row, res))
                else:
                    counts["failed"] += 1
            if ok:
                caps, memories = models.caption_only(torch.stack([r.pixels for _, r in ok]),
                                                     None if ok[0][1].cap_pixels is None else
                                                     torch.stack([r.cap_pixels for _, r in ok]))
                where, vecs = models.embed_captions(caps)
                ids = np.array([row.id for row, _ in ok], dtype=np.int64)
                vectors.captions.remove(ids)
                if len(where):
                    vectors.captions.add(ids[where], vecs)
                if memories is not None:
                    vectors.set_memories(ids, memories)
                for (row, _), cap in zip(ok, caps):
                    row.caption, row.captioner = cap, fp if cap else None
                    row.captioned_at = utcnow() if cap else None
                    counts["captioned"] += cap is not None
                vectors.save()
                with store.session() as s:
                    for row, _ in ok:
                        s.merge(row)
            bar.update(len(chunk))
        bar.close()
        store.set_meta({"captioner": json.dumps(models.captioner.info.to_dict())})
        return counts

    def drop(self) -> None:
        """Delete this index's files (never any image)."""
        self.close()
        self._vectors = None
        for path in self.config.index_files:
            path.unlink(missing_ok=True)

    # --- search ------------------------------------------------------------------------------
    def _ready(self) -> tuple[Store, VectorBundle]:
        store = self._open(create=False)
        self._check_encoder(store)
        return store, self._vector_index(store)

    def _image_vector(self, image: str | Path) -> np.ndarray:
        from retrieval.images import load_image

        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"query image {path} does not exist")
        return self.encoder.encode_images([load_image(path).image])[0]

    def embed_query(self, text: str | None = None, image: str | Path | None = None) -> np.ndarray:
        """A text (in the query language, see indexer/query_parser.py), an example image, or both
        -> one (dim,) unit query vector."""
        parsed = parse_query(text) if text is not None else None
        return self._query(parsed, image)

    def _query(self, parsed: ParsedQuery | None, image: str | Path | None) -> np.ndarray:
        if parsed is None and image is None:
            raise InputError("give a text query, an example image, or both")
        image_vec = self._image_vector(image) if image is not None else None
        if parsed is None:
            return (image_vec / (np.linalg.norm(image_vec) or 1.0)).astype(np.float32)
        return query_vector(parsed, lambda texts: self.encoder.encode_texts(texts), image_vec)

    def search_vectors(self, queries: np.ndarray, k: int, mode: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """Rank the index for (Q, dim) query vectors by one vector signal -> (scores, ids), each (Q, <=k)."""
        if mode not in ("image", "caption"):
            raise InputError(f"search_vectors ranks by image or caption vectors, not {mode!r}")
        _, vectors = self._ready()
        return (vectors.images if mode == "image" else vectors.captions).search(queries, k)

    def ranker(self) -> Ranker:
        """The ranker over this index (the likelihood and match signals only when the stored memories
        are the scorer's)."""
        store, vectors = self._ready()
        if not self._scorer_matches(store):
            return Ranker(store, vectors)
        return Ranker(store, vectors, self.scorer, self.matcher)

    def search(self, text: str | None = None, image: str | Path | None = None, k: int = 10, mode: str = "fused",
               weights: FusionWeights | None = None, filters: Filters | None = None,
               threshold: float | None = None) -> list[SearchHit]:
        """Top ``k`` images for a text query and/or an example image, best first.

        ``mode``: one of MODES (``fused`` combines every signal, see indexer/ranking.py); ``weights``:
        the fused mode's weights (default: tuned on Flickr8k dev); ``filters``: only images that
        match; ``threshold``: leave out hits whose score is below it.
        """
        if not isinstance(k, int) or k < 1:
            raise InputError("k must be at least 1")
        _check_mode(mode)
        parsed = parse_query(text) if text is not None else None
        if parsed is None and mode == "keyword":
            raise InputError("keyword mode needs words to look for")
        ranker = self.ranker()  # opens and checks the index once per search
        store = ranker.store
        q = self._query(parsed, image)
        allowed = store.filter_ids(filters) if filters is not None else None
        if allowed is not None and not len(allowed):
            return []
        ranked = ranker.rank(mode, q, parsed, k, weights or FusionWeights(), allowed,
                             pool=self.config.pool, depth=self.config.rerank_depth)
        rows = store.images_by_ids(ranked.ids.tolist())
        hits = []
        for n, (i, score) in enumerate(zip(ranked.ids.tolist(), ranked.scores.tolist())):
            if i not in rows or (threshold is not None and score < threshold):
                continue
            scores = {name: float(v[n]) for name, v in ranked.signals.items() if not np.isnan(v[n])}
            hits.append(self._hit(rows[i], float(score), scores))
        return hits

    @staticmethod
    def _hit(row: ImageRow, score: float, scores: dict[str, float]) -> SearchHit:
        return SearchHit(row.id, row.path, score, row.width, row.height, row.file_type, row.caption, scores)

    def more_like_this(self, image: int | str | Path, k: int = 10, filters: Filters | None = None) -> list[SearchHit]:
        """The ``k`` indexed images most like indexed ``image`` (an id or a path), itself left out, best first."""
        if k < 1:
            raise InputError("k must be at least 1")
        store, vectors = self._ready()
        row = self._indexed(store, image)
        if not vectors.images.contains(row.id):
            raise InputError(f"{row.path} has no image vector yet; index its folder again")
        query = vectors.images.reconstruct(np.array([row.id], dtype=np.int64))  # (1, D)
        allowed = store.filter_ids(filters) if filters is not None else None
        scores, ids = vectors.images.search(query, k + 1, ids=allowed)  # +1: the image finds itself
        ranked = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i != row.id][:k]
        rows = store.images_by_ids([i for _, i in ranked])
        return [self._hit(rows[i], s, {"image": s}) for s, i in ranked if i in rows]

    @staticmethod
    def _indexed(store: Store, image: int | str | Path) -> ImageRow:
        """The row of an indexed image given by id or by path (as given, or resolved)."""
        if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
            row = store.images_by_ids([int(image)]).get(int(image))
            if row is None:
                raise InputError(f"no image with id {int(image)} in this index")
            return row
        if not isinstance(image, (str, Path)) or not str(image).strip():
            raise InputError(f"give an indexed image's id or path, not {image!r}")
        try:
            path = Path(image).expanduser()
            candidates = dict.fromkeys((os.path.abspath(path), str(path.resolve())))
            exists = path.exists()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long, a symlink loop
            raise InputError(f"{str(image)[:200]!r} is not a usable path: {exc}") from None
        for candidate in candidates:
            row = store.image_by_path(candidate)
            if row is not None:
                return row
        raise InputError(f"{path} is not in this index" + ("" if exists else " (no such file)"))

    def duplicates(self, threshold: float = 0.95, k: int = 10) -> list[DuplicateGroup]:
        """Groups of exact copies (same bytes) and near copies (image similarity >= ``threshold``).

        ``k``: neighbours looked at per image; summarise the groups with ``indexer.duplicates.summarize``.
        """
        if not 0 < threshold <= 1:  # `not` also refuses NaN
            raise InputError(f"the similarity threshold must be in (0, 1], got {threshold}")
        if k < 1:
            raise InputError("k must be at least 1")
        store, vectors = self._ready()
        images = vectors.images
        return find_duplicates(
            images.ids(), store.same_hash_groups(), images.reconstruct,
            lambda q, n, allowed: images.search(q, n, ids=allowed),
            lambda ids: {i: r.path for i, r in store.images_by_ids(ids).items()},
            threshold=threshold, k=k)

    # --- inspection --------------------------------------------------------------------------
    def stats(self) -> dict:
        store = self._open(create=False)
        last = store.last_run()
        info = self.index_info
        size = sum(p.stat().st_size for p in self.config.index_dir.glob("*") if p.is_file())
        skipped = store.skipped()
        captioner, scorer = store.get_meta("captioner"), store.get_meta("scorer")
        return {
            "index_dir": str(self.config.index_dir),
            "images": store.count_images(),
            "captioned": len(store.captioned_ids()),
            "skipped": len(skipped),
            "encoder": info.to_dict() if info else None,
            "captioner": json.loads(captioner) if captioner else None,
            "scorer": json.loads(scorer) if scorer else None,
            "index_bytes": size,
            "last_run": None if last is None else {
                "root": last.root, "started_at": last.started_at.isoformat(timespec="seconds"),
                "finished_at": last.finished_at.isoformat(timespec="seconds") if last.finished_at else None,
                "summary": json.loads(last.summary) if last.summary else None,
            },
        }

    def paths(self) -> dict[int, str]:
        """{id: path} of every indexed image."""
        return {r.id: r.path for r in self._open(create=False).all_images()}

    def image_vectors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored image embeddings of ``ids`` -> (n, dim)."""
        _, vectors = self._ready()
        return vectors.images.reconstruct(np.asarray(ids, dtype=np.int64))

    def image(self, id: int) -> ImageRow | None:
        """Everything the index holds about image ``id`` (None when no such id is indexed)."""
        return self._open(create=False).images_by_ids([int(id)]).get(int(id))

    def skipped_files(self) -> list[dict]:
        return [{"path": s.path, "reason": s.reason} for s in self._open(create=False).skipped()]
