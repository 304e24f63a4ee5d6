"""Catalogue metadata in SQL: typed values per image and field, the conditions that filter on them, and
the keyword index over their text.

Imported by ``pixquery meta import`` (``indexer/catalogue/csv_import.py`` parses and checks the file;
:meth:`indexer.storage.store.Store.import_catalogue` writes it here in one transaction). Each value
sits in the column of its field's kind (``text_value``/``text_key``, ``num_value`` or
``date_value``), so ``price<50`` compares numbers and ``released>=2024-01-01`` dates, with an index on
(field, value) for each.

A filter condition (``category=shoes``, ``price<50``, ``title~linen``) is parsed here into a field, an
operator and a value; :func:`condition_sql` types the value by the field's registered kind and turns it
into ``images.id IN (SELECT image_id ... WHERE field = ? AND value < ?)`` with bound parameters only.
Field names are checked against the registry, never formatted into SQL.

The keyword index (SQLite: an FTS5 table ``catalogue_fts``, rowid = image id, the index's tokenizer)
holds the text of the fields marked ``keyword``, so a SKU or a brand typed in a query can bring its
product into fused ranking's pool (the ``meta`` weight, ``indexer/search/ranker.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date
from typing import Iterable, Sequence

from sqlalchemy import ColumnElement, bindparam, delete, func, insert, select
from sqlalchemy.engine import Connection, Engine

from indexer.errors import InputError
from indexer.storage.keywords import KEYWORD_TOKENIZER, fts_any
from indexer.storage.schema import CatalogueField, CatalogueValue, ImageRow

KINDS = ("text", "number", "date")
OPERATORS = ("<=", ">=", "!=", "=", "<", ">", "~")
MAX_FIELD_CHARS = 64
CHUNK = 500  # ids per IN (...) list
_FIELD_NAME = re.compile(r"^[a-z0-9_][a-z0-9_.]*$")
_CONDITION = re.compile(r"^\s*(?P<field>[^<>=!~]+?)\s*(?P<op><=|>=|!=|==|=|<|>|~)\s*(?P<value>.*?)\s*$", re.DOTALL)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def field_name(raw: str) -> str:
    """A column header or a typed field name as the registry keeps it: lower case, runs of spaces and
    hyphens as ``_`` (``"In Stock"`` -> ``in_stock``); InputError when nothing usable is left."""
    name = re.sub(r"[\s\-]+", "_", (raw or "").strip().lower())
    if not name or len(name) > MAX_FIELD_CHARS or not _FIELD_NAME.match(name):
        raise InputError(f"{raw[:80]!r} is not a usable field name: use letters, digits, '_' and '.' "
                         f"(at most {MAX_FIELD_CHARS} characters)")
    return name


def parse_number(text: str) -> float | None:
    """A finite number from a cell (``12``, ``-3.5``, ``1e3``), else None."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_date(text: str) -> date | None:
    """A day written as YYYY-MM-DD, else None."""
    text = text.strip()
    if not _DATE.match(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class Condition:
    """One filter on a catalogue field: ``field op value`` (``value``: one or more alternatives joined by
    ``|`` for ``=`` and ``!=``).

    ``=``: equals (text: ignoring case); ``!=``: does not equal (images without the field pass too);
    ``<``, ``<=``, ``>``, ``>=``: numbers and dates; ``~``: the text contains the value (ignoring case).
    """

    field: str
    op: str
    value: str

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value}"


def parse_condition(spec: str | Condition) -> Condition:
    """``"price<50"`` -> Condition("price", "<", "50"); InputError for anything else."""
    if isinstance(spec, Condition):
        return spec
    if not isinstance(spec, str) or len(spec) > 1000:
        raise InputError("a catalogue filter is FIELD OP VALUE, e.g. category=shoes or price<50")
    m = _CONDITION.match(spec)
    if m is None:
        raise InputError(f"{spec[:100]!r} is not a catalogue filter: write FIELD OP VALUE with OP one of "
                         f"{' '.join(OPERATORS)}, e.g. category=shoes or price<50")
    value = m.group("value")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    if not value:
        raise InputError(f"{spec[:100]!r}: the value after {m.group('op')} is empty")
    op = "=" if m.group("op") == "==" else m.group("op")
    return Condition(field_name(m.group("field")), op, value)


def _typed(cond: Condition, kind: str, text: str) -> object:
    if kind == "number":
        value = parse_number(text)
        if value is None:
            raise InputError(f"{cond}: {cond.field} is a number field and {text!r} is not a number")
        return value
    if kind == "date":
        value = parse_date(text)
        if value is None:
            raise InputError(f"{cond}: {cond.field} is a date field; write the date as YYYY-MM-DD, not {text!r}")
        return value
    return text.casefold()


