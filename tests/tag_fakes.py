"""Test doubles for tags: an encoder with a grid (the tiny encoder's pixels) and a tagger over colours."""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import torch

from conftest import TinyEncoder
from retrieval.encoder import EncoderInfo, GridEncoder
from retrieval.tagging import Classes, Tag, Tagger, TaggerInfo, concept_scores, concept_vectors, gate

COLOURS = list(TinyEncoder.COLOURS)  # the "classes": red, green, blue, yellow, black, white, purple, orange
WARM = ("red", "orange", "yellow")  # a group


def colour_units(texts: Sequence[str]) -> np.ndarray:
    """Texts -> (B, 8) unit vectors over the colour words they name (zeros: none)."""
    out = np.zeros((len(texts), len(COLOURS)), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]+", t.lower()):
            if w in COLOURS:
                out[i, COLOURS.index(w)] += 1
            if w == "warm":
                out[i, [COLOURS.index(c) for c in WARM]] += 1
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.where(norm > 0, out / np.maximum(norm, 1e-9), 0).astype(np.float32)


class TinyGridEncoder(GridEncoder):
    """TinyEncoder with a "grid": its (B, 3, 4, 4) pixels; texts also embed as colour units (the tagger's space)."""

    def __init__(self) -> None:
        self.tiny = TinyEncoder()
        self.device = torch.device("cpu")
        self.info = EncoderInfo(name="test:tiny-grid", weights_sha256=self.tiny.info.weights_sha256, dim=16)

    def preprocess(self, image):  # noqa: ANN001, ANN201
        return self.tiny.preprocess(image)

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def encode_grid(self, grid: torch.Tensor) -> np.ndarray:
        return self.tiny.encode_pixels(grid)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.tiny.encode_texts(texts)

    def encode_texts_pooled(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_texts(texts), colour_units(texts)


class ColourTagger(Tagger):
    """Classes = the 8 colours, by the distance of an image's mean colour to each; group "warm".
    Class tags from 0.5, the group from 0.6; queries embed as colour units."""

    def __init__(self, sharpness: float = 0.02) -> None:
        self.info = TaggerInfo("test:colour-tagger", hashlib.sha256(b"colours").hexdigest())
        self.sharpness = sharpness
        self.embeddings = np.eye(len(COLOURS), dtype=np.float32)
        self.ref = torch.tensor([TinyEncoder.COLOURS[c] for c in COLOURS], dtype=torch.float32) / 255.0 - 0.5

    def classify_grid(self, grid: torch.Tensor) -> list[Classes]:
        mean = grid.float().mean(dim=(2, 3))  # (B, 3), in the tiny encoder's [-0.5, 0.5] scale
        dist = torch.cdist(mean, self.ref) * 255.0  # (B, 8)
        probs = torch.softmax(-dist * self.sharpness, dim=-1)
        p, idx = probs.topk(3, dim=-1)
        return [[(int(c), float(q)) for c, q in zip(ci, pi) if q >= 0.01] for ci, pi in zip(idx.tolist(), p.tolist())]

    def tags(self, classes: Classes) -> list[Tag]:
        out = [Tag(COLOURS[c], p, f"colour:{c}") for c, p in classes if p >= 0.5]
        warm = sum(p for c, p in classes if COLOURS[c] in WARM)
        if warm >= 0.6:
            out.append(Tag("warm", warm, "group:warm"))
        return sorted(out, key=lambda t: -t.probability)

    def concepts(self, classes: Sequence[Classes]) -> np.ndarray:
        return concept_vectors(classes, self.embeddings)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return colour_units(texts)

    def prepare(self, texts: Sequence[str], batch: int = 256) -> None:
        pass

    def concept_scores(self, query: np.ndarray, classes: Sequence[Classes]) -> np.ndarray:
        return concept_scores(query, classes, self.embeddings)

    def gate(self, query: np.ndarray) -> float:
        return gate(float((self.embeddings @ query).max()), 0.3, 0.7, 0.125)

    def names(self) -> dict[str, tuple[int, ...]]:
        return {**{c: (i,) for i, c in enumerate(COLOURS)}, "warm": tuple(COLOURS.index(c) for c in WARM)}

    def near_classes(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        sims = self.embeddings @ query
        return [(int(c), float(sims[c])) for c in np.argsort(-sims)[:n]]
