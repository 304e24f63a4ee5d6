"""``pixquery meta import``: a CSV of catalogue fields (SKU, title, price, category...) attached to indexed
images, checked whole before anything is written.

The file is read and decoded (UTF-8 unless told otherwise), split by its delimiter, and every row is
checked: the key column must be there and filled, no key twice, every cell of a number column a
number and of a date column a YYYY-MM-DD day. Column types come from ``types`` (``price=number``),
else from the field's earlier import, else from the values (all numbers: number; all days: date;
otherwise text, except that a column mostly of numbers or days with a few others is an error that names
the bad cells, since it is more likely a typo than a text column). Only when the whole file passes are
the values written, in one transaction (:meth:`indexer.storage.store.Store.import_catalogue`).

Keys: ``path`` (absolute, or relative to ``base``, by default the CSV's folder), ``file`` (the file
name; every indexed image of that name gets the row), ``sha256`` (of the file's bytes: each indexed
file is read and hashed) or ``hash`` (the index's own content hash, as ``pixquery export`` writes it).
Rows whose key matches no indexed image are reported, never silently dropped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import InputError
from indexer.storage.catalogue import KINDS, field_name, parse_date, parse_number
from indexer.storage.store import Store

KEYS = ("path", "file", "sha256", "hash")
MAX_ERRORS = 10  # bad cells listed in one message
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass
class ImportReport:
    rows: int  # data rows in the file
    matched_rows: int
    images: int  # images that the file's rows name
    values: int  # values written (new or changed; an unchanged value is not written again)
    removed: int  # values removed (an empty cell where there was a value)
    changed_images: int  # images whose values changed
    fields: dict[str, str]  # name -> kind
    unmatched: list[str] = field(default_factory=list)  # keys that matched no indexed image
    ambiguous: int = 0  # keys that matched more than one image (file names)
    unreadable: int = 0  # indexed files that could not be hashed (--key sha256)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def decode(data: bytes, encoding: str, source: str) -> str:
    if b"\x00" in data[:65536]:
        raise InputError(f"{source} is not a text file (it holds NUL bytes); export it as CSV")
    try:
        return data.decode(encoding)
    except LookupError:
        raise InputError(f"unknown text encoding {encoding!r}") from None
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"{source} is not {encoding} text (byte 0x{data[exc.start]:02x} on line {line}); save it "
                         f"as UTF-8, or name its encoding with --encoding (e.g. cp1252 or latin-1)") from None


def read_table(text: str, delimiter: str, key_column: str, source: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of CSV text; InputError for a missing key column (with a hint when
    the file seems to use another delimiter) or a row whose cell count differs from the header's."""
    if len(delimiter) != 1:
        raise InputError(f"the delimiter must be one character, got {delimiter!r}")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(c.strip() for c in header):
            raise InputError(f"{source} is empty: the first line must name the columns")
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # blank lines
            if len(cells) != len(header):
                raise InputError(f"{source}, line {reader.line_num}: {len(cells)} cells where the header has "
                                 f"{len(header)}; is a value with a '{delimiter}' not quoted?")
            rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise InputError(f"{source}, line {reader.line_num}: not valid CSV ({exc})") from None
    names = [c.strip().lower() for c in header]
    if key_column.lower() not in names:
        others = [d for d in ",;\t|" if d != delimiter and d in header[0]]
        hint = (f"; the file seems to be separated by {others[0]!r}: pass --delimiter "
                f"{repr(others[0]) if others[0] != chr(9) else 'tab'}" if len(header) == 1 and others else "")
        raise InputError(f"{source} has no {key_column!r} column (its columns: {', '.join(h.strip() for h in header)})"
                         f"{hint}")
    return header, rows


def _column_kind(name: str, cells: list[tuple[int, str]], declared: str | None) -> str:
    """The kind of a column: ``declared`` (checked), else inferred from its non-empty cells."""
    filled = [(line, v) for line, v in cells if v.strip()]
    if declared is None:
        numbers = sum(parse_number(v) is not None for _, v in filled)
        days = sum(parse_date(v) is not None for _, v in filled)
        if filled and numbers == len(filled):
            return "number"
        if filled and days == len(filled):
            return "date"
        if filled and max(numbers, days) * 2 <= len(filled):
            return "text"
        if not filled:
            return "text"
        declared = "number" if numbers >= days else "date"  # mostly one kind: the others are errors below
    if declared == "text":
        return "text"
    parse = parse_number if declared == "number" else parse_date
    bad = [(line, v) for line, v in filled if parse(v) is None]
    if bad:
        what = "numbers" if declared == "number" else "dates (YYYY-MM-DD)"
        listed = "; ".join(f"line {line}: {v[:40]!r}" for line, v in bad[:MAX_ERRORS])
        more = f" and {len(bad) - MAX_ERRORS} more" if len(bad) > MAX_ERRORS else ""
        raise InputError(f"column {name!r} holds {what}, but not everywhere: {listed}{more}. Fix those cells, or "
                         f"import the column as text with --type {name}=text")
    return declared


