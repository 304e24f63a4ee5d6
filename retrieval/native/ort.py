"""onnxruntime without torch: where exported models are cached, CPU sessions, and file hashes.

Shared by the image tower's runtime (``retrieval/native/onnx.py``, which exports with PyTorch) and the
torch-free query models (``retrieval/native/lite.py``), so a ``pixquery search`` process that only
answers a text query never imports torch.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from retrieval.errors import InputError

ENV_RUNTIME = "PIXQUERY_RUNTIME"  # auto (default): onnxruntime for the towers on a CPU when installed; torch; onnx
RUNTIMES = ("auto", "torch", "onnx")

_sessions: dict[str, object] = {}  # path|threads -> session, shared by every model of one process
_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256
_lock = threading.Lock()


def runtime_setting() -> str:
    """``PIXQUERY_RUNTIME`` as one of :data:`RUNTIMES` (unset or empty: ``auto``); another value: InputError."""
    name = os.environ.get(ENV_RUNTIME, "auto").strip().lower() or "auto"
    if name not in RUNTIMES:
        raise InputError(f"{ENV_RUNTIME}={name!r}: use {', '.join(RUNTIMES)}")
    return name


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_cache() -> Path:
    """Where exported models go when no cache folder is given: ``$PIXQUERY_CACHE_DIR/models/onnx``, else
    ``$XDG_CACHE_HOME/pixquery/models/onnx``, else ``~/.cache/pixquery/models/onnx``."""
    base = os.environ.get("PIXQUERY_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "pixquery")
    return Path(base).expanduser() / "models" / "onnx"


def model_file(folder: Path, spec: dict, name: str, precision: str = "int8") -> Path:
    """The exported graph of one part in ``folder``: the ``precision`` its manifest ``spec`` lists (``int8``:
    8-bit weights, what a search uses; ``float32``: the reference), else the float32 ``name``."""
    files = spec.get("files") or {}
    return folder / files.get(precision, files.get("float32", name))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_threads() -> int:
    """Intra-op threads for a query-time session: the cores this process may use, at most 4 (a query's
    graphs are small; more threads only add hand-over cost)."""
    return max(1, min(4, usable_cores()))


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


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered for this process while its size and modification time stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    found = _hashes.get(key)
    if found is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        found = _hashes[key] = h.hexdigest()
    return found
