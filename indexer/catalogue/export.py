"""``pixquery export``: what the index knows about each image (path, caption, captioner, size, dates,
imported catalogue fields) as CSV, JSON lines or JSON, for product descriptions and alt text.

The columns come from a registry, :data:`FIELDS`: each :class:`ExportField` has a name, a line of help
and a function of the image's row and its catalogue values. Catalogue fields are added per index, under
their own names (``meta.NAME`` when a name is taken by a built-in field). Another part of pixquery
adds its own columns with :func:`register` (tags, caption confidence).

Uncertain captions: :func:`caption_uncertain` says a caption should be reviewed before it is published
(as a product description or alt text): its stored confidence (captioning/confidence.py) is below the
index's threshold. The ``caption_uncertain`` column shows it, the ``alt_text`` column gives the tags
instead of such a caption, and ``--alt-text-html`` leaves those images for review instead of writing
their alt text. A caption never rated (an index from before caption confidence) is not marked.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Callable, Iterable, TextIO

from indexer.errors import InputError
from indexer.storage.schema import ImageRow

FORMATS = ("csv", "jsonl", "json")


def caption_uncertain(row: ImageRow, threshold: float | None = None) -> bool:
    """Whether ``row``'s caption should be reviewed before it is published: it was rated, and below the
    index's confidence ``threshold`` (None: the index rates no captions, so none is marked)."""
    return bool(row.caption) and row.caption_confidence is not None and threshold is not None \
        and row.caption_confidence < threshold


@dataclass(frozen=True)
class ExportField:
    name: str
    help: str
    # (row, its catalogue values) -> value (None: empty); ``described``: (row, its
    # indexer.search.describe.ImageDescription or None) instead
    get: Callable[[ImageRow, object], object]
    described: bool = False


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


FIELDS: dict[str, ExportField] = {}


def register(field: ExportField) -> None:
    """Add an export column (its name must be new)."""
    if field.name in FIELDS:
        raise ValueError(f"export field {field.name!r} exists already")
    FIELDS[field.name] = field


for _field in (
    ExportField("id", "the image's id in the index", lambda r, m: r.id),
    ExportField("path", "absolute path of the file", lambda r, m: r.path),
    ExportField("file_name", "the file's name", lambda r, m: os.path.basename(r.path)),
    ExportField("caption", "the generated caption", lambda r, m: r.caption),
    ExportField("captioner", "the captioner that wrote it (name|weights sha256)", lambda r, m: r.captioner),
    ExportField("caption_uncertain", "the caption should be reviewed before use (rated below the threshold)",
                lambda r, d: d is not None and d.caption_is_confident is False, described=True),
    ExportField("caption_confidence", "probability that the caption is good, fitted on train (empty: not rated)",
                lambda r, d: None if d is None or d.caption_confidence is None else round(d.caption_confidence, 4),
                described=True),
    ExportField("tags", "what the classifier sees, most likely first (empty: no confident class, or not "
                "tagged: pixquery retag)", lambda r, d: ", ".join(t.name for t in d.tags) if d and d.tags else None,
                described=True),
    ExportField("alt_text", "the caption when it is rated confident, else the tags (never an uncertain caption)",
                lambda r, d: d.alt_text() if d is not None else None, described=True),
    ExportField("captioned_at", "when the caption was written (UTC)", lambda r, m: _iso(r.captioned_at)),
    ExportField("width", "in pixels", lambda r, m: r.width),
    ExportField("height", "in pixels", lambda r, m: r.height),
    ExportField("file_type", "lower-case extension", lambda r, m: r.file_type),
    ExportField("byte_size", "file size in bytes", lambda r, m: r.byte_size),
    ExportField("content_hash", "the index's content hash (blake2b-256; meta import --key hash)",
                lambda r, m: r.content_hash),
    ExportField("taken_at", "EXIF date taken", lambda r, m: _iso(r.taken_at)),
    ExportField("modified_at", "file modification time (local)",
                lambda r, m: _iso(datetime.fromtimestamp(r.mtime)) if r.mtime else None),
    ExportField("indexed_at", "when it was indexed (UTC)", lambda r, m: _iso(r.indexed_at)),
):
    register(_field)

DEFAULT_FIELDS = ("path", "caption", "captioner", "caption_uncertain", "caption_confidence", "tags", "width", "height", "file_type", "taken_at",
                  "modified_at")


def catalogue_columns(names: Iterable[str]) -> dict[str, str]:
    """{export column: catalogue field} for an index's catalogue fields."""
    return {(f"meta.{n}" if n in FIELDS else n): n for n in names}


def columns_for(requested: list[str] | None, catalogue: list[str]) -> tuple[list[str], dict[str, str]]:
    """The export's columns (``requested`` or the defaults plus every catalogue field) and the catalogue
    ones among them; InputError for a name that is neither."""
    meta = catalogue_columns(catalogue)
    aliases = {f"meta.{n}": n for n in catalogue}
    if not requested:
        return [*DEFAULT_FIELDS, *meta], meta
    out = []
    for name in requested:
        if name in FIELDS:
            out.append(name)
        elif name in meta or name in aliases:
            meta.setdefault(name, aliases.get(name, name))
            out.append(name)
        else:
            raise InputError(f"no export field {name!r}; the fields are: {', '.join([*FIELDS, *catalogue_columns(catalogue)])}")
    return out, {c: f for c, f in meta.items() if c in out}


def needs_descriptions(columns: list[str]) -> bool:
    """Whether any of ``columns`` reads the images' descriptions (tags, caption confidence)."""
    return any(c in FIELDS and FIELDS[c].described for c in columns)


def records(rows: Iterable[ImageRow], values: dict[int, dict], columns: list[str],
            meta: dict[str, str], described: dict[int, object] | None = None) -> Iterable[dict]:
    """One {column: value} per row; ``described``: {id: ImageDescription} (Engine.describe) for the tags
    and caption-confidence columns."""
    described = described or {}
    for row in rows:
        mine = values.get(row.id, {})
        yield {c: (mine.get(meta[c]) if c in meta else
                   FIELDS[c].get(row, described.get(row.id) if FIELDS[c].described else mine)) for c in columns}


def _plain(value: object) -> object:
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return value


def write(recs: Iterable[dict], columns: list[str], fmt: str, out: TextIO) -> int:
    """Write ``recs`` to ``out`` in ``fmt``; returns how many."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    n = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for rec in recs:
            writer.writerow(["" if rec[c] is None else _plain(rec[c]) for c in columns])
            n += 1
    elif fmt == "jsonl":
        for rec in recs:
            out.write(json.dumps({c: _plain(v) for c, v in rec.items()}, ensure_ascii=False) + "\n")
            n += 1
    else:
        out.write("[")
        for rec in recs:
            out.write(("," if n else "") + "\n" + json.dumps({c: _plain(v) for c, v in rec.items()}, ensure_ascii=False))
            n += 1
        out.write("\n]\n")
    return n


def write_file(recs: Iterable[dict], columns: list[str], fmt: str, path: Path) -> int:
    """Write to ``path`` through a temporary file renamed over it: a failed export leaves no half file."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            n = write(recs, columns, fmt, f)
        os.replace(tmp, path)
        return n
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def to_text(recs: Iterable[dict], columns: list[str], fmt: str) -> str:
    buf = io.StringIO()
    write(recs, columns, fmt, buf)
    return buf.getvalue()
