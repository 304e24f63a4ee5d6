"""The ``tags`` signal and tags in keyword search, over one index's stored classes.

* Zero-shot score (``tags``): the query's MiniLM embedding against each candidate's concept vector (the
  probability-weighted class-name embeddings of its stored classes; retrieval/tagging.py), with the
  weight scaled by the query's gate (a query that names a concept, "pizza", gets all of it; a sentence
  unlike any class name a small part). Candidates: the images holding one of the classes whose names
  are nearest the query, so "suspension bridge" finds the bridge in a collection of any size.
* Keywords: an image's tags join its caption's words (``caption | tag, tag``), so BM25 of "pizza" finds
  the photo tagged "pizza" whatever its caption says; the images whose tags contain a query word are
  found from the stored classes (the index's table of classes, not a scan of the captions).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from indexer.storage.pool_keywords import TOKENS
from indexer.storage.store import Store
from retrieval.tagging import Classes, Tag, Tagger

NEAR_CLASSES = 8  # classes nearest the query whose images join fused mode's candidates
NEAR_SIMILARITY = 0.5  # ... if their name is at least this close to the query
CANDIDATE_PROBABILITY = 0.05  # ... and the image holds the class at least this likely
GATE_FOR_CANDIDATES = 0.5  # zero-shot candidates only for queries whose gate is at least this


@dataclass(frozen=True)
class TagQuery:
    """A query as the tags signal sees it: its unit vector in the class-name space and its gate."""

    vector: np.ndarray
    gate: float


class _NameIndex:
    """Stemmed word -> tag names containing it, over every name the tagger can give (built once); words
    split and stemmed as the keyword index does it (``indexer/storage/pool_keywords.TOKENS``)."""

    def __init__(self, tagger: Tagger) -> None:
        self.names = tagger.names()
        listed = list(self.names)
        self.by_token: dict[str, set[str]] = {}
        for name, tokens in zip(listed, TOKENS.many(listed)):
            for term in tokens:
                self.by_token.setdefault(term, set()).add(name)

    @staticmethod
    def tokens(text: str) -> list[str]:
        return TOKENS(text)


_NAME_INDEXES: dict[str, _NameIndex] = {}
_NAME_LOCK = threading.Lock()


def name_index(tagger: Tagger) -> _NameIndex:
    with _NAME_LOCK:
        index = _NAME_INDEXES.get(tagger.info.fingerprint)
        if index is None:
            index = _NAME_INDEXES[tagger.info.fingerprint] = _NameIndex(tagger)
        return index


class TagSignal:
    """Reads one index's stored classes for ranking (see module doc)."""

    def __init__(self, store: Store, tagger: Tagger) -> None:
        self.store, self.tagger = store, tagger

    def query(self, text: str) -> TagQuery:
        vec = self.tagger.embed_queries([text])[0]
        return TagQuery(vec, self.tagger.gate(vec))

    def classes(self, ids: Iterable[int]) -> dict[int, Classes]:
        return self.store.classes_by_ids(ids)

    def tags(self, ids: Iterable[int], classes: dict[int, Classes] | None = None) -> dict[int, list[Tag]]:
        """{id: its tags} for those ``ids`` that have any (``classes``: their stored classes, if already read)."""
        out = {}
        for i, cls in (self.classes(ids) if classes is None else classes).items():
            tags = self.tagger.tags(cls)
            if tags:
                out[i] = tags
        return out

    def scores(self, tq: TagQuery, ids: np.ndarray, classes: dict[int, Classes] | None = None) -> np.ndarray:
        """(len(ids),) zero-shot scores; NaN for images without stored classes (``classes``: as in :meth:`tags`)."""
        found = self.classes(ids.tolist()) if classes is None else classes
        return self.tagger.concept_scores(tq.vector, [found.get(int(i), []) for i in ids])

    def candidates(self, tq: TagQuery, n: int, allowed: np.ndarray | None, force: bool = False) -> list[int]:
        """Images holding a class whose name is near the query (for a query whose gate is high, or ``force``)."""
        if tq.gate < GATE_FOR_CANDIDATES and not force:
            return []
        near = [c for c, s in self.tagger.near_classes(tq.vector, NEAR_CLASSES) if s >= NEAR_SIMILARITY or force]
        allowed_set = None if allowed is None else set(allowed.tolist())
        return self.store.ids_with_classes(near, CANDIDATE_PROBABILITY, n, allowed_set)

    def ranked(self, tq: TagQuery, n: int, allowed: np.ndarray | None) -> dict[int, float]:
        """``tags`` mode: images holding any of the query's 50 nearest classes, by zero-shot score."""
        near = [c for c, _ in self.tagger.near_classes(tq.vector, 50)]
        allowed_set = None if allowed is None else set(allowed.tolist())
        ids = np.array(self.store.ids_with_classes(near, 0.0, max(20 * n, 2000), allowed_set), dtype=np.int64)
        if not len(ids):
            return {}
        scores = self.scores(tq, ids)
        order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:n]
        return {int(ids[j]): float(scores[j]) for j in order}

    def keyword_matches(self, phrases: list[str], n: int, allowed: np.ndarray | None) -> list[int]:
        """Images whose tags contain a word of ``phrases`` (each as the keyword index stems it)."""
        index = name_index(self.tagger)
        tokens = {t for p in phrases for t in index.tokens(p)}
        names = {name for t in tokens for name in index.by_token.get(t, ())}
        if not names:
            return []
        classes = {c for name in names for c in index.names[name]}
        allowed_set = None if allowed is None else set(allowed.tolist())
        ids = self.store.ids_with_classes(classes, CANDIDATE_PROBABILITY, 4 * n, allowed_set)
        tags = self.tags(ids)
        return [i for i in ids if any(t.name in names for t in tags.get(i, ()))][:n]

    def texts(self, captions: dict[int, str], ids: Iterable[int],
              classes: dict[int, Classes] | None = None) -> dict[int, str]:
        """Caption and tags of each image, as keyword search reads them: ``caption | tag, tag`` (``classes``:
        as in :meth:`tags`)."""
        tags = self.tags(ids, classes)
        out = dict(captions)
        for i, found in tags.items():
            words = ", ".join(t.name for t in found)
            out[i] = f"{captions[i]} | {words}" if captions.get(i) else words
        return out
