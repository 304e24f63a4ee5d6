"""What an indexing run does with each file: the decision table of docs/ARCHITECTURE.md, as pure functions.

Before any file is read, :func:`triage` sorts what the folder holds against what the index knows:

| the run sees                                            | decision                         |
|---------------------------------------------------------|----------------------------------|
| a problem found while listing (broken link, not UTF-8...) | read stage skips it, every run   |
| known path, same size and mtime                         | ``unchanged``: nothing is read   |
| unknown path skipped before, same size and mtime        | ``skipped`` again, not retried   |
| indexed under this root, gone from disk                 | ``deleted`` (unless a move claims it) |
| anything else                                           | read and hashed, then :func:`decide` |

Once a file is read and hashed, :func:`decide`:

| what the read found                                     | decision                         |
|---------------------------------------------------------|----------------------------------|
| unreadable / not an image                               | ``skipped`` (a row it had is deleted) |
| known path, same hash                                   | ``touched``: metadata only       |
| unknown path, hash of a file that vanished              | ``moved``: that row takes the path, keeps id and vectors |
| hash of other indexed content (another path)            | ``copied`` (new id) or ``changed`` (known path): vectors copied, no decode |
| known path, new hash                                    | ``changed``: decoded and embedded under the same id |
| unknown path, unknown hash                              | ``new``: decoded and embedded    |

Nothing here reads a file, touches the index or allocates an id: the runner (``pipeline.py``) does
that with the decisions, so the table is tested on its own (tests/test_plan.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

from indexer.indexing.discover import FileEntry


class IndexedFile(Protocol):
    """What the plan needs to know of an indexed image (``ImageRow`` has it)."""

    id: int
    path: str
    content_hash: str
    byte_size: int
    mtime: float


class SkippedFile(Protocol):
    path: str
    reason: str
    byte_size: int
    mtime: float


@dataclass
class Triage:
    """The folder sorted against the index before anything is read."""

    unchanged: list[FileEntry] = field(default_factory=list)
    skipped_before: list[tuple[FileEntry, str]] = field(default_factory=list)  # (file, its recorded reason)
    to_read: list[FileEntry] = field(default_factory=list)
    gone: dict[str, IndexedFile] = field(default_factory=dict)  # path -> row: indexed under the root, not on disk
    vanished_skips: list[str] = field(default_factory=list)  # skip records under the root whose files are gone


def under(root: str) -> str:
    """The path prefix of everything under folder ``root``."""
    return root.rstrip(os.sep) + os.sep


def triage(root: str, files: Sequence[FileEntry], rows: Sequence[IndexedFile],
           skipped: Sequence[SkippedFile]) -> Triage:
    """Sort ``files`` (found under ``root``) against the index's ``rows`` and ``skipped`` records."""
    prefix = under(root)
    by_path = {r.path: r for r in rows}
    skips = {s.path: s for s in skipped}
    on_disk = {f.path for f in files}
    out = Triage()
    for f in files:
        if f.problem is not None:  # known without reading (a broken link, ...): decided afresh every run
            out.to_read.append(f)
            continue
        row = by_path.get(f.path)
        if row is not None and row.byte_size == f.size and row.mtime == f.mtime:
            out.unchanged.append(f)
            continue
        prev = skips.get(f.path)
        if row is None and prev is not None and prev.byte_size == f.size and prev.mtime == f.mtime:
            out.skipped_before.append((f, prev.reason))
            continue
        out.to_read.append(f)
    out.gone = {r.path: r for r in rows if r.path.startswith(prefix) and r.path not in on_disk}
    out.vanished_skips = [p for p in skips if p.startswith(prefix) and p not in on_disk]
    return out


@dataclass(frozen=True)
class Decision:
    """What to do with one file that was read.

    kind: ``skipped``, ``touched``, ``moved``, ``copied``, ``changed`` or ``new``;
    embed: decode and run the models on it (``changed`` and ``new`` with content the index does not hold);
    source: the indexed row whose vectors it takes (``moved``: the row itself; ``copied``/``changed`` by
    copy: a row holding that content).
    """

    kind: str
    embed: bool = False
    source: IndexedFile | None = None


def decide(error: str | None, content_hash: str | None, old: IndexedFile | None,
           indexed: Mapping[str, IndexedFile], move_sources: Mapping[str, Sequence[IndexedFile]]) -> Decision:
    """The decision for one file that was read (see the module's table).

    ``old``: the row at the file's path, if any; ``indexed``: content hash -> a row holding that content;
    ``move_sources``: content hash -> rows gone from disk that hold it (a move claims one; the runner
    removes it, so two new paths do not claim the same row).
    """
    if error is not None:
        return Decision("skipped")
    if old is not None and old.content_hash == content_hash:
        return Decision("touched")
    if content_hash in indexed:
        sources = move_sources.get(content_hash) or ()
        if old is None and sources:
            return Decision("moved", source=sources[-1])
        return Decision("copied" if old is None else "changed", source=indexed[content_hash])
    return Decision("new" if old is None else "changed", embed=True)


def reason_kind(message: str) -> str:
    """The short kind of a skip reason, e.g. "not a readable image" (what the run's summary counts): reasons
    read "<kind> (<details>)", possibly after "<file>: "."""
    return message.split(" (", 1)[0].rsplit(": ", 1)[-1].strip() or "unreadable"
