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

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from retrieval.errors import ModelLoadError
from retrieval.native.ort import available, default_cache, file_sha256, session

__all__ = ["FORMAT", "OnnxTower", "available", "default_cache", "export_tower", "graphs", "linear_of", "quantize_int8",
           "session"]

log = logging.getLogger(__name__)

FORMAT = "tower-onnx-1"  # part of the cached file's name: change it when the export changes
_exported: dict[str, Path] = {}  # file name -> where this process exported or found it (any cache folder)


def _file_key(path: Path) -> str:
    return file_sha256(path)[:16]


def export_module(module: torch.nn.Module, args: tuple, path: Path, inputs: dict[str, dict[int, str]],
                  outputs: dict[str, dict[int, str]], what: str) -> None:
    """Export ``module`` (eval mode) called on example ``args`` to ONNX at ``path``: ``inputs`` and ``outputs``
    name the graph's tensors with their dynamic axes. Written to a temporary file and renamed, so readers
    in other processes never see half a file. Any failure: :class:`ModelLoadError` naming ``what``."""
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError as exc:
        raise ModelLoadError(f"exporting {what} to ONNX needs the 'onnx' package: "
                             "pip install onnx (or pixquery's 'onnx' extra)") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(module, args, str(tmp), input_names=list(inputs), output_names=list(outputs),
                              dynamic_axes={**inputs, **outputs}, opset_version=17, dynamo=False)
        tmp.replace(path)
    except Exception as exc:  # noqa: BLE001 - any export failure means: run in PyTorch
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"could not export {what} to ONNX: {exc}") from exc


def linear_of(weight: torch.Tensor, bias: torch.Tensor, scale: float = 1.0) -> torch.nn.Linear:
    """A ``Linear`` computing ``scale * (x @ weight.T + bias)``: one slice of a packed projection as a layer of its
    own, for an export (a packed one exports as slices of one weight, which the 8-bit graph leaves in float32)."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight * scale)
        layer.bias.copy_(bias * scale)
    return layer


def quantize_int8(src: Path, dst: Path, what: str) -> None:
    """``src`` with its matrix products' weights in 8-bit integers (per output channel) and their inputs
    quantised on the fly (onnxruntime's dynamic quantisation) -> ``dst``, written through a temporary file.
    For a query's second stage on a CPU: about half the float32 scorer's time on 2 cores, its
    log-likelihoods within about 1 % (docs/BENCHMARKS.md); any failure: :class:`ModelLoadError`."""
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    root = logging.getLogger()
    was = root.disabled
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root.disabled = True  # its hint about pre-processing goes to the root logger
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"])
        tmp.replace(dst)
    except Exception as exc:  # noqa: BLE001 - any failure means: no 8-bit copy
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"could not quantise {what} to 8 bits: {exc}") from exc
    finally:
        root.disabled = was


def graphs(folder: Path, name: str, what: str) -> dict[str, str]:
    """The manifest's ``files`` of a part exported as ``folder / name``: its float32 graph and, where it can be
    made, an 8-bit copy (:func:`quantize_int8`); without one, searches use the float32 graph (a warning says why)."""
    files = {"float32": name}
    int8 = name.removesuffix(".onnx") + "-int8.onnx"
    try:
        quantize_int8(folder / name, folder / int8, what)
        files["int8"] = int8
    except ModelLoadError as exc:
        log.warning("%s; text searches use its float32 graph", exc)
    return files


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
    export_module(ImageTower().eval(), (torch.zeros(2, 3, 224, 224),), path, {"pixels": {0: "batch"}},
                  {"grid": {0: "batch"}}, "the image tower")
    _exported[path.name] = path
    return path


class OnnxTower:
    """EfficientNet-Lite0 on onnxruntime: (B, 3, 224, 224) float32 -> grid (B, 1280, 7, 7) float32."""

    def __init__(self, cache: Path, threads: int | None = None) -> None:
        self.path = export_tower(cache)
        self.session = session(self.path, threads or torch.get_num_threads())

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixels.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["grid"], {"pixels": x})[0])
