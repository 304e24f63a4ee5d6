"""Native joint encoder: frozen PyPI towers + contrastively trained projection heads.

image (B, 3, 224, 224) -> EfficientNet-Lite0 grid (B, 1280, 7, 7) -> mean pool (B, 1280)
      -> linear head -> (B, D) -> L2 normalise
text  B strings -> MiniLM mean pool (B, 384) -> L2 normalise -> linear head -> (B, D) -> L2 normalise
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from retrieval.device import compute_dtype, resolve_runtime
from retrieval.encoder import EncoderInfo, GridEncoder, l2_normalize
from retrieval.errors import ModelLoadError
from retrieval.images import normalize_raw, to_tensor
from retrieval.shipped import is_shipped, resolve_weights
from retrieval.weights import save_payload
from retrieval.native.towers import (
    GRID_DIM, IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, TEXT_DIM, ImageTower, TextTower,
)

DEFAULT_HEADS = "effl0-minilm-v1"  # retrieval/shipped.py

log = logging.getLogger(__name__)


@dataclass
class HeadsConfig:
    embed_dim: int = 256
    members: int = 1  # ensemble size: independently trained heads whose cosines are averaged
    image_in: int = GRID_DIM
    text_in: int = TEXT_DIM
    init_temperature: float = 0.07


class Heads(nn.Module):
    """The trained part of the native encoder: linear projections of both towers into one space.

    With ``members`` = M > 1 the heads are an ensemble: M independently trained projections of
    size D each, every one L2-normalised, concatenated and scaled by 1/sqrt(M), so the dot product
    of two outputs (dimension M*D) is the mean of the M members' cosines.
    """

    def __init__(self, cfg: HeadsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image = nn.Linear(cfg.image_in, cfg.members * cfg.embed_dim)
        self.text = nn.Linear(cfg.text_in, cfg.members * cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / cfg.init_temperature))))

    @property
    def out_dim(self) -> int:
        return self.cfg.members * self.cfg.embed_dim

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        m, d = self.cfg.members, self.cfg.embed_dim
        x = nn.functional.normalize(x.view(len(x), m, d), dim=-1)  # (B, M, D)
        return x.reshape(len(x), m * d) / float(np.sqrt(m))  # (B, M*D), unit norm

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._unit(self.image(pooled.float()))  # (B, 1280) -> (B, M*D)

    def embed_grid(self, grid: torch.Tensor) -> torch.Tensor:
        return self.embed_pooled(grid.float().mean(dim=(2, 3)))  # (B, 1280, 7, 7) -> (B, M*D)

    def embed_text(self, text_feats: torch.Tensor) -> torch.Tensor:
        t = nn.functional.normalize(text_feats.float(), dim=-1)  # (B, 384)
        return self._unit(self.text(t))  # (B, M*D)


def stack_members(members: list[Heads]) -> Heads:
    """Merge independently trained single heads (same config) into one ensemble."""
    cfg = HeadsConfig(**{**asdict(members[0].cfg), "members": len(members)})
    merged = Heads(cfg)
    with torch.no_grad():
        for name in ("image", "text"):
            getattr(merged, name).weight.copy_(torch.cat([getattr(h, name).weight for h in members]))
            getattr(merged, name).bias.copy_(torch.cat([getattr(h, name).bias for h in members]))
        merged.logit_scale.copy_(members[0].logit_scale)
    return merged.eval()


def save_heads(heads: Heads, path: Path, meta: dict) -> None:
    """Store config, weights (float32) and training metadata in one ``weights_only``-loadable file."""
    save_payload({
        "format": "pixquery-native-heads/1",
        "config": asdict(heads.cfg),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
        "meta": meta,
    }, path)


def resolve_heads_path(spec: str) -> Path:
    """``effl0-minilm-v1`` (shipped) or a path to a ``.pt`` file written by ``pixquery train encoder``."""
    return resolve_weights(spec, "encoder")


def load_heads(path: Path) -> tuple[Heads, str]:
    """Load heads from ``path``; returns them with the file's sha256."""
    data = path.read_bytes()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        heads = Heads(HeadsConfig(**payload["config"]))
        heads.load_state_dict(payload["state_dict"])
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable weight file
        raise ModelLoadError(f"{path} is not a pixquery native heads file: {exc}") from exc
    return heads.eval(), hashlib.sha256(data).hexdigest()


