"""Filters pushed into the search: SQL for the metadata (bound parameters only), FAISS for the vectors."""

from __future__ import annotations

import json
import os
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pytest

from conftest import TinyEncoder, make_image
from indexer.storage import vectors as vectors_module
from indexer.cli import main
from indexer.cli.args import EXIT_OK, EXIT_USAGE
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.storage.filters import Filters
from indexer.storage.schema import ImageRow
from indexer.storage.segments import SegmentLog
from indexer.storage.store import Store, WriteBatch
from indexer.storage.vectors import VectorIndex


def flat(dim: int, ids=None, vecs=None) -> VectorIndex:
    """An in-memory flat index on the CPU (nothing is written until a commit)."""
    index = VectorIndex(SegmentLog(Path("/nonexistent"), "images", dim), use_gpu=False)
    if ids is not None:
        index.put(np.asarray(ids, np.int64), vecs)
    return index


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- the vector side: search only the allowed ids, inside FAISS ------------------------------------------------
@pytest.mark.parametrize("n_allowed", [5, 40, vectors_module.DENSE_FILTER_MAX + 500])  # matmul path and selector path
def test_filtered_search_matches_numpy_oracle_on_external_ids(n_allowed):
    vecs, ids = unit(3000, 16, 0), np.arange(10_000, 13_000, dtype=np.int64)  # external ids far from row numbers
    index = flat(16, ids, vecs)
    rng = np.random.default_rng(1)
    pick = np.sort(rng.choice(len(ids), n_allowed, replace=False))
    q = unit(3, 16, 2)
    scores, got = index.search(q, 10, ids=ids[pick][::-1])  # order and duplicates of `ids` do not matter
    oracle = q @ vecs[pick].T
    order = np.argsort(-oracle, axis=1)[:, :10]
    np.testing.assert_array_equal(got, ids[pick][order])
    np.testing.assert_allclose(scores, np.take_along_axis(oracle, order, 1), rtol=1e-5, atol=1e-5)


def test_filtered_search_returns_k_even_when_all_allowed_rank_below_the_unfiltered_top_k():
    vecs, ids = unit(500, 16, 0), np.arange(1, 501, dtype=np.int64)
    index = flat(16, ids, vecs)
    q = unit(1, 16, 3)
    _, top = index.search(q, 50)
    worst = ids[np.argsort(q @ vecs.T)[0][:20]]  # the 20 least similar: far outside the top 50
    assert not set(worst) & set(top[0])
    for allowed in (worst, np.concatenate([worst, ids[:2000:1]])[:20]):
        _, got = index.search(q, 7, ids=allowed)
        assert got.shape == (1, 7) and set(got[0]) <= set(allowed.tolist())
    # more allowed ids than the dense path takes: the FAISS selector path gives k as well
    many = np.setdiff1d(ids, top[0])
    _, got = index.search(q, 50, ids=many)
    assert got.shape == (1, 50) and not set(got[0]) & set(top[0])


def test_filtered_search_edge_cases():
    index = flat(8, [3, 5, 9], unit(3, 8, 0))
    q = unit(2, 8, 1)
    s, i = index.search(q, 5, ids=np.array([], dtype=np.int64))  # nothing matches
    assert s.shape == (2, 0) and i.shape == (2, 0)
    s, i = index.search(q, 5, ids=np.array([5, 9, 77]))  # 77 has no vector: fewer than k, no -1
    assert sorted(i[0].tolist()) == [5, 9] and i.shape == (2, 2)
    big = np.arange(10_000, dtype=np.int64)  # selector path with mostly missing ids
    s, i = index.search(q, 5, ids=big)
    assert sorted(i[0].tolist()) == [3, 5, 9] and (i >= 0).all()
    assert flat(8).search(q, 5, ids=np.array([1]))[1].shape == (2, 0)  # empty index


def test_filtered_search_never_uses_the_gpu_copy(monkeypatch):
    vecs = unit(2000, 8, 0)
    index = flat(8, np.arange(2000), vecs)
    index.use_gpu = True  # pretend a GPU: selectors must still run on the CPU index

    def no_gpu():
        raise AssertionError("filtered search went to the GPU index")

    monkeypatch.setattr(index, "_searcher", no_gpu)
    for allowed in (np.arange(10), np.arange(1500)):
        _, got = index.search(vecs[:1], 3, ids=allowed)
        assert got.shape == (1, 3) and set(got[0]) <= set(allowed.tolist())


# --- the SQL side: Store.filter_ids ------------------------------------------------------------------------------
BASE = Path("/photos")
ODD_FOLDERS = ["100%", "100x", "a_b", "aXb", "it's", "star*", "ünï", "Upper", "upper", "photos", "photos-old",
               "x' OR '1'='1"]


def local_ts(*args: int) -> float:
    return datetime(*args).timestamp()  # naive = local time, as the filter reads file dates


