"""Vector segments and checkpoints: writes proportional to the change, atomic commits with the rows,
garbage collection, readers that follow new generations, and indexes of the old layout converted in place."""

from __future__ import annotations

import json
import sqlite3

import faiss
import numpy as np
import pytest

from conftest import TinyCaptioner, TinyEncoder, make_image
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.storage import segments as segments_module
from indexer.storage.schema import SCHEMA_VERSION
from indexer.storage.segments import SegmentLog, plan_merge
from indexer.storage.store import Store
from indexer.storage.vectors import MEMORY_RANGE


def engine_at(tmp_path, name="idx", **kw) -> Engine:
    cfg = EngineConfig(index_dir=tmp_path / name, progress=False, captioner=None, scorer=None, matcher=None)
    return Engine(cfg, encoder=TinyEncoder(), **kw)


def state(engine: Engine) -> dict:
    """{path: (content hash, caption, rounded image vector, rounded caption vector or None)}."""
    index = engine.open()
    out = {}
    for row in index.store.all_images():
        ids = np.array([row.id])
        has_cap, cap = index.vectors.captions.reconstruct_present(ids)
        out[row.path] = (row.content_hash, row.caption, index.vectors.images.reconstruct(ids)[0].round(5).tolist(),
                         cap[0].round(5).tolist() if has_cap[0] else None)
    return out


# --- the segment log against a dict -----------------------------------------------------------------------
def test_segment_log_matches_a_dict_through_puts_deletes_merges_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setattr(segments_module, "MERGE_FACTOR", 3)  # merges early and often
    rng = np.random.default_rng(0)
    log = SegmentLog(tmp_path, "images", 4)
    oracle: dict[int, np.ndarray] = {}
    number = 1
    for step in range(60):
        ids = rng.integers(0, 80, size=rng.integers(1, 12))
        if rng.random() < 0.3:
            log.delete(ids)
            for i in ids.tolist():
                oracle.pop(i, None)
        else:
            rows = rng.standard_normal((len(ids), 4)).astype(np.float32)
            log.put(ids, rows)
            for i, r in zip(ids.tolist(), rows):
                oracle[i] = r
        if step % 3 == 2:  # a checkpoint
            if log.write_pending(number) is not None:
                number += 1
            while (run := plan_merge(log.live_sizes())) is not None:
                log.merge(*run, number)
                number += 1
        if step % 10 == 9:  # reopen from the files, as a new process would
            if log.write_pending(number) is not None:
                number += 1
            log = SegmentLog.load(tmp_path, "images", 4, np.float32, list(log.segments))
        want = sorted(oracle)
        assert log.ids().tolist() == want
        mask, rows = log.get(np.array(want + [999], dtype=np.int64))
        assert mask.tolist() == [True] * len(want) + [False]
        np.testing.assert_array_equal(rows, np.stack([oracle[i] for i in want]) if want else rows)
    assert len(log.segments) < 15  # merges keep the number of segments small


def test_plan_merge_takes_the_newest_run_of_one_size_level():
    f = segments_module.MERGE_FACTOR
    assert plan_merge([5] * (f - 1)) is None
    assert plan_merge([5] * f) == (0, f)
    big = f ** 3
    assert plan_merge([big] + [5] * f) == (1, f + 1)  # the big segment is not rewritten


# --- checkpoints ------------------------------------------------------------------------------------------
def test_a_checkpoint_writes_new_files_only(tmp_path, photo_dir):
    engine = engine_at(tmp_path)
    engine.index(photo_dir / "a")
    folder = engine.config.vectors_dir
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    engine.index(photo_dir)  # adds the images of b/
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    kept = set(before) & set(after)
    assert all(before[n] == after[n] for n in kept)  # no file was rewritten
    new = set(after) - set(before)
    assert any(n.startswith("images-") and n.endswith(".rows.npy") for n in new)
    manifest = json.loads(max(folder.glob("manifest-*.json")).read_text())
    assert manifest["generation"] == engine.generation


