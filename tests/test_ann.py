"""Approximate search chosen by size: plans, growth from exact to approximate, incremental changes,
filters, merges, persistence and bad files, against exact numpy search as the oracle."""

import json

import numpy as np
import pytest

from indexer.errors import AnnFileError
from indexer.storage.ann import AnnPolicy, SearchParams, choose_plan
from indexer.storage.bundle import VectorBundle, describe, manifest_path
from indexer.storage.store import Store, WriteBatch

DIM = 32


def clustered(n, seed, centers=60, dim=DIM, noise=0.35):
    """Unit vectors around ``centers`` fixed random directions (real embeddings, and the queries that look
    for them, cluster; Gaussian noise does not)."""
    c = np.random.default_rng(1234).standard_normal((centers, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(centers, size=n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP teams spin when the 2 cores are shared (8x slower training here): tests use one."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


POLICY = AnnPolicy(flat_max=1000, merge_min=200, merge_fraction=0.1, recall_queries=100)


def open_bundle(tmp_path, policy=POLICY, repair=False):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    return store, VectorBundle.open(tmp_path / "vectors", store, DIM, None, policy=policy, repair=repair)


def fill(bundle, store, vecs, start=1, chunk=500):
    for lo in range(0, len(vecs), chunk):
        ids = np.arange(start + lo, start + min(len(vecs), lo + chunk), dtype=np.int64)
        bundle.add(ids, vecs[lo:lo + chunk], ids, vecs[lo:lo + chunk])
        bundle.commit(store, WriteBatch())


def oracle(q, ids, vecs, k, allowed=None):
    keep = np.ones(len(ids), bool) if allowed is None else np.isin(ids, allowed)
    sims = q @ vecs[keep].T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return ids[keep][order], np.take_along_axis(sims, order, 1)


def recall(got, truth):
    return np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got.tolist(), truth.tolist())])


def manifest(tmp_path, bundle):
    return json.loads(manifest_path(tmp_path / "vectors", bundle.generation).read_text())


def test_plan_is_exact_when_small_and_approximate_above_the_threshold():
    policy = AnnPolicy()
    assert choose_plan(10_000, 1024, policy) is None
    plan = choose_plan(1_000_000, 1024, policy)
    assert plan is not None and plan.nlist & (plan.nlist - 1) == 0 and plan.m == 256  # 4 dims per 4-bit code
    assert plan.resident_bytes(1_000_000, 1024) <= policy.memory_mb << 20
    tight = choose_plan(1_000_000, 1024, AnnPolicy(memory_mb=100))
    assert tight.m < plan.m and tight.resident_bytes(1_000_000, 1024) <= 100 << 20
    # a collection that would not fit the budget exactly goes approximate below flat_max
    assert choose_plan(15_000, 1024, AnnPolicy(memory_mb=32)) is not None
    assert choose_plan(2_000_000, 1024, AnnPolicy(index_type="flat")) is None
    assert choose_plan(5_000, 64, AnnPolicy(index_type="ivf")) is not None
    assert choose_plan(100, 64, AnnPolicy(index_type="ivf")) is None  # too few to train


def test_grows_from_exact_to_approximate_without_being_asked(tmp_path):
    vecs = clustered(3000, 0)
    ids = np.arange(1, 3001)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs[:900])
    assert bundle.images.kind == "flat" and "ann" not in manifest(tmp_path, bundle)["kinds"]["images"]
    fill(bundle, store, vecs[900:], start=901)
    entry = manifest(tmp_path, bundle)["kinds"]["images"]["ann"]
    assert bundle.images.kind == "ivf-pq" and bundle.captions.kind == "ivf-pq"
    assert entry["recall_at_10"] >= POLICY.target_recall and entry["recall_queries"] == 100
    assert "caption vectors" in entry["recall_source"]
    q = clustered(50, 9)
    scores, got = bundle.images.search(q, 10)
    truth, _ = oracle(q, ids, vecs, 10)
    assert recall(got, truth) >= 0.9
    # scores are exact cosines of what came back, best first
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, vecs[got - 1]), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # exact search asked per query equals the oracle
    _, got = bundle.images.search(q, 10, params=SearchParams(exact=True))
    np.testing.assert_array_equal(got, truth)
    stats = describe(tmp_path / "vectors", bundle.generation)["images"]
    assert stats["kind"] == "ivf-pq" and stats["nprobe"] == entry["nprobe"] and stats["recall_at_10"] == entry["recall_at_10"]


