"""``native:imagenet-tags-v1``: tags and zero-shot scores from the image tower's own ImageNet-1k classifier.

The classifier (the EfficientNet-Lite0 wheel's ``_fc`` layer) reads the mean of the grid that indexing
computes anyway, so tagging costs one (1280 x 1000) matrix product per image. The tagger file (written
by ``pixquery train tagger``, see retrieval/native/training/tagger.py) holds what was calibrated on
Flickr8k train: the softmax temperature, the thresholds of class and group tags, the gate of the
zero-shot signal, and the MiniLM embeddings of the 1,000 class names (so no search embeds them again).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from retrieval.errors import ModelLoadError
from retrieval.native.class_tags import ClassTagger, TagCalibration, checked_classes
from retrieval.native.imagenet import ClassList
from retrieval.native.towers import imagenet_classifier
from retrieval.shipped import is_shipped, resolve_weights
from retrieval.tagging import Classes, Tagger, TaggerInfo
from retrieval.weights import save_payload

DEFAULT_TAGGER = "imagenet-tags-v1"  # retrieval/shipped.py
FORMAT = "pixquery-tagger/1"


def save_tagger(path: Path, calibration: dict, class_embeddings: np.ndarray, classes: ClassList, meta: dict) -> None:
    """Write a tagger file: ``calibration`` (temperature, thresholds, gate, ...), the (1000, d) class-name
    embeddings (stored as float16) and the hash of the class list they belong to."""
    save_payload({"format": FORMAT, **calibration, "classes_sha256": classes.sha256,
                  "class_embeddings": torch.from_numpy(np.asarray(class_embeddings, dtype=np.float16)),
                  "meta": meta}, path)


class ImageNetTagger(ClassTagger):
    """Tags from the ImageNet-1k classes (and groups of them); ConSE zero-shot scores of queries.

    ``text_tower``: the MiniLM tower that embeds queries (the native encoder's; None: this tagger can tag
    images and read tags, but not score queries). ``classes``: the class list (default: timm's).
    """

    def __init__(self, spec: str = DEFAULT_TAGGER, text_tower: object | None = None,
                 classes: ClassList | None = None, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        path = resolve_weights(spec, "tagger")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") != FORMAT:
                raise ValueError(f"format is {payload.get('format')!r}, expected {FORMAT!r}")
            calibration = TagCalibration.from_payload(payload)
            embeddings = payload["class_embeddings"].float().numpy()
            classes_sha = payload["classes_sha256"]
            self.meta = payload.get("meta", {})
        except Exception as exc:  # noqa: BLE001 - any failure here means an unusable tagger file
            raise ModelLoadError(f"{path} is not a pixquery tagger file: {exc}") from exc
        classes = checked_classes(path, classes_sha, embeddings.shape[0], classes)
        info = TaggerInfo(name=f"native:{is_shipped(path) or path.resolve()}",
                          weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        super().__init__(calibration, embeddings, classes, info)
        self.classes_sha256 = classes_sha
        self.text_tower = text_tower
        self._classifier: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- tagging images ----------------------------------------------------------------------------
    @property
    def classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._classifier is None:
            weight, bias = imagenet_classifier()  # raises ModelLoadError
            self._classifier = (weight.to(self.device), bias.to(self.device))
        return self._classifier

    def probabilities(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, 1280, h, w) grid -> (B, 1000) calibrated class probabilities."""
        weight, bias = self.classifier
        with torch.inference_mode():
            pooled = grid.float().to(self.device).mean(dim=(2, 3))  # (B, 1280)
            logits = pooled @ weight.T + bias  # (B, 1000)
            return torch.softmax(logits / self.temperature, dim=-1)

    def classify_grid(self, grid: torch.Tensor) -> list[Classes]:
        probs = self.probabilities(grid)
        p, idx = probs.topk(self.top_k, dim=-1)  # (B, K) each
        p, idx = p.cpu().numpy(), idx.cpu().numpy()
        return [[(int(c), float(q)) for c, q in zip(ci, pi) if q >= self.floor] for ci, pi in zip(idx, p)]

    # --- query embeddings: the native text tower ----------------------------------------------------
    def _embed(self, texts: list[str], cache: bool = True) -> np.ndarray:
        if self.text_tower is None:
            return super()._embed(texts, cache)  # raises: no tower
        tower: Callable = self.text_tower
        with torch.inference_mode():
            if cache:
                pooled = tower(texts)  # the tower keeps recent single queries' token states
            else:
                pooled = tower.pool(*tower.token_states(texts, cache=False))
            return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()


def create_tagger(name: str, text_tower: object | None = None, device: torch.device | None = None) -> Tagger:
    """The tagger called ``name`` (``native:<shipped name or path of a tagger file>``)."""
    kind, sep, spec = (name or "").partition(":")
    if kind != "native" or not sep or not spec:
        from retrieval.errors import InputError

        raise InputError(f"tagger name {name!r} must look like 'native:<weights>' (e.g. native:{DEFAULT_TAGGER})")
    return ImageNetTagger(spec, text_tower=text_tower, device=device)
