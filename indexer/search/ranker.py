"""Caption-conditioned ranking over one index: a query -> ranked image ids, from five signals.

    image       cosine of the query and the image embedding               (the images vector index)
    caption     cosine of the query and the generated caption's embedding (the captions vector index)
    keyword     BM25 of the query words in the generated caption          (the store's keyword index; for
                a pool of candidates, storage/pool_keywords.py with the index's term statistics)
    likelihood  log P(query | image) under the caption decoder            (the scorer's stored memories)
    match       the match head's logit for the query and the decoder memory (the same memories)
    meta        BM25 of the query words in the imported catalogue text (SKU, title, brand...; the
                store's catalogue keyword index; off unless the ``meta`` weight is set)
    tags        zero-shot score of the query against the image's classifier classes (ConSE over the
                stored classes, search/tag_signal.py), its weight scaled by the query's gate

An image's tags also join its caption's words for the keyword signal ("pizza" finds the photo tagged
pizza), and images whose classes are near the query join fused mode's candidates.

This module reads the signals; the arithmetic that fuses them is ``retrieval/fusion.py``.

Modes ``image``, ``caption`` and ``keyword`` rank by one signal. ``fused`` takes the union of
the best ``pool`` candidates of each of the first three (the caption and keyword searches only when
their weight is at least half the image weight; otherwise they only re-score), z-normalises each
signal over that pool,
and sums them with the query's weights (a normalised weighted sum beat reciprocal-rank fusion on
Flickr8k dev; docs/MODELS.md). It then asks the caption decoder how likely it is to have written
the query for each of the ``depth`` best candidates, and adds that log-probability (in nats, relative
to the most likely candidate) with its own weight; candidates below ``depth`` count as the least
likely of them. The match head (retrieval/native/matcher.py) rates the same candidates from the same
stored memories, and its logit is added the same way, with its own weight.

Excluded terms (``-people``) move the query vector away from them and drop every candidate whose
caption mentions them (an FTS5 match over the candidates' captions); weighted terms (``grass^2``) add
their own embedding and BM25 with that weight.
Filters arrive as the allowed ids and are applied inside each search, so k results come back
whenever k images match.

Relevance feedback arrives as a :class:`Feedback`: the query vector has already been moved towards the
good images and away from the bad ones (``retrieval.fusion.feedback_vector``); here the bad images, and
every candidate whose image is a near copy of one (``retrieval.fusion.near_bad``), are left out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.storage.ann import SearchParams
from indexer.storage.bundle import VectorBundle
from indexer.storage.pool_keywords import PoolKeywords
from indexer.storage.search_reads import Preview, RowsRead
from indexer.storage.store import Store
from indexer.search.second_stage import SecondStage
from indexer.search.side import beside
from indexer.search.tag_signal import TagQuery, TagSignal
from retrieval.fusion import (
    NEAR_BAD, Ranked, first_stage, first_stage_parts, near_bad, relative_part, stage_total,
)
from retrieval.query import FIRST_STAGE, SECOND_STAGE, FusionWeights, ParsedQuery
from retrieval.query_parser import excluded_phrases, keyword_phrases, keyword_pieces, phrase_of

if TYPE_CHECKING:  # models are built by the Engine; ranking only calls them
    from captioning.captioner import TextScorer
    from retrieval.native.matcher import Matcher
    from retrieval.tagging import Classes, Tagger


@dataclass
class Feedback:
    """Images the user marked bad: left out, with every candidate at least ``near`` similar to one of them
    and closer to it than to any image marked good (a good image, and its own near copies, always stay)."""

    bad_ids: frozenset[int] = frozenset()
    bad: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))  # (B, D) unit image vectors
    good_ids: frozenset[int] = frozenset()
    good: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))  # (G, D)
    near: float = NEAR_BAD

    def drops(self, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """(n,) True for the candidates ``ids`` (image vectors (n, D)) that feedback leaves out."""
        marked = np.array([int(i) in self.bad_ids for i in ids], dtype=bool)
        kept = np.array([int(i) in self.good_ids for i in ids], dtype=bool)
        near = near_bad(vectors, self.bad, self.near)
        if near.any() and len(self.good):
            to_bad = (np.asarray(vectors) @ np.asarray(self.bad).T).max(axis=1)
            to_good = (np.asarray(vectors) @ np.asarray(self.good).T).max(axis=1)
            near &= to_bad > to_good
        return (marked | near) & ~kept


class Ranker:
    """Ranks one index for one query at a time. ``scorer`` (optional) rates text against images."""

    def __init__(self, store: Store, vectors: VectorBundle, scorer: TextScorer | None = None,
                 matcher: Matcher | None = None, tagger: Tagger | None = None) -> None:
        """``scorer`` and ``matcher`` read the stored memories, so both need them (the caller checks that
        they are the scorer's, and that the matcher was trained on that scorer's memories); ``tagger``
        reads the stored classes (None: the index has no tags, or no tagger is configured)."""
        self.store, self.vectors = store, vectors
        self.scorer = scorer if vectors.memories is not None and len(vectors.memories) else None
        self.matcher = matcher if self.scorer is not None else None
        self.second = SecondStage(vectors.memories, self.scorer, self.matcher)
        self.tags = TagSignal(store, tagger) if tagger is not None else None

    # --- single signals ------------------------------------------------------------------------
    def _vector_top(self, which: str, q: np.ndarray, n: int, allowed: np.ndarray | None,
                    params: SearchParams | None = None, read: RowsRead | None = None,
                    preview: Preview | None = None) -> dict[int, float]:
        index = self.vectors.images if which == "image" else self.vectors.captions
        scores, ids = index.search(q[None], n, ids=allowed, params=params, read=read, preview=preview)
        return {int(i): float(s) for s, i in zip(scores[0], ids[0])}

    def _keyword_top(self, parsed: ParsedQuery | None, n: int, allowed: np.ndarray | None) -> dict[int, float]:
        """The best ``n`` images by (weighted) BM25 of the query words in their captions, collection-wide."""
        keywords = self.store.keywords
        if parsed is None or keywords is None:
            return {}
        phrases = keyword_phrases([t for t, _ in parsed.terms])
        if not phrases:
            return {}
        allowed_set = None if allowed is None else set(allowed.tolist())
        tagged = self.tags.keyword_matches(phrases, n, allowed) if self.tags is not None else []
        if all(w == 1.0 for _, w in parsed.terms) and not tagged:
            return dict(keywords.top(phrases, n, allowed_set))
        # weighted terms: each term's best n are candidates, so a heavily weighted term's matches are all
        # in the running; they are then scored with every term's weight
        per_term = [p for p in (keyword_phrases([term]) for term, _ in parsed.terms) if p]
        among = list(dict.fromkeys([*(i for p in per_term for i, _ in keywords.top(p, n, allowed_set)), *tagged]))
        with self._texts(among) as texts:
            found = self._pool_bm25(parsed, texts)
        return dict(sorted(found.items(), key=lambda kv: -kv[1])[:n])

    def _meta_top(self, parsed: ParsedQuery | None, n: int, allowed: np.ndarray | None) -> dict[int, float]:
        """The best ``n`` images by BM25 of the query's terms in their catalogue text."""
        catalogue = self.store.catalogue
        if parsed is None or catalogue is None:
            return {}
        phrases = meta_phrases(parsed)
        allowed_set = None if allowed is None else set(allowed.tolist())
        return dict(catalogue.top(phrases, n, allowed_set)) if phrases else {}

    def _meta_bm25(self, parsed: ParsedQuery, ids: list[int]) -> dict[int, float]:
        """Weighted BM25 of the query's terms in the catalogue text of ``ids``, with the catalogue's term
        statistics (a term that is a SKU such as ``AB-123`` counts as the phrase of its words)."""
        catalogue = self.store.catalogue
        if catalogue is None:
            return {}
        weights: dict[str, float] = {}
        for term, w in parsed.terms:
            phrase = phrase_of(term)
            if phrase:
                weights[phrase] = max(w, weights.get(phrase, w))
        with PoolKeywords(self.store.catalogue_texts(ids)) as texts:
            return texts.bm25(list(weights.items()), catalogue.doc_freq, max(1, catalogue.count()))

    def _texts(self, ids: list[int], classes: dict[int, Classes] | None = None) -> PoolKeywords:
        """The captions (and tags) of ``ids``, ready for keyword scoring and exclusion tests (``classes``: their
        stored classes, if already read)."""
        captions = self.store.captions_by_ids(ids)
        if self.tags is not None:
            captions = self.tags.texts(captions, ids, classes)
        return PoolKeywords(captions)

    def _pool_bm25(self, parsed: ParsedQuery, texts: PoolKeywords) -> dict[int, float]:
        """Weighted BM25 of the query's terms in the candidates' captions (collection-wide term
        statistics; BM25 is a sum over query terms, so weights apply term by term)."""
        weights: dict[str, float] = {}
        for term, w in parsed.terms:  # each phrase once, at its largest weight
            for piece in keyword_pieces(term):
                weights[piece] = max(w, weights.get(piece, w))
        if not weights or self.store.keywords is None:
            return {}
        n_docs = len(self.vectors.captions) or len(self.vectors.images)
        return texts.bm25(list(weights.items()), self.store.keywords.doc_freq, n_docs)

    @staticmethod
    def _excluded(parsed: ParsedQuery | None, texts: PoolKeywords) -> set[int]:
        """Ids among ``texts`` whose caption mentions an excluded term."""
        if parsed is None or not parsed.negative:
            return set()
        return texts.matching(excluded_phrases(parsed.negative))

    def rerank_signals(self, ids: np.ndarray, text: str, likelihood: bool = True,
                       match: bool = True) -> dict[str, np.ndarray]:
        """The second-stage signals of ``ids`` (see :meth:`SecondStage.signals`)."""
        return self.second.signals(ids, text, likelihood, match)

    # --- modes --------------------------------------------------------------------------------
    def rank(self, mode: str, q: np.ndarray, parsed: ParsedQuery | None, k: int, weights: FusionWeights,
             allowed: np.ndarray | None = None, pool: int = 100, depth: int = 10,
             feedback: Feedback | None = None, params: SearchParams | None = None, rows: bool = False) -> Ranked:
        """The best ``k`` images for query vector ``q`` (and its parsed text, None for an image-only query).
        ``params``: the vector searches' knobs (nprobe, refine, exact) for large, approximate indexes;
        ``rows``: the caller shows the results, so fused mode reads their metadata rows while its scorer
        finishes (``Ranked.rows``)."""
        if mode == "fused":
            return self._fused(q, parsed, k, weights, allowed, max(pool, 4 * k), depth, feedback, params, rows)
        if mode == "tags" and (parsed is None or self.tags is None):
            return Ranked(np.zeros(0, dtype=np.int64), np.zeros(0), {})
        tq = self.tags.query(parsed.positive_text) if mode == "tags" else None
        want = k
        while True:  # fetch more until exclusions leave k, or the index runs out
            n = want + 8 * len(parsed.negative) if parsed else want
            n += 8 * len(feedback.bad_ids) if feedback is not None else 0
            if mode == "keyword":
                found = self._keyword_top(parsed, n, allowed)
            elif mode == "tags":
                found = self.tags.ranked(tq, n, allowed)
            else:
                found = self._vector_top(mode, q, n, allowed, params)
            ids = list(found)
            drop: set[int] = set()
            if parsed is not None and parsed.negative and ids:
                with self._texts(ids) as texts:
                    drop = self._excluded(parsed, texts)
            if feedback is not None and ids:
                have, vecs = self.vectors.images.reconstruct_present(np.asarray(ids, dtype=np.int64))
                present = np.asarray(ids, dtype=np.int64)[have]
                drop |= {int(i) for i in present[feedback.drops(present, vecs)]}
            kept = [i for i in ids if i not in drop]
            if len(kept) >= k or len(ids) < n:
                break
            want *= 2
        kept = kept[:k]
        scores = np.array([found[i] for i in kept])
        return Ranked(np.array(kept, dtype=np.int64), scores, {mode: scores})

    def tag_query(self, parsed: ParsedQuery | None) -> TagQuery | None:
        """The query as the tags signal sees it (None: no text, or no tags in this index)."""
        if parsed is None or self.tags is None or not parsed.positive_text.strip():
            return None
        return self.tags.query(parsed.positive_text)

    def effective(self, weights: FusionWeights, tq: TagQuery | None) -> FusionWeights:
        """The weights a query ranks with: the tags weight scaled by its gate (0 without tags). Not checked
        again: without tags, weights that only had a tags weight have none left (no candidates)."""
        out = copy.copy(weights)
        object.__setattr__(out, "tags", weights.tags * tq.gate if tq is not None else 0.0)
        return out

    def pool(self, q: np.ndarray, parsed: ParsedQuery | None, weights: FusionWeights,
             allowed: np.ndarray | None, pool: int,
             feedback: Feedback | None = None, params: SearchParams | None = None,
             tq: TagQuery | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Fused mode's candidates (the union of each signal's best ``pool``, exclusions and feedback's
        rejects dropped) and their image, caption, keyword, tags (and meta) signals -> (ids (n,),
        {signal: (n,)}). ``weights``: as :meth:`effective` made them for ``tq``."""
        reads = _Reads()
        found = self._searches(q, parsed, weights, allowed, pool, params, tq, reads)
        return self._signals(found, q, parsed, weights, feedback, tq, reads=reads)

    def _searches(self, q: np.ndarray, parsed: ParsedQuery | None, w: FusionWeights, allowed: np.ndarray | None,
                  pool: int, params: SearchParams | None, tq: TagQuery | None, reads: _Reads | None = None,
                  preview: Preview | None = None) -> list[dict[int, float]]:
        """Each signal's best ``pool`` ({id: score}, best first; the image search's first), the caption
        vector search on a side thread while the image search runs (``reads``: keeps the image rows read;
        ``preview``: the image search's, see :class:`~indexer.storage.search_reads.Preview`)."""
        # each signal that carries real weight brings its own candidates; a light caption or keyword weight
        # only re-scores the others' (it could not lift an image from outside the pool into the top k, and
        # a second full scan, of the caption index or of every caption sharing a word, would double the cost)
        captions = (beside(self._vector_top, "caption", q, pool, allowed, params)
                    if w.caption and w.caption >= w.image / 2 else None)
        found_i = (self._vector_top("image", q, pool, allowed, params, reads.rows if reads is not None else None,
                                    preview) if w.image or w.likelihood else {})
        found_k = (self._keyword_top(parsed, pool, allowed)
                   if w.keyword and w.keyword >= w.image / 2 and parsed is not None else {})
        found_m = self._meta_top(parsed, pool, allowed) if w.meta and parsed is not None else {}
        found_t = {}
        if tq is not None and w.tags:
            alone = not (w.image or w.caption or w.keyword or w.likelihood or w.meta)
            found_t = dict.fromkeys(self.tags.candidates(tq, pool, allowed, force=alone), 0.0)
        found_c = captions.result() if captions is not None else {}
        return [found_i, found_c, found_k, found_m, found_t]

    def _signals(self, found: list[dict[int, float]], q: np.ndarray, parsed: ParsedQuery | None,
                 w: FusionWeights, feedback: Feedback | None, tq: TagQuery | None, weighted_only: bool = False,
                 reads: _Reads | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The candidates of :meth:`_searches` and their signals (see :meth:`pool`); ``weighted_only``: not the
        caption and tags signals when their weight is 0 (they could not change the order); ``reads``: what
        the searches read (the image rows), and where the pool's classes are kept for the query's later steps."""
        ids = list(dict.fromkeys(i for top in found for i in top))
        if not ids:
            return np.zeros(0, dtype=np.int64), {}
        classes = self.tags.classes(ids) if self.tags is not None else None  # read once: texts and scores
        if reads is not None:
            reads.classes = classes
        with self._texts(ids, classes) as texts:
            drop = self._excluded(parsed, texts)
            if w.meta and parsed is not None and parsed.negative and self.store.catalogue is not None:
                with PoolKeywords(self.store.catalogue_texts(ids)) as meta_texts:
                    drop |= self._excluded(parsed, meta_texts)
            cand = np.array([i for i in ids if i not in drop], dtype=np.int64)
            keyword = self._pool_bm25(parsed, texts) if parsed is not None else None
        if not len(cand):
            return cand, {}
        vecs = self.vectors.images.reconstruct(cand, reads.rows if reads is not None else None)  # (n, D)
        if feedback is not None:
            keep = ~feedback.drops(cand, vecs)
            cand, vecs = cand[keep], vecs[keep]
            if not len(cand):
                return cand, {}
        signals = {"image": vecs @ q}  # (n,)
        if w.caption or not weighted_only:
            signals["caption"] = self._caption_cosines(cand, q)
        if keyword is not None:
            signals["keyword"] = np.array([keyword.get(int(i), 0.0) for i in cand])
        if w.meta and parsed is not None and self.store.catalogue is not None:
            meta = self._meta_bm25(parsed, cand.tolist())
            signals["meta"] = np.array([meta.get(int(i), 0.0) for i in cand])
        if tq is not None and (w.tags or not weighted_only):
            signals["tags"] = self.tags.scores(tq, cand, classes)
        return cand, signals

    def _caption_cosines(self, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        """(n,) cosines of the query and the captions of ``ids`` (NaN: no caption vector)."""
        has_cap, cap_vecs = self.vectors.captions.reconstruct_present(ids)
        caption = np.full(len(ids), np.nan)
        caption[has_cap] = cap_vecs @ q
        return caption

    def _shown_only(self, ids: np.ndarray, q: np.ndarray, tq: TagQuery | None,
                    signals: dict[str, np.ndarray], reads: _Reads | None = None) -> dict[str, np.ndarray]:
        """``signals`` of the results ``ids`` with the signals left out of ranking for want of weight (the
        caption cosine, the tags of a query that names no concept) filled in, so every result still
        shows them (``reads``: what the query read already: classes, caption cosines)."""
        reads = reads or _Reads()
        classes = reads.classes
        if "caption" not in signals:
            ahead = reads.caption_cosines
            signals["caption"] = (np.array([ahead[i] for i in ids.tolist()]) if all(i in ahead for i in ids.tolist())
                                  else self._caption_cosines(ids, q))
        if tq is not None and "tags" not in signals:
            signals["tags"] = self.tags.scores(tq, ids, classes)
        order = [*FIRST_STAGE, *SECOND_STAGE]  # the order every mode shows them in
        return dict(sorted(signals.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))

    def _fused(self, q: np.ndarray, parsed: ParsedQuery | None, k: int, weights: FusionWeights,
               allowed: np.ndarray | None, pool: int, depth: int, feedback: Feedback | None = None,
               params: SearchParams | None = None, rows: bool = False) -> Ranked:
        tq = self.tag_query(parsed) if weights.tags > 0 else None
        weights = self.effective(weights, tq)
        want_ll, want_match = weights.likelihood > 0, weights.match > 0 and self.matcher is not None
        second_stage = parsed is not None and (want_ll or want_match) and self.scorer is not None and depth > 0
        reads, started = _Reads(), []
        # the second stage starts as soon as the image search knows its best ``depth``, before it has re-ranked
        # the rest of the pool's short list (a search too small for that: once it has answered)
        preview = Preview(depth, lambda ids: started.append(self.second.start(ids, parsed.positive_text, depth,
                                                                              want_ll))) \
            if second_stage and self.second.starts_early(want_ll) else None
        found = self._searches(q, parsed, weights, allowed, pool, params, tq, reads, preview)
        early = (started[0] if started else self.second.start(list(found[0]), parsed.positive_text, depth, want_ll)) \
            if second_stage else None
        cand, signals = self._signals(found, q, parsed, weights, feedback, tq, weighted_only=True, reads=reads)
        if not len(cand):
            return Ranked(cand, np.zeros(0), {})
        fused = first_stage(signals, weights)
        parts = first_stage_parts(signals, weights)
        if second_stage:
            top = np.argsort(-fused, kind="stable")[:depth]
            # the results are the first stage's best ``depth`` in a new order (the second stage adds least to the
            # others), so what showing them needs is read while the scorer finishes
            ahead = (lambda: self._read_ahead(cand[top], q, signals, reads, rows)) if k <= depth else None
            second = self.second.finish(cand[top], parsed.positive_text, want_ll, want_match, early, ahead)
            total = stage_total(signals, weights)
            for name, values in second.items():  # both from the first stage's order, so neither depends on the other
                added = relative_part(len(cand), top, values, getattr(weights, name), total)
                fused = fused + added
                parts[name] = np.broadcast_to(np.asarray(added, dtype=np.float64), (len(cand),))
                signals[name] = np.full(len(cand), np.nan)
                signals[name][top] = values
        order = np.argsort(-fused, kind="stable")[:k]
        shown = self._shown_only(cand[order], q, tq, {name: s[order] for name, s in signals.items()}, reads)
        return Ranked(cand[order], fused[order], shown, {name: p[order] for name, p in parts.items()},
                      reads.classes, reads.images)

    def _read_ahead(self, ids: np.ndarray, q: np.ndarray, signals: dict[str, np.ndarray], reads: _Reads,
                    rows: bool) -> None:
        """Into ``reads``: the caption cosines (when ranking left them out) and, with ``rows``, the metadata rows
        of ``ids``, the likely results."""
        if "caption" not in signals:
            reads.caption_cosines = dict(zip(ids.tolist(), self._caption_cosines(ids, q).tolist()))
        if rows:
            reads.images = self.store.images_by_ids(ids.tolist())


@dataclass
class _Reads:
    """What one query has read, kept for its later steps: the rows its image search re-ranked (the pool's image
    vectors are among them), the pool's stored classes (the results' tags; None: no tags), and what showing
    the likely results needs, read while the scorer finishes (their caption cosines and metadata rows)."""

    rows: RowsRead = field(default_factory=RowsRead)
    classes: dict[int, Classes] | None = None
    caption_cosines: dict[int, float] = field(default_factory=dict)
    images: dict[int, Any] | None = None  # {id: ImageRow}


def meta_phrases(parsed: ParsedQuery) -> list[str]:
    """What the catalogue keyword index looks for: each term as one phrase of its words (``AB-123`` ->
    ``ab 123``, so a SKU matches as a whole), lone stopwords left out."""
    return list(dict.fromkeys(p for p in (phrase_of(t) for t, _ in parsed.terms) if p))
