"""Filters: restrict a search to part of the collection, as SQL conditions with bound parameters only.

Everything but the glob runs in SQL (the folder as a literal ``substr`` prefix, not ``LIKE``, so ``%``
and ``_`` in paths mean themselves; dates as ``taken_at``, else ``mtime``, within whole local days);
the glob is matched with ``fnmatch`` in Python over the rows the other conditions leave.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, func, or_

from indexer.errors import InputError
from indexer.storage.catalogue import Condition, parse_condition
from indexer.storage.schema import ImageRow


@dataclass(frozen=True)
class Filters:
    """Restrict a search to part of the collection; applied inside the search, so k results still come back
    whenever k images match.

    folder: only images under this folder (absolute or relative to the working directory);
    glob: only paths matching this shell pattern (``*`` and ``?`` as in fnmatch, matched on the full path);
    after / before: date taken (EXIF), else file modification date, inclusive;
    file_types: lower-case extensions without the dot, e.g. ("jpg", "png");
    min_width / min_height: in pixels;
    where: conditions on imported catalogue fields, e.g. ("category=shoes", "price<50"), all of which must
    hold (strings are parsed into :class:`~indexer.storage.catalogue.Condition`; see there for the operators).
    """

    folder: str | None = None
    glob: str | None = None
    after: date | None = None
    before: date | None = None
    file_types: tuple[str, ...] = ()
    min_width: int = 0
    min_height: int = 0
    where: tuple[Condition, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.where, (str, Condition)):
            object.__setattr__(self, "where", (self.where,))
        object.__setattr__(self, "where", tuple(parse_condition(c) for c in self.where))
        if self.min_width < 0 or self.min_height < 0:
            raise InputError("minimum width and height cannot be negative")
        if self.after and self.before and self.after > self.before:
            raise InputError(f"the date range is empty: {self.after} is after {self.before}")
        object.__setattr__(self, "file_types", tuple(t.lower().lstrip(".") for t in self.file_types))

    @property
    def active(self) -> bool:
        return any((self.folder, self.glob, self.after, self.before, self.file_types, self.min_width,
                    self.min_height, self.where))

    def describe(self) -> list[str]:
        """The filters that are set, in words (``folder /photos/a``, ``price<50``), for explanations."""
        parts = [f"folder {self.folder}" if self.folder else "", f"path matches {self.glob}" if self.glob else "",
                 f"on or after {self.after}" if self.after else "", f"on or before {self.before}" if self.before else "",
                 f"type {', '.join(self.file_types)}" if self.file_types else "",
                 f"at least {self.min_width} px wide" if self.min_width else "",
                 f"at least {self.min_height} px high" if self.min_height else ""]
        return [p for p in parts if p] + [str(c) for c in self.where]



# extensions that name the same format: --type jpg also finds .jpeg files
_SAME_TYPE = {"jpg": ("jpeg",), "jpeg": ("jpg",), "tif": ("tiff",), "tiff": ("tif",)}


def _timestamp(local: datetime) -> float:
    """Seconds since the epoch of a naive local time; +-inf beyond what the platform can convert."""
    try:
        return local.timestamp()
    except (OverflowError, ValueError, OSError):
        return -math.inf if local.year < 1970 else math.inf


def folder_prefix(filters: Filters) -> str | None:
    """The path prefix the folder filter asks for (absolute, ending with a separator), or None."""
    if not filters.folder:
        return None
    try:
        return os.path.join(str(Path(filters.folder).expanduser().resolve()), "")
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop
        raise InputError(f"folder filter {filters.folder[:200]!r} is not a usable path: {exc}") from None


def literal_prefix(filters: Filters) -> str:
    """What every path that passes must start with: the folder, or the glob's text before its first
    wildcard, whichever is longer ("" when nothing is known)."""
    glob = filters.glob or ""
    cut = min([i for i in (glob.find("*"), glob.find("?"), glob.find("[")) if i >= 0], default=len(glob))
    return max(folder_prefix(filters) or "", glob[:cut], key=len)


def prefix_range(prefix: str) -> list[ColumnElement[bool]]:
    """``path`` in [prefix, the next prefix): conditions the unique index on ``path`` answers without a
    scan, for databases that compare text by code point (SQLite's default BINARY collation; a server's
    locale collation may not, so the store adds these only for SQLite, beside the exact conditions)."""
    if not prefix or ord(prefix[-1]) >= 0x10FFFF:
        return []
    return [ImageRow.path >= prefix, ImageRow.path < prefix[:-1] + chr(ord(prefix[-1]) + 1)]


def filter_conditions(filters: Filters) -> list[ColumnElement[bool]]:
    """SQL conditions for every filter but the glob and the catalogue conditions (which need the field
    registry: ``Store.filter_ids`` adds them); all values are bound parameters."""
    conds: list[ColumnElement[bool]] = []
    prefix = folder_prefix(filters)
    if prefix:
        # a plain prefix comparison: no LIKE, so '%', '_' and case in paths mean exactly themselves
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
    # clamped: no image is 2**31 - 1 pixels wide, and a bigger Python int would overflow a SQL integer
    # (PostgreSQL binds the value as the column's 32-bit INTEGER)
    if filters.min_width:
        conds.append(ImageRow.width >= min(filters.min_width, 2**31 - 1))
    if filters.min_height:
        conds.append(ImageRow.height >= min(filters.min_height, 2**31 - 1))
    return conds