def test_rows_a_search_reads_serve_the_same_querys_reconstruct(tmp_path):
    """Fused ranking takes its pool's image vectors from the rows the image search re-ranked: the same stored
    rows, and ids the search did not read (the exact part's, or others) are read as before."""
    from indexer.storage.search_reads import RowsRead

    vecs = clustered(3000, 5)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    images = bundle.images
    changed = clustered(1, 6)[0]
    images.put(np.array([11]), changed[None])  # pending: searched in the exact part, not re-ranked from rows
    q = np.stack([changed, clustered(1, 7)[0]])
    for query, params in ((q[:1], None), (q[1:], None), (q[1:], SearchParams(exact=True))):
        read = RowsRead()
        _, got = images.search(query, 100, params=params, read=read)
        assert (np.diff(read.ids) > 0).all() and len(read.rows) == len(read.ids)  # the rows re-ranked, by id
        assert set(got[0].tolist()) - {11} <= set(read.ids.tolist())  # all but the exact part's come from them
        want = np.concatenate([got[0], [1, 2, 3]])  # the results, and ids the search may not have read
        np.testing.assert_array_equal(images.reconstruct(want, read), images.reconstruct(want))
    assert got[0][0] != 11 and 11 in images.search(q[:1], 1, read=RowsRead())[1][0]
    asked = []
    get = images.records.get
    images.records.get = lambda ids: (asked.append(np.asarray(ids).tolist()), get(ids))[1]
    images.reconstruct(got[0][:20], read)
    assert asked == []  # served from the rows the search read, no second read
    images.reconstruct(np.array([got[0][0], 11]), read)
    assert asked == [[11]]  # only what the search did not read
    images.records.get = get
    np.testing.assert_array_equal(images.reconstruct(np.array([11]), read), changed[None])
    # a filtered search reads the allowed ids' rows itself: they serve too
    read = RowsRead()
    allowed = np.arange(100, 160)
    _, got = images.search(q[1:], 5, ids=allowed, read=read)
    assert set(read.ids.tolist()) <= set(allowed.tolist()) and set(got[0].tolist()) <= set(read.ids.tolist())
    np.testing.assert_array_equal(images.reconstruct(got[0], read), vecs[got[0] - 1])


def test_a_preview_hands_out_the_best_few_early_and_changes_no_result(tmp_path):
    """A long short list is re-ranked in two parts, the best few handed out in between (fused ranking starts
    its second stage there): those are what a search for that few answers, and the results, scores and rows
    read are exactly those of a search without a preview."""
    from indexer.storage.search_reads import Preview, RowsRead

    vecs = clustered(3000, 8)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    images = bundle.images
    images.put(np.array([12]), clustered(1, 9))  # pending: from the exact part, in the preview too
    for seed in range(6):
        q = clustered(1, 20 + seed) if seed else clustered(1, 9)
        seen, plain_read, read = [], RowsRead(), RowsRead()
        plain = images.search(q, 100, read=plain_read)
        got = images.search(q, 100, read=read, preview=Preview(10, seen.append))
        np.testing.assert_array_equal(got[1], plain[1])
        np.testing.assert_array_equal(got[0], plain[0])  # the same float32 scores, bit for bit
        np.testing.assert_array_equal(read.ids, plain_read.ids)
        np.testing.assert_array_equal(read.rows, plain_read.rows)
        assert len(seen) == 1
        np.testing.assert_array_equal(seen[0], images.search(q, 10)[1][0])
        assert (12 in seen[0]) == (seed == 0)
    seen = []
    images.search(q, 10, preview=Preview(10, seen.append))  # nothing left to re-rank after the few: no preview
    assert seen == []