def parse_types(specs: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``["price=number", "sku=text"]`` (or comma lists) -> {field: kind}."""
    out: dict[str, str] = {}
    for spec in specs or ():
        for part in spec.split(","):
            if not part.strip():
                continue
            name, sep, kind = part.partition("=")
            if not sep or kind.strip().lower() not in KINDS:
                raise InputError(f"--type wants FIELD=KIND with KIND one of {', '.join(KINDS)}; got {part!r}")
            out[field_name(name)] = kind.strip().lower()
    return out


class KeyIndex:
    """Indexed images by the import key: path, file name, sha256 of the bytes, or content hash."""

    def __init__(self, store: Store, key: str, base: Path) -> None:
        self.key, self.base = key, base
        self.unreadable = 0
        self.by: dict[str, list[int]] = {}
        for image_id, path, content_hash in store.key_lookup():
            if key == "path":
                names = [path]
            elif key == "file":
                names = [os.path.basename(path)]
            elif key == "hash":
                names = [content_hash.lower()]
            else:
                digest = self._sha256(path)
                names = [digest] if digest else []
            for name in names:
                self.by.setdefault(name, []).append(image_id)

    def _sha256(self, path: str) -> str | None:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            self.unreadable += 1
            return None
        return h.hexdigest()

    def normalise(self, cell: str, line: int) -> str:
        """The key of a cell as the index holds it (InputError for a malformed hash)."""
        value = cell.strip()
        if self.key == "path":
            return os.path.normpath(os.path.join(self.base, os.path.expanduser(value)))
        if self.key in ("sha256", "hash"):
            if not _HEX64.match(value):
                raise InputError(f"line {line}: {value[:80]!r} is not a {self.key} (64 hexadecimal digits)")
            return value.lower()
        return value

    def ids(self, key: str) -> list[int]:
        found = self.by.get(key)
        if found is None and self.key == "path":
            try:
                found = self.by.get(os.path.realpath(key))  # through symbolic links, as indexing resolved them
            except (OSError, ValueError):
                found = None
        return found or []


def import_csv(store: Store, source: Path, key: str = "path", key_column: str | None = None,
               delimiter: str = ",", encoding: str = "utf-8-sig", types: dict[str, str] | None = None,
               keyword_fields: list[str] | None = None, base: Path | None = None, replace: bool = False,
               strict: bool = False) -> ImportReport:
    """Check all of ``source`` and then write it in one transaction (see module doc).

    ``keyword_fields``: the text fields whose words join the ``meta`` keyword signal (None: every text
    field); ``replace``: forget every catalogue field first; ``strict``: refuse the file when a key
    matches no image.
    """
    t0 = time.perf_counter()
    if key not in KEYS:
        raise InputError(f"--key must be one of {', '.join(KEYS)}, got {key!r}")
    source = Path(source).expanduser()
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None
    key_column = key_column or key
    header, rows = read_table(decode(data, encoding, str(source)), delimiter, key_column, str(source))
    if not rows:
        raise InputError(f"{source} has a header but no rows")
    names = [c.strip() for c in header]
    key_at = [n.lower() for n in names].index(key_column.lower())
    columns: dict[str, int] = {}
    for i, raw in enumerate(names):
        if i == key_at:
            continue
        name = field_name(raw)
        if name in columns:
            raise InputError(f"{source}: two columns are both called {name!r} (names ignore case, spaces and '-')")
        columns[name] = i
    if not columns:
        raise InputError(f"{source} has only the key column: nothing to attach")
    types = dict(types or {})
    unknown = sorted(set(types) - set(columns))
    if unknown:
        raise InputError(f"--type names {', '.join(unknown)}, which {source} has no column for")
    registered = store.catalogue_kinds()
    kinds = {}
    for name, i in columns.items():
        cells = [(line, cells[i]) for line, cells in rows]
        declared = types.get(name) or (registered.get(name) if not replace else None)
        kinds[name] = _column_kind(name, cells, declared)
    keys = KeyIndex(store, key, (base or source.parent).expanduser().resolve())
    # every key present and once
    empty = [line for line, cells in rows if not cells[key_at].strip()]
    if empty:
        raise InputError(f"{source}: {len(empty)} rows have no {key_column!r} (lines "
                         f"{', '.join(map(str, empty[:MAX_ERRORS]))}{'...' if len(empty) > MAX_ERRORS else ''})")
    seen: dict[str, int] = {}
    dupes = []
    normalised = []
    for line, cells in rows:
        k = keys.normalise(cells[key_at], line)
        if k in seen:
            dupes.append(f"{cells[key_at].strip()[:60]!r} on lines {seen[k]} and {line}")
        seen.setdefault(k, line)
        normalised.append(k)
    if dupes:
        raise InputError(f"{source}: {len(dupes)} keys appear more than once: {'; '.join(dupes[:MAX_ERRORS])}")
    keyword = set(columns) if keyword_fields is None else {field_name(f) for f in keyword_fields if f.strip()}
    parse = {"number": parse_number, "date": parse_date, "text": lambda v: v.strip()}
    writes: dict[int, dict[str, object]] = {}
    unmatched, ambiguous, matched = [], 0, 0
    for (line, cells), k in zip(rows, normalised):
        ids = keys.ids(k)
        if not ids:
            unmatched.append(cells[key_at].strip())
            continue
        matched += 1
        ambiguous += len(ids) > 1
        values = {name: (parse[kinds[name]](cells[i]) if cells[i].strip() else None) for name, i in columns.items()}
        for image_id in ids:
            writes[image_id] = values
    if strict and unmatched:
        raise InputError(f"{len(unmatched)} keys match no indexed image (first: {unmatched[0]!r}); nothing was "
                         f"imported (without --strict the others would be)")
    fields = {name: (kind, kind == "text" and name in keyword) for name, kind in kinds.items()}
    counts = (store.import_catalogue(fields, list(writes.items()), replace=replace) if writes or replace
              else {"written": 0, "removed": 0, "images": 0})
    return ImportReport(rows=len(rows), matched_rows=matched, images=len(writes), values=counts["written"],
                        removed=counts["removed"], changed_images=counts["images"], fields=kinds,
                        unmatched=unmatched, ambiguous=ambiguous, unreadable=keys.unreadable,
                        seconds=round(time.perf_counter() - t0, 3))
