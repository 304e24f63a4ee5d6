"""The image tower on onnxruntime (the CPU default where it is installed) against PyTorch's (the reference):
the same grid within float32 rounding, the same embeddings and captions; and the runtime choice's rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.device import resolve_runtime
from retrieval.errors import InputError
from retrieval.images import load_image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "indexer" / "sample_photos").glob("*.jpg"))


def test_onnx_tower_agrees_with_pytorch(tmp_path, monkeypatch):
    from captioning.native import NativeCaptioner
    from retrieval.native.model import NativeEncoder

    images = [load_image(p).image for p in SAMPLES[:24]]
    out = {}
    for runtime in ("torch", "onnx"):
        monkeypatch.setenv("PIXQUERY_RUNTIME", runtime)
        encoder = NativeEncoder(cache_dir=tmp_path)
        pixels = torch.stack([encoder.preprocess(im) for im in images])
        grid = encoder.grid(pixels)
        assert encoder.runtime == runtime and grid.dtype == torch.float32 and grid.shape == (24, 1280, 7, 7)
        out[runtime] = (grid, encoder.encode_grid(grid), NativeCaptioner().caption_grid(grid))
    (g0, v0, c0), (g1, v1, c1) = out["torch"], out["onnx"]
    assert float((g0 - g1).abs().max()) < 1e-3 * float(g0.abs().max())  # float32 rounding, other kernels
    assert (v0 * v1).sum(1).min() > 0.99999
    assert sum(a == b for a, b in zip(c0, c1)) >= 23  # a caption may tip on an exact near-tie


def test_runtime_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("PIXQUERY_RUNTIME", "torch")
    assert resolve_runtime(cpu) == ("torch", False)
    monkeypatch.setenv("PIXQUERY_RUNTIME", "auto")
    assert resolve_runtime(cpu) == ("onnx", False) and resolve_runtime(cuda) == ("torch", False)
    monkeypatch.setenv("PIXQUERY_RUNTIME", "onnx")
    assert resolve_runtime(cpu) == ("onnx", True)
    with pytest.raises(InputError, match="on a CPU"):
        resolve_runtime(cuda)
    monkeypatch.setenv("PIXQUERY_RUNTIME", "tensorrt")
    with pytest.raises(InputError, match="PIXQUERY_RUNTIME"):
        resolve_runtime(cpu)


def test_missing_onnxruntime_falls_back_to_pytorch_or_is_an_error_when_required(monkeypatch, tmp_path):
    import sys

    from retrieval.native.model import NativeEncoder

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setenv("PIXQUERY_RUNTIME", "auto")
    assert resolve_runtime(torch.device("cpu")) == ("torch", False)
    encoder = NativeEncoder(cache_dir=tmp_path)
    assert encoder.runtime == "torch"
    monkeypatch.setenv("PIXQUERY_RUNTIME", "onnx")
    with pytest.raises(InputError, match="onnxruntime is not installed"):
        resolve_runtime(torch.device("cpu"))


def test_failed_export_warns_and_runs_in_pytorch(monkeypatch, tmp_path, caplog):
    import sys

    from retrieval.native import onnx
    from retrieval.native.model import NativeEncoder

    monkeypatch.setattr(onnx, "_exported", {})
    monkeypatch.setitem(sys.modules, "onnx", None)  # nothing to export with, nothing exported yet
    monkeypatch.setenv("PIXQUERY_RUNTIME", "auto")
    encoder = NativeEncoder(cache_dir=tmp_path / "empty")
    x = torch.zeros(1, 3, 224, 224)
    with caplog.at_level("WARNING"):
        assert encoder.grid(x).shape == (1, 1280, 7, 7)
    assert encoder.runtime == "torch" and "needs the 'onnx' package" in caplog.text
    np.testing.assert_array_equal(encoder.grid(x).numpy(), encoder.image_tower(x).numpy())
