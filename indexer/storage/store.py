"""The metadata store: the one class that reads and writes the SQL database.

SQLite (WAL mode) by default; any SQLAlchemy URL otherwise (``EngineConfig.db_url``). The store owns
its sessions: callers never open one. Everything an indexing checkpoint changes (rows, skipped files,
deletions, meta facts such as the committed vector generation) goes in through :meth:`Store.write`
as one :class:`WriteBatch`, in one transaction.
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from sqlalchemy import create_engine, delete, event, func, insert, inspect, select
from sqlalchemy.engine import Engine as SqlEngine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from indexer.errors import IndexCorruptError, InputError
from indexer.storage.filters import Filters, filter_conditions
from indexer.storage.keywords import KeywordIndex, keyword_index_for
from indexer.storage.schema import (
    MIGRATIONS, SCHEMA_VERSION, Base, ImageClassRow, ImageRow, Meta, RunRow, SkippedRow, utcnow,
)

CHUNK = 500  # ids per IN (...) list: under SQLite's bound-parameter limit


@dataclass
class WriteBatch:
    """What one checkpoint changes in the database, written in one transaction by :meth:`Store.write`."""

    rows: list[ImageRow] = field(default_factory=list)  # inserted or updated by id
    skips: list[SkippedRow] = field(default_factory=list)  # inserted or updated by path
    unskip: list[str] = field(default_factory=list)  # paths whose skip record goes (the file indexed, or vanished)
    deletes: list[int] = field(default_factory=list)  # image ids that leave the index
    meta: dict[str, str] = field(default_factory=dict)
    # image id -> its classes [(class index, probability)], replacing what it had (retrieval/tagging.py)
    classes: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return (len(self.rows) + len(self.skips) + len(self.unskip) + len(self.deletes) + len(self.meta)
                + len(self.classes))

    def clear(self) -> None:
        for part in (self.rows, self.skips, self.unskip, self.deletes, self.meta, self.classes):
            part.clear()


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL (None for another database, or an in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InputError(f"{url!r} is not a database URL: {exc}") from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", re.IGNORECASE)


def _already_applied(conn, statement: str) -> bool:  # noqa: ANN001 - a SQLAlchemy connection
    """Whether ``statement`` adds a column the table already has (a migration interrupted after it, or a
    database that an older pixquery downgraded by hand): adding it again would fail."""
    m = _ADD_COLUMN.match(statement.strip())
    if m is None:
        return False
    return m.group(2) in {c["name"] for c in inspect(conn).get_columns(m.group(1))}


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    """All SQL access; one :class:`Session` per unit of work, opened here and nowhere else."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: SqlEngine = create_engine(url)
        except (ArgumentError, ImportError) as exc:  # a malformed URL, or no driver for its database
            raise InputError(f"cannot use the database {url!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.keywords: KeywordIndex | None = keyword_index_for(self.engine)
        try:
            Base.metadata.create_all(self.engine)
            self._check_schema()
            if self.keywords is not None:
                with self.engine.begin() as conn:
                    self.keywords.install(conn)
        except SQLAlchemyError as exc:
            raise IndexCorruptError(f"cannot open the index database {url}: {exc}") from exc

    @staticmethod
    def exists(url: str) -> bool:
        """Whether an index database is at ``url`` (for SQLite: its file; elsewhere: its meta table)."""
        path = sqlite_path(url)
        if path is not None:
            return path.exists()
        try:
            engine = create_engine(url)
            try:
                return inspect(engine).has_table(Meta.__tablename__)
            finally:
                engine.dispose()
        except (ArgumentError, ImportError, SQLAlchemyError):
            return False

    def drop_all(self) -> None:
        """Drop every table of the index (``--rebuild`` on a database that is not a file)."""
        if self.keywords is not None:
            with self.engine.begin() as conn:
                self.keywords.uninstall(conn)
        Base.metadata.drop_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def write(self, batch: WriteBatch) -> None:
        """Everything in ``batch`` in one transaction: deletions, then skip records, then rows, their
        classes and meta."""
        if not len(batch):
            return
        with self._session() as s:
            for start in range(0, len(batch.deletes), CHUNK):
                chunk = batch.deletes[start:start + CHUNK]
                s.execute(delete(ImageClassRow).where(ImageClassRow.image_id.in_(chunk)))  # not only by cascade
                s.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
            for start in range(0, len(batch.unskip), CHUNK):
                s.execute(delete(SkippedRow).where(SkippedRow.path.in_(batch.unskip[start:start + CHUNK])))
            for row in batch.rows:
                s.merge(row)
            for skip in batch.skips:
                s.merge(skip)
            if batch.classes:
                s.flush()  # the rows first: classes refer to them
                ids = list(batch.classes)
                for start in range(0, len(ids), CHUNK):
                    s.execute(delete(ImageClassRow).where(ImageClassRow.image_id.in_(ids[start:start + CHUNK])))
                values = [{"image_id": int(i), "class_index": int(c), "probability": float(p)}
                          for i, cls in batch.classes.items() for c, p in cls]
                if values:
                    s.execute(insert(ImageClassRow), values)
            for key, value in batch.meta.items():
                s.merge(Meta(key=key, value=value))

    # --- meta -------------------------------------------------------------------------------
    def _check_schema(self) -> None:
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta({"schema_version": str(SCHEMA_VERSION)})
            return
        if int(version) > SCHEMA_VERSION:
            raise IndexCorruptError(
                f"the index was written by a newer pixquery (schema {version} > {SCHEMA_VERSION}); upgrade pixquery"
            )
        for target in range(int(version) + 1, SCHEMA_VERSION + 1):
            with self.engine.begin() as conn:
                for statement in MIGRATIONS[target]:
                    if not _already_applied(conn, statement):
                        conn.exec_driver_sql(statement)
            self.set_meta({"schema_version": str(target)})

    def captions_by_ids(self, ids: Iterable[int]) -> dict[int, str]:
        """{id: caption} of those ``ids`` that have a caption."""
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                rows = conn.execute(select(ImageRow.id, ImageRow.caption).where(
                    ImageRow.caption.is_not(None), ImageRow.id.in_(ids[start:start + CHUNK])))
                out.update({int(i): c for i, c in rows})
        return out

    def classes_by_ids(self, ids: Iterable[int]) -> dict[int, list[tuple[int, float]]]:
        """{id: [(class index, probability)], most likely first} of those ``ids`` that have classes."""
        ids = [int(i) for i in ids]
        out: dict[int, list[tuple[int, float]]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                rows = conn.execute(select(ImageClassRow.image_id, ImageClassRow.class_index, ImageClassRow.probability)
                                    .where(ImageClassRow.image_id.in_(ids[start:start + CHUNK])))
                for i, c, p in rows:
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

    def get_meta(self, key: str) -> str | None:
        with self._session() as s:
            row = s.get(Meta, key)
            return row.value if row else None

    def set_meta(self, values: dict[str, str]) -> None:
        with self._session() as s:
            for key, value in values.items():
                s.merge(Meta(key=key, value=value))

    # --- images -----------------------------------------------------------------------------
    def all_images(self) -> list[ImageRow]:
        with self._session() as s:
            return list(s.scalars(select(ImageRow)))

    def image_ids(self) -> set[int]:
        with self._session() as s:
            return set(s.scalars(select(ImageRow.id)))

    def captioned_ids(self) -> set[int]:
        with self._session() as s:
            return set(s.scalars(select(ImageRow.id).where(ImageRow.caption.is_not(None))))

    def images_by_ids(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = list(ids)
        out: dict[int, ImageRow] = {}
        with self._session() as s:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                out.update({r.id: r for r in s.scalars(select(ImageRow).where(ImageRow.id.in_(chunk)))})
        return out

    def image_by_path(self, path: str) -> ImageRow | None:
        with self._session() as s:
            return s.scalars(select(ImageRow).where(ImageRow.path == path)).first()

    def filter_ids(self, filters: Filters) -> np.ndarray | None:
        """Sorted int64 ids of the images that pass ``filters``; None when no filter is set (all images).

        Everything but the glob runs in SQL with bound parameters; the glob (fnmatch rules on the full
        path, case-sensitive) is matched in Python over the rows the other conditions leave.
        """
        if not filters.active:
            return None
        conds = filter_conditions(filters)
        with self._session() as s:
            if filters.glob:
                pattern = re.compile(fnmatch.translate(filters.glob), re.DOTALL)
                rows = s.execute(select(ImageRow.id, ImageRow.path).where(*conds))
                ids = [i for i, path in rows if pattern.match(path)]
            else:
                ids = list(s.scalars(select(ImageRow.id).where(*conds)))
        return np.sort(np.asarray(ids, dtype=np.int64))

    def same_hash_groups(self) -> list[list[int]]:
        """Ids of images that share a content hash (exact copies), one sorted list per hash of two or more."""
        shared = select(ImageRow.content_hash).group_by(ImageRow.content_hash).having(func.count() > 1)
        groups: dict[str, list[int]] = {}
        with self._session() as s:
            rows = s.execute(select(ImageRow.content_hash, ImageRow.id)
                             .where(ImageRow.content_hash.in_(shared)).order_by(ImageRow.content_hash, ImageRow.id))
            for digest, row_id in rows:
                groups.setdefault(digest, []).append(row_id)
        return list(groups.values())

    def count_images(self) -> int:
        with self._session() as s:
            return s.scalar(select(func.count()).select_from(ImageRow)) or 0

    def next_id(self) -> int:
        with self._session() as s:
            return (s.scalar(select(func.max(ImageRow.id))) or 0) + 1

    def skipped(self) -> list[SkippedRow]:
        with self._session() as s:
            return list(s.scalars(select(SkippedRow).order_by(SkippedRow.path)))

    # --- runs -------------------------------------------------------------------------------
    def start_run(self, root: str) -> int:
        with self._session() as s:
            run = RunRow(root=root)
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, summary_json: str) -> None:
        with self._session() as s:
            run = s.get(RunRow, run_id)
            run.finished_at = utcnow()
            run.summary = summary_json

    def last_run(self) -> RunRow | None:
        with self._session() as s:
            return s.scalars(select(RunRow).order_by(RunRow.id.desc())).first()