@pytest.fixture
def store(db) -> Store:
    """Rows only (no files): odd folder names, sizes, types, EXIF dates and file dates (SQLite, PostgreSQL)."""
    s = Store(db.store_url())
    rows = []
    for i, folder in enumerate(ODD_FOLDERS, start=1):
        ext = ("jpg", "png", "jpeg", "webp")[i % 4]
        rows.append(ImageRow(id=i, path=str(BASE / folder / f"img{i}.{ext}"), content_hash=f"h{i}", byte_size=1,
                             mtime=local_ts(2023, 1, i), width=100 * i, height=50 * i, file_type=ext,
                             encoder="test"))
    # dates: EXIF date wins over the file date; whole days inclusive
    rows.append(ImageRow(id=100, path="/dates/exif-late.jpg", content_hash="d1", byte_size=1,
                         mtime=local_ts(2020, 6, 1), taken_at=datetime(2023, 5, 1, 23, 59, 59), width=10, height=10,
                         file_type="jpg", encoder="test"))
    rows.append(ImageRow(id=101, path="/dates/exif-next.jpg", content_hash="d2", byte_size=1,
                         mtime=local_ts(2023, 5, 1, 12), taken_at=datetime(2023, 5, 2), width=10, height=10,
                         file_type="jpg", encoder="test"))
    rows.append(ImageRow(id=102, path="/dates/mtime-early.jpg", content_hash="d3", byte_size=1,
                         mtime=local_ts(2023, 5, 1, 0, 0, 1), width=10, height=10, file_type="jpg", encoder="test"))
    rows.append(ImageRow(id=103, path="/dates/mtime-before.jpg", content_hash="d4", byte_size=1,
                         mtime=local_ts(2023, 4, 30, 23, 59, 59), width=10, height=10, file_type="JPG".lower(),
                         encoder="test"))
    s.write(WriteBatch(rows=rows))
    yield s
    s.close()


def ids_of(store: Store, **kw) -> list[int]:
    got = store.filter_ids(Filters(**kw))
    assert got is not None and got.dtype == np.int64 and (np.diff(got) > 0).all()
    return got.tolist()


def folder_id(name: str) -> int:
    return ODD_FOLDERS.index(name) + 1


def test_no_filter_means_no_restriction(store):
    assert store.filter_ids(Filters()) is None


@pytest.mark.parametrize("folder", ODD_FOLDERS)
def test_folder_is_a_literal_prefix_whatever_the_characters(store, folder):
    # '%' and '_' are not wildcards, case counts, "photos" is not "photos-old", quotes are just characters
    assert ids_of(store, folder=str(BASE / folder)) == [folder_id(folder)]
    assert ids_of(store, folder=str(BASE / folder) + "/") == [folder_id(folder)]


def test_folder_is_resolved_and_covers_subfolders(store, monkeypatch):
    monkeypatch.chdir("/")
    assert ids_of(store, folder="photos/../photos/upper") == [folder_id("upper")]
    assert len(ids_of(store, folder="/photos")) == len(ODD_FOLDERS)
    assert ids_of(store, folder="/phot") == []  # a folder, not a string prefix
    assert ids_of(store, folder="/nowhere") == []


def test_glob_follows_fnmatch_on_the_full_path(store):
    assert ids_of(store, glob="*.png") == [i for i in range(1, 13) if i % 4 == 1]
    assert ids_of(store, glob="/photos/100%/*") == [folder_id("100%")]
    assert ids_of(store, glob="/photos/a?b/*") == [folder_id("a_b"), folder_id("aXb")]
    assert ids_of(store, glob="/photos/star[*]/*") == [folder_id("star*")]
    assert ids_of(store, glob="*/ünï/*") == [folder_id("ünï")]
    assert ids_of(store, glob="*/upper/*") == [folder_id("upper")]  # case-sensitive
    assert ids_of(store, glob="*it's*") == [folder_id("it's")]
    assert ids_of(store, glob="img1.jpg") == []  # the full path, not the name


def test_dates_use_exif_else_file_date_and_include_whole_days(store):
    day = date(2023, 5, 1)
    assert ids_of(store, after=day, before=day, folder="/dates") == [100, 102]
    assert ids_of(store, after=date(2023, 5, 2), folder="/dates") == [101]
    assert ids_of(store, before=date(2023, 4, 30), folder="/dates") == [103]
    assert ids_of(store, after=date(2023, 1, 3), before=date(2023, 1, 4), folder="/photos") == [3, 4]
    assert len(ids_of(store, after=date.min, before=date.max)) == len(ODD_FOLDERS) + 4  # no overflow at the ends


def test_types_and_sizes(store):
    assert ids_of(store, file_types=("PNG",)) == [1, 5, 9]
    assert ids_of(store, file_types=(".jpg",)) == ids_of(store, file_types=("jpeg",))  # jpg and jpeg are one type
    assert ids_of(store, file_types=("webp", "png"), folder="/photos") == [1, 3, 5, 7, 9, 11]
    assert ids_of(store, min_width=1000) == [10, 11, 12]
    assert ids_of(store, min_width=1000, min_height=550) == [11, 12]
    assert ids_of(store, min_width=10**30) == ids_of(store, min_height=2**63) == []  # no SQL integer overflow


