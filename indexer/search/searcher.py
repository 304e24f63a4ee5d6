"""Searching one open index: text and example-image queries, more like this, duplicates.

A :class:`Searcher` is made by the Engine for each call, from what the Engine wired (the store and
vectors of the committed generation, the encoder, and a :class:`~indexer.search.ranker.Ranker` with
the second-stage models the stored memories allow), and returns :class:`SearchHit` rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from indexer.errors import InputError
from indexer.search.duplicates import DuplicateGroup, find_duplicates
from indexer.search.ranker import Feedback, Ranker
from indexer.storage.ann import SearchParams
from indexer.storage.filters import Filters
from indexer.storage.schema import ImageRow
from retrieval.encoder import JointEncoder
from retrieval.fusion import feedback_vector, query_vector
from retrieval.query import MODES, FusionWeights, ParsedQuery
from retrieval.query_parser import parse_query
from retrieval.tagging import Classes, Tag


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
    # fused mode: what each signal added to ``score`` (z-scored and weighted; see indexer/search/explain.py)
    contributions: dict[str, float] = field(default_factory=dict)
    tags: tuple[Tag, ...] = ()  # the image's tags, most likely first (none: no confident class, or not tagged)
    caption_confidence: float | None = None  # probability that the caption is good, fitted on train (None: not rated)
    caption_is_confident: bool | None = None  # the confidence against the index's threshold (None: not rated)

    def to_dict(self) -> dict:
        out = {"id": self.id, "path": self.path, "score": round(self.score, 6), "caption": self.caption,
               "caption_confidence": None if self.caption_confidence is None else round(self.caption_confidence, 4),
               "caption_is_confident": self.caption_is_confident, "tags": [t.to_dict() for t in self.tags],
               "width": self.width, "height": self.height, "file_type": self.file_type,
               "scores": {k: round(v, 6) for k, v in self.scores.items()}}
        if self.contributions:
            out["contributions"] = {k: round(v, 6) for k, v in self.contributions.items()}
        return out

    @classmethod
    def of(cls, row: ImageRow, score: float, scores: dict[str, float],
           contributions: dict[str, float] | None = None, tags: list[Tag] | None = None,
           threshold: float | None = None) -> "SearchHit":
        conf = row.caption_confidence if row.caption else None
        sure = None if conf is None or threshold is None else bool(conf >= threshold)
        return cls(row.id, row.path, score, row.width, row.height, row.file_type, row.caption, scores,
                   contributions or {}, tuple(tags or ()), conf, sure)


MAX_FEEDBACK = 1000  # marked images per search


MAX_ID = 2**63 - 1  # ids are signed 64-bit in every store


def check_id(value: object) -> int:
    """An image id (a non-negative int that fits the stores) from ``value``, else InputError: never a path,
    a string, a float or a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= MAX_ID:
        raise InputError(f"not an image id: {str(value)[:80]!r}")
    return int(value)


def check_k(k: object) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InputError("k must be at least 1")


