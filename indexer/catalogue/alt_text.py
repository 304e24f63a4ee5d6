"""``pixquery export --alt-text-html DIR``: alt attributes from the captions, for the images a site's HTML
files show, as a diff first (``--apply`` writes).

Every ``*.html``/``*.htm`` under DIR is read (UTF-8) and its ``<img>`` tags are found with the standard
library's HTML parser. A tag's ``src`` (relative to the page, or to DIR when it starts with ``/``; never
a URL with a scheme, nor a file outside DIR) names an indexed image when its path is in the index, or
when its bytes are an indexed image's (the index's content hash: a site's copy of a catalogue photo).
Only the tag's own text changes: ``alt="..."`` is added (escaped) where the tag has none; an empty
``alt=""`` marks a decorative image and is left alone unless ``fill_empty``; existing alt text is kept
unless ``overwrite``. A caption the hook ``indexer.catalogue.export.caption_uncertain`` marks is left for
review. Files are written through a temporary file renamed over them.
"""

from __future__ import annotations

import difflib
import html
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit

from indexer.catalogue.export import caption_uncertain
from indexer.indexing.discover import hash_bytes
from indexer.storage.schema import ImageRow

_ALT_VALUE = re.compile(r"""(\s)alt\s*=\s*("[^"]*"|'[^']*'|[^\s"'>]+)""", re.IGNORECASE)
_ALT_BARE = re.compile(r"""(\s)alt(?=[\s/>])(?!\s*=)""", re.IGNORECASE)


@dataclass
class Change:
    src: str
    alt: str
    line: int


@dataclass
class PageChanges:
    path: Path
    old: str
    new: str
    changes: list[Change] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (src, why)


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[tuple[int, int], str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.found.append((self.getpos(), self.get_starttag_text() or "", dict(attrs)))

    handle_startendtag = handle_starttag


def with_alt(tag: str, alt: str, has_alt: bool) -> str:
    """``tag`` (an ``<img ...>`` start tag's text) with ``alt="alt"``: the tag's own alt attribute replaced
    (``has_alt``), else one added before the tag's end."""
    quoted = f'alt="{html.escape(alt, quote=True)}"'
    if has_alt:
        for pattern in (_ALT_VALUE, _ALT_BARE):
            if pattern.search(tag):
                return pattern.sub(lambda m: m.group(1) + quoted, tag, count=1)
    end = len(tag) - (2 if tag.endswith("/>") else 1)
    head = tag[:end].rstrip()
    return head + " " + quoted + tag[len(head):]


class Lookup:
    """Indexed images by path and by content hash."""

    def __init__(self, entries: list[tuple[int, str, str]], rows: Callable[[int], ImageRow | None]) -> None:
        self.by_path = {p: i for i, p, _ in entries}
        self.by_hash: dict[str, int] = {}
        for i, _, h in entries:
            self.by_hash.setdefault(h, i)
        self.rows = rows

    def find(self, path: Path) -> ImageRow | None:
        image_id = self.by_path.get(str(path))
        if image_id is None:
            try:
                image_id = self.by_hash.get(hash_bytes(path.read_bytes()))
            except OSError:
                return None
        return self.rows(image_id) if image_id is not None else None


def _resolve(site: Path, page: Path, src: str) -> Path | None:
    parts = urlsplit(src.strip())
    if parts.scheme or parts.netloc or not parts.path:
        return None
    rel = unquote(parts.path)
    target = (site / rel.lstrip("/")) if rel.startswith("/") else (page.parent / rel)
    try:
        target = target.resolve()
    except (OSError, ValueError):
        return None
    return target if target.is_relative_to(site) and target.is_file() else None


def alt_for(row: ImageRow, values: dict, alt_field: str | None) -> str | None:
    text = values.get(alt_field) if alt_field else None
    text = str(text).strip() if text not in (None, "") else (row.caption or "").strip()
    return text[:1].upper() + text[1:] if text else None


def plan(site: Path, lookup: Lookup, metadata: Callable[[int], dict], alt_field: str | None = None,
         overwrite: bool = False, fill_empty: bool = False, threshold: float | None = None,
         ) -> tuple[list[PageChanges], list[tuple[Path, str]]]:
    """The changes to every HTML page under ``site`` -> (pages with changes or skips, unreadable pages).
    ``threshold``: the index's caption-confidence threshold (a caption rated below it is left for review)."""
    site = Path(site).expanduser().resolve()
    pages, unreadable = [], []
    for page in sorted(p for ext in ("*.html", "*.htm") for p in site.rglob(ext)):
        try:
            text = page.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            unreadable.append((page, "not UTF-8"))
            continue
        except OSError as exc:
            unreadable.append((page, exc.strerror or str(exc)))
            continue
        parser = _Images()
        parser.feed(text)
        parser.close()
        line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        result = PageChanges(page, text, text)
        edits = []
        for (line, col), tag, attrs in parser.found:
            src = attrs.get("src") or ""
            target = _resolve(site, page, src) if src else None
            row = lookup.find(target) if target is not None else None
            if row is None:
                result.skipped.append((src, "not an indexed image"))
                continue
            alt = attrs.get("alt")
            if alt is None and "alt" in attrs:
                alt = ""
            if alt and not overwrite:
                result.skipped.append((src, "has alt text (--overwrite replaces it)"))
                continue
            if alt == "" and "alt" in attrs and not (fill_empty or overwrite):
                result.skipped.append((src, 'alt="" marks it decorative (--fill-empty fills it)'))
                continue
            if (caption_uncertain(row, threshold) if threshold is not None else caption_uncertain(row)):
                result.skipped.append((src, "its caption is marked for review"))
                continue
            text_alt = alt_for(row, metadata(row.id), alt_field)
            if not text_alt:
                result.skipped.append((src, "no caption"))
                continue
            start = line_starts[line - 1] + col
            if text[start:start + len(tag)] != tag:
                result.skipped.append((src, "the tag could not be located exactly"))
                continue
            edits.append((start, tag, with_alt(tag, text_alt, "alt" in attrs)))
            result.changes.append(Change(src, text_alt, line))
        for start, tag, new_tag in sorted(edits, reverse=True):
            result.new = result.new[:start] + new_tag + result.new[start + len(tag):]
        if result.changes or result.skipped:
            pages.append(result)
    return pages, unreadable


def diff(pages: list[PageChanges], site: Path) -> str:
    out = []
    for page in pages:
        if page.new == page.old:
            continue
        name = os.path.relpath(page.path, Path(site).expanduser().resolve())
        out.extend(difflib.unified_diff(page.old.splitlines(keepends=True), page.new.splitlines(keepends=True),
                                        f"a/{name}", f"b/{name}"))
    return "".join(out)


def apply(pages: list[PageChanges]) -> int:
    """Write every changed page (temporary file, then rename); returns how many."""
    written = 0
    for page in pages:
        if page.new == page.old:
            continue
        tmp = page.path.with_name(f".{page.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(page.new.encode("utf-8"))
        os.replace(tmp, page.path)
        written += 1
    return written