def test_filters_combine(store):
    # 8: too low; 9 (png) and 10 (jpeg = jpg) pass; 11: webp; 12: too late; 'x...' folder: no 'p'
    assert ids_of(store, folder="/photos", glob="*/*p*/*", file_types=("jpg", "png"), min_height=400,
                  after=date(2023, 1, 2), before=date(2023, 1, 10)) == [8, 9, 10]
    assert ids_of(store, folder="/photos", glob="*/*p*/*", file_types=("jpg", "png"), min_height=450,
                  after=date(2023, 1, 2), before=date(2023, 1, 10)) == [9, 10]
    assert ids_of(store, folder="/photos", glob="*/*p*/*", file_types=("png",), min_height=450,
                  after=date(2023, 1, 2), before=date(2023, 1, 10)) == [9]


@pytest.mark.parametrize("kw", [
    {"folder": "/photos/x' OR '1'='1' --"},
    {"folder": "/photos/%"},
    {"folder": "/photos/_"},
    {"glob": "' OR 1=1 --"},
    {"glob": "["},
    {"glob": "(?i)*/UPPER/*"},  # regex syntax is not special in a glob
    {"file_types": ("jpg'; DROP TABLE images; --",)},
    {"file_types": ("%",)},
])
def test_injection_like_input_matches_nothing_and_changes_nothing(store, kw):
    assert ids_of(store, **kw) == []
    assert store.count_images() == len(ODD_FOLDERS) + 4


def test_unusable_folder_is_an_input_error(store):
    with pytest.raises(InputError, match="not a usable path"):
        store.filter_ids(Filters(folder="/photos/a\x00b"))


def test_quote_folder_matches_what_it_literally_says(store):
    assert ids_of(store, folder="/photos/x' OR '1'='1") == [folder_id("x' OR '1'='1")]


@pytest.mark.parametrize("kw", [{"min_width": -1}, {"min_height": -5},
                                {"after": date(2023, 2, 1), "before": date(2023, 1, 1)}])
def test_bad_filters_are_input_errors(kw):
    with pytest.raises(InputError):
        Filters(**kw)


# --- through the Engine and the CLI ------------------------------------------------------------------------------
def build(tmp_path: Path, db_url: str | None = None) -> tuple[Engine, Path]:
    """Reds near each other and a far-away 'blue' folder of mixed sizes and types."""
    root = tmp_path / "photos"
    for i in range(8):
        make_image(root / "reds" / f"red{i}.png", (220, 30 + i * 3, 30), stripe=(200, 40 + i * 5, 40))
    for i in range(4):
        make_image(root / "blues" / f"blue{i}.jpg", (30, 40, 220 - i * 10), size=(64 + 64 * i, 48))
    make_image(root / "blues" / "blue-png.png", (30, 40, 200), size=(300, 300))
    engine = Engine(EngineConfig(index_dir=tmp_path / "idx", db_url=db_url, progress=False, captioner=None),
                    encoder=TinyEncoder())
    engine.index(root)
    return engine, root.resolve()


def test_more_like_this_with_filters_returns_k_from_the_filtered_set(tmp_path, db):
    engine, root = build(tmp_path, db.url("idx"))
    query = root / "reds" / "red0.png"
    unfiltered = engine.more_like_this(query, k=5)
    assert all("/reds/" in h.path for h in unfiltered)  # blues all rank below the unfiltered top 5
    hits = engine.more_like_this(query, k=3, filters=Filters(folder=str(root / "blues")))
    assert len(hits) == 3 and all("/blues/" in h.path for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {Path(h.path).name for h in engine.more_like_this(query, k=10, filters=Filters(min_width=192))} == \
        {"blue2.jpg", "blue3.jpg", "blue-png.png"}
    assert {Path(h.path).name for h in engine.more_like_this(query, k=10, filters=Filters(
        folder=str(root / "blues"), file_types=("png",)))} == {"blue-png.png"}
    assert engine.more_like_this(query, k=10, filters=Filters(glob="*/nothing/*")) == []


def test_cli_filter_flags(tmp_path, capsys, monkeypatch):
    engine, root = build(tmp_path)
    engine.close()
    monkeypatch.setattr("indexer.engine.Engine.encoder", property(lambda self: self._encoder or TinyEncoder()))
    db = str(tmp_path / "idx")
    query = str(root / "reds" / "red0.png")
    assert main(["similar", query, "--db", db, "--json", "-k", "10", "--folder", str(root / "blues"),
                 "--type", "jpg", "--min-width", "128", "--after", "2000-01-01", "--before", "2999-12-31"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert sorted(Path(r["path"]).name for r in out["results"]) == ["blue1.jpg", "blue2.jpg", "blue3.jpg"]
    assert main(["similar", query, "--db", db, "--json", "--type", "png,jpg", "--type", "webp"]) == EXIT_OK
    assert len(json.loads(capsys.readouterr().out)["results"]) == 10
    for bad in (["--after", "2023-13-01"], ["--before", "yesterday"], ["--min-width", "-3"],
                ["--after", "2024-01-02", "--before", "2024-01-01"]):
        assert main(["similar", query, "--db", db, *bad]) == EXIT_USAGE, bad
        err = capsys.readouterr().err
        assert err.startswith("pixquery: error:") and "Traceback" not in err
    assert os.path.exists(db)
