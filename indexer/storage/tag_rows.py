"""The tags part of the :class:`~indexer.storage.store.Store`: images' classifier classes and caption
confidence counts, in their own file to keep the store readable (``Store`` inherits these methods; they
use its engine and private sessions). Portable SQL only: SQLite and PostgreSQL alike."""

from __future__ import annotations

from typing import Iterable

from sqlalchemy import bindparam, func, select

from indexer.storage.schema import ImageClassRow, ImageRow

CHUNK = 500  # ids per IN (...) list: under SQLite's bound-parameter limit
# built once: a query reads the pool's classes for every fused search, and building the statement each time
# cost more than running it (0.25 against 0.11 ms for 100 ids without classes, SQLite)
_CLASSES_OF = select(ImageClassRow.image_id, ImageClassRow.class_index, ImageClassRow.probability).where(
    ImageClassRow.image_id.in_(bindparam("ids", expanding=True)))


class TagRows:
    """Reads of stored classes (tags) and caption confidence; mixed into ``Store``."""

    def classes_by_ids(self, ids: Iterable[int]) -> dict[int, list[tuple[int, float]]]:
        """{id: [(class index, probability)], most likely first} of those ``ids`` that have classes."""
        ids = [int(i) for i in ids]
        out: dict[int, list[tuple[int, float]]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                rows = conn.execute(_CLASSES_OF, {"ids": ids[start:start + CHUNK]})
                for i, c, p in rows.all():  # one fetch, not a call per row
                    out.setdefault(int(i), []).append((int(c), float(p)))
        for cls in out.values():
            cls.sort(key=lambda cp: -cp[1])
        return out

    def ids_with_classes(self, classes: Iterable[int], min_probability: float, limit: int,
                         allowed: set[int] | None = None) -> list[int]:
        """Ids of images holding any of ``classes`` at ``min_probability`` or more, the most probable first,
        at most ``limit`` (``allowed``: only these ids): candidates for tag and zero-shot search."""
        classes = sorted({int(c) for c in classes})
        if not classes or limit < 1:
            return []
        query = (select(ImageClassRow.image_id, func.max(ImageClassRow.probability).label("p"))
                 .where(ImageClassRow.class_index.in_(classes), ImageClassRow.probability >= min_probability)
                 .group_by(ImageClassRow.image_id).order_by(func.max(ImageClassRow.probability).desc()))
        out: list[int] = []
        with self.engine.connect() as conn:
            for i, _ in conn.execute(query if allowed is not None else query.limit(limit)):
                if allowed is None or int(i) in allowed:
                    out.append(int(i))
                    if len(out) >= limit:
                        break
        return out

    def tag_counts(self) -> dict[str, int]:
        """{"tagged": images whose classes were computed, "untagged": images never tagged (an older index)}."""
        with self._session() as s:
            tagged = s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.tagger.is_not(None))) or 0
            total = s.scalar(select(func.count()).select_from(ImageRow)) or 0
        return {"tagged": tagged, "untagged": total - tagged}

    def confidence_counts(self, threshold: float | None) -> dict[str, int]:
        """{"rated": captions with a confidence, "confident": of them at or above ``threshold``,
        "unrated": captions without one (an older index)}."""
        with self._session() as s:
            captioned = s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.caption.is_not(None))) or 0
            rated = s.scalar(select(func.count()).select_from(ImageRow).where(
                ImageRow.caption.is_not(None), ImageRow.caption_confidence.is_not(None))) or 0
            sure = 0 if threshold is None else s.scalar(select(func.count()).select_from(ImageRow).where(
                ImageRow.caption.is_not(None), ImageRow.caption_confidence >= threshold)) or 0
        return {"rated": rated, "confident": sure, "unrated": captioned - rated}
