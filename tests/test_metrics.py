"""Recall and rank metrics against hand-computed examples."""

import numpy as np
import pytest

from retrieval.metrics import best_ranks_multi, ranks_from_scores, recall_report


def test_ranks_from_scores_hand_example():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.5, 0.5, 0.1]])
    # query 0 -> item 0 is first; query 1 -> item 0 is third; query 2 -> item 1 ties with item 0: counts against
    assert ranks_from_scores(scores, np.array([0, 0, 1])).tolist() == [1, 3, 2]


def test_best_ranks_multi_uses_any_owned_caption():
    # two images, four captions: captions 0,1 belong to image 0; 2,3 to image 1
    scores = np.array([[0.1, 0.7, 0.9, 0.2], [0.3, 0.2, 0.1, 0.4]])
    owner = np.array([0, 0, 1, 1])
    assert best_ranks_multi(scores, owner).tolist() == [2, 1]
    with pytest.raises(ValueError):
        best_ranks_multi(scores, np.array([0, 0, 0, 0]))


def test_recall_report_percentages_and_median():
    r = recall_report(np.array([1, 2, 6, 11]))
    assert r == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "medr": 4.0}
    assert "medr" not in recall_report(np.array([1]), medr=False)
