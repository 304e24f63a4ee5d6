"""The metadata store: the one class that reads and writes the SQL database.

SQLite (WAL mode) by default; any SQLAlchemy URL otherwise (``EngineConfig.db_url``). The store owns
its sessions: callers never open one. Everything an indexing checkpoint changes (rows, skipped files,
deletions, meta facts such as the committed vector generation) goes in through :meth:`Store.write`
as one :class:`WriteBatch`, in one transaction.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from sqlalchemy import bindparam, create_engine, delete, event, func, insert, inspect, select, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine import Engine as SqlEngine
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from indexer.errors import DatabaseUnavailableError, IndexCorruptError, InputError
from indexer.storage.catalogue import CatalogueKeywords, catalogue_keywords_for, condition_sql
from indexer.storage.catalogue_rows import CatalogueRows
from indexer.storage.tag_rows import TagRows
from indexer.storage.filters import Filters, filter_conditions, literal_prefix, prefix_range
from indexer.storage.keywords import KeywordIndex, SqliteKeywords
from indexer.storage.pg_keywords import PostgresKeywords, lock_writers
from indexer.storage.schema import (
    MIGRATIONS, SCHEMA_VERSION, Base, ImageClassRow, ImageRow, Meta, RunRow, SkippedRow, utcnow,
)

CHUNK = 500  # ids per IN (...) list: under SQLite's bound-parameter limit
# built once: fused ranking reads its pool's captions for every search (0.60 against 0.41 ms for 100 ids, SQLite)
_CAPTIONS_OF = select(ImageRow.id, ImageRow.caption).where(ImageRow.caption.is_not(None),
                                                         ImageRow.id.in_(bindparam("ids", expanding=True)))


@functools.cache
def _image_columns() -> tuple[str, ...]:
    """The attribute names of every column of ``images`` (read once the mapper is configured)."""
    return tuple(a.key for a in inspect(ImageRow).column_attrs)


@dataclass
class WriteBatch:
    """What one checkpoint changes in the database, written in one transaction by :meth:`Store.write`."""

    rows: list[ImageRow] = field(default_factory=list)  # inserted or updated by id
    skips: list[SkippedRow] = field(default_factory=list)  # inserted or updated by path
    unskip: list[str] = field(default_factory=list)  # paths whose skip record goes (the file indexed, or vanished)
    deletes: list[int] = field(default_factory=list)  # image ids that leave the index
    meta: dict[str, str] = field(default_factory=dict)
    # new image rows as {column: value}, inserted in bulk (no lookup per row): ids and paths must be unused
    inserts: list[dict] = field(default_factory=list)
    # image id -> its classes [(class index, probability)], replacing what it had (retrieval/tagging.py)
    classes: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return (len(self.rows) + len(self.skips) + len(self.unskip) + len(self.deletes) + len(self.meta)
                + len(self.inserts) + len(self.classes))

    def clear(self) -> None:
        for part in (self.rows, self.skips, self.unskip, self.deletes, self.meta, self.inserts, self.classes):
            part.clear()


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL (None for another database, or an in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InputError(f"{safe_url(url)!r} is not a database URL: {exc}") from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def with_driver(url: str) -> str:
    """``url`` with PostgreSQL's driver made explicit: ``postgresql://`` means psycopg 3 (the ``postgres``
    extra), not SQLAlchemy's default psycopg2."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InputError(f"{safe_url(url)!r} is not a database URL: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def safe_url(url: str) -> str:
    """``url`` fit to print: its password, if any, as ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<a malformed database URL>"


def _no_password(error: object, url: str) -> str:
    """An error's text with the URL's password, if it shows, masked."""
    message = str(error).strip()
    try:
        password = make_url(url).password
    except ArgumentError:
        return message
    return message.replace(str(password), "***") if password else message


def keyword_index_for(engine: SqlEngine) -> KeywordIndex | None:
    """The keyword index this database can hold (None: keyword ranking is unavailable there)."""
    if engine.dialect.name == "sqlite":
        return SqliteKeywords(engine)
    if engine.dialect.name == "postgresql":
        return PostgresKeywords(engine)
    return None


_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", re.IGNORECASE)


def _already_applied(conn: Connection, statement: str) -> bool:
    """Whether ``statement`` adds a column the table already has (an index of the tags branch's draft
    schema 5 had these columns): adding it again would fail."""
    m = _ADD_COLUMN.match(statement.strip())
    return m is not None and m.group(2) in {c["name"] for c in inspect(conn).get_columns(m.group(1))}


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store(CatalogueRows, TagRows):
    """All SQL access; one :class:`Session` per unit of work, opened here and nowhere else."""

    def __init__(self, url: str) -> None:
        self.url = url = with_driver(url)
        self.safe_url = safe_url(url)
        try:
            self.engine: SqlEngine = create_engine(url)
        except (ArgumentError, ImportError) as exc:  # a malformed URL, or no driver for its database
            raise InputError(f"cannot use the database {self.safe_url!r}: {_no_password(exc, url)}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._postgres = self.engine.dialect.name == "postgresql"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.keywords: KeywordIndex | None = keyword_index_for(self.engine)
        self.catalogue: CatalogueKeywords | None = catalogue_keywords_for(self.engine)
        try:
            with self.engine.begin() as conn:  # tables, migrations and the keyword index: all or nothing
                if self._postgres:
                    lock_writers(conn)  # two processes opening a new index do not create it twice
                Base.metadata.create_all(conn)
                self._check_schema(conn)
                if self.keywords is not None:
                    self.keywords.install(conn)
                if self.catalogue is not None:
                    self.catalogue.install(conn)
            if self.keywords is not None:
                self.keywords.settle()
        except OperationalError as exc:
            self.engine.dispose()
            if not self._postgres:
                raise IndexCorruptError(f"cannot open the index database {self.safe_url}: {exc.orig}") from exc
            raise DatabaseUnavailableError(
                f"cannot reach the database {self.safe_url}: {_no_password(exc.orig, url)}") from None
        except SQLAlchemyError as exc:
            self.engine.dispose()
            reason = getattr(exc, "orig", None) or exc  # the driver's words, without SQLAlchemy's SQL dump
            raise IndexCorruptError(f"cannot open the index database {self.safe_url}: {reason}. If it is damaged, "
                                    f"rebuild the index with: pixquery index FOLDER --rebuild (your photos are not "
                                    f"touched)") from exc

    @staticmethod
    def exists(url: str) -> bool:
        """Whether an index database is at ``url`` (for SQLite: its file; elsewhere: its meta table).
        A server that cannot be reached is a :class:`DatabaseUnavailableError`, not a missing index."""
        path = sqlite_path(url)
        if path is not None:
            return path.exists()
        url = with_driver(url)
        try:
            engine = create_engine(url)
        except (ArgumentError, ImportError) as exc:
            raise InputError(f"cannot use the database {safe_url(url)!r}: {_no_password(exc, url)}") from None
        try:
            return inspect(engine).has_table(Meta.__tablename__)
        except OperationalError as exc:
            raise DatabaseUnavailableError(
                f"cannot reach the database {safe_url(url)}: {_no_password(exc.orig, url)}") from None
        except SQLAlchemyError:
            return False
        finally:
            engine.dispose()

    def drop_all(self) -> None:
        """Drop every table of the index (``--rebuild`` on a database that is not a file)."""
        if self.keywords is not None:
            with self.engine.begin() as conn:
                self.keywords.uninstall(conn)
        if self.catalogue is not None:
            with self.engine.begin() as conn:
                self.catalogue.uninstall(conn)
        Base.metadata.drop_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def write(self, batch: WriteBatch) -> None:
        """Everything in ``batch`` in one transaction: deletions, then skip records, then rows, their
        classes and meta (and the keyword index's entries of the rows, where triggers do not keep it in step)."""
        if not len(batch):
            return
        with self._session() as s:
            if self._postgres:
                lock_writers(s.connection())
            for start in range(0, len(batch.deletes), CHUNK):
                chunk = batch.deletes[start:start + CHUNK]
                s.execute(delete(ImageClassRow).where(ImageClassRow.image_id.in_(chunk)))  # not only by cascade
                s.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
            for start in range(0, len(batch.unskip), CHUNK):
                s.execute(delete(SkippedRow).where(SkippedRow.path.in_(batch.unskip[start:start + CHUNK])))
            if batch.inserts:  # rows known to be new (bulk builders): no lookup at all
                s.execute(insert(ImageRow), batch.inserts)
            self._write_rows(s, batch.rows)
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
            if batch.rows and self.keywords is not None:
                s.flush()
                self.keywords.update(s.connection(), (row.id for row in batch.rows))

    @staticmethod
    def _write_rows(s: Session, rows: list[ImageRow]) -> None:
        """Insert or update ``rows`` by id (the last of one id wins), as ``merge`` would, but in two
        executemany statements instead of a SELECT and a write per row: the rows a checkpoint updates
        first (a moved file's row frees its old path), then the new ones."""
        if not rows:
            return
        latest = {int(r.id): r for r in rows}
        ids = list(latest)
        existing: set[int] = set()
        for start in range(0, len(ids), CHUNK):
            existing.update(s.scalars(select(ImageRow.id).where(ImageRow.id.in_(ids[start:start + CHUNK]))))
        keys = _image_columns()
        old = [{k: getattr(r, k) for k in keys} for i, r in latest.items() if i in existing]
        new = [{k: getattr(r, k) for k in keys} for i, r in latest.items() if i not in existing]
        if old:
            s.execute(update(ImageRow), old)
        if new:
            s.execute(insert(ImageRow), new)

    # --- meta -------------------------------------------------------------------------------
    def _check_schema(self, conn: Connection) -> None:
        """Record the schema version of a new index; migrate an older one (in ``conn``'s transaction)."""
        version = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
        if version is None:
            conn.execute(insert(Meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        if int(version) > SCHEMA_VERSION:
            raise IndexCorruptError(
                f"the index was written by a newer pixquery (schema {version} > {SCHEMA_VERSION}); upgrade pixquery"
            )
        for target in range(int(version) + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                if not _already_applied(conn, statement):
                    conn.exec_driver_sql(statement)
        if int(version) < SCHEMA_VERSION:
            conn.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(SCHEMA_VERSION)))

    def captions_by_ids(self, ids: Iterable[int]) -> dict[int, str]:
        """{id: caption} of those ``ids`` that have a caption."""
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), CHUNK):
                rows = conn.execute(_CAPTIONS_OF, {"ids": ids[start:start + CHUNK]})
                out.update({int(i): c for i, c in rows.all()})  # one fetch, not a call per row
        return out

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
        ids = [int(i) for i in ids if -2**31 <= int(i) < 2**31]  # ids are INTEGER: 32-bit on PostgreSQL
        out: dict[int, ImageRow] = {}
        with self._session() as s:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start:start + CHUNK]
                out.update({r.id: r for r in s.scalars(select(ImageRow).where(ImageRow.id.in_(chunk)))})
        return out

    def image_by_path(self, path: str) -> ImageRow | None:
        if "\x00" in path:  # no file name holds a NUL byte (and PostgreSQL text cannot)
            return None
        with self._session() as s:
            return s.scalars(select(ImageRow).where(ImageRow.path == path)).first()

    def filter_ids(self, filters: Filters) -> np.ndarray | None:
        """Sorted int64 ids of the images that pass ``filters``; None when no filter is set (all images).

        Everything but the glob runs in SQL with bound parameters; the glob (fnmatch rules on the full
        path, case-sensitive) is matched in Python over the rows the other conditions leave.
        """
        if not filters.active:
            return None
        for value in filters.file_types:  # (a folder with one is refused by filter_conditions)
            if "\x00" in value:  # no file name holds a NUL byte (and PostgreSQL text cannot)
                raise InputError(f"file type {value[:200]!r} contains a NUL byte")
        conds = filter_conditions(filters)
        if filters.where:
            kinds = self.catalogue_kinds()
            conds += [condition_sql(c, kinds) for c in filters.where]
        if self.engine.dialect.name == "sqlite":  # the path index answers a known prefix without a scan
            conds += prefix_range(literal_prefix(filters))
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

    def unfinished_runs(self) -> int:
        """Runs that started and never finished (killed, or stopped by an error)."""
        with self._session() as s:
            return s.scalar(select(func.count()).select_from(RunRow).where(RunRow.finished_at.is_(None))) or 0

    def last_run(self) -> RunRow | None:
        with self._session() as s:
            return s.scalars(select(RunRow).order_by(RunRow.id.desc())).first()

    # --- consistency (pixquery doctor) --------------------------------------------------------
    def integrity_problems(self) -> list[str]:
        """What the database itself finds damaged (SQLite's ``quick_check``; other databases check
        themselves); empty when it is sound."""
        if self.engine.dialect.name != "sqlite":
            return []
        try:
            with self.engine.connect() as conn:
                rows = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check")]
        except SQLAlchemyError as exc:
            return [str(exc)]
        return [] if rows == ["ok"] else rows
