"""The metadata schema: SQLAlchemy 2.0 typed models, the schema version and its migrations.

An image's ``id`` is also its id in every vector store (``indexer/storage/bundle.py``), so rows and
vectors never shuffle when files come and go.
"""

from __future__ import annotations

from datetime import date, datetime, timezone

from sqlalchemy import BigInteger, Boolean, Date, DateTime, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# 2: captions (images.caption, captioner, captioned_at); 3: keyword index over captions;
# 4: vectors in append-only segments committed with the rows (meta ``vector_generation``; the
#    vector files of schema 3 are converted in place by indexer/storage/legacy.py);
# 5: catalogue metadata (catalogue_fields, catalogue_values; indexer/storage/catalogue.py)
# 6: tags (the ``image_classes`` table, ``images.tagger``) and caption confidence (``images.caption_confidence``)
SCHEMA_VERSION = 6


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """Key/value facts about the index: schema version, model provenance, the committed vector generation."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # = the vector stores' id
    path: Mapped[str] = mapped_column(Text, unique=True, index=True)  # absolute, resolved
    content_hash: Mapped[str] = mapped_column(String(64), index=True)  # blake2b-256 hex of the bytes
    byte_size: Mapped[int] = mapped_column(BigInteger)
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
    # probability that the caption is good, fitted on train (captioning/confidence.py); None: not rated (an older index)
    caption_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    tagger: Mapped[str | None] = mapped_column(String(255), nullable=True)  # fingerprint of the tagger of its classes
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)


class ImageClassRow(Base):
    """An image's most likely classifier classes with their calibrated probabilities (what its tags and
    the zero-shot signal are made of, see retrieval/tagging.py); replaced whenever the image is tagged."""

    __tablename__ = "image_classes"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    class_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    probability: Mapped[float] = mapped_column(Float)
    __table_args__ = (Index("ix_image_classes_class", "class_index", "probability"),)


class SkippedRow(Base):
    """Files that could not be indexed, with the reason; cleared when the file indexes or vanishes."""

    __tablename__ = "skipped"
    path: Mapped[str] = mapped_column(Text, primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    byte_size: Mapped[int] = mapped_column(BigInteger)
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


class CatalogueField(Base):
    """A catalogue field imported with ``pixquery meta import`` (the registry: its name and type)."""

    __tablename__ = "catalogue_fields"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)  # normalised: lower case, [a-z0-9_.]
    kind: Mapped[str] = mapped_column(String(8))  # "text", "number" or "date"
    keyword: Mapped[bool] = mapped_column(Boolean, default=False)  # text that joins the ``meta`` keyword signal
    imported_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class CatalogueValue(Base):
    """One image's value of one catalogue field, in the column of the field's kind (the others NULL)."""

    __tablename__ = "catalogue_values"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    field: Mapped[str] = mapped_column(ForeignKey("catalogue_fields.name", ondelete="CASCADE"), primary_key=True)
    text_value: Mapped[str | None] = mapped_column(Text, nullable=True)  # as imported
    text_key: Mapped[str | None] = mapped_column(Text, nullable=True)  # casefolded: what text filters compare
    num_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    date_value: Mapped[date | None] = mapped_column(Date, nullable=True)
    # partial indexes: each value sits in one of them only (a third of the index writes of full ones)
    __table_args__ = tuple(
        Index(f"ix_catalogue_{name}", "field", column, sqlite_where=text(f"{column} IS NOT NULL"),
              postgresql_where=text(f"{column} IS NOT NULL"))
        for name, column in (("text", "text_key"), ("num", "num_value"), ("date", "date_value")))


# schema version -> SQL that upgrades the previous version to it (portable SQL only: it runs on SQLite
# and PostgreSQL; what a keyword index or the vector files need is done by their own owners when an
# index opens)
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE images ADD COLUMN caption TEXT",
        "ALTER TABLE images ADD COLUMN captioner VARCHAR(255)",
        "ALTER TABLE images ADD COLUMN captioned_at TIMESTAMP"),  # TIMESTAMP: a type both databases know
    3: (),  # the keyword index: created and filled by the keyword index (indexer/storage/keywords.py)
    4: (),  # the vector files: converted by indexer/storage/legacy.py
    5: (),  # the catalogue tables: new tables, created with the others (Base.metadata.create_all)
    6: ("ALTER TABLE images ADD COLUMN caption_confidence FLOAT",  # the image_classes table: created with the others
        "ALTER TABLE images ADD COLUMN tagger VARCHAR(255)"),
}
