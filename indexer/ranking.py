"""Caption-conditioned ranking: one text query -> ranked image ids, from four signals.

    image       cosine of the query and the image embedding               (FAISS, images.faiss)
    caption     cosine of the query and the generated caption's embedding (FAISS, captions.faiss)
    keyword     BM25 of the query words in the generated caption          (SQLite FTS5; for a pool of
                candidates, indexer/pool_keywords.py with the index's term statistics)
    likelihood  log P(query | image) under the caption decoder            (memories.faiss)
    match       the match head's logit for the query and the decoder memory (memories.faiss)

Modes ``image``, ``caption`` and ``keyword`` rank by one signal. ``fused`` takes the union of
the best ``pool`` candidates of each of the first three (the caption and keyword searches only when
their weight is at least half the image weight; otherwise they only re-score), z-normalises each
signal over that pool,
and sums them with the query's weights (a normalised weighted sum beat reciprocal-rank fusion on
Flickr8k dev; docs/MODELS.md). It then asks the caption decoder how likely it is to have written
the query for each of the ``depth`` best candidates, and adds that log-probability (in nats, relative
to the most likely candidate) with its own weight; candidates below ``depth`` count as the least
likely of them. The match head (captioning/matcher.py) rates the same candidates from the same
stored memories, and its logit is added the same way, with its own weight.

Excluded terms (``-people``) move the query vector away from them and drop every candidate whose
caption mentions them (an FTS5 match over the candidates' captions); weighted terms (``grass^2``) add
their own embedding and BM25 with that weight.
Filters arrive as the allowed ids and are applied inside each search, so k results come back
whenever k images match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from indexer.query import FusionWeights, ParsedQuery
from indexer.pool_keywords import PoolKeywords
from indexer.query_parser import fts_expression, fts_phrase, keyword_pieces
from indexer.store import Store
from indexer.vectors_bundle import VectorBundle

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


def query_vector(parsed: ParsedQuery, embed: Callable[[list[str]], np.ndarray],
                 image_vec: np.ndarray | None = None) -> np.ndarray:
    """The (D,) unit query vector: the positive text, plus (w - 1) x each weighted term, minus
    NEGATIVE_WEIGHT x each excluded term, averaged with an example image's vector when given."""
    texts = [parsed.positive_text] + [t for t, w in parsed.terms if w != 1.0] + list(parsed.negative)
    vecs = embed(texts)  # (len(texts), D)
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


