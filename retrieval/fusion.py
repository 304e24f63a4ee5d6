"""The pure math of fused ranking: query vectors from a parsed query, z-scores, the first stage's weighted
sum and the second stage's re-scoring terms. No index, no I/O: ``indexer/search/ranker.py`` reads the
signals and calls these.

The first stage z-normalises each signal (image cosine, caption cosine, keyword BM25) over the
candidate pool and sums them with the query's weights (a normalised weighted sum beat reciprocal-rank
fusion on Flickr8k dev; docs/MODELS.md). The second stage adds the caption scorer's log P(query |
image) and the match head's logit for the best few candidates, each relative to the best of them
(:func:`add_relative`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from retrieval.query import FIRST_STAGE, FusionWeights, ParsedQuery

NEGATIVE_WEIGHT = 0.5  # how far an excluded term pushes the query vector away
# relevance feedback (Rocchio): q' = ALPHA q + BETA mean(good) - GAMMA mean(bad), the textbook weights
# (Manning et al., Introduction to Information Retrieval, 9.1.1); candidates whose image is at least
# NEAR_BAD similar (cosine) to a bad one are left out, so near copies of a rejected photo go with it
ROCCHIO_ALPHA, ROCCHIO_BETA, ROCCHIO_GAMMA = 1.0, 0.75, 0.15
NEAR_BAD = 0.9


@dataclass
class Ranked:
    ids: np.ndarray  # (n,) best first
    scores: np.ndarray  # (n,) final score of each
    signals: dict[str, np.ndarray]  # per signal, (n,) aligned with ids (NaN: not measured for that image)
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # fused: what each signal added to the score
    # the stored classes the ranking read for (at least) these ids, so that showing their tags needs no second read
    classes: dict[int, Any] | None = None
    rows: dict[int, Any] | None = None  # the same for the ranked ids' metadata rows, where the ranking read them


def zscore(x: np.ndarray) -> np.ndarray:
    """(n,) -> (n,) zero mean, unit variance; NaN entries become the minimum (a missing signal counts least)."""
    x = np.asarray(x, dtype=np.float64)
    if not len(x):
        return x
    known = ~np.isnan(x)
    if not known.any():
        return np.zeros_like(x)
    x = np.where(known, x, x[known].min())
    std = x.std()
    return (x - x.mean()) / std if std > 1e-12 else np.zeros_like(x)


def query_texts(parsed: ParsedQuery) -> list[str]:
    """The texts :func:`query_vector` embeds, in the order it reads them."""
    return [parsed.positive_text] + [t for t, w in parsed.terms if w != 1.0] + list(parsed.negative)


def query_vector(parsed: ParsedQuery, embed: Callable[[list[str]], np.ndarray],
                 image_vec: np.ndarray | None = None) -> np.ndarray:
    """The (D,) unit query vector: the positive text, plus (w - 1) x each weighted term, minus
    NEGATIVE_WEIGHT x each excluded term, averaged with an example image's vector when given."""
    vecs = embed(query_texts(parsed))  # (len(texts), D)
    q = vecs[0].astype(np.float64).copy()
    row = 1
    for _, w in ((t, w) for t, w in parsed.terms if w != 1.0):
        q += (w - 1.0) * vecs[row]
        row += 1
    for _ in parsed.negative:
        q -= NEGATIVE_WEIGHT * vecs[row]
        row += 1
    q /= np.linalg.norm(q) or 1.0
    if image_vec is not None:
        q = (q + image_vec) / 2
        q /= np.linalg.norm(q) or 1.0
    return q.astype(np.float32)


def feedback_vector(q: np.ndarray | None, good: np.ndarray, bad: np.ndarray, alpha: float = ROCCHIO_ALPHA,
                    beta: float = ROCCHIO_BETA, gamma: float = ROCCHIO_GAMMA) -> np.ndarray:
    """Rocchio's query update: the (D,) unit vector of ``alpha`` x ``q`` (None: no query, only marked
    images) + ``beta`` x the mean of ``good`` (G, D) - ``gamma`` x the mean of ``bad`` (B, D)."""
    dim = q.shape[-1] if q is not None else (good if len(good) else bad).shape[-1]
    out = np.zeros(dim, dtype=np.float64) if q is None else alpha * np.asarray(q, dtype=np.float64)
    if len(good):
        out = out + beta * np.asarray(good, dtype=np.float64).mean(0)
    if len(bad):
        out = out - gamma * np.asarray(bad, dtype=np.float64).mean(0)
    return (out / (np.linalg.norm(out) or 1.0)).astype(np.float32)


def near_bad(vectors: np.ndarray, bad: np.ndarray, near: float = NEAR_BAD) -> np.ndarray:
    """(n,) True where a candidate's unit image vector (n, D) is at least ``near`` similar to a bad one (B, D)."""
    if not len(bad) or not len(vectors):
        return np.zeros(len(vectors), dtype=bool)
    return (np.asarray(vectors) @ np.asarray(bad).T).max(axis=1) >= near


def first_stage_parts(signals: Mapping[str, np.ndarray], weights: FusionWeights) -> dict[str, np.ndarray]:
    """What each first-stage signal adds to :func:`first_stage` (their sum), for explanations."""
    total = stage_total(signals, weights)
    return {name: getattr(weights, name) * zscore(signals[name]) / total
            for name in FIRST_STAGE if name in signals and getattr(weights, name)}


def stage_total(signals: Mapping[str, np.ndarray], weights: FusionWeights) -> float:
    """Sum of the first stage's weights over the signals measured (what its weighted sum is divided by)."""
    return sum(getattr(weights, name) for name in FIRST_STAGE if name in signals) or 1.0


def first_stage(signals: Mapping[str, np.ndarray], weights: FusionWeights) -> np.ndarray:
    """Normalised weighted sum of the pool's z-scored first-stage signals -> (n,)."""
    parts = [(getattr(weights, name), signals[name]) for name in FIRST_STAGE if name in signals]
    return sum(w * zscore(x) for w, x in parts if w) / stage_total(signals, weights)


def add_relative(fused: np.ndarray, top: np.ndarray, values: np.ndarray, weight: float,
                 total: float) -> np.ndarray:
    """Add ``weight`` x ``values`` (``(len(top),)``, e.g. log P(query | image) in nats), relative to the
    best of them, to ``fused`` (n,) for the candidates ``top``; every other candidate (below the depth,
    or without a value) counts as the worst one. Raw values, not z-scores: ten candidates are too few to
    estimate a spread, and a difference of one nat means the same for every query."""
    return fused + relative_part(len(fused), top, values, weight, total)


def relative_part(n: int, top: np.ndarray, values: np.ndarray, weight: float, total: float) -> np.ndarray | float:
    """What :func:`add_relative` adds to each of ``n`` candidates ((n,), or 0.0 when no value is known)."""
    if np.isnan(values).all():
        return 0.0
    rel = values - np.nanmax(values)  # (len(top),) <= 0
    add = np.full(n, np.nanmin(rel))
    add[top] = np.where(np.isnan(rel), np.nanmin(rel), rel)
    return weight * add / total