class NativeEncoder(GridEncoder):
    """The offline default encoder (``native:<heads>``). Towers load lazily, on first use.

    The towers run in :func:`~retrieval.device.compute_dtype` (float32 on a CPU, bfloat16 on a GPU);
    the heads always in float32. On a CPU the image tower's forward pass runs on onnxruntime where it
    is installed (``retrieval/native/onnx.py``; ``PIXQUERY_RUNTIME``), exported into ``cache_dir``.
    :meth:`grid` also takes raw (B, H, W, 3) uint8 pixels (:func:`~retrieval.images.to_raw`, what
    decoding worker processes hand over) and normalises them on the device.
    """

    def __init__(self, heads_spec: str = DEFAULT_HEADS, device: torch.device | None = None,
                 cache_dir: Path | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.dtype = compute_dtype(self.device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._forward = None  # the image tower's forward pass: PyTorch's module or onnxruntime's session
        path = resolve_heads_path(heads_spec)
        self.heads, sha = load_heads(path)
        self.heads.to(self.device)
        name = f"native:{is_shipped(path) or path.resolve()}"
        self.info = EncoderInfo(name=name, weights_sha256=sha, dim=self.heads.out_dim)
        self._image_tower: ImageTower | None = None
        self._text_tower: TextTower | None = None

    @property
    def image_tower(self) -> ImageTower:
        if self._image_tower is None:
            tower = ImageTower().to(self.device, self.dtype)
            self._image_tower = tower.to(memory_format=torch.channels_last).eval()
        return self._image_tower

    @property
    def text_tower(self) -> TextTower:
        if self._text_tower is None:
            self._text_tower = TextTower().to(self.device, self.dtype).eval()
        return self._text_tower

    @property
    def runtime(self) -> str:
        """``onnx`` or ``torch``: what runs the image tower's forward pass (decided on first use)."""
        from retrieval.native.onnx import OnnxTower

        return "onnx" if isinstance(self._tower_forward(), OnnxTower) else "torch"

    def _tower_forward(self):  # noqa: ANN202 - a callable: (B, 3, H, W) -> (B, C, h, w)
        if self._forward is None:
            runtime, required = resolve_runtime(self.device)
            if runtime == "onnx":
                from retrieval.native.onnx import OnnxTower, default_cache

                try:
                    self._forward = OnnxTower(self.cache_dir / "onnx" if self.cache_dir else default_cache())
                except ModelLoadError as exc:
                    if required:
                        raise
                    log.warning("%s; the image tower runs in PyTorch instead", exc)
            if self._forward is None:
                self._forward = self.image_tower
        return self._forward

    #: (size, mean, std) of :meth:`preprocess`: decoding workers resize to it, the device normalises
    pixel_spec = (IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image, IMAGE_SIZE, IMAGE_MEAN, IMAGE_STD)

    @torch.inference_mode()
    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) normalised, or (B, 224, 224, 3) uint8 raw -> (B, 1280, 7, 7) grid features
        (shared with the captioner), in the towers' dtype."""
        x = pixels.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize_raw(x, IMAGE_MEAN, IMAGE_STD, self.dtype)
        forward = self._tower_forward()
        if not isinstance(forward, nn.Module):
            return forward(x)  # onnxruntime: float32 NCHW
        return forward(x.to(self.dtype).contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def encode_grid(self, grid: torch.Tensor) -> np.ndarray:
        """(B, 1280, 7, 7) grid features -> (B, dim) embeddings."""
        return l2_normalize(self.heads.embed_grid(grid))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_text_features(self.text_tower(list(texts)))

    @torch.inference_mode()
    def encode_texts_pooled(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """B strings -> their (B, dim) embeddings and their unit-length MiniLM mean-pooled states (B, 384),
        from one pass of the text tower (the tagger compares the latter with class names)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), np.zeros((0, TEXT_DIM), dtype=np.float32)
        pooled = self.text_tower(list(texts))
        return self.encode_text_features(pooled), l2_normalize(pooled)

    @torch.inference_mode()
    def encode_text_features(self, pooled: torch.Tensor) -> np.ndarray:
        """(B, 384) mean-pooled text-tower states -> (B, dim) embeddings (what encode_texts does after
        the tower, for callers that already ran it)."""
        return l2_normalize(self.heads.embed_text(pooled))
