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
from typing import Callable, Sequence

import numpy as np
import torch

from retrieval.errors import ModelLoadError
from retrieval.native.imagenet import ClassList, default_classes
from retrieval.native.towers import imagenet_classifier
from retrieval.shipped import is_shipped, resolve_weights
from retrieval.tagging import Classes, Tag, Tagger, TaggerInfo, concept_scores, concept_vectors, gate
from retrieval.weights import save_payload

DEFAULT_TAGGER = "imagenet-tags-v1"  # retrieval/shipped.py
FORMAT = "pixquery-tagger/1"
QUERY_CACHE = 256  # query vectors kept (an evaluation prepares all of its queries at once)


def save_tagger(path: Path, calibration: dict, class_embeddings: np.ndarray, classes: ClassList, meta: dict) -> None:
    """Write a tagger file: ``calibration`` (temperature, thresholds, gate, ...), the (1000, d) class-name
    embeddings (stored as float16) and the hash of the class list they belong to."""
    save_payload({"format": FORMAT, **calibration, "classes_sha256": classes.sha256,
                  "class_embeddings": torch.from_numpy(np.asarray(class_embeddings, dtype=np.float16)),
                  "meta": meta}, path)


class ImageNetTagger(Tagger):
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
            self.temperature = float(payload["temperature"])
            self.top_k, self.floor = int(payload["top_k"]), float(payload["floor"])
            self.class_threshold = float(payload["class_threshold"])
            self.group_threshold = float(payload["group_threshold"])
            self.max_class_tags = int(payload["max_class_tags"])
            self.sharpen = float(payload["sharpen"])
            self.gate_low, self.gate_high, self.gate_floor = (float(payload["gate"][k]) for k in ("low", "high", "floor"))
            embeddings = payload["class_embeddings"].float().numpy()
            classes_sha = payload["classes_sha256"]
            self.meta = payload.get("meta", {})
        except Exception as exc:  # noqa: BLE001 - any failure here means an unusable tagger file
            raise ModelLoadError(f"{path} is not a pixquery tagger file: {exc}") from exc
        self.classes = classes or default_classes()  # raises ModelLoadError when the class list is unusable
        if classes_sha != self.classes.sha256:
            raise ModelLoadError(f"the tagger {path} was calibrated for another ImageNet class list than the one "
                                 f"installed (timm's); retrain it with: pixquery train tagger")
        if embeddings.shape[0] != len(self.classes):
            raise ModelLoadError(f"the tagger {path} holds {embeddings.shape[0]} class embeddings, "
                                 f"expected {len(self.classes)}")
        self.embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)  # (1000, d)
        self.info = TaggerInfo(name=f"native:{is_shipped(path) or path.resolve()}",
                               weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        self.text_tower = text_tower
        self._classifier: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prepared: dict[str, np.ndarray] = {}
        self._names: dict[str, tuple[int, ...]] | None = None
        self._group_of = {}
        for group, members in self.classes.groups.items():
            for c in members:
                self._group_of.setdefault(c, []).append(group)

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

    def tags(self, classes: Classes) -> list[Tag]:
        out: list[Tag] = []
        groups: dict[str, float] = {}
        for c, p in classes:
            for group in self._group_of.get(c, ()):
                groups[group] = groups.get(group, 0.0) + p
        for group, p in groups.items():
            if p >= self.group_threshold:
                out.append(Tag(group, min(p, 1.0), f"group:{group}"))
        strong = [(c, p) for c, p in classes if p >= self.class_threshold][: self.max_class_tags]
        for c, p in strong:
            name = self.classes.names[c]
            if all(t.name != name for t in out):
                out.append(Tag(name, p, f"imagenet:{c}"))
        return sorted(out, key=lambda t: -t.probability)

    # --- zero-shot scores of queries ---------------------------------------------------------------
    def prepare(self, texts: Sequence[str], batch: int = 256) -> None:
        """Embed many queries at once (an evaluation's), for later single-query calls."""
        self._prepared = {}
        texts = list(dict.fromkeys(texts))
        for start in range(0, len(texts), batch):
            chunk = texts[start:start + batch]
            self._prepared.update(zip(chunk, self._embed(chunk, cache=False)))

    def _embed(self, texts: list[str], cache: bool = True) -> np.ndarray:
        if self.text_tower is None:
            raise ModelLoadError("this tagger has no text tower to embed queries with (the native encoder's)")
        tower: Callable = self.text_tower
        with torch.inference_mode():
            if cache:
                pooled = tower(texts)  # the tower keeps recent single queries' token states
            else:
                pooled = tower.pool(*tower.token_states(texts, cache=False))
            return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if texts and all(t in self._prepared for t in texts):
            return np.stack([self._prepared[t] for t in texts])
        return self._embed(texts)

    def concepts(self, classes: Sequence[Classes]) -> np.ndarray:
        return concept_vectors(classes, self.embeddings, self.sharpen)

    def concept_scores(self, query: np.ndarray, classes: Sequence[Classes]) -> np.ndarray:
        return concept_scores(query, classes, self.embeddings, self.sharpen)

    def gate(self, query: np.ndarray) -> float:
        best = float((self.embeddings @ query.astype(np.float32)).max())
        return gate(best, self.gate_low, self.gate_high, self.gate_floor)

    def names(self) -> dict[str, tuple[int, ...]]:
        if self._names is None:
            names: dict[str, tuple[int, ...]] = {}
            for i, name in enumerate(self.classes.names):
                names[name] = names.get(name, ()) + (i,)
            for group, members in self.classes.groups.items():
                names[group] = tuple(dict.fromkeys(names.get(group, ()) + members))
            self._names = names
        return self._names

    def near_classes(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        sims = self.embeddings @ query.astype(np.float32)  # (1000,)
        top = np.argsort(-sims)[:n]
        return [(int(c), float(sims[c])) for c in top]


def create_tagger(name: str, text_tower: object | None = None, device: torch.device | None = None) -> Tagger:
    """The tagger called ``name`` (``native:<shipped name or path of a tagger file>``)."""
    kind, sep, spec = (name or "").partition(":")
    if kind != "native" or not sep or not spec:
        from retrieval.errors import InputError

        raise InputError(f"tagger name {name!r} must look like 'native:<weights>' (e.g. native:{DEFAULT_TAGGER})")
    return ImageNetTagger(spec, text_tower=text_tower, device=device)
