"""Incremental indexing against the oracle of a full rebuild, and the bad-input cases."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import Databases, TinyCaptioner, TinyEncoder, make_image
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import EncoderMismatchError, IndexNotFoundError, InputError

QUERIES = ["red", "green", "blue things", "yellow", "black", "purple orange"]


def engine_at(tmp_path: Path, name: str, encoder: TinyEncoder | None = None,
              captioner: TinyCaptioner | None = None, db: Databases | None = None) -> Engine:
    """An engine on index ``name`` in ``tmp_path`` (its metadata in ``db``'s database for it; default SQLite)."""
    config = EngineConfig(index_dir=tmp_path / name, db_url=db.url(name) if db else None, progress=False,
                          batch_size=4, captioner=None)
    return Engine(config, encoder=encoder or TinyEncoder(), captioner=captioner)


def ranking(engine: Engine, k: int = 50) -> list[list[tuple[str, float]]]:
    return [[(h.path, round(h.score, 5)) for h in engine.search(q, k=k)] for q in QUERIES]


def test_first_index_then_rerun_embeds_nothing(tmp_path, photo_dir, db):
    engine = engine_at(tmp_path, "idx", db=db)
    first = engine.index(photo_dir)
    assert (first.new, first.embedded, first.total_images, first.skipped) == (16, 16, 16, 0)
    second = engine.index(photo_dir)
    assert (second.new, second.embedded, second.unchanged, second.deleted) == (0, 0, 16, 0)
    assert engine.search("red", k=1)[0].path.endswith("red.png") or "red" in engine.search("red", k=1)[0].path


def test_incremental_after_adds_edits_moves_deletes_equals_full_rebuild(tmp_path, photo_dir, db):
    enc = TinyEncoder()
    inc = engine_at(tmp_path, "incremental", enc, db=db)
    inc.index(photo_dir)
    ids_before = {os.path.basename(p): i for i, p in inc.paths().items()}

    # add, edit in place, move/rename (same bytes), delete, copy, swap two files' names
    make_image(photo_dir / "c" / "new-teal.png", (20, 160, 160))
    make_image(photo_dir / "a" / "red.png", (200, 60, 60), stripe=(0, 0, 0))  # edited
    (photo_dir / "moved").mkdir()
    shutil.move(photo_dir / "a" / "blue.png", photo_dir / "moved" / "renamed-blue.png")
    os.remove(photo_dir / "a" / "green.png")
    shutil.copy(photo_dir / "a" / "yellow.png", photo_dir / "c" / "yellow-copy.png")
    a, b = photo_dir / "a" / "black.png", photo_dir / "a" / "white.png"
    tmp = photo_dir / "a" / "swap.tmp"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    for p in (a, b):  # renames keep mtimes; make sure the stat changes like a real edit would
        os.utime(p, (p.stat().st_atime, p.stat().st_mtime + 10))

    enc.encoded_images = 0
    s = inc.index(photo_dir)
    assert s.new == 1 and s.moved == 1 and s.deleted == 1 and s.copied == 1
    assert s.changed == 3  # the edit and the two swapped files
    assert enc.encoded_images == 2  # only the new file and the edited one: moves, copies, swaps reuse vectors
    ids_after = {os.path.basename(p): i for i, p in inc.paths().items()}
    assert ids_after["renamed-blue.png"] == ids_before["blue.png"]  # a moved file keeps its id and vector
    assert ids_after["red.png"] == ids_before["red.png"]
    assert "green.png" not in ids_after

    full = engine_at(tmp_path, "rebuild", db=db)
    full.index(photo_dir)
    assert len(inc.paths()) == len(full.paths()) == 17
    assert ranking(inc) == ranking(full)
    # image queries too: every file as an example image
    for path in sorted(full.paths().values())[:5]:
        assert [h.path for h in inc.search(image=path, k=5)] == [h.path for h in full.search(image=path, k=5)]


def test_reindex_only_subfolder_keeps_other_roots(tmp_path, photo_dir, db):
    engine = engine_at(tmp_path, "idx", db=db)
    engine.index(photo_dir / "a")
    engine.index(photo_dir / "b")
    assert len(engine.paths()) == 16
    s = engine.index(photo_dir / "a")
    assert s.deleted == 0 and len(engine.paths()) == 16


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    engine = engine_at(tmp_path, "idx")
    with pytest.raises(InputError, match="does not exist"):
        engine.index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no image files"):
        engine.index(tmp_path / "empty")


def test_bad_files_are_skipped_counted_and_recorded(tmp_path, photo_dir, db):
    (photo_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    (photo_dir / "text.png").write_text("hello, I am not a PNG")
    (photo_dir / "empty.webp").write_bytes(b"")
    engine = engine_at(tmp_path, "idx", db=db)
    s = engine.index(photo_dir)
    assert s.total_images == 16 and s.skipped == 3
    skipped = {os.path.basename(x["path"]): x["reason"] for x in engine.skipped_files()}
    assert set(skipped) == {"corrupt.jpg", "text.png", "empty.webp"}
    assert skipped["empty.webp"] == "empty file (0 bytes)"
    assert all(skipped[n].startswith("not a readable image") for n in ("corrupt.jpg", "text.png"))
    assert s.skipped_reasons == {"not a readable image": 2, "empty file": 1}
    again = engine.index(photo_dir)  # unchanged bad files are not retried but still counted
    assert again.skipped == 3 and again.embedded == 0
    (photo_dir / "text.png").unlink()
    make_image(photo_dir / "corrupt.jpg", "orange", size=(30, 30), fmt="JPEG")  # repaired file
    fixed = engine.index(photo_dir)
    assert fixed.new == 1 and fixed.skipped == 1
    assert {os.path.basename(x["path"]) for x in engine.skipped_files()} == {"empty.webp"}


def test_file_that_becomes_unreadable_leaves_the_index(tmp_path, photo_dir, db):
    engine = engine_at(tmp_path, "idx", db=db)
    engine.index(photo_dir)
    (photo_dir / "a" / "red.png").write_bytes(b"broken")
    s = engine.index(photo_dir)
    assert s.skipped == 1 and s.total_images == 15
    assert not any(p.endswith("red.png") for p in engine.paths().values())


def test_search_without_index_and_with_other_encoder_is_refused(tmp_path, photo_dir, db):
    with pytest.raises(IndexNotFoundError, match="pixquery index"):
        engine_at(tmp_path, "nothing", db=db).search("red")
    assert not engine_at(tmp_path, "nothing", db=db).exists  # searching never creates an index
    assert not (tmp_path / "nothing" / "pixquery.sqlite").exists()
    engine_at(tmp_path, "idx", db=db).index(photo_dir)
    other = engine_at(tmp_path, "idx", TinyEncoder(seed=1), db=db)
    with pytest.raises(EncoderMismatchError, match="not comparable"):
        other.search("red")
    with pytest.raises(EncoderMismatchError):
        other.index(photo_dir)
    named = Engine(EngineConfig(index_dir=tmp_path / "idx", db_url=db.url("idx"), encoder="native:effl0-minilm-v1",
                                progress=False))
    with pytest.raises(EncoderMismatchError, match="was built with encoder 'test:tiny'"):
        named.search("red")


def test_rebuild_switches_encoder(tmp_path, photo_dir, db):
    engine_at(tmp_path, "idx", db=db).index(photo_dir)
    other = engine_at(tmp_path, "idx", TinyEncoder(name="test:other", seed=1), db=db)
    s = other.index(photo_dir, rebuild=True)
    assert s.new == 16 and other.index_info.name == "test:other"


def test_query_validation(tmp_path, photo_dir, db):
    engine = engine_at(tmp_path, "idx", db=db)
    engine.index(photo_dir)
    with pytest.raises(InputError, match="empty"):
        engine.search("   ")
    with pytest.raises(InputError, match="limit"):
        engine.search("red " * 1000)
    with pytest.raises(InputError, match="does not exist"):
        engine.search(image=tmp_path / "missing.jpg")
    with pytest.raises(InputError):
        engine.search("red", k=0)
    hits = engine.search("red", k=100)
    assert len(hits) == 16 and hits == sorted(hits, key=lambda h: -h.score)


def test_rows_without_vectors_are_repaired_when_the_index_opens_for_writing(tmp_path, photo_dir, db):
    engine = engine_at(tmp_path, "idx", db=db)
    engine.index(photo_dir)
    # rows whose vectors are gone (an index edited by hand, or converted from an older version)
    index = engine.open()
    victim = index.store.image_by_path(str(photo_dir / "a" / "red.png"))
    index.vectors.images.delete(np.array([victim.id]))
    index.vectors.commit(index.store)
    engine.close()
    fresh = engine_at(tmp_path, "idx", db=db)
    summary = fresh.index(photo_dir)
    assert summary.new == 1 and summary.unchanged == 15  # the row went, and its file was indexed again
    assert len(fresh.search("red", k=100)) == 16
