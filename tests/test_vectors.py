"""FAISS wrapper against exact numpy search; stable ids; atomic saves."""

import numpy as np

from indexer.vectors import VectorIndex


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_matches_numpy_oracle_after_removals(tmp_path):
    vecs, ids = unit(300, 32, 0), np.arange(10, 310, dtype=np.int64)
    index = VectorIndex(32)
    index.add(ids, vecs)
    drop = ids[::7]
    assert index.remove(drop) == len(drop)
    keep = ~np.isin(ids, drop)
    q = unit(20, 32, 1)
    scores, got = index.search(q, 10)
    oracle = q @ vecs[keep].T
    order = np.argsort(-oracle, axis=1)[:, :10]
    np.testing.assert_array_equal(got, ids[keep][order])
    np.testing.assert_allclose(scores, np.take_along_axis(oracle, order, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(index.reconstruct(ids[keep][:3]), vecs[keep][:3])


def test_k_larger_than_index_and_empty_index():
    index = VectorIndex(8)
    s, i = index.search(unit(2, 8, 0), 5)
    assert s.shape == (2, 0) and i.shape == (2, 0)
    index.add(np.array([5, 9]), unit(2, 8, 1))
    s, i = index.search(unit(1, 8, 2), 10)
    assert sorted(i[0].tolist()) == [5, 9] and (i >= 0).all()


def test_save_is_atomic_and_roundtrips(tmp_path):
    path = tmp_path / "v.faiss"
    index = VectorIndex(16)
    index.add(np.array([1, 2, 3]), unit(3, 16, 0))
    index.save(path)
    assert not (tmp_path / "v.faiss.tmp").exists()
    loaded = VectorIndex.load(path, 16)
    assert sorted(loaded.ids().tolist()) == [1, 2, 3]