def test_a_crash_before_the_rows_commit_leaves_the_last_checkpoint(tmp_path, photo_dir, monkeypatch):
    engine = engine_at(tmp_path)
    engine.index(photo_dir / "a")
    committed, generation = state(engine), engine.generation
    engine.close()

    def crash(self, batch):  # segments and manifest are written; the SQL transaction never happens
        raise RuntimeError("power cut")

    monkeypatch.setattr(Store, "write", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        engine_at(tmp_path).index(photo_dir)
    monkeypatch.undo()
    fresh = engine_at(tmp_path)
    assert fresh.generation == generation and state(fresh) == committed  # nothing half-written is visible
    folder = fresh.config.vectors_dir
    named = committed_files(folder, generation)
    assert {p.name for p in folder.iterdir()} - named  # the crashed checkpoint left files behind ...
    fresh.writer()
    assert {p.name for p in folder.iterdir()} == named  # ... which the next writer collects first
    summary = fresh.index(photo_dir)
    assert summary.new == 8 and summary.unchanged == 8  # the lost checkpoint's work is simply done again
    clean = engine_at(tmp_path, "clean")
    clean.index(photo_dir)
    assert list(state(fresh).values()) == list(state(clean).values())


def committed_files(folder, generation: int) -> set[str]:
    """The manifest of ``generation`` and every segment file it names."""
    name = f"manifest-{generation:08d}.json"
    out = {name}
    for kind, entry in json.loads((folder / name).read_text())["kinds"].items():
        for seg in entry["segments"]:
            stem = f"{kind}-{seg['number']:08d}"
            out |= ({f"{stem}.ids.npy", f"{stem}.rows.npy"} if seg["puts"] else set()) | \
                ({f"{stem}.del.npy"} if seg["deletes"] else set())
    return out


def test_a_crash_between_kinds_leaves_the_last_checkpoint(tmp_path, photo_dir, monkeypatch):
    cap = TinyCaptioner()
    cfg = EngineConfig(index_dir=tmp_path / "idx", progress=False, scorer=None, matcher=None)
    engine = Engine(cfg, encoder=TinyEncoder(), captioner=cap)
    engine.index(photo_dir / "a")
    committed = state(engine)
    engine.close()
    real = SegmentLog.write_pending

    def fail_on_captions(self, number):
        if self.kind == "captions":
            raise OSError("disk full")
        return real(self, number)

    monkeypatch.setattr(SegmentLog, "write_pending", fail_on_captions)
    with pytest.raises(OSError, match="disk full"):
        Engine(cfg, encoder=TinyEncoder(), captioner=cap).index(photo_dir)
    monkeypatch.undo()
    again = Engine(cfg, encoder=TinyEncoder(), captioner=cap)
    assert state(again) == committed
    assert again.index(photo_dir).new == 8


def test_readers_follow_new_generations(tmp_path, photo_dir):
    writer = engine_at(tmp_path)
    writer.index(photo_dir / "a")
    reader = engine_at(tmp_path)
    assert len(reader.search("red", k=100, mode="image")) == 8
    writer.index(photo_dir)  # another Engine (another process, for the index) commits more images
    assert len(reader.search("red", k=100, mode="image")) == 16


def test_garbage_collection_keeps_the_previous_generation(tmp_path, photo_dir):
    engine = engine_at(tmp_path)
    for sub in ("a", "b"):
        engine.index(photo_dir / sub)
    make_image(photo_dir / "c" / "new.png", "orange", size=(30, 30))
    engine.index(photo_dir)
    assert engine.generation == 3
    folder = engine.config.vectors_dir
    gens = sorted(int(p.stem.split("-")[1]) for p in folder.glob("manifest-*.json"))
    assert gens == [engine.generation - 1, engine.generation]
    named = committed_files(folder, gens[0]) | committed_files(folder, gens[1])
    assert {p.name for p in folder.iterdir()} == named  # nothing else is kept


# --- indexes of the old layout ----------------------------------------------------------------------------
def to_old_layout(engine: Engine) -> None:
    """Rewrite an index as schema 3 wrote it: three FAISS files beside the database, no segments."""
    index = engine.open()
    folder, vectors = engine.config.index_dir, index.vectors
    for name, store in (("images", vectors.images), ("captions", vectors.captions)):
        ids = store.ids()
        flat = faiss.IndexIDMap2(faiss.IndexFlatIP(store.dim))
        if len(ids):
            flat.add_with_ids(store.reconstruct(ids), ids)
        faiss.write_index(flat, str(folder / f"{name}.faiss"))
    if vectors.memories is not None:
        ids = vectors.memories.ids()
        sq = faiss.IndexScalarQuantizer(vectors.memories.dim, faiss.ScalarQuantizer.QT_8bit_uniform,
                                        faiss.METRIC_INNER_PRODUCT)
        sq.train(np.array([[-MEMORY_RANGE] * sq.d, [MEMORY_RANGE] * sq.d], dtype=np.float32))
        mem = faiss.IndexIDMap2(sq)
        _, decoded = vectors.memories.reconstruct_present(ids)
        mem.add_with_ids(decoded, ids)
        faiss.write_index(mem, str(folder / "memories.faiss"))
    engine.close()
    import shutil

    shutil.rmtree(engine.config.vectors_dir)
    con = sqlite3.connect(engine.config.db_file)
    con.execute("DELETE FROM meta WHERE key IN ('vector_generation', 'next_id')")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    con.commit()
    con.close()


def test_an_index_of_the_old_layout_opens_and_converts_without_re_embedding(tmp_path, photo_dir):
    cap = TinyCaptioner()
    cfg = EngineConfig(index_dir=tmp_path / "idx", progress=False, scorer=None, matcher=None)
    engine = Engine(cfg, encoder=TinyEncoder(), captioner=cap)
    engine.index(photo_dir)
    before = state(engine)
    hits_before = [(h.id, round(h.score, 5)) for h in engine.search("a red picture", k=5)]
    to_old_layout(engine)
    assert (cfg.index_dir / "images.faiss").exists() and not cfg.vectors_dir.exists()

    encoder = TinyEncoder()
    converted = Engine(cfg, encoder=encoder, captioner=cap)
    assert [(h.id, round(h.score, 5)) for h in converted.search("a red picture", k=5)] == hits_before
    assert state(converted) == before
    assert not (cfg.index_dir / "images.faiss").exists() and converted.generation == 1
    assert converted.open().store.get_meta("schema_version") == str(SCHEMA_VERSION)
    summary = converted.index(photo_dir)
    assert summary.unchanged == 16 and encoder.encoded_images == 0  # nothing was embedded again


def test_old_layout_memories_convert_bit_for_bit(tmp_path, tiny_scorer_weights):
    from pathlib import Path

    from captioning.native import NativeCaptioner
    from retrieval.factory import DEFAULT_ENCODER, create_encoder

    samples = Path(__file__).resolve().parents[1] / "indexer" / "sample_photos"
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("cat_tabby_chelsea_01.jpg", "surfer_on_wave_01.jpg"):
        (root / name).write_bytes((samples / name).read_bytes())
    cfg = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner=None, matcher=None,
                       scorer=str(tiny_scorer_weights))
    encoder, scorer = create_encoder(DEFAULT_ENCODER), NativeCaptioner(str(tiny_scorer_weights))
    engine = Engine(cfg, encoder=encoder, scorer=scorer)
    engine.index(root)
    ids = engine.open().vectors.memories.ids()
    codes_before = engine.open().vectors.memories.codes_present(ids)[1]
    likelihood = [h.scores["likelihood"] for h in engine.search("a dog runs", k=2)]
    to_old_layout(engine)
    converted = Engine(cfg, encoder=encoder, scorer=scorer)
    assert np.array_equal(converted.open().vectors.memories.codes_present(ids)[1], codes_before)
    assert [h.scores["likelihood"] for h in converted.search("a dog runs", k=2)] == likelihood


def test_a_missing_manifest_is_a_clear_error(tmp_path, photo_dir):
    from indexer.errors import IndexCorruptError

    engine = engine_at(tmp_path)
    engine.index(photo_dir / "a")
    engine.close()
    for manifest in engine.config.vectors_dir.glob("manifest-*.json"):
        manifest.unlink()
    with pytest.raises(IndexCorruptError, match="manifest-.*missing"):
        engine_at(tmp_path).search("red")


def test_new_ids_are_never_reused(tmp_path):
    root = tmp_path / "photos"
    make_image(root / "a.png", "red")
    make_image(root / "b.png", "blue")
    engine = engine_at(tmp_path)
    engine.index(root)
    top = max(engine.paths())
    (root / engine.paths()[top].split("/")[-1]).unlink()  # the image with the highest id goes
    engine.index(root)
    make_image(root / "c.png", "green")
    engine.index(root)
    assert max(engine.paths()) == top + 1
