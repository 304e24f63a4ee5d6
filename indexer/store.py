"""Metadata store: SQLAlchemy 2.0 models and the one class that reads and writes them.

SQLite (WAL mode) by default; the URL is configurable so PostgreSQL can follow. An image's
``id`` is also its id in the FAISS index (``indexer/vectors.py``), so rows and vectors never
shuffle when files come and go.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterable, Iterator

from sqlalchemy import (
    DateTime, Float, ForeignKey, Integer, String, Text, create_engine, delete, event, func, select,
)
from sqlalchemy.engine import Engine as SqlEngine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from indexer.errors import IndexCorruptError

SCHEMA_VERSION = 2  # 2: captions (images.caption, captioner, captioned_at)


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
}


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
