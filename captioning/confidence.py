"""How sure a generated caption is: a probability that it describes the photo well (fitted on Flickr8k
train, so optimistic on photos unlike train: read it as a ranking with a fixed cut, not as a frequency).

Four measurements of one caption against its image, all from models that indexing runs anyway:

* ``agreement``: cosine of the image embedding and the caption's embedding (the joint encoder);
* ``likelihood``: the captioner's own log-probability of its caption, per word (a native captioner's
  decoder, from a memory of the same grid); missing for captioners that cannot rate text;
* ``tag_agreement``: cosine of the caption's MiniLM embedding and the image's concept vector (the
  tagger's classes, ConSE): a caption about "a man and a dog on a bench" under a photo the classifier
  calls "cheeseburger 0.62" disagrees;
* ``tag_certainty``: the probability of the tagger's most likely class (how much the disagreement means).

:class:`ConfidenceModel` is a logistic regression over them, fitted on Flickr8k train by ``pixquery
train confidence`` (captioning/training/confidence.py) to predict whether a caption scores well against
the five human captions; its file holds the coefficients, a second set without ``likelihood`` (for
captioners that cannot rate text), and the threshold below which a caption counts as uncertain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from typing import Sequence

from captioning.captioner import CaptionerInfo, TextScorer
from captioning.tokenizer import clean_words
from retrieval.errors import ModelLoadError
from retrieval.shipped import is_shipped, resolve_weights
from retrieval.weights import save_payload

FEATURES = ("agreement", "likelihood", "tag_agreement", "tag_certainty")
WITHOUT_LIKELIHOOD = tuple(f for f in FEATURES if f != "likelihood")
FORMAT = "pixquery-confidence/1"
DEFAULT_CONFIDENCE = "caption-confidence-v1"  # retrieval/shipped.py


@dataclass
class Logistic:
    """p = sigmoid(((x - mean) / std) @ coef + bias) over the named features."""

    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    bias: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = ((np.asarray(x, dtype=np.float64) - self.mean) / self.std) @ self.coef + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "coef": self.coef.tolist(), "bias": float(self.bias)}

    @classmethod
    def from_dict(cls, d: dict) -> "Logistic":
        return cls(tuple(d["features"]), np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64),
                   np.asarray(d["coef"], dtype=np.float64), float(d["bias"]))


def fit_logistic(x: np.ndarray, y: np.ndarray, features: tuple[str, ...], l2: float = 1e-3,
                 steps: int = 500) -> Logistic:
    """Maximum-likelihood logistic regression (L2 ``l2``) on standardised features, by Newton's method."""
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-9
    xs = np.hstack([(x - mean) / std, np.ones((len(x), 1))])  # (n, F + 1)
    w = np.zeros(xs.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-xs @ w))
        grad = xs.T @ (p - y) + l2 * np.r_[w[:-1], 0.0]
        hess = (xs * (p * (1 - p))[:, None]).T @ xs + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return Logistic(features, mean, std, w[:-1], float(w[-1]))


def measure(image_vecs: np.ndarray, caption_vecs: np.ndarray, caption_units: np.ndarray, concepts: np.ndarray,
            certainty: np.ndarray, likelihood: np.ndarray | None) -> dict[str, np.ndarray]:
    """The measurements of N captions against their images (module doc): ``image_vecs`` and
    ``caption_vecs`` (N, D) from the joint encoder; ``caption_units`` (N, d) the captions' unit vectors
    and ``concepts`` (N, d) the images' concept vectors, both in the tagger's text space
    (:meth:`retrieval.tagging.Tagger.concepts`); ``certainty`` (N,) each image's most likely class's
    probability; ``likelihood`` (N,) the captioner's log-probability per word (None: it cannot rate text)."""
    out = {"agreement": (np.asarray(image_vecs) * np.asarray(caption_vecs)).sum(1).astype(np.float64),
           "tag_agreement": (np.asarray(caption_units) * np.asarray(concepts)).sum(1).astype(np.float64),
           "tag_certainty": np.asarray(certainty, dtype=np.float64)}
    if likelihood is not None:
        out["likelihood"] = np.asarray(likelihood, dtype=np.float64)
    return out


def likelihood_per_word(scorer: TextScorer, grid: torch.Tensor, captions: Sequence[str]) -> np.ndarray:
    """A native captioner's log P(caption | image) divided by the caption's words + 1 (the end token)."""
    total = scorer.log_likelihood(scorer.memory(grid), list(captions))
    return total / np.array([len(clean_words(c)) + 1 for c in captions], dtype=np.float64)


def save_confidence(path: Path, full: Logistic, fallback: Logistic, threshold: float, meta: dict) -> None:
    save_payload({"format": FORMAT, "full": full.to_dict(), "without_likelihood": fallback.to_dict(),
                  "threshold": float(threshold), "meta": meta}, path)


class ConfidenceModel:
    """The calibrated caption confidence (``native:caption-confidence-v1``, see module doc)."""

    def __init__(self, spec: str = DEFAULT_CONFIDENCE) -> None:
        path = resolve_weights(spec, "confidence")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("format") != FORMAT:
                raise ValueError(f"format is {payload.get('format')!r}, expected {FORMAT!r}")
            self.full = Logistic.from_dict(payload["full"])
            self.fallback = Logistic.from_dict(payload["without_likelihood"])
            self.threshold = float(payload["threshold"])
            self.meta = payload.get("meta", {})
        except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
            raise ModelLoadError(f"{path} is not a pixquery caption confidence file: {exc}") from exc
        if self.full.features != FEATURES or self.fallback.features != WITHOUT_LIKELIHOOD:
            raise ModelLoadError(f"{path} rates other features than {FEATURES}")
        self.info = CaptionerInfo(name=f"native:{is_shipped(path) or path.resolve()}",
                                  weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest())

    def predict(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """{feature name: (N,)} -> (N,) probabilities that the captions are good; ``likelihood`` may be
        missing (or NaN for some captions): those use the fitted model without it."""
        n = len(features["agreement"])
        base = np.stack([np.asarray(features[f], dtype=np.float64) for f in WITHOUT_LIKELIHOOD], axis=1)
        out = self.fallback(base) if n else np.zeros(0)
        if "likelihood" in features and n:
            ll = np.asarray(features["likelihood"], dtype=np.float64)
            have = ~np.isnan(ll)
            if have.any():
                full = np.stack([np.asarray(features[f], dtype=np.float64)[have] for f in FEATURES], axis=1)
                out[have] = self.full(full)
        return out

    def confident(self, confidence: float | None) -> bool | None:
        """True/False against the threshold; None when the caption has no confidence (an older index)."""
        return None if confidence is None else bool(confidence >= self.threshold)