class Searcher:
    """Queries over one open index (see module doc)."""

    def __init__(self, ranker: Ranker, encoder: JointEncoder, pool: int = 100, depth: int = 10,
                 confidence_threshold: float | None = None) -> None:
        """``confidence_threshold``: from which caption confidence a caption counts as sure (the index's)."""
        self.ranker, self.encoder, self.pool, self.depth = ranker, encoder, pool, depth
        self.store, self.vectors = ranker.store, ranker.vectors
        self.threshold = confidence_threshold

    def hits(self, found: list[tuple[int, float, dict[str, float], dict[str, float]]],
             classes: dict[int, Classes] | None = None, rows: dict[int, ImageRow] | None = None) -> list[SearchHit]:
        """Rows, tags and caption confidence of ``(id, score, signals, contributions)`` results, in order
        (ids no longer in the index are left out; ``classes`` and ``rows``: stored classes and rows of at
        least these ids, if the ranking read them)."""
        ids = [f[0] for f in found]
        if rows is None or not all(i in rows for i in ids):
            rows = self.store.images_by_ids(ids)
        if classes is not None:
            classes = {i: classes[i] for i in ids if i in classes}
        tags = self.ranker.tags.tags(ids, classes) if self.ranker.tags is not None else {}
        return [SearchHit.of(rows[i], s, sig, parts, tags.get(i), self.threshold)
                for i, s, sig, parts in found if i in rows]

    # --- queries ------------------------------------------------------------------------------
    def _image_vector(self, image: str | Path) -> np.ndarray:
        from retrieval.images import load_image

        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"query image {path} does not exist")
        return self.encoder.encode_images([load_image(path).image])[0]

    def query(self, parsed: ParsedQuery | None, image: str | Path | None) -> np.ndarray:
        """The (dim,) unit query vector of a parsed text, an example image, or both."""
        if parsed is None and image is None:
            raise InputError("give a text query, an example image, or both")
        image_vec = self._image_vector(image) if image is not None else None
        if parsed is None:
            return (image_vec / (np.linalg.norm(image_vec) or 1.0)).astype(np.float32)
        return query_vector(parsed, lambda texts: self.encoder.encode_texts(texts), image_vec)

    def _marked(self, ids: Sequence[int], what: str) -> np.ndarray:
        """Stored image vectors (n, D) of images marked ``what`` (good or bad); InputError for an unknown id."""
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise InputError(f"{what} images are given by their ids (integers)") from None
        if len(ids) > MAX_FEEDBACK:
            raise InputError(f"at most {MAX_FEEDBACK} images can be marked {what}, got {len(ids)}")
        missing = [i for i in ids if not self.vectors.images.contains(i)]
        if missing:
            raise InputError(f"no image with id {missing[0]} in this index (marked {what})")
        return self.vectors.images.reconstruct(np.asarray(ids, dtype=np.int64)) if ids else np.zeros((0, 0))

    def feedback(self, q: np.ndarray | None, positive_ids: Sequence[int],
                 negative_ids: Sequence[int]) -> tuple[np.ndarray, Feedback | None]:
        """The query vector moved by relevance feedback (Rocchio) and what the ranking leaves out."""
        good, bad = self._marked(positive_ids, "good"), self._marked(negative_ids, "bad")
        both = set(map(int, positive_ids)) & set(map(int, negative_ids))
        if both:
            raise InputError(f"image {min(both)} is marked both good and bad")
        if q is None and not len(good):
            raise InputError("give a text query, an example image, or at least one image marked good")
        if not len(good) and not len(bad):
            return q, None
        q = feedback_vector(q, good, bad)
        if not len(bad):
            return q, None
        return q, Feedback(frozenset(map(int, negative_ids)), bad, frozenset(map(int, positive_ids)), good)

    def search(self, text: str | None = None, image: str | Path | None = None, k: int = 10, mode: str = "fused",
               weights: FusionWeights | None = None, filters: Filters | None = None,
               threshold: float | None = None, positive_ids: Sequence[int] = (),
               negative_ids: Sequence[int] = (), params: SearchParams | None = None) -> list[SearchHit]:
        """Top ``k`` images for a text query and/or an example image, best first (see ``Engine.search``)."""
        check_k(k)
        if mode not in MODES:
            raise InputError(f"unknown ranking mode {mode!r}; choose one of: {', '.join(MODES)}")
        parsed = parse_query(text) if text is not None else None
        if parsed is None and mode in ("keyword", "tags"):
            raise InputError(f"{mode} mode needs words to look for")
        weights = weights or FusionWeights()
        only_tags = mode == "fused" and not (weights.image or weights.caption or weights.keyword or weights.meta)
        if (mode == "tags" or only_tags) and self.ranker.tags is None:
            raise InputError("this index has no tags to rank by; add them with: pixquery retag")
        marked = bool(len(positive_ids) or len(negative_ids))
        q = self.query(parsed, image) if (parsed is not None or image is not None or not marked) else None
        q, feedback = self.feedback(q, positive_ids, negative_ids) if marked else (q, None)
        allowed = self.store.filter_ids(filters) if filters is not None else None
        if allowed is not None and not len(allowed):
            return []
        ranked = self.ranker.rank(mode, q, parsed, int(k), weights, allowed,
                                  pool=self.pool, depth=self.depth, feedback=feedback, params=params, rows=True)
        found = []
        for n, (i, score) in enumerate(zip(ranked.ids.tolist(), ranked.scores.tolist())):
            if threshold is not None and score < threshold:
                continue
            found.append((i, float(score), {name: float(v[n]) for name, v in ranked.signals.items()
                                            if not np.isnan(v[n])},
                          {name: float(v[n]) for name, v in ranked.parts.items()}))
        return self.hits(found, ranked.classes, ranked.rows)

    def more_like_this(self, image: int | str | Path, k: int = 10, filters: Filters | None = None) -> list[SearchHit]:
        """The ``k`` indexed images most like indexed ``image`` (an id or a path), itself left out, best first."""
        check_k(k)
        row = self.indexed(image)
        if not self.vectors.images.contains(row.id):
            raise InputError(f"{row.path} has no image vector yet; index its folder again")
        query = self.vectors.images.reconstruct(np.array([row.id], dtype=np.int64))  # (1, D)
        allowed = self.store.filter_ids(filters) if filters is not None else None
        scores, ids = self.vectors.images.search(query, int(k) + 1, ids=allowed)  # +1: the image finds itself
        ranked = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i != row.id][:k]
        return self.hits([(i, s, {"image": s}, {}) for s, i in ranked])

    def indexed(self, image: int | str | Path) -> ImageRow:
        """The row of an indexed image given by id or by path (as given, or resolved)."""
        store = self.store
        if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
            row_id = check_id(image)
            row = store.images_by_ids([row_id]).get(row_id)
            if row is None:
                raise InputError(f"no image with id {row_id} in this index")
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
        """Groups of exact copies (same bytes) and near copies (image similarity >= ``threshold``)."""
        if not 0 < threshold <= 1:  # `not` also refuses NaN
            raise InputError(f"the similarity threshold must be in (0, 1], got {threshold}")
        check_k(k)
        images = self.vectors.images
        return find_duplicates(
            images.ids(), self.store.same_hash_groups(), images.reconstruct,
            lambda q, n, allowed: images.search(q, n, ids=allowed),
            lambda ids: {i: r.path for i, r in self.store.images_by_ids(ids).items()},
            threshold=threshold, k=int(k))
