"""The CUDA path: models in half precision on the GPU, raw pixels normalised there, decoding on worker
processes, and an index that agrees with the CPU's (the reference). Tests marked ``gpu`` skip without
CUDA; the others check the device rules that hold everywhere."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.config import EngineConfig
from indexer.engine import Engine
from retrieval.device import compute_dtype, default_batch_size, resolve_device
from retrieval.errors import InputError
from retrieval.images import load_image, to_raw

SAMPLES = Path(__file__).resolve().parents[1] / "indexer" / "sample_photos"


def sample_paths(n: int) -> list[Path]:
    return sorted(SAMPLES.glob("*.jpg"))[:n]


def test_cuda_without_a_gpu_is_a_clear_input_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA device is available.*--device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")


def test_cpu_runs_in_float32_with_batches_of_32(monkeypatch):
    monkeypatch.setenv("PIXQUERY_PRECISION", "bf16")  # names the GPU's precision; a CPU stays the reference
    assert compute_dtype(torch.device("cpu")) == torch.float32
    assert default_batch_size(torch.device("cpu")) == 32
    monkeypatch.setenv("PIXQUERY_PRECISION", "fp8")
    with pytest.raises(InputError, match="PIXQUERY_PRECISION"):
        compute_dtype(torch.device("cpu"))


def test_raw_pixels_give_the_float_pixels_grid_bit_for_bit_on_cpu():
    from retrieval.native.model import NativeEncoder

    encoder = NativeEncoder()
    images = [load_image(p).image for p in sample_paths(4)]
    floats = torch.stack([encoder.preprocess(im) for im in images])
    raw = torch.stack([torch.from_numpy(np.array(to_raw(im, 224))) for im in images])
    assert torch.equal(encoder.grid(raw), encoder.grid(floats))


def test_half_precision_path_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    """The dtype plumbing of the GPU path (bfloat16 towers, decoders and text tower; float32 heads,
    beam scores and memories), exercised on a CPU by pretending it is the GPU's precision."""
    import captioning.native
    import retrieval.native.model

    for module in (captioning.native, retrieval.native.model):
        monkeypatch.setattr(module, "compute_dtype", lambda device: torch.bfloat16)
    monkeypatch.setenv("PIXQUERY_RUNTIME", "torch")  # as on a GPU: the towers in PyTorch
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_paths(6):
        (folder / p.name).write_bytes(p.read_bytes())
    config = EngineConfig(index_dir=tmp_path / "idx", progress=False, readers="processes", batch_size=4)
    with Engine(config) as engine:
        summary = engine.index(folder)
        assert summary.embedded == summary.captioned == 6
        ids = sorted(engine.paths())
        vectors = engine.image_vectors(ids)
        assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        index = engine.open()
        assert len(index.vectors.captions) == 6 and len(index.vectors.memories) == 6
        assert engine.encoder.image_tower.net.conv_stem.weight.dtype == torch.bfloat16


@pytest.mark.gpu
def test_gpu_models_agree_with_the_cpu_reference():
    from captioning.native import NativeCaptioner
    from retrieval.native.model import NativeEncoder

    cuda, cpu = resolve_device("cuda"), torch.device("cpu")
    assert compute_dtype(cuda) in (torch.bfloat16, torch.float16) and default_batch_size(cuda) == 256
    images = [load_image(p).image for p in sample_paths(24)]
    raw = torch.stack([torch.from_numpy(np.array(to_raw(im, 224))) for im in images])
    out, encoders = {}, {}
    for device in (cpu, cuda):
        enc, cap = NativeEncoder(device=device), NativeCaptioner(device=device)
        grid = enc.grid(raw)
        assert grid.device.type == device.type and grid.dtype == compute_dtype(device)
        out[device.type] = (enc.encode_grid(grid), cap.caption_grid(grid), cap.memory(grid))
        encoders[device.type] = enc
    (v0, c0, m0), (v1, c1, m1) = out["cpu"], out["cuda"]
    assert (v0 * v1).sum(1).min() > 0.99  # image embeddings: cosine of bfloat16 against float32
    # beam search may tip on a near tie (bfloat16 keeps 3 significant digits): most captions agree, and
    # the others are about as long
    assert sum(a == b for a, b in zip(c0, c1)) >= 0.5 * len(c0)
    assert abs(np.mean([len(c.split()) for c in c1]) / np.mean([len(c.split()) for c in c0]) - 1) < 0.2
    assert m1.dtype == np.float32 and np.abs(m0 - m1).mean() < 0.1 and np.corrcoef(m0.ravel(), m1.ravel())[0, 1] > 0.99
    t0, t1 = encoders["cpu"].encode_texts(c0), encoders["cuda"].encode_texts(c0)  # the same texts on both
    assert (t0 * t1).sum(1).min() > 0.99


@pytest.mark.gpu
def test_gpu_index_through_worker_processes_agrees_with_cpu_index(tmp_path):
    results = {}
    for device in ("cpu", "cuda"):
        config = EngineConfig(index_dir=tmp_path / device, device=device, progress=False)
        with Engine(config) as engine:
            if device == "cuda":
                assert engine.read_processes and engine.batch_size == 256
            summary = engine.index(SAMPLES)
            paths = engine.paths()
            ids = sorted(paths, key=paths.get)
            results[device] = (summary.embedded, [paths[i] for i in ids], engine.image_vectors(ids),
                               [engine.image(i).caption for i in ids])
            if device == "cuda" and importlib.util.find_spec("faiss") is not None:  # indexing needs no FAISS
                assert len(engine.search("a dog", k=5)) == 5
    (n0, p0, v0, c0), (n1, p1, v1, c1) = results["cpu"], results["cuda"]
    assert n0 == n1 == len(list(SAMPLES.glob("*.jpg"))) and p0 == p1
    assert (v0 * v1).sum(1).min() > 0.99
    assert sum(a == b for a, b in zip(c0, c1)) >= 0.5 * len(c0)


@pytest.mark.gpu
def test_faiss_searches_on_the_gpu_when_its_build_sees_one(tmp_path):
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("the installed FAISS is a CPU build (pip install '.[gpu]' for faiss-gpu-cu12)")
    from indexer.storage.segments import SegmentLog
    from indexer.storage.vectors import VectorIndex

    vecs = np.random.default_rng(0).standard_normal((5000, 64)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = VectorIndex(SegmentLog(tmp_path, "images", 64))
    index.put(np.arange(5000), vecs)
    scores, ids = index.search(vecs[:10], 5)
    assert index.use_gpu and index._gpu_index is not None
    oracle = np.argsort(-(vecs[:10] @ vecs.T), axis=1)[:, :5]
    np.testing.assert_array_equal(ids, oracle)