def test_more_cells_visited_never_lowers_recall(tmp_path):
    vecs = clustered(3000, 1)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    q = clustered(60, 2)
    truth, _ = oracle(q, np.arange(1, 3001), vecs, 10)
    nlist = bundle.images.base.info.nlist
    r1 = recall(bundle.images.search(q, 10, params=SearchParams(nprobe=1, refine=1))[1], truth)
    rall = recall(bundle.images.search(q, 10, params=SearchParams(nprobe=nlist, refine=10))[1], truth)
    assert rall >= r1 and rall >= 0.98


def test_changes_after_the_snapshot_are_searched_exactly_and_stale_ids_never_return(tmp_path):
    vecs = clustered(3000, 3)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    ann_file = bundle.images.base.info.file
    images = bundle.images
    # a new image, a replaced vector (a changed file) and a deleted one, not committed yet
    new, changed, gone = clustered(3, 4)
    images.put(np.array([5001]), new[None])
    images.put(np.array([7]), changed[None])
    images.delete(np.array([8]))
    for vec, want in ((new, 5001), (changed, 7)):
        s, i = images.search(vec[None], 3)
        assert i[0, 0] == want and s[0, 0] == pytest.approx(1.0, abs=1e-5)
    _, i = images.search(vecs[7][None], 20)  # the old vector of 8: 8 is gone
    assert 8 not in i[0].tolist()
    _, i = images.search(vecs[6][None], 20)  # 7's old vector no longer finds 7 first
    assert i[0, 0] != 7
    bundle.commit(store, WriteBatch())
    assert bundle.images.base.info.file == ann_file  # a small change is not merged into the file
    # a new process: the structure is read from its file, the change from the later segment
    store2, again = open_bundle(tmp_path)
    assert again.images.base.info.file == ann_file and again.images.base.path.exists()
    s, i = again.images.search(new[None], 1)
    assert i[0, 0] == 5001
    _, i = again.images.search(vecs[7][None], 20)
    assert 8 not in i[0].tolist()
    assert len(again.images) == 3000


def test_merges_when_the_change_grows_and_keeps_answers(tmp_path):
    vecs = clustered(4000, 5)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs[:3000])
    first = bundle.images.base.info
    bundle.remove(np.arange(1, 101))  # 100 deleted
    fill(bundle, store, vecs[3000:], start=3001)  # 1000 added: past merge_fraction of 3000
    info = bundle.images.base.info
    assert info.file != first.file and info.merged >= 1 and info.nlist == first.nlist
    assert info.n == 3900 and bundle.images.index.ntotal == 0 and not bundle.images._stale
    assert not (tmp_path / "vectors" / first.file).exists() or bundle.generation - 1  # kept one generation at most
    ids = np.arange(101, 4001)
    q = clustered(40, 6)
    _, got = bundle.images.search(q, 10)
    truth, _ = oracle(q, ids, vecs[100:], 10)
    assert recall(got, truth) >= 0.9 and not np.isin(got, np.arange(1, 101)).any()


def test_filtered_search_returns_k_whenever_k_match(tmp_path):
    vecs = clustered(3000, 7)
    ids = np.arange(1, 3001)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    q = clustered(5, 8)
    rng = np.random.default_rng(0)
    allowed = np.sort(rng.choice(ids, 1500, replace=False))  # above the dense-filter size: inside FAISS
    scores, got = bundle.images.search(q, 10, ids=allowed)
    assert got.shape == (5, 10) and np.isin(got, allowed).all()
    truth, _ = oracle(q, ids, vecs, 10, allowed)
    assert recall(got, truth) >= 0.9
    # a filter of images far from every query: a few cells would hold none of them; k still come back
    far = ids[np.argsort(vecs @ q[0])[:1100]]
    _, got = bundle.images.search(q[:1], 10, ids=far, params=SearchParams(nprobe=1))
    assert got.shape == (1, 10) and np.isin(got, far).all()
    # fewer than k match: all of them
    _, got = bundle.images.search(q[:1], 10, ids=np.array([3, 99999]))
    assert got.tolist() == [[3]]


