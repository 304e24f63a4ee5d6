"""Resolve the compute device once, at the edge of the program, and what follows from it: the
precision models run in there and the batch size that fills it.

On a CPU everything runs in float32 (the reference). On a CUDA GPU the towers and decoders run in
bfloat16 (float16 where the GPU has no bfloat16), which is what its matrix units are fast at;
``PIXQUERY_PRECISION=fp32`` keeps float32 there too.
"""

from __future__ import annotations

import os

import torch

from retrieval.errors import InputError
from retrieval.native.ort import ENV_RUNTIME, runtime_setting

ENV_PRECISION = "PIXQUERY_PRECISION"  # auto (default), fp32, bf16 or fp16
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_BATCH = 256  # images per model batch on a GPU (a CPU takes 32: larger batches only add latency there)
CPU_BATCH = 32


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N``/``mps`` into a ``torch.device``.

    ``auto`` picks CUDA when available, else CPU. Asking for a device that is not there
    is an :class:`InputError`, not a silent fallback.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but no CUDA device is available "
                         f"(this PyTorch {'has no CUDA support' if torch.version.cuda is None else 'sees no GPU'}); "
                         f"use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {name!r} requested but MPS is not available")
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype models run in on ``device``: float32 on a CPU; on CUDA bfloat16, else float16 (see
    the module doc), unless ``PIXQUERY_PRECISION`` says otherwise."""
    name = os.environ.get(ENV_PRECISION, "auto").strip().lower() or "auto"
    if name != "auto" and name not in PRECISIONS:
        raise InputError(f"{ENV_PRECISION}={name!r}: use auto, {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return torch.float32  # the reference: half precision on a CPU is slower or less exact
    if name != "auto":
        return PRECISIONS[name]
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_batch_size(device: torch.device) -> int:
    """Images per model batch when the user names none: enough to fill a GPU, small on a CPU."""
    return GPU_BATCH if device.type == "cuda" else CPU_BATCH


def resolve_runtime(device: torch.device) -> tuple[str, bool]:
    """-> (``torch`` or ``onnx``, whether the choice is required rather than preferred) for the native
    towers on ``device``, from ``PIXQUERY_RUNTIME``: onnxruntime runs them on CPUs only; ``auto`` uses it
    when it is installed, ``onnx`` insists (an error where it cannot run), ``torch`` never uses it."""
    name = runtime_setting()
    if name == "torch":
        return "torch", False
    if device.type != "cpu":
        if name == "onnx":
            raise InputError(f"{ENV_RUNTIME}=onnx runs the towers on a CPU; on {device.type} they run in PyTorch "
                             f"(unset {ENV_RUNTIME} or use --device cpu)")
        return "torch", False
    from retrieval.native import onnx

    if not onnx.available():
        if name == "onnx":
            raise InputError(f"{ENV_RUNTIME}=onnx but onnxruntime is not installed: pip install onnxruntime onnx "
                             f"(pixquery's 'onnx' extra)")
        return "torch", False
    return "onnx", name == "onnx"
