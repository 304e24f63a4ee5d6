"""Retrieval metrics: recall@K and median rank, as percentages, from score matrices or rankings."""

from __future__ import annotations

from typing import Iterable

import numpy as np

KS = (1, 5, 10)


def ranks_from_scores(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of ``target[q]`` among ``scores[q]`` (ties count against the target).

    scores: (Q, N); target: (Q,) column index of the right item -> (Q,) int ranks.
    """
    right = scores[np.arange(len(target)), target][:, None]  # (Q, 1)
    return (scores > right).sum(axis=1) + 1 + ((scores == right).sum(axis=1) - 1)


def best_ranks_multi(scores: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per row of ``scores`` (N, M), the best 1-based rank of any column j with ``owner[j] == row``.

    Used for image -> text: an image is retrieved correctly at K if any of its captions is in the top K.
    """
    order = np.argsort(-scores, axis=1, kind="stable")  # (N, M)
    hits = owner[order] == np.arange(scores.shape[0])[:, None]  # (N, M)
    if not hits.any(axis=1).all():
        raise ValueError("every row needs at least one owned column")
    return hits.argmax(axis=1) + 1


def recall_report(ranks: np.ndarray, ks: Iterable[int] = KS, medr: bool = True) -> dict[str, float]:
    """{"R@1": %, "R@5": %, "R@10": %, "medr": median rank} from 1-based ranks."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": round(float((ranks <= k).mean() * 100.0), 2) for k in ks}
    if medr:
        out["medr"] = float(np.median(ranks))
    return out
