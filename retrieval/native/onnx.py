"""The native towers on onnxruntime, for CPUs: the same networks, exported once from PyTorch (the
reference) into the model cache, run by onnxruntime's kernels (about twice as fast as PyTorch's for
EfficientNet-Lite0 on 2 cores: docs/BENCHMARKS.md).

``PIXQUERY_RUNTIME`` chooses (``retrieval/device.py``): ``auto`` (default) uses onnxruntime on a CPU when
it is installed (``pip install ".[onnx]"``), ``torch`` never does. Without onnxruntime, or when the
export fails (no ``onnx`` package to export with and no exported file in the cache), the tower runs in
PyTorch and a warning says why; ``PIXQUERY_RUNTIME=onnx`` makes that an error instead. Results agree
with PyTorch's within float32 rounding (a test bounds the grid's difference and compares embeddings and
captions).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from retrieval.errors import ModelLoadError

log = logging.getLogger(__name__)

FORMAT = "tower-onnx-1"  # part of the cached file's name: change it when the export changes
_sessions: dict[str, object] = {}  # path -> session, shared by the encoders of one process
_exported: dict[str, Path] = {}  # file name -> where this process exported or found it (any cache folder)
_lock = threading.Lock()


def default_cache() -> Path:
    """Where exported towers go when no cache folder is given: ``$PIXQUERY_CACHE_DIR/models/onnx``, else
    ``$XDG_CACHE_HOME/pixquery/models/onnx``, else ``~/.cache/pixquery/models/onnx``."""
    base = os.environ.get("PIXQUERY_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "pixquery")
    return Path(base).expanduser() / "models" / "onnx"


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def session(path: Path, threads: int):  # noqa: ANN201 - onnxruntime.InferenceSession
    """An onnxruntime CPU session for ``path`` with ``threads`` intra-op threads that sleep when idle
    (spinning threads would take the cores from the PyTorch work that follows: beam search)."""
    import onnxruntime as ort

    key = f"{path}|{threads}"
    with _lock:
        if key not in _sessions:
            so = ort.SessionOptions()
            so.intra_op_num_threads = max(1, threads)
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            _sessions[key] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return _sessions[key]


def _file_key(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def export_tower(cache: Path) -> Path:
    """The image tower as ONNX in ``cache`` (exported from PyTorch on first use; the file is named by
    the weights' hash, so other weights get their own)."""
    from retrieval.native.towers import ImageTower, efficientnet_weights_path

    path = cache / f"effl0-{FORMAT}-{_file_key(efficientnet_weights_path())}.onnx"
    if path.is_file():
        return path
    earlier = _exported.get(path.name)  # the same export, in another cache folder, this process made or used
    if earlier is not None and earlier.is_file():
        return earlier
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError as exc:
        raise ModelLoadError("exporting the image tower to ONNX needs the 'onnx' package: "
                             "pip install onnx (or pixquery's 'onnx' extra)") from exc
    cache.mkdir(parents=True, exist_ok=True)
    tower = ImageTower().eval()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(tower, (torch.zeros(2, 3, 224, 224),), str(tmp), input_names=["pixels"],
                              output_names=["grid"], dynamic_axes={"pixels": {0: "batch"}, "grid": {0: "batch"}},
                              opset_version=17, dynamo=False)
        tmp.replace(path)  # readers in other processes never see half a file
        _exported[path.name] = path
    except Exception as exc:  # noqa: BLE001 - any export failure means: run in PyTorch
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"could not export the image tower to ONNX: {exc}") from exc
    return path


class OnnxTower:
    """EfficientNet-Lite0 on onnxruntime: (B, 3, 224, 224) float32 -> grid (B, 1280, 7, 7) float32."""

    def __init__(self, cache: Path, threads: int | None = None) -> None:
        self.path = export_tower(cache)
        self.session = session(self.path, threads or torch.get_num_threads())

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["grid"], {"pixels": x})[0])
