"""``pixquery doctor``: each kind of damage is found, ``--repair`` fixes it (or says why not), and after the
next indexing run the index equals a clean build (tests/index_state.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from conftest import TinyCaptioner, TinyEncoder, make_image
from index_state import snapshot
from tiny_cli import tiny_init
from indexer.cli import main
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.storage.schema import SkippedRow, utcnow
from indexer.storage.store import WriteBatch


def engine_at(index_dir: Path) -> Engine:
    config = EngineConfig(index_dir=index_dir, progress=False, batch_size=4, captioner=None, checkpoint_every=4)
    return Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner())


@pytest.fixture
def built(tmp_path, photo_dir):
    (photo_dir / "sub").mkdir()
    for i in range(3):
        make_image(photo_dir / "sub" / f"s{i}.png", "purple", stripe=(i * 40, 0, 0))
    engine = engine_at(tmp_path / "idx")
    engine.index(photo_dir)
    clean = engine_at(tmp_path / "clean")
    yield engine, photo_dir, clean
    engine.close()
    clean.close()


def problems(engine: Engine) -> dict[str, str]:
    findings, _, _ = engine.doctor()
    return {c.name: c.message for c in findings.problems}


def row_of(engine: Engine, name: str):
    return next(engine.image(i) for i, p in engine.paths().items() if p.endswith("/" + name))


def test_a_fresh_index_is_consistent(built, capsys):
    engine, _, _ = built
    findings, _, _ = engine.doctor()
    assert findings.consistent, findings.problems
    assert {c.name for c in findings.checks} >= {"database", "provenance", "vectors", "rows", "files", "keywords",
                                                 "leftovers"}
    assert main(["doctor", "--db", str(engine.config.index_dir)]) == 0
    out = capsys.readouterr().out
    assert "the index is consistent" in out and "rows: 19 rows, each with its image vector; 19 captions" in out


def test_each_damage_is_found_and_repaired(built, capsys, monkeypatch):
    engine, photos, clean = built
    index = engine.open()
    store, vectors = index.store, index.vectors
    red, blue, green, s0 = (row_of(engine, n) for n in ("red.png", "blue.png", "green.png", "s0.png"))
    yellow = row_of(engine, "yellow.png")
    # vectors without rows, a row without vectors, a caption without its vector, a caption vector without a caption
    vectors.images.put(np.array([9001], np.int64), np.ones((1, 16), np.float32) / 4)
    vectors.remove(np.array([red.id], np.int64))
    vectors.captions.delete(np.array([blue.id], np.int64))
    green.caption = green.captioner = None
    vectors.commit(store, WriteBatch(rows=[green], meta={"next_id": "3"},
                                     skips=[SkippedRow(path=s0.path, reason="x", byte_size=1, mtime=0, at=utcnow())]))
    yellow.encoder = "test:other|x|16|l2"
    store.write(WriteBatch(rows=[yellow]))
    with store.engine.begin() as conn:  # the keyword index loses one caption behind the table's back
        conn.exec_driver_sql("INSERT INTO captions_fts(captions_fts, rowid, caption) VALUES ('delete', ?, ?)",
                             (s0.id, s0.caption))
    (engine.config.vectors_dir / "images-00099999.rows.npy").write_bytes(b"left by a killed checkpoint")
    (photos / "a" / "white.png").unlink()  # a file gone from a folder that is still there
    shutil.rmtree(photos / "sub")  # a whole folder gone (an unmounted drive?)
    engine.close()

    found = problems(engine)
    assert set(found) == {"provenance", "rows", "keywords", "files", "skipped", "ids"}, found
    findings = engine.doctor()[0]
    assert "images-00099999.rows.npy" in findings.stray_files  # (and what the hand-made commit above left)
    assert any(c.name == "leftovers" and c.status == "note" for c in findings.checks)
    assert "1 image vectors without a row; 1 rows without an image vector; 1 captions without a caption vector; " \
           "1 caption vectors without a caption" in found["rows"]
    assert "1 of 19 rows were embedded by another encoder" in found["provenance"]
    assert "1 indexed files are gone from their folders; 3 are under 1 folders that are gone" in found["files"]
    assert main(["doctor", "--db", str(engine.config.index_dir)]) == 1
    assert "PROBLEM  keywords:" in capsys.readouterr().out

    # this process cannot build the index's encoder ("test:tiny"): the caption without a vector stays
    assert main(["doctor", "--repair", "--db", str(engine.config.index_dir), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["checks"] if c["status"] == "problem"] == ["rows", "files"]
    assert "1 captions without a caption vector" == report["checks"][3]["message"]
    assert len(report["not_fixed"]) == 2 and "run pixquery recaption" in report["not_fixed"][0]
    assert "under folders that are gone" in report["not_fixed"][1]
    assert any("rebuilt the keyword index" in line for line in report["fixed"])
    monkeypatch.setattr(Engine, "__init__", tiny_init(Engine.__init__))  # now it can
    assert main(["doctor", "--repair", "--db", str(engine.config.index_dir), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in report["checks"] if c["status"] == "problem"] == ["files"]  # only what it cannot fix
    assert report["fixed"] == ["embedded 1 captions that had no vector"]
    assert not (engine.config.vectors_dir / "images-00099999.rows.npy").exists()
    assert [h.path for h in engine.search("blue", mode="keyword", k=20)] != []

    # the next run over the folder puts back what the repair dropped; then it equals a clean build
    engine.index(photos)
    findings, _, _ = engine.doctor()
    assert findings.consistent, findings.problems
    clean.index(photos)
    repaired, oracle = snapshot(engine.config.index_dir)["rows"], snapshot(clean.config.index_dir)["rows"]
    # green's caption was lost (only recaption can write it again): it is consistent without one
    assert repaired.pop(green.path)[4:] == (None, oracle.pop(green.path)[5], None)
    assert repaired == oracle


def test_unreadable_vectors_go_back_to_the_last_generation_that_reads(built):
    engine, photos, clean = built
    make_image(photos / "late.png", "orange", stripe=(1, 2, 3))
    engine.index(photos)  # one more checkpoint: the one that will be damaged
    generation = engine.generation
    manifest = json.loads((engine.config.vectors_dir / f"manifest-{generation:08d}.json").read_text())
    newest = max(s["number"] for s in manifest["kinds"]["images"]["segments"])
    segment = engine.config.vectors_dir / f"images-{newest:08d}.rows.npy"
    segment.write_bytes(segment.read_bytes()[:40])  # truncated on a full disk, say
    engine.close()
    with pytest.raises(Exception, match="cannot read vector segment"):
        engine.search("red")
    found = problems(engine)
    assert "cannot read vector segment" in found["vectors"] and f"generation {generation - 1} reads" in found["vectors"]
    findings, fixed, not_fixed = engine.doctor(repair=True)
    assert findings.consistent and not not_fixed, (findings.problems, not_fixed)
    assert fixed[0] == f"vectors: went back to generation {generation - 1}"
    assert len(engine.search("red", k=100)) == 19  # what the older generation held; late.png dropped
    engine.index(photos)
    clean.index(photos)
    assert snapshot(engine.config.index_dir)["rows"] == snapshot(clean.config.index_dir)["rows"]


def test_a_damaged_database_is_reported_not_a_traceback(built, capsys):
    engine, _, _ = built
    engine.close()
    db = engine.config.index_dir / "pixquery.sqlite"
    with Engine(engine.config, encoder=TinyEncoder()).open().store.engine.begin() as conn:
        conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    data = bytearray(db.read_bytes())
    data[4096:8192] = b"\xa5" * 4096  # a page of garbage
    db.write_bytes(bytes(data))
    code = main(["doctor", "--repair", "--db", str(engine.config.index_dir)])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err + captured.out
    assert "cannot open the index database" in captured.err and "malformed" in captured.err
    assert "pixquery index FOLDER --rebuild" in captured.err and "SELECT" not in captured.err
