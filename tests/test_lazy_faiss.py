"""Indexing needs no FAISS: the search structure is built on the first search, and scorer memories are
coded in numpy, bit for bit as FAISS's 8-bit scalar quantizer codes them."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from indexer.storage.segments import SegmentLog
from indexer.storage.vectors import MEMORY_RANGE, VectorIndex, memory_codec
from tests.conftest import REPO


def faiss_codec(dim):
    faiss = pytest.importorskip("faiss")
    sq = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_uniform)
    sq.train(np.array([[-MEMORY_RANGE] * dim, [MEMORY_RANGE] * dim], dtype=np.float32))
    return sq


@pytest.mark.parametrize("dim", [49 * 512, 49 * 384 + 3])
def test_memory_codes_are_faiss_codes_bit_for_bit(dim):
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((20, dim)) * 2.5).astype(np.float32)
    # edges: the range ends, just inside and outside them, zero, and values on the code boundaries
    edges = np.array([-5, 5, -5.0000005, 4.9999995, 0, -6, 6, 1e-8, -1e-8, 2.5, -2.5, 100, -100], np.float32)
    boundaries = (np.arange(256, dtype=np.float32) / np.float32(255) * np.float32(10) - np.float32(5))
    x[0, :len(edges)] = edges
    x[1, :256] = boundaries
    x[2, :256] = np.nextafter(boundaries, np.float32(-np.inf))
    ours, theirs = memory_codec(dim), faiss_codec(dim)
    assert ours.code_size == theirs.code_size
    codes = ours.compute_codes(x)
    np.testing.assert_array_equal(codes, theirs.compute_codes(x))
    every = np.resize(np.arange(256, dtype=np.uint8), (3, dim))
    for c in (codes, every):
        np.testing.assert_array_equal(ours.decode(c), theirs.decode(c))  # bit-identical floats


def test_no_search_structure_until_the_first_search(tmp_path):
    vecs = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = VectorIndex(SegmentLog(tmp_path, "images", 16))
    index.put(np.arange(50), vecs)
    index.delete(np.array([3, 4]))
    assert index._index is None and len(index) == 48
    _, got = index.search(vecs[:1], 3)
    assert got[0, 0] == 0 and index._index is not None
    index.put(np.array([100]), vecs[5:6])  # kept in step once built
    index.delete(np.array([0]))
    _, got = index.search(vecs[5:6], 2)
    assert sorted(got[0].tolist()) == [5, 100]


def test_indexing_runs_without_faiss_installed(tmp_path):
    """A process where ``import faiss`` fails builds an index (vectors, memories, SQL rows) and only
    a search says that FAISS is missing."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["faiss"] = None  # import faiss raises ImportError
        import numpy as np
        from pathlib import Path
        from indexer.storage.bundle import VectorBundle
        from indexer.storage.store import Store, WriteBatch
        from indexer.errors import InputError
        folder = Path({str(tmp_path)!r})
        store = Store(f"sqlite:///{{folder / 'db.sqlite'}}")
        bundle = VectorBundle.open(folder / "vectors", store, 8, 49 * 4)
        rng = np.random.default_rng(0)
        ids = np.arange(1, 11)
        bundle.add(ids, rng.standard_normal((10, 8)).astype(np.float32), ids[:5],
                   rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((10, 196)).astype(np.float32))
        bundle.commit(store, WriteBatch())
        again = VectorBundle.open(folder / "vectors", store, 8, 49 * 4)
        assert len(again.images) == 10 and len(again.captions) == 5 and len(again.memories) == 10
        try:
            again.images.search(np.ones((1, 8), np.float32), 3)
        except InputError as exc:
            print("refused:", exc)
        assert "faiss" not in sys.modules or sys.modules["faiss"] is None
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "refused: searching needs FAISS" in out.stdout


def test_memories_coded_on_the_model_device_are_the_stored_codes():
    """The model stage codes memories in torch (on a GPU: before they leave it); the codes equal the
    numpy codec's bit for bit (here on the CPU; the arithmetic is correctly rounded on GPUs too)."""
    import torch

    from indexer.indexing.models import code_on_device

    dim = 49 * 64
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, dim)) * 2.5).astype(np.float32)
    boundaries = np.arange(256, dtype=np.float32) / np.float32(255) * np.float32(10) - np.float32(5)
    x[0, :256], x[1, :256] = boundaries, np.nextafter(boundaries, np.float32(np.inf))
    x[2, :6] = [-5, 5, -7, 9, 0, 4.9999995]
    np.testing.assert_array_equal(code_on_device(torch.from_numpy(x)), memory_codec(dim).compute_codes(x))
