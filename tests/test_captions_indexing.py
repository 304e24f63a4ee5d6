"""Captions in the index: stored with provenance, embedded into a second vector index,
kept through moves and copies, never empty, refreshed by recaption without re-embedding images."""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np

from conftest import TinyCaptioner, TinyEncoder, make_image
from indexer.storage.schema import SCHEMA_VERSION
from indexer.storage.store import Store
from test_pipeline import engine_at


def caption_state(engine):
    """{file name: (caption, caption vector or None)} from the store and the caption index."""
    index = engine.open()
    store, vectors = index.store, index.vectors
    out = {}
    for row in store.all_images():
        vec = vectors.captions.reconstruct(np.array([row.id]))[0] if vectors.captions.contains(row.id) else None
        out[os.path.basename(row.path)] = (row.caption, None if vec is None else np.round(vec, 5).tolist())
    return out


def test_every_new_image_is_captioned_and_caption_embedded(tmp_path, photo_dir, db):
    cap = TinyCaptioner(blank=("purple",))
    engine = engine_at(tmp_path, "idx", captioner=cap, db=db)
    s = engine.index(photo_dir)
    assert s.new == 16 and s.captioned == 14 and cap.captioned == 16
    state = caption_state(engine)
    assert state["red.png"][0] == "a red picture"
    assert state["purple.png"] == (None, None)  # an empty caption is never stored, nor embedded
    enc = TinyEncoder()
    np.testing.assert_allclose(state["red.png"][1], np.round(enc.encode_texts(["a red picture"])[0], 5), atol=1e-5)
    hit = engine.search("green", k=1)[0]
    assert hit.caption == "a green picture"
    stats = engine.stats()
    assert stats["captioned"] == 14 and stats["captioner"]["name"] == "test:tiny-captioner"
    store = engine.open().store
    row = store.image_by_path(str(photo_dir / "a" / "red.png"))
    assert row.captioner == cap.info.fingerprint and row.captioned_at is not None


def test_incremental_captions_equal_full_rebuild(tmp_path, photo_dir, db):
    cap = TinyCaptioner()
    inc = engine_at(tmp_path, "inc", captioner=cap, db=db)
    inc.index(photo_dir)
    shutil.move(photo_dir / "a" / "blue.png", photo_dir / "blue-moved.png")
    shutil.copy(photo_dir / "a" / "red.png", photo_dir / "red-copy.png")
    make_image(photo_dir / "a" / "green.png", "orange", size=(50, 50))  # edited: new content, new caption
    os.remove(photo_dir / "a" / "black.png")
    cap.captioned = 0
    inc.index(photo_dir)
    assert cap.captioned == 1  # only the edited file; the move and the copy reuse caption and vectors
    full = engine_at(tmp_path, "full", captioner=TinyCaptioner(), db=db)
    full.index(photo_dir)
    assert caption_state(inc) == caption_state(full)
    assert caption_state(inc)["green.png"][0] == "a orange picture"


def test_recaption_changes_captions_but_not_image_vectors(tmp_path, photo_dir, db):
    engine = engine_at(tmp_path, "idx", captioner=TinyCaptioner(), db=db)
    engine.index(photo_dir)
    before = engine.image_vectors(sorted(engine.paths()))
    other = engine_at(tmp_path, "idx", captioner=TinyCaptioner(name="test:other", template="something {}"), db=db)
    counts = other.recaption()
    assert counts == {"images": 16, "captioned": 16, "failed": 0, "already_done": 0, "interrupted": False,
                      "tagged": 0}  # the tiny encoder: no tags
    np.testing.assert_array_equal(other.image_vectors(sorted(other.paths())), before)
    state = caption_state(other)
    assert state["red.png"][0] == "something red"
    np.testing.assert_allclose(state["red.png"][1], np.round(TinyEncoder().encode_texts(["something red"])[0], 5),
                               atol=1e-5)
    assert other.stats()["captioner"]["name"] == "test:other"


def test_index_without_captioner_has_no_captions(tmp_path, photo_dir, db):
    engine = engine_at(tmp_path, "idx", db=db)
    s = engine.index(photo_dir)
    assert s.captioned == 0 and engine.search("red", k=1)[0].caption is None
    assert engine.stats()["captioner"] is None


def test_schema_1_database_is_migrated(tmp_path):
    db = tmp_path / "old.sqlite"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE runs (id INTEGER PRIMARY KEY, root TEXT, started_at DATETIME, finished_at DATETIME, summary TEXT);
        CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT UNIQUE, content_hash VARCHAR(64), byte_size INTEGER,
            mtime FLOAT, width INTEGER, height INTEGER, file_type VARCHAR(16), taken_at DATETIME,
            indexed_at DATETIME, encoder VARCHAR(255), run_id INTEGER);
        INSERT INTO images VALUES (1, '/x.jpg', 'h', 1, 1.0, 2, 2, 'jpg', NULL, '2026-01-01 00:00:00', 'e', NULL);
    """)
    con.commit()
    con.close()
    store = Store(f"sqlite:///{db}")
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    row = store.all_images()[0]
    assert row.path == "/x.jpg" and row.caption is None