def test_shrinking_collection_goes_back_to_exact(tmp_path):
    vecs = clustered(3000, 9)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    old = bundle.images.base.info.file
    bundle.remove(np.arange(1, 2701))
    bundle.commit(store, WriteBatch())
    assert bundle.images.kind == "flat" and len(bundle.images) == 300
    bundle.collect_garbage()  # the previous generation is kept for readers still opening it ...
    assert (tmp_path / "vectors" / old).exists()
    from indexer.storage.manifest import read_manifest

    bundle.collect_garbage(keep=(read_manifest(tmp_path / "vectors", bundle.generation),))
    assert not (tmp_path / "vectors" / old).exists()  # ... and goes with it
    q = clustered(5, 10)
    _, got = bundle.images.search(q, 5)
    truth, _ = oracle(q, np.arange(2701, 3001), vecs[2700:], 5)
    np.testing.assert_array_equal(got, truth)


def test_a_damaged_file_is_a_clear_error_and_a_writer_rebuilds_it(tmp_path):
    vecs = clustered(3000, 11)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    path = bundle.images.base.path
    store.close()
    with open(path, "r+b") as fh:  # truncated: a crash of the disk, not of pixquery (which renames)
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(AnnFileError, match=path.name):
        open_bundle(tmp_path)
    store, writer = open_bundle(tmp_path, repair=True)
    assert writer.images.kind == "flat"  # searched exactly meanwhile: right answers, never wrong ones
    q = clustered(3, 12)
    truth, _ = oracle(q, np.arange(1, 3001), vecs, 10)
    np.testing.assert_array_equal(writer.images.search(q, 10)[1], truth)
    writer.commit(store, WriteBatch())  # nothing changed, but the structure is rebuilt
    assert writer.images.kind == "ivf-pq" and writer.images.base.path != path
    store.close()
    _, reader = open_bundle(tmp_path)
    assert reader.images.kind == "ivf-pq"


def test_garbage_in_the_file_is_caught_not_trusted(tmp_path):
    vecs = clustered(3000, 13)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    path = bundle.images.base.path
    size = path.stat().st_size
    path.write_bytes(b"\0" * size)  # same size, nothing readable
    with pytest.raises(AnnFileError, match="cannot be read|does not hold"):
        open_bundle(tmp_path)


def test_an_entry_of_another_version_is_not_trusted_and_is_rebuilt(tmp_path, caplog):
    vecs = clustered(3000, 14)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    mpath = manifest_path(tmp_path / "vectors", bundle.generation)
    m = json.loads(mpath.read_text())
    m["kinds"]["images"]["ann"]["version"] = 0
    mpath.write_text(json.dumps(m))
    store.close()
    store, again = open_bundle(tmp_path)
    assert again.images.kind == "flat" and "another version" in caplog.text
    again.commit(store, WriteBatch())
    assert again.images.kind == "ivf-pq" and again.images.base.info.version == 1


def test_explicit_flat_ignores_and_then_drops_the_structure(tmp_path):
    vecs = clustered(3000, 15)
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, vecs)
    store.close()
    store, flat = open_bundle(tmp_path, policy=AnnPolicy(index_type="flat"))
    assert flat.images.kind == "flat" and len(flat.images) == 3000
    flat.remove(np.array([1]))
    flat.commit(store, WriteBatch())
    assert "ann" not in manifest(tmp_path, flat)["kinds"]["images"]


def test_an_index_from_before_approximate_search_is_migrated_by_the_next_writer(tmp_path):
    vecs = clustered(3000, 16)
    store, old = open_bundle(tmp_path, policy=AnnPolicy(index_type="flat"))  # what the previous version wrote
    fill(old, store, vecs)
    assert "ann" not in manifest(tmp_path, old)["kinds"]["images"]
    store.close()
    store, reader = open_bundle(tmp_path)
    q = clustered(4, 17)
    truth, _ = oracle(q, np.arange(1, 3001), vecs, 10)
    np.testing.assert_array_equal(reader.images.search(q, 10)[1], truth)  # exact until a writer commits
    reader.commit(store, WriteBatch())  # any indexing run: nothing changed, the structure is built
    assert reader.images.kind == "ivf-pq" and "ann" in manifest(tmp_path, reader)["kinds"]["images"]


def test_a_missing_file_is_named(tmp_path):
    store, bundle = open_bundle(tmp_path)
    fill(bundle, store, clustered(3000, 18))
    path = bundle.images.base.path
    store.close()
    path.unlink()
    with pytest.raises(AnnFileError, match=f"{path.name} is missing"):
        open_bundle(tmp_path)