def condition_sql(cond: Condition, kinds: dict[str, str]) -> ColumnElement[bool]:
    """The SQL condition on ``images`` for ``cond``, its value typed by the field's kind; bound parameters
    only. InputError for an unknown field or an operator the kind has no meaning for."""
    kind = kinds.get(cond.field)
    if kind is None:
        known = ", ".join(sorted(kinds)) or "none yet (import some with: pixquery meta import FILE.csv)"
        raise InputError(f"{cond}: no catalogue field {cond.field!r}; the fields are: {known}")
    column = {"text": CatalogueValue.text_key, "number": CatalogueValue.num_value,
              "date": CatalogueValue.date_value}[kind]
    has = select(CatalogueValue.image_id).where(CatalogueValue.field == cond.field)
    if cond.op in ("=", "!="):
        values = [_typed(cond, kind, v) for v in cond.value.split("|") if v.strip() or kind == "text"]
        if not values:
            raise InputError(f"{cond}: nothing to compare with")
        matching = has.where(column.in_(values))
        return ImageRow.id.in_(matching) if cond.op == "=" else ImageRow.id.not_in(matching)
    if cond.op == "~":
        if kind != "text":
            raise InputError(f"{cond}: '~' (contains) is for text fields; {cond.field} is a {kind} field")
        return ImageRow.id.in_(has.where(column.contains(cond.value.casefold(), autoescape=True)))
    if kind == "text":
        raise InputError(f"{cond}: {cond.field} is a text field; compare it with =, != or ~ (contains)")
    value = _typed(cond, kind, cond.value)
    compare = {"<": column < value, "<=": column <= value, ">": column > value, ">=": column >= value}[cond.op]
    return ImageRow.id.in_(has.where(compare))


# --- reading and writing ------------------------------------------------------------------------------
def field_kinds(conn: Connection) -> dict[str, str]:
    return {name: kind for name, kind in conn.execute(select(CatalogueField.name, CatalogueField.kind))}


def values_of(conn: Connection, ids: Sequence[int]) -> dict[int, dict[str, object]]:
    """{image id: {field: value}} (text as imported, numbers as float, dates as date) of ``ids``."""
    out: dict[int, dict[str, object]] = {}
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), CHUNK):
        rows = conn.execute(select(CatalogueValue.image_id, CatalogueValue.field, CatalogueValue.text_value,
                                   CatalogueValue.num_value, CatalogueValue.date_value)
                            .where(CatalogueValue.image_id.in_(ids[start:start + CHUNK])))
        for image_id, name, text, num, day in rows:
            out.setdefault(int(image_id), {})[name] = text if text is not None else num if num is not None else day
    return out


def distinct_texts(conn: Connection, name: str, limit: int) -> list[str]:
    """Up to ``limit`` distinct values of text field ``name`` (as imported), most frequent first."""
    rows = conn.execute(select(CatalogueValue.text_value, func.count()).where(CatalogueValue.field == name)
                        .group_by(CatalogueValue.text_value).order_by(func.count().desc(), CatalogueValue.text_value)
                        .limit(limit))
    return [v for v, _ in rows if v is not None]


def value_range(conn: Connection, name: str, kind: str) -> tuple[object, object]:
    column = CatalogueValue.num_value if kind == "number" else CatalogueValue.date_value
    return tuple(conn.execute(select(func.min(column), func.max(column)).where(CatalogueValue.field == name)).one())


def value_row(image_id: int, name: str, kind: str, value: object) -> dict:
    """The ``catalogue_values`` row of one typed value (text, float or date)."""
    row = {"image_id": image_id, "field": name, "text_value": None, "text_key": None, "num_value": None,
           "date_value": None}
    if kind == "text":
        row["text_value"], row["text_key"] = value, str(value).casefold()
    elif kind == "number":
        row["num_value"] = value
    else:
        row["date_value"] = value
    return row


def replace_values(conn: Connection, fields: dict[str, str],
                   rows: Iterable[tuple[int, dict[str, object]]]) -> tuple[int, int, list[int]]:
    """For each (image id, {field: value or None}): its values of ``fields`` become these (None: none).
    Only what differs is written (a re-import of an unchanged catalogue writes nothing).
    Returns (values written, values removed, ids whose values changed)."""
    rows = list(rows)
    names = list(fields)
    wanted = {(i, name): value_row(i, name, fields[name], v) for i, cells in rows for name, v in cells.items()
              if v is not None}
    columns = ("text_value", "num_value", "date_value")
    existing: dict[tuple[int, str], tuple] = {}
    for start in range(0, len(rows), CHUNK):
        ids = [i for i, _ in rows[start:start + CHUNK]]
        found = conn.execute(select(CatalogueValue.image_id, CatalogueValue.field, CatalogueValue.text_value,
                                    CatalogueValue.num_value, CatalogueValue.date_value)
                             .where(CatalogueValue.image_id.in_(ids), CatalogueValue.field.in_(names)))
        existing.update({(int(i), f): (t, n, d) for i, f, t, n, d in found})
    same = {key for key, old in existing.items()
            if key in wanted and tuple(wanted[key][c] for c in columns) == old}
    gone = [{"i": i, "f": f} for (i, f) in existing if (i, f) not in same]
    new = [row for key, row in wanted.items() if key not in same]
    if gone:
        conn.execute(delete(CatalogueValue).where(CatalogueValue.image_id == bindparam("i"),
                                                  CatalogueValue.field == bindparam("f")), gone)
    for start in range(0, len(new), 20_000):
        conn.execute(insert(CatalogueValue), new[start:start + 20_000])
    changed = sorted({g["i"] for g in gone} | {row["image_id"] for row in new})
    removed = sum((g["i"], g["f"]) not in wanted for g in gone)
    return len(new), removed, changed


