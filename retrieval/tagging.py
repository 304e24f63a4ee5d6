"""Tags and the zero-shot ranking signal: what a classifier over the image tower's grid says a photo shows.

* :class:`Tagger` is the interface (``retrieval/native/tagger.py`` implements it with the ImageNet-1k
  classifier that ships with the native image tower). At indexing time it turns a batch of grids into
  each image's most likely classes with calibrated probabilities (:data:`Classes`, what an index
  stores); at reading time it turns stored classes into readable :class:`Tag`s above its thresholds,
  and at search time it scores a query against stored classes (the ``tags`` signal of fused ranking).
* The zero-shot score is ConSE (Norouzi et al., 2014): an image's concept vector is the
  probability-weighted mean of the text embeddings of its classes' names, compared with the query's
  embedding in the same text space (:func:`concept_scores`). A query that names a concept ("pizza",
  "suspension bridge") is close to some class name; a Flickr8k-style sentence about people is not:
  :func:`gate` turns the query's best class similarity into how much the signal counts for it.

Pure numpy; no index, no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

#: one image's stored classes: (class index, calibrated probability) pairs, most likely first
Classes = list[tuple[int, float]]


@dataclass(frozen=True)
class Tag:
    """A readable tag of an image: ``name`` ("cheeseburger", "dog"), its calibrated probability, and
    where it comes from: ``imagenet:<class index>`` or ``group:<word>`` (a set of classes, e.g. the dog breeds)."""

    name: str
    probability: float
    source: str

    def to_dict(self) -> dict:
        return {"name": self.name, "probability": round(float(self.probability), 4), "source": self.source}


@dataclass(frozen=True)
class TaggerInfo:
    """Provenance of a tagger (recorded with the tags of an index, like a captioner's)."""

    name: str  # e.g. "native:imagenet-tags-v1"
    weights_sha256: str  # of the tagger file (calibration, class-name embeddings), see retrieval/shipped.py

    @property
    def fingerprint(self) -> str:
        return f"{self.name}|{self.weights_sha256[:16]}"

    def to_dict(self) -> dict:
        return asdict(self)


class Tagger(ABC):
    """Classes from an image tower's grid, tags from stored classes, and a zero-shot score of a query."""

    info: TaggerInfo

    @abstractmethod
    def classify_grid(self, grid) -> list[Classes]:  # noqa: ANN001 - torch.Tensor (B, C, h, w)
        """(B, C, h, w) grid features -> per image, its most likely classes with calibrated probabilities
        (at most ``top_k``, none below the storage floor), most likely first."""

    @abstractmethod
    def tags(self, classes: Classes) -> list[Tag]:
        """The readable tags of an image with these stored classes: none when no class (or group of
        classes) reaches its threshold, so an abstract picture or a text document gets no tags."""

    @abstractmethod
    def concepts(self, classes: Sequence[Classes]) -> np.ndarray:
        """N images' classes -> their (N, d) unit concept vectors in the query space (zeros: no classes)."""

    @abstractmethod
    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """B query texts -> (B, d) unit vectors in the space of the class-name embeddings."""

    def prepare(self, texts: Sequence[str], batch: int = 256) -> None:  # noqa: B027 - optional
        """Embed many queries at once (an evaluation's) so that later single-query calls are cheap."""

    @abstractmethod
    def concept_scores(self, query: np.ndarray, classes: Sequence[Classes]) -> np.ndarray:
        """(d,) query vector and N images' stored classes -> (N,) zero-shot scores (NaN: no classes)."""

    @abstractmethod
    def gate(self, query: np.ndarray) -> float:
        """How much the zero-shot signal counts for this (d,) query, in [0, 1]."""

    @abstractmethod
    def names(self) -> dict[str, tuple[int, ...]]:
        """Every tag name this tagger can give -> the classes it stands for (a class's own name -> that
        class; a group's word -> its classes): what keyword search over tags matches query words with."""

    @abstractmethod
    def near_classes(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        """The ``n`` classes whose names are nearest the (d,) query, with their cosine, nearest first."""


def concept_vectors(classes: Sequence[Classes], embeddings: np.ndarray, sharpen: float = 1.0) -> np.ndarray:
    """ConSE concept vectors: per image, the unit-length sum of its classes' name embeddings
    (``embeddings``, (n_classes, d)) weighted by probability ** ``sharpen`` -> (N, d); a row of zeros
    for an image without classes."""
    out = np.zeros((len(classes), embeddings.shape[1]), dtype=np.float32)
    for i, cls in enumerate(classes):
        if not cls:
            continue
        idx = np.fromiter((c for c, _ in cls), dtype=np.int64, count=len(cls))
        p = np.fromiter((p for _, p in cls), dtype=np.float64, count=len(cls)) ** sharpen
        v = (p[:, None] * embeddings[idx]).sum(0)
        out[i] = v / (np.linalg.norm(v) or 1.0)
    return out


def concept_scores(query: np.ndarray, classes: Sequence[Classes], embeddings: np.ndarray,
                   sharpen: float = 1.0) -> np.ndarray:
    """Cosine of the (d,) unit query and each image's concept vector -> (N,); NaN for images without classes."""
    vecs = concept_vectors(classes, embeddings, sharpen)
    scores = (vecs @ query.astype(np.float32)).astype(np.float64)
    scores[[not c for c in classes]] = np.nan
    return scores


def gate(best_similarity: float, low: float, high: float, floor: float) -> float:
    """``floor`` when the query's best class-name similarity is at most ``low``, 1 from ``high`` on,
    linear in between: a query naming a concept gets the zero-shot signal's whole weight, a sentence
    unlike any class name (Flickr8k's "a man in a red shirt climbs a rock") a small part of it."""
    if high <= low:
        return 1.0 if best_similarity >= high else floor
    t = min(1.0, max(0.0, (best_similarity - low) / (high - low)))
    return floor + (1.0 - floor) * t
