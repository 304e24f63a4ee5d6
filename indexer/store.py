"""Metadata store: SQLAlchemy 2.0 models and the one class that reads and writes them.

SQLite (WAL mode) by default; the URL is configurable so PostgreSQL can follow. An image's
``id`` is also its id in the FAISS index (``indexer/vectors.py``), so rows and vectors never
shuffle when files come and go.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from sqlalchemy import (
    ColumnElement, DateTime, Float, ForeignKey, Integer, String, Text, and_, create_engine, delete, event, func,
    or_, select,
)
from sqlalchemy.engine import Engine as SqlEngine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from indexer.errors import IndexCorruptError, InputError
from indexer.query import Filters

SCHEMA_VERSION = 3  # 2: captions (images.caption, captioner, captioned_at); 3: keyword index over captions


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the index: schema version, encoder provenance."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # = FAISS id
    path: Mapped[str] = mapped_column(Text, unique=True, index=True)  # absolute, resolved
    content_hash: Mapped[str] = mapped_column(String(64), index=True)  # blake2b-256 hex of the bytes
    byte_size: Mapped[int] = mapped_column(Integer)
    mtime: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    file_type: Mapped[str] = mapped_column(String(16))  # lower-case extension without dot
    taken_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # EXIF date taken
    indexed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    encoder: Mapped[str] = mapped_column(String(255))  # fingerprint of the encoder that made the vector
    caption: Mapped[str | None] = mapped_column(Text, nullable=True)  # never an empty string
    captioner: Mapped[str | None] = mapped_column(String(255), nullable=True)  # fingerprint of its captioner
    captioned_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)


class SkippedRow(Base):
    """Files that could not be indexed, with the reason; cleared when the file indexes or vanishes."""

    __tablename__ = "skipped"
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    byte_size: Mapped[int] = mapped_column(Integer)
    mtime: Mapped[float] = mapped_column(Float)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RunRow(Base):
    """One ``pixquery index`` run and its summary counts."""

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    root: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    summary: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON of IndexSummary


# schema version -> SQL that upgrades the previous version to it (portable SQL only)
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE images ADD COLUMN caption TEXT",
        "ALTER TABLE images ADD COLUMN captioner VARCHAR(255)",
        "ALTER TABLE images ADD COLUMN captioned_at DATETIME"),
    3: (),  # the keyword index: created and filled by _ensure_keyword_index
}

# Keyword index over the generated captions: an SQLite FTS5 table with external content (the
# images table), kept in step by triggers, so every code path that writes a caption updates it.
# Porter stemming lets "running" match "runs". Ranking is FTS5's BM25 (k1 = 1.2, b = 0.75).
KEYWORD_TABLE = "captions_fts"
KEYWORD_TOKENIZER = "porter unicode61"  # FTS5 tokenizer of the keyword index (and of indexer/pool_keywords.py)
_KEYWORD_DDL = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {KEYWORD_TABLE} USING fts5("
    f"caption, content='images', content_rowid='id', tokenize='{KEYWORD_TOKENIZER}')",
    f"CREATE TRIGGER IF NOT EXISTS captions_fts_ai AFTER INSERT ON images BEGIN "
    f"INSERT INTO {KEYWORD_TABLE}(rowid, caption) VALUES (new.id, new.caption); END",
    f"CREATE TRIGGER IF NOT EXISTS captions_fts_ad AFTER DELETE ON images BEGIN "
    f"INSERT INTO {KEYWORD_TABLE}({KEYWORD_TABLE}, rowid, caption) VALUES ('delete', old.id, old.caption); END",
    f"CREATE TRIGGER IF NOT EXISTS captions_fts_au AFTER UPDATE OF caption ON images BEGIN "
    f"INSERT INTO {KEYWORD_TABLE}({KEYWORD_TABLE}, rowid, caption) VALUES ('delete', old.id, old.caption); "
    f"INSERT INTO {KEYWORD_TABLE}(rowid, caption) VALUES (new.id, new.caption); END",
)


# extensions that name the same format: --type jpg also finds .jpeg files
_SAME_TYPE = {"jpg": ("jpeg",), "jpeg": ("jpg",), "tif": ("tiff",), "tiff": ("tif",)}


def _timestamp(local: datetime) -> float:
    """Seconds since the epoch of a naive local time; +-inf beyond what the platform can convert."""
    try:
        return local.timestamp()
    except (OverflowError, ValueError, OSError):
        return -math.inf if local.year < 1970 else math.inf


def _filter_conditions(filters: Filters) -> list[ColumnElement[bool]]:
    """SQL conditions for every filter but the glob; all values are bound parameters."""
    conds: list[ColumnElement[bool]] = []
    if filters.folder:
        # a plain prefix comparison: no LIKE, so '%', '_' and case in paths mean exactly themselves
        try:
            prefix = os.path.join(str(Path(filters.folder).expanduser().resolve()), "")
        except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
            raise InputError(f"folder filter {filters.folder[:200]!r} is not a usable path: {exc}") from None
        conds.append(func.substr(ImageRow.path, 1, len(prefix)) == prefix)
    if filters.after or filters.before:
        # date taken (EXIF, local time), else the file's modification time (local), whole days inclusive
        start = datetime.combine(filters.after, time()) if filters.after else None
        end = (datetime.combine(filters.before + timedelta(days=1), time())
               if filters.before and filters.before < date.max else None)
        taken = [ImageRow.taken_at.is_not(None)]
        modified = [ImageRow.taken_at.is_(None)]
        if start is not None:
            taken.append(ImageRow.taken_at >= start)
            modified.append(ImageRow.mtime >= _timestamp(start))
        if end is not None:
            taken.append(ImageRow.taken_at < end)
            modified.append(ImageRow.mtime < _timestamp(end))
        conds.append(or_(and_(*taken), and_(*modified)))
    if filters.file_types:
        types = {t for ft in filters.file_types for t in (ft, *_SAME_TYPE.get(ft, ()))}
        conds.append(ImageRow.file_type.in_(sorted(types)))
    # clamped: no image is 2**31 pixels wide, and a bigger Python int would overflow a SQL integer
    if filters.min_width:
        conds.append(ImageRow.width >= min(filters.min_width, 2**31))
    if filters.min_height:
        conds.append(ImageRow.height >= min(filters.min_height, 2**31))
    return conds


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    """All SQL access. One :class:`Session` per unit of work (see :meth:`session`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: SqlEngine = create_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            Base.metadata.create_all(self.engine)
            self._check_schema()
            self._ensure_keyword_index()
        except SQLAlchemyError as exc:
            raise IndexCorruptError(f"cannot open the index database {url}: {exc}") from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

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
                    conn.exec_driver_sql(statement)
            self.set_meta({"schema_version": str(target)})

    def _ensure_keyword_index(self) -> None:
        if not self.url.startswith("sqlite"):
            return  # other databases: keyword ranking is not available yet (see ROADMAP, PostgreSQL)
        with self.engine.begin() as conn:
            exists = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (KEYWORD_TABLE,)).first()
            for statement in _KEYWORD_DDL:
                conn.exec_driver_sql(statement)
            if not exists:  # a new table over existing rows (an index from before schema 3): fill it
                conn.exec_driver_sql(f"INSERT INTO {KEYWORD_TABLE}({KEYWORD_TABLE}) VALUES ('rebuild')")

    @property
    def has_keyword_index(self) -> bool:
        return self.url.startswith("sqlite")

    def keyword_search(self, match: str, limit: int, ids: Sequence[int] | None = None,
                       allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """(id, BM25 score) of captions matching the FTS5 expression ``match``, best first (scores > 0).

        ``match`` must come from :func:`indexer.query_parser.fts_expression` (quoted terms only); it is
        bound as a parameter, never formatted into the SQL. ``ids``: score exactly these rows (a few
        hundred candidates); ``allowed``: the best ``limit`` among these ids (a filter).
        """
        if not self.has_keyword_index or not match:
            return []
        sql = f"SELECT rowid, -bm25({KEYWORD_TABLE}) AS s FROM {KEYWORD_TABLE} WHERE {KEYWORD_TABLE} MATCH ?"
        with self.engine.connect() as conn:
            if ids is not None:
                ids = [int(i) for i in ids]
                out: list[tuple[int, float]] = []
                for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                    chunk = ids[start:start + 500]
                    rows = conn.exec_driver_sql(f"{sql} AND rowid IN ({','.join('?' * len(chunk))})",
                                                (match, *chunk))
                    out += [(int(r[0]), float(r[1])) for r in rows]
                out.sort(key=lambda r: -r[1])
                return out[:limit]
            if allowed is None:
                rows = conn.exec_driver_sql(sql + " ORDER BY s DESC LIMIT ?", (match, int(limit)))
                return [(int(r[0]), float(r[1])) for r in rows]
            out = []
            for r in conn.exec_driver_sql(sql + " ORDER BY s DESC", (match,)):  # streamed, best first
                if int(r[0]) in allowed:
                    out.append((int(r[0]), float(r[1])))
                    if len(out) >= limit:
                        break
            return out

    def keyword_doc_freq(self, tokens: Iterable[str]) -> dict[str, int]:
        """{token: number of captions containing it} for tokens as the keyword index stores them
        (stemmed; see ``PoolKeywords.tokens``), from the index's own vocabulary."""
        out: dict[str, int] = {}
        if not self.has_keyword_index:
            return out
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{KEYWORD_TABLE}_vocab "
                                 f"USING fts5vocab(main, {KEYWORD_TABLE}, row)")
            for token in dict.fromkeys(tokens):
                row = conn.exec_driver_sql(f"SELECT doc FROM temp.{KEYWORD_TABLE}_vocab WHERE term = ?",
                                           (token,)).first()
                out[token] = int(row[0]) if row else 0
        return out

    def captions_by_ids(self, ids: Iterable[int]) -> dict[int, str]:
        """{id: caption} of those ``ids`` that have a caption."""
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = conn.exec_driver_sql(
                    f"SELECT id, caption FROM images WHERE caption IS NOT NULL AND id IN ({','.join('?' * len(chunk))})",
                    tuple(chunk))
                out.update({int(i): c for i, c in rows})
        return out

    def get_meta(self, key: str) -> str | None:
        with self.session() as s:
            row = s.get(Meta, key)
            return row.value if row else None

    def set_meta(self, values: dict[str, str]) -> None:
        with self.session() as s:
            for key, value in values.items():
                s.merge(Meta(key=key, value=value))

    # --- images -----------------------------------------------------------------------------
    def all_images(self) -> list[ImageRow]:
        with self.session() as s:
            return list(s.scalars(select(ImageRow)))

    def image_ids(self) -> set[int]:
        with self.session() as s:
            return set(s.scalars(select(ImageRow.id)))

    def captioned_ids(self) -> set[int]:
        with self.session() as s:
            return set(s.scalars(select(ImageRow.id).where(ImageRow.caption.is_not(None))))

    def images_by_ids(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = list(ids)
        out: dict[int, ImageRow] = {}
        with self.session() as s:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                out.update({r.id: r for r in s.scalars(select(ImageRow).where(ImageRow.id.in_(chunk)))})
        return out

    def image_by_path(self, path: str) -> ImageRow | None:
        with self.session() as s:
            return s.scalars(select(ImageRow).where(ImageRow.path == path)).first()

    def filter_ids(self, filters: Filters) -> np.ndarray | None:
        """Sorted int64 ids of the images that pass ``filters``; None when no filter is set (all images).

        Everything but the glob runs in SQL with bound parameters; the glob (fnmatch rules on the full
        path, case-sensitive) is matched in Python over the rows the other conditions leave.
        """
        if not filters.active:
            return None
        conds = _filter_conditions(filters)
        with self.session() as s:
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
        with self.session() as s:
            rows = s.execute(select(ImageRow.content_hash, ImageRow.id)
                             .where(ImageRow.content_hash.in_(shared)).order_by(ImageRow.content_hash, ImageRow.id))
            for digest, row_id in rows:
                groups.setdefault(digest, []).append(row_id)
        return list(groups.values())

    def count_images(self) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(ImageRow)) or 0

    def next_id(self) -> int:
        with self.session() as s:
            return (s.scalar(select(func.max(ImageRow.id))) or 0) + 1

    def skipped(self) -> list[SkippedRow]:
        with self.session() as s:
            return list(s.scalars(select(SkippedRow).order_by(SkippedRow.path)))

    # --- runs -------------------------------------------------------------------------------
    def start_run(self, root: str) -> int:
        with self.session() as s:
            run = RunRow(root=root)
            s.add(run)
            s.flush()
            return run.id

    def finish_run(self, run_id: int, summary_json: str) -> None:
        with self.session() as s:
            run = s.get(RunRow, run_id)
            run.finished_at = utcnow()
            run.summary = summary_json

    def last_run(self) -> RunRow | None:
        with self.session() as s:
            return s.scalars(select(RunRow).order_by(RunRow.id.desc())).first()

    def delete_images(self, s: Session, ids: Iterable[int]) -> None:
        ids = list(ids)
        for start in range(0, len(ids), 500):
            s.execute(delete(ImageRow).where(ImageRow.id.in_(ids[start:start + 500])))

    def clear_skipped(self, s: Session, paths: Iterable[str]) -> None:
        paths = list(paths)
        for start in range(0, len(paths), 500):
            s.execute(delete(SkippedRow).where(SkippedRow.path.in_(paths[start:start + 500])))