class Ranker:
    """Ranks one index for one query at a time. ``scorer`` (optional) rates text against images."""

    def __init__(self, store: Store, vectors: VectorBundle, scorer=None,  # noqa: ANN001 - NativeCaptioner
                 matcher=None) -> None:  # noqa: ANN001 - captioning.matcher.Matcher
        """``scorer`` and ``matcher`` read the stored memories, so both need them (the caller checks that
        they are the scorer's, and that the matcher was trained on that scorer's memories)."""
        self.store, self.vectors = store, vectors
        self.scorer = scorer if vectors.memories is not None and len(vectors.memories) else None
        self.matcher = matcher if self.scorer is not None else None

    # --- single signals ------------------------------------------------------------------------
    def _vector_top(self, which: str, q: np.ndarray, n: int, allowed: np.ndarray | None) -> dict[int, float]:
        index = self.vectors.images if which == "image" else self.vectors.captions
        scores, ids = index.search(q[None], n, ids=allowed)
        return {int(i): float(s) for s, i in zip(scores[0], ids[0])}

    def _keyword_top(self, parsed: ParsedQuery | None, n: int, allowed: np.ndarray | None) -> dict[int, float]:
        """The best ``n`` images by (weighted) BM25 of the query words in their captions, collection-wide."""
        if parsed is None:
            return {}
        expr = fts_expression([t for t, _ in parsed.terms])
        if not expr:
            return {}
        allowed_set = None if allowed is None else set(allowed.tolist())
        if all(w == 1.0 for _, w in parsed.terms):
            return dict(self.store.keyword_search(expr, n, allowed=allowed_set))
        # weighted terms: each term's best n are candidates, so a heavily weighted term's matches are all
        # in the running; they are then scored with every term's weight
        exprs = [e for e in (fts_expression([term]) for term, _ in parsed.terms) if e]
        among = list(dict.fromkeys(i for e in exprs for i, _ in self.store.keyword_search(e, n, allowed=allowed_set)))
        with self._texts(among) as texts:
            found = self._pool_bm25(parsed, texts)
        return dict(sorted(found.items(), key=lambda kv: -kv[1])[:n])

    def _texts(self, ids: list[int]) -> PoolKeywords:
        """The captions of ``ids``, ready for keyword scoring and exclusion tests."""
        return PoolKeywords(self.store.captions_by_ids(ids))

    def _pool_bm25(self, parsed: ParsedQuery, texts: PoolKeywords) -> dict[int, float]:
        """Weighted BM25 of the query's terms in the candidates' captions (collection-wide term
        statistics; BM25 is a sum over query terms, so weights apply term by term)."""
        weights: dict[str, float] = {}
        for term, w in parsed.terms:  # each phrase once, at its largest weight
            for piece in keyword_pieces(term):
                weights[piece] = max(w, weights.get(piece, w))
        if not weights:
            return {}
        n_docs = len(self.vectors.captions) or len(self.vectors.images)
        return texts.bm25(list(weights.items()), self.store.keyword_doc_freq, n_docs)

    @staticmethod
    def _excluded(parsed: ParsedQuery | None, texts: PoolKeywords) -> set[int]:
        """Ids among ``texts`` whose caption mentions an excluded term."""
        if parsed is None or not parsed.negative:
            return set()
        phrases = [p for p in (fts_phrase(t, drop_stopwords=False) for t in parsed.negative) if p]
        return texts.matching(" OR ".join(phrases)) if phrases else set()

    def rerank_signals(self, ids: np.ndarray, text: str, likelihood: bool = True,
                       match: bool = True) -> dict[str, np.ndarray]:
        """The second-stage signals asked for and available, from one read of the stored memories:
        {"likelihood": log P(text | image), "match": the match head's logit}, each (len(ids),), NaN
        where an image has no stored memory."""
        wanted = [name for name, on, model in (("likelihood", likelihood, self.scorer), ("match", match, self.matcher))
                  if on and model is not None]
        out = {name: np.full(len(ids), np.nan) for name in wanted}
        if not wanted or not len(ids):
            return out
        have, mem = self.vectors.memories.reconstruct_present(ids)  # (m, S * D_dec)
        if have.any():
            if "likelihood" in out:
                out["likelihood"][have] = self.scorer.log_likelihood(mem, text)
            if "match" in out:
                out["match"][have] = self.matcher.score(mem, text)
        return out

    # --- modes --------------------------------------------------------------------------------
    def rank(self, mode: str, q: np.ndarray, parsed: ParsedQuery | None, k: int, weights: FusionWeights,
             allowed: np.ndarray | None = None, pool: int = 100, depth: int = 10) -> Ranked:
        """The best ``k`` images for query vector ``q`` (and its parsed text, None for an image-only query)."""
        if mode == "fused":
            return self._fused(q, parsed, k, weights, allowed, max(pool, 4 * k), depth)
        want = k
        while True:  # fetch more until exclusions leave k, or the index runs out
            n = want + 8 * len(parsed.negative) if parsed else want
            if mode == "keyword":
                found = self._keyword_top(parsed, n, allowed)
            else:
                found = self._vector_top(mode, q, n, allowed)
            ids = list(found)
            drop: set[int] = set()
            if parsed is not None and parsed.negative and ids:
                with self._texts(ids) as texts:
                    drop = self._excluded(parsed, texts)
            kept = [i for i in ids if i not in drop]
            if len(kept) >= k or len(ids) < n:
                break
            want *= 2
        kept = kept[:k]
        scores = np.array([found[i] for i in kept])
        return Ranked(np.array(kept, dtype=np.int64), scores, {mode: scores})

    def pool(self, q: np.ndarray, parsed: ParsedQuery | None, weights: FusionWeights,
             allowed: np.ndarray | None, pool: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fused mode's candidates (the union of each signal's best ``pool``, exclusions dropped) and
        their image, caption and keyword signals -> (ids (n,), {signal: (n,)})."""
        w = weights
        # each signal that carries real weight brings its own candidates; a light caption or keyword weight
        # only re-scores the others' (it could not lift an image from outside the pool into the top k, and
        # a second full scan, of the caption index or of every caption sharing a word, would double the cost)
        found_i = self._vector_top("image", q, pool, allowed) if w.image or w.likelihood else {}
        found_c = self._vector_top("caption", q, pool, allowed) if w.caption and w.caption >= w.image / 2 else {}
        found_k = (self._keyword_top(parsed, pool, allowed)
                   if w.keyword and w.keyword >= w.image / 2 and parsed is not None else {})
        ids = list(dict.fromkeys([*found_i, *found_c, *found_k]))
        if not ids:
            return np.zeros(0, dtype=np.int64), {}
        with self._texts(ids) as texts:
            drop = self._excluded(parsed, texts)
            cand = np.array([i for i in ids if i not in drop], dtype=np.int64)
            keyword = self._pool_bm25(parsed, texts) if parsed is not None else None
        if not len(cand):
            return cand, {}
        image = self.vectors.images.reconstruct(cand) @ q  # (n,)
        has_cap, cap_vecs = self.vectors.captions.reconstruct_present(cand)
        caption = np.full(len(cand), np.nan)
        caption[has_cap] = cap_vecs @ q
        signals = {"image": image, "caption": caption}
        if keyword is not None:
            signals["keyword"] = np.array([keyword.get(int(i), 0.0) for i in cand])
        return cand, signals

    @staticmethod
    def stage_total(signals: dict[str, np.ndarray], weights: FusionWeights) -> float:
        """Sum of the first stage's weights over the signals measured (what its weighted sum is divided by)."""
        return sum(getattr(weights, name) for name in ("image", "caption", "keyword") if name in signals) or 1.0

    @staticmethod
    def first_stage(signals: dict[str, np.ndarray], weights: FusionWeights) -> np.ndarray:
        """Normalised weighted sum of the pool's z-scored image, caption and keyword signals -> (n,)."""
        parts = [(getattr(weights, name), signals[name]) for name in ("image", "caption", "keyword") if name in signals]
        return sum(w * zscore(x) for w, x in parts if w) / Ranker.stage_total(signals, weights)

    @staticmethod
    def add_likelihood(fused: np.ndarray, top: np.ndarray, ll: np.ndarray, weight: float,
                       total: float) -> np.ndarray:
        """Add ``weight`` x log P(query | image) (``ll`` (len(top),), in nats, relative to the most
        likely candidate) to ``fused`` (n,) for the candidates ``top``; every other candidate (below
        the depth, or without a memory) counts as the least likely one. Raw log-probabilities, not
        z-scores: ten candidates are too few to estimate a spread, and a difference of one nat means
        the same for every query. The match head's logits are added the same way."""
        if np.isnan(ll).all():
            return fused
        rel = ll - np.nanmax(ll)  # (len(top),) <= 0
        add = np.full(len(fused), np.nanmin(rel))
        add[top] = np.where(np.isnan(rel), np.nanmin(rel), rel)
        return fused + weight * add / total

    def _fused(self, q: np.ndarray, parsed: ParsedQuery | None, k: int, weights: FusionWeights,
               allowed: np.ndarray | None, pool: int, depth: int) -> Ranked:
        cand, signals = self.pool(q, parsed, weights, allowed, pool)
        if not len(cand):
            return Ranked(cand, np.zeros(0), {})
        fused = self.first_stage(signals, weights)
        want_ll, want_match = weights.likelihood > 0, weights.match > 0 and self.matcher is not None
        if parsed is not None and (want_ll or want_match) and self.scorer is not None and depth > 0:
            top = np.argsort(-fused, kind="stable")[:depth]
            second = self.rerank_signals(cand[top], parsed.positive_text, want_ll, want_match)
            total = self.stage_total(signals, weights)
            for name, values in second.items():  # both from the first stage's order, so neither depends on the other
                fused = self.add_likelihood(fused, top, values, getattr(weights, name), total)
                signals[name] = np.full(len(cand), np.nan)
                signals[name][top] = values
        order = np.argsort(-fused, kind="stable")[:k]
        return Ranked(cand[order], fused[order], {name: s[order] for name, s in signals.items()})
