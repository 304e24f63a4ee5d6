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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from indexer.config import EngineConfig
from indexer.errors import EncoderMismatchError, IndexNotFoundError, InputError
from indexer.models import ImageModels
from indexer.pipeline import Indexer, IndexSummary, ReadResult, decode_into, reconcile
from indexer.store import ImageRow, Store, utcnow
from indexer.vectors_bundle import VectorBundle
from captioning.captioner import Captioner
from retrieval.encoder import EncoderInfo, JointEncoder

log = logging.getLogger(__name__)

MODES = ("image",)  # ranking modes this engine offers; caption-based modes come with captions
MAX_QUERY_CHARS = 2000


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InputError(f"unknown ranking mode {mode!r}; this index offers: {', '.join(MODES)}")


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
                 captioner: Captioner | None = None) -> None:
        self.config = config or EngineConfig()
        # injected (tests, the app) or built lazily from the config
        self._encoder = encoder
        self._captioner = captioner
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

    def _models(self) -> ImageModels:
        return ImageModels(self.encoder, self.captioner, self.config.decode)

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
            self._vectors = VectorBundle.load(self.config.vectors_path, self.config.caption_vectors_path, dim)
            removed = reconcile(store, self._vectors)
            if any(removed):
                self._vectors.save()
        return self._vectors

    # --- indexing ----------------------------------------------------------------------------
    def index(self, root: str | Path, rebuild: bool = False) -> IndexSummary:
        """Index ``root`` incrementally (``rebuild``: drop this index first and start over)."""
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
        indexer = Indexer(store, vectors, self._models(), batch_size=self.config.batch_size,
                          workers=self.config.workers, progress=self.config.progress)
        return indexer.run(root)

    def recaption(self) -> dict:
        """Caption every indexed image again with the configured captioner (image vectors untouched).

        Returns counts: {"images", "captioned", "failed"}; unreadable files keep their old caption.
        """
        store, vectors = self._ready()
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
                caps = models.caption_only(torch.stack([r.pixels for _, r in ok]),
                                           None if ok[0][1].cap_pixels is None else
                                           torch.stack([r.cap_pixels for _, r in ok]))
                where, vecs = models.embed_captions(caps)
                ids = np.array([row.id for row, _ in ok], dtype=np.int64)
                vectors.captions.remove(ids)
                if len(where):
                    vectors.captions.add(ids[where], vecs)
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

    def embed_query(self, text: str | None = None, image: str | Path | None = None) -> np.ndarray:
        """A text, an example image, or both (averaged) -> one (dim,) unit query vector."""
        from retrieval.images import load_image

        parts = []
        if text is not None:
            text = text.strip()
            if not text:
                raise InputError("the query is empty")
            if len(text) > MAX_QUERY_CHARS:
                raise InputError(f"the query is {len(text)} characters long; the limit is {MAX_QUERY_CHARS}")
            parts.append(self.encoder.encode_texts([text])[0])
        if image is not None:
            path = Path(image).expanduser()
            if not path.is_file():
                raise InputError(f"query image {path} does not exist")
            parts.append(self.encoder.encode_images([load_image(path).image])[0])
        if not parts:
            raise InputError("give a text query, an example image, or both")
        q = np.mean(parts, axis=0)
        return (q / (np.linalg.norm(q) or 1.0)).astype(np.float32)

    def search_vectors(self, queries: np.ndarray, k: int, mode: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """Rank the index for (Q, dim) query vectors -> (scores, ids), each (Q, <=k)."""
        _check_mode(mode)
        _, vectors = self._ready()
        return vectors.images.search(queries, k)

    def search(self, text: str | None = None, image: str | Path | None = None, k: int = 10,
               mode: str = "image") -> list[SearchHit]:
        """Top ``k`` images for a text query and/or an example image, best first."""
        if k < 1:
            raise InputError("k must be at least 1")
        _check_mode(mode)
        store, vectors = self._ready()
        q = self.embed_query(text, image)
        scores, ids = vectors.images.search(q[None], k)
        rows = store.images_by_ids(ids[0].tolist())
        return [self._hit(rows[i], float(s), mode) for s, i in zip(scores[0], ids[0]) if i in rows]

    @staticmethod
    def _hit(row: ImageRow, score: float, mode: str) -> SearchHit:
        return SearchHit(row.id, row.path, score, row.width, row.height, row.file_type, row.caption, {mode: score})

    # --- inspection --------------------------------------------------------------------------
    def stats(self) -> dict:
        store = self._open(create=False)
        last = store.last_run()
        info = self.index_info
        size = sum(p.stat().st_size for p in self.config.index_dir.glob("*") if p.is_file())
        skipped = store.skipped()
        captioner = store.get_meta("captioner")
        return {
            "index_dir": str(self.config.index_dir),
            "images": store.count_images(),
            "captioned": len(store.captioned_ids()),
            "skipped": len(skipped),
            "encoder": info.to_dict() if info else None,
            "captioner": json.loads(captioner) if captioner else None,
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

    def skipped_files(self) -> list[dict]:
        return [{"path": s.path, "reason": s.reason} for s in self._open(create=False).skipped()]
