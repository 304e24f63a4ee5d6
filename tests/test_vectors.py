"""Vector stores: search against exact numpy search, stable ids, exact rows from the segment log."""

import numpy as np
import pytest

from indexer.storage.segments import SegmentLog
from indexer.storage.vectors import MemoryStore, VectorIndex, memory_codec


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def new_index(tmp_path, dim, use_gpu=True):
    return VectorIndex(SegmentLog(tmp_path, "images", dim), use_gpu=use_gpu)


def test_search_matches_numpy_oracle_after_removals(tmp_path):
    vecs, ids = unit(300, 32, 0), np.arange(10, 310, dtype=np.int64)
    index = new_index(tmp_path, 32)
    index.put(ids, vecs)
    drop = ids[::7]
    index.delete(drop)
    keep = ~np.isin(ids, drop)
    assert len(index) == keep.sum() and np.array_equal(index.ids(), ids[keep])
    q = unit(20, 32, 1)
    scores, got = index.search(q, 10)
    oracle = q @ vecs[keep].T
    order = np.argsort(-oracle, axis=1)[:, :10]
    np.testing.assert_array_equal(got, ids[keep][order])
    np.testing.assert_allclose(scores, np.take_along_axis(oracle, order, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(index.reconstruct(ids[keep][:3]), vecs[keep][:3])
    with pytest.raises(KeyError):
        index.reconstruct(drop[:1])


def test_put_replaces_a_vector_under_the_same_id(tmp_path):
    index = new_index(tmp_path, 8)
    a, b = unit(2, 8, 0)
    index.put(np.array([7]), a[None])
    index.put(np.array([7]), b[None])
    assert len(index) == 1
    _, got = index.search(b[None], 1)
    assert got[0, 0] == 7 and np.array_equal(index.reconstruct(np.array([7]))[0], b)


def test_k_larger_than_index_and_empty_index(tmp_path):
    index = new_index(tmp_path, 8)
    s, i = index.search(unit(2, 8, 0), 5)
    assert s.shape == (2, 0) and i.shape == (2, 0)
    index.put(np.array([5, 9]), unit(2, 8, 1))
    s, i = index.search(unit(1, 8, 2), 10)
    assert sorted(i[0].tolist()) == [5, 9] and (i >= 0).all()


def test_rows_written_to_segments_reload_exactly(tmp_path):
    log = SegmentLog(tmp_path, "images", 16)
    index = VectorIndex(log)
    vecs = unit(5, 16, 0)
    index.put(np.arange(1, 6), vecs)
    info = log.write_pending(1)
    again = VectorIndex(SegmentLog.load(tmp_path, "images", 16, np.float32, [info]))
    assert again.ids().tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(again.reconstruct(np.array([4, 2])), vecs[[3, 1]])
    _, got = again.search(vecs[2:3], 1)
    assert got[0, 0] == 3


def test_memories_round_trip_through_8_bit_codes(tmp_path):
    dim = 49 * 8
    store = MemoryStore(SegmentLog(tmp_path, "memories", memory_codec(dim).code_size, np.uint8), dim)
    mem = np.clip(np.random.default_rng(0).standard_normal((3, dim)), -4, 4).astype(np.float32)
    store.put(np.array([3, 1, 2]), mem)
    mask, back = store.reconstruct_present(np.array([1, 99, 3]))
    assert mask.tolist() == [True, False, True]
    np.testing.assert_allclose(back, mem[[1, 0]], atol=10 / 255)  # one step of the 8-bit grid on [-5, 5]
    with pytest.raises(ValueError):
        store.put(np.array([4]), mem[:1, :10])
