"""A synthetic index past the exact-search threshold, through the Engine: the structure grows by
itself, every ranking mode answers, filters return k, per-query knobs reach exact search, stats say
what was built; and ``pixquery bench ann`` reports its figures."""

import json
import shutil

import numpy as np
import pytest
from conftest import TinyEncoder

from indexer.cli import main
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.lab.bench_latency import build_synthetic_index
from indexer.lab.real_vectors import synthetic_captions
from indexer.lab.real_vectors import Bases
from indexer.storage.ann import AnnPolicy, SearchParams
from indexer.storage.filters import Filters


@pytest.fixture(autouse=True)
def one_faiss_thread():
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered_bases(dim, n_images=300, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, dim)).astype(np.float32)
    images = centers[rng.integers(20, size=n_images)] + 0.4 * rng.standard_normal((n_images, dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    owner = np.repeat(np.arange(n_images), 2)
    captions = images[owner] + 0.3 * rng.standard_normal((len(owner), dim)).astype(np.float32)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return Bases(images, captions, owner, synthetic_captions(len(owner), seed), np.arange(len(owner)), None, "test")


N = 3000


def config(index_dir):
    return EngineConfig(index_dir=index_dir, captioner=None, scorer=None, matcher=None, progress=False,
                        ann=AnnPolicy(flat_max=1000, merge_min=100, recall_queries=100))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One synthetic index of N images, built once (each test gets its own copy)."""
    import faiss

    faiss.omp_set_num_threads(1)
    folder = tmp_path_factory.mktemp("scale") / "idx"
    with Engine(config(folder), encoder=TinyEncoder()) as engine:
        build_synthetic_index(engine, N, chunk=600, bases=clustered_bases(engine.encoder.dim))
    return folder


@pytest.fixture
def big_engine(built, tmp_path):
    shutil.copytree(built, tmp_path / "idx")
    engine = Engine(config(tmp_path / "idx"), encoder=TinyEncoder())
    yield engine
    engine.close()


def test_a_growing_index_goes_approximate_and_every_mode_answers(big_engine):
    engine = big_engine
    stats = engine.stats()
    assert stats["images"] == N
    for kind in ("images", "captions"):
        vi = stats["vector_index"][kind]
        assert vi["kind"] == "ivf-pq" and vi["recall_at_10"] is not None and vi["nprobe"] >= 1
    for mode in ("image", "caption", "keyword", "fused"):
        hits = engine.search("a red dog", k=10, mode=mode)
        assert len(hits) == 10 and len({h.id for h in hits}) == 10
    # visiting every cell with a short list as long as the index is exact search
    q = engine.encoder.encode_texts(["a blue boat"])
    exact = engine.search_vectors(q, 10, params=SearchParams(exact=True))
    wide = engine.search_vectors(q, 10, params=SearchParams(nprobe=10_000, refine=1000))
    np.testing.assert_array_equal(wide[1], exact[1])
    np.testing.assert_allclose(wide[0], exact[0], rtol=1e-5)
    hits = engine.search("a blue boat", k=10, mode="image", params=SearchParams(exact=True))
    assert [h.id for h in hits] == exact[1][0].tolist()


def test_keyword_index_holds_every_bulk_inserted_caption(big_engine):
    store = big_engine.open().store
    rows = store.images_by_ids(range(1, N + 1))
    want = {i for i, r in rows.items() if " puppy " in f" {r.caption} "}
    found = {i for i, _ in store.keywords.top(["puppy"], 10 * N)}
    assert found == want and want


def test_filters_return_k_through_the_approximate_index(big_engine):
    # ids 1000..2999: 2000 allowed, more than the dense-filter size, so the selector runs inside FAISS
    hits = big_engine.search("a green field", k=10, mode="image", filters=Filters(glob="/synthetic/000[12]*.jpg"))
    assert len(hits) == 10 and all(1000 <= h.id <= 2999 for h in hits)
    hits = big_engine.search("a green field", k=10, mode="fused", filters=Filters(glob="/synthetic/000[12]*.jpg"))
    assert len(hits) == 10 and all(1000 <= h.id <= 2999 for h in hits)


def test_changes_after_the_build_are_found_and_deletions_never_come_back(big_engine):
    engine = big_engine
    writer = engine.writer()
    vec = engine.encoder.encode_texts(["a purple kite"])
    writer.vectors.add(np.array([7]), vec, np.array([7]), vec)  # image 7 now looks like the query
    writer.delete([8])
    writer.checkpoint()
    s, ids = engine.search_vectors(vec, 3)
    assert ids[0, 0] == 7 and s[0, 0] == pytest.approx(1.0, abs=1e-5)
    everything = engine.search_vectors(vec, N, params=SearchParams(exact=True))[1][0]
    assert 8 not in everything.tolist() and len(everything) == N - 1


def test_stats_command_says_which_structure(big_engine, capsys):
    db = str(big_engine.config.index_dir)
    big_engine.close()
    assert main(["stats", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "image vectors: approximate, IVF" in out and "recall@10" in out


def test_bench_ann_reports_build_memory_latency_and_recall(tmp_path, capsys):
    assert main(["bench", "ann", "--n", "3000", "--dim", "32", "--gaussian", "--queries", "40", "--index-type",
                 "ivf", "--json", "--workdir", str(tmp_path), "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 3000 and report["dim"] == 32 and report["index"]["kind"] == "ivf-pq"
    assert 0 <= report["recall_at_10"] <= 1 and report["p99_ms"] >= report["p50_ms"] > 0
    assert report["memory_mb"]["index_file"] > 0 and report["build_seconds"] >= 0
    assert list(tmp_path.iterdir()) == []  # the vectors it wrote are gone
    assert main(["bench", "ann", "--n", "500", "--dim", "16", "--gaussian", "--queries", "20", "--json",
                 "--workdir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["index"]["kind"] == "flat" and report["recall_at_10"] == 1.0


def test_bench_ann_makes_its_work_folder_or_says_why_it_cannot(tmp_path, capsys):
    """``--workdir`` that does not exist yet is made; one that cannot be (a file stands in the way) is a clear
    error with exit code 2, not a traceback."""
    args = ["bench", "ann", "--n", "300", "--dim", "16", "--gaussian", "--queries", "10", "--json"]
    assert main([*args, "--workdir", str(tmp_path / "new" / "work")]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 300
    assert (tmp_path / "new" / "work").is_dir() and list((tmp_path / "new" / "work").iterdir()) == []
    (tmp_path / "file").write_text("not a folder")
    assert main([*args, "--workdir", str(tmp_path / "file" / "work")]) == 2
    err = capsys.readouterr().err
    assert "pixquery: error: cannot write the benchmark's vectors in" in err and "Traceback" not in err


def test_bench_ann_without_data_says_what_to_give(capsys, monkeypatch):
    monkeypatch.delenv("PIXQUERY_FLICKR8K", raising=False)
    assert main(["bench", "ann", "--n", "100"]) == 2
    assert "--data" in capsys.readouterr().err


def test_path_filters_answered_from_the_path_index_match_an_oracle(tmp_path):
    """Folder and glob filters add a range on the path (so the index answers them at a million rows):
    the ids must be exactly those a prefix test and fnmatch give, whatever characters the paths hold."""
    import fnmatch
    from datetime import datetime

    from indexer.storage.filters import literal_prefix
    from indexer.storage.store import Store, WriteBatch

    paths = ["/p/a/x.jpg", "/p/a/y.png", "/p/a0/x.jpg", "/p/a/%_/z.jpg", "/p/a/é.jpg", "/p/a/\U0001f600.jpg",
             "/p/b/x.jpg", "/p/a", "/p/a/sub/deep.jpg", "/p/A/x.jpg", "/p/a/[x].jpg"]
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    now = datetime(2024, 1, 1)
    store.write(WriteBatch(inserts=[dict(id=i + 1, path=p, content_hash=f"{i:064x}", byte_size=1, mtime=0.0,
                                         width=1, height=1, file_type="jpg", indexed_at=now, encoder="e")
                                    for i, p in enumerate(paths)]))
    for f, want in ((Filters(folder="/p/a"), lambda p: p.startswith("/p/a/")),
                    (Filters(glob="/p/a/*.jpg"), lambda p: fnmatch.fnmatchcase(p, "/p/a/*.jpg")),
                    (Filters(glob="/p/a/é*"), lambda p: fnmatch.fnmatchcase(p, "/p/a/é*")),
                    (Filters(glob="/p/a/[[]x].jpg"), lambda p: fnmatch.fnmatchcase(p, "/p/a/[[]x].jpg")),
                    (Filters(folder="/p/a", glob="*/sub/*"), lambda p: p.startswith("/p/a/") and "/sub/" in p)):
        got = store.filter_ids(f).tolist()
        assert got == [i + 1 for i, p in enumerate(paths) if want(p)], f
    assert literal_prefix(Filters(folder="/p/a", glob="/p/a/sub/*.jpg")) == "/p/a/sub/"
    plan = store.engine.connect().exec_driver_sql(
        "EXPLAIN QUERY PLAN SELECT id FROM images WHERE path >= ? AND path < ?", ("/p/a/", "/p/a0")).fetchall()
    assert "INDEX" in str(plan).upper()
    store.close()
