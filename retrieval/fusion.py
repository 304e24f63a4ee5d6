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

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from retrieval.query import FIRST_STAGE, FusionWeights, ParsedQuery

NEGATIVE_WEIGHT = 0.5  # how far an excluded term pushes the query vector away


@dataclass
class Ranked:
    ids: np.ndarray  # (n,) best first
    scores: np.ndarray  # (n,) final score of each
    signals: dict[str, np.ndarray]  # per signal, (n,) aligned with ids (NaN: not measured for that image)


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
    if np.isnan(values).all():
        return fused
    rel = values - np.nanmax(values)  # (len(top),) <= 0
    add = np.full(len(fused), np.nanmin(rel))
    add[top] = np.where(np.isnan(rel), np.nanmin(rel), rel)
    return fused + weight * add / total