def keyword_texts(conn: Connection, ids: Sequence[int]) -> dict[int, str]:
    """{image id: its keyword fields' text, joined} of ``ids`` that have some."""
    keyword_fields = select(CatalogueField.name).where(CatalogueField.keyword.is_(True))
    out: dict[int, list[str]] = {}
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), CHUNK):
        rows = conn.execute(select(CatalogueValue.image_id, CatalogueValue.text_value)
                            .where(CatalogueValue.image_id.in_(ids[start:start + CHUNK]),
                                   CatalogueValue.field.in_(keyword_fields), CatalogueValue.text_value.is_not(None))
                            .order_by(CatalogueValue.image_id, CatalogueValue.field))
        for image_id, text in rows:
            out.setdefault(int(image_id), []).append(text)
    return {i: " ; ".join(parts) for i, parts in out.items()}


# --- the keyword index over catalogue text -------------------------------------------------------------
CATALOGUE_FTS = "catalogue_fts"
_SQLITE_DDL = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {CATALOGUE_FTS} USING fts5(text, tokenize='{KEYWORD_TOKENIZER}')",
    # an image that leaves the index takes its catalogue text along (its values go by ON DELETE CASCADE)
    f"CREATE TRIGGER IF NOT EXISTS catalogue_fts_ad AFTER DELETE ON images BEGIN "
    f"DELETE FROM {CATALOGUE_FTS} WHERE rowid = old.id; END",
)


class CatalogueKeywords:
    """BM25 over the catalogue text of each image (SQLite FTS5; ``catalogue_fts``, rowid = image id)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @staticmethod
    def install(conn: Connection) -> None:
        for statement in _SQLITE_DDL:
            conn.exec_driver_sql(statement)

    @staticmethod
    def uninstall(conn: Connection) -> None:
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS catalogue_fts_ad")
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {CATALOGUE_FTS}")

    @staticmethod
    def refresh(conn: Connection, ids: Sequence[int]) -> None:
        """Write the keyword text of ``ids`` again from their values (inside the import's transaction)."""
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            marks = ",".join("?" * len(chunk))
            conn.exec_driver_sql(f"DELETE FROM {CATALOGUE_FTS} WHERE rowid IN ({marks})", tuple(chunk))
        texts = keyword_texts(conn, ids)
        if texts:
            conn.exec_driver_sql(f"INSERT INTO {CATALOGUE_FTS}(rowid, text) VALUES (?, ?)", list(texts.items()))

    @staticmethod
    def rebuild(conn: Connection) -> None:
        """Every image's keyword text again (after the keyword fields changed)."""
        conn.exec_driver_sql(f"DELETE FROM {CATALOGUE_FTS}")
        ids = [int(i) for (i,) in conn.execute(select(CatalogueValue.image_id).distinct())]
        CatalogueKeywords.refresh(conn, ids)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {CATALOGUE_FTS}").scalar() or 0)

    def top(self, phrases: Sequence[str], limit: int, allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """(id, BM25 > 0) of the best ``limit`` images whose catalogue text contains any of ``phrases``."""
        if not phrases or limit < 1:
            return []
        sql = (f"SELECT rowid, -bm25({CATALOGUE_FTS}) AS s FROM {CATALOGUE_FTS} WHERE {CATALOGUE_FTS} MATCH ? "
               f"ORDER BY s DESC")
        out = []
        with self.engine.connect() as conn:
            for r in conn.exec_driver_sql(sql, (fts_any(phrases),)):
                if allowed is None or int(r[0]) in allowed:
                    out.append((int(r[0]), float(r[1])))
                    if len(out) >= limit:
                        break
        return out

    def doc_freq(self, tokens: Iterable[str]) -> dict[str, int]:
        tokens = list(dict.fromkeys(tokens))
        out: dict[str, int] = {}
        if not tokens:
            return out
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{CATALOGUE_FTS}_vocab "
                                 f"USING fts5vocab(main, {CATALOGUE_FTS}, row)")
            for token in tokens:
                row = conn.exec_driver_sql(f"SELECT doc FROM temp.{CATALOGUE_FTS}_vocab WHERE term = ?",
                                           (token,)).first()
                out[token] = int(row[0]) if row else 0
        return out


def catalogue_keywords_for(engine: Engine) -> CatalogueKeywords | None:
    """The catalogue's keyword index where the database has one (SQLite), else None (no ``meta`` signal)."""
    return CatalogueKeywords(engine) if engine.dialect.name == "sqlite" else None
