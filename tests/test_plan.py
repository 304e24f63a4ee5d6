"""The indexing decision table (indexer/indexing/plan.py), case by case, with no file, model or index."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from indexer.indexing.discover import FileEntry
from indexer.indexing.plan import decide, reason_kind, triage


@dataclass
class Row:
    id: int
    path: str
    content_hash: str
    byte_size: int = 10
    mtime: float = 1.0


@dataclass
class Skip:
    path: str
    reason: str
    byte_size: int = 10
    mtime: float = 1.0


def entry(path: str, size: int = 10, mtime: float = 1.0) -> FileEntry:
    return FileEntry(path, size, mtime)


def test_triage_sorts_the_folder_before_anything_is_read():
    rows = [Row(1, "/r/same.jpg", "h1"), Row(2, "/r/touched.jpg", "h2"), Row(3, "/r/gone.jpg", "h3"),
            Row(4, "/elsewhere/x.jpg", "h4"), Row(5, "/r/sub/gone2.jpg", "h5")]
    skipped = [Skip("/r/bad.jpg", "x: not a readable image (OSError: truncated)"),
               Skip("/r/bad-changed.jpg", "why"), Skip("/r/bad-gone.jpg", "why"), Skip("/rx/other.jpg", "why")]
    files = [entry("/r/same.jpg"), entry("/r/touched.jpg", mtime=2.0), entry("/r/new.jpg"), entry("/r/bad.jpg"),
             entry("/r/bad-changed.jpg", size=11)]
    t = triage("/r", files, rows, skipped)
    assert [f.path for f in t.unchanged] == ["/r/same.jpg"]  # same size and mtime: not even read
    assert [(f.path, reason) for f, reason in t.skipped_before] == [("/r/bad.jpg", skipped[0].reason)]
    assert [f.path for f in t.to_read] == ["/r/touched.jpg", "/r/new.jpg", "/r/bad-changed.jpg"]
    assert sorted(t.gone) == ["/r/gone.jpg", "/r/sub/gone2.jpg"]  # rows elsewhere are never touched
    assert t.vanished_skips == ["/r/bad-gone.jpg"]  # "/rx/..." is not under "/r"


# what the read found -> the decision; `indexed` holds content h1 (at /a.jpg) and h9 (at /gone.jpg, which vanished)
A, GONE = Row(1, "/a.jpg", "h1"), Row(9, "/gone.jpg", "h9")
INDEXED = {"h1": A, "h9": GONE}


@pytest.mark.parametrize("error, digest, old, moves, kind, embed, source", [
    ("not a readable image", None, None, {}, "skipped", False, None),
    ("not a readable image", None, A, {}, "skipped", False, None),  # a once-good file: its row leaves
    (None, "h1", A, {}, "touched", False, None),  # same path, same bytes, new stat
    (None, "h9", None, {"h9": [GONE]}, "moved", False, GONE),  # a vanished file's bytes at a new path
    (None, "h1", None, {}, "copied", False, A),  # bytes indexed under another path
    (None, "h9", None, {}, "copied", False, GONE),  # its move source already claimed: a copy
    (None, "h1", Row(7, "/b.jpg", "h7"), {}, "changed", False, A),  # known path, bytes held elsewhere
    (None, "h9", Row(7, "/b.jpg", "h7"), {"h9": [GONE]}, "changed", False, GONE),  # a known path never moves
    (None, "new", Row(7, "/b.jpg", "h7"), {}, "changed", True, None),  # known path, new bytes: embedded
    (None, "new", None, {}, "new", True, None),
])
def test_decide_follows_the_table(error, digest, old, moves, kind, embed, source):
    d = decide(error, digest, old, INDEXED, moves)
    assert (d.kind, d.embed, d.source) == (kind, embed, source)


def test_a_move_source_is_claimed_once():
    moves = {"h9": [GONE]}
    first = decide(None, "h9", None, INDEXED, moves)
    assert first.kind == "moved"
    moves["h9"].remove(first.source)  # what the runner does with a move
    assert decide(None, "h9", None, INDEXED, moves).kind == "copied"


def test_reason_kind_is_the_short_reason():
    assert reason_kind("/x.jpg: not a readable image (UnidentifiedImageError: cannot identify)") == \
        "not a readable image"
    assert reason_kind("cannot read file (PermissionError: denied)") == "cannot read file"
    assert reason_kind("broken symbolic link (its target /a: b does not exist)") == "broken symbolic link"
    assert reason_kind("image has no pixels") == "image has no pixels"
    assert reason_kind("") == "unreadable"
