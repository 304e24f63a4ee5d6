"""Explained matches: each result's per-signal scores turned into a short readable reason.

    caption matches "dog", "grass" · image similarity 0.31 (+0.82) · caption likelihood -1.2 nats
    below the best (-0.36) · match head 2.4 (+0.00) · filters: folder /photos, price<50

The amounts in brackets are what each signal added to the fused score (its z-score among the
candidates times its weight, over the first stage's weights; the likelihood and match head relative to
the best of the re-scored candidates: ``retrieval/fusion.py``), so they add up to the score. Caption
(and catalogue) words are matched as the keyword index matches them: lower-cased and stemmed by the
index's tokenizer, so "running" matches "runs".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from indexer.search.searcher import SearchHit
from indexer.storage.filters import Filters
from indexer.storage.pool_keywords import PoolKeywords
from retrieval.query_parser import STOPWORDS, parse_query, term_words

LABELS = {"image": "image similarity", "caption": "caption meaning", "keyword": "caption words (BM25)",
          "meta": "catalogue words (BM25)", "likelihood": "caption likelihood", "match": "match head"}


@dataclass
class Explanation:
    id: int
    caption_words: list[str] = field(default_factory=list)  # query words found in the caption
    catalogue_words: list[str] = field(default_factory=list)  # query words found in the catalogue text
    signals: list[dict] = field(default_factory=list)  # [{"signal", "label", "value", "added"}]
    filters: list[str] = field(default_factory=list)
    feedback: str | None = None
    text: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _words_in(texts: dict[int, str], words: list[str]) -> dict[int, list[str]]:
    """{id: the ``words`` whose stem occurs in that text}, with the keyword index's tokenizer."""
    if not texts or not words:
        return {}
    with PoolKeywords(texts) as pool:
        stems = {w: pool.tokens(w) for w in words}
        return {i: [w for w in words if stems[w] and all(s in pool.doc_tokens.get(i, ()) for s in stems[w])]
                for i in texts}


def _signal_text(name: str, value: float | None, added: float | None) -> str:
    label = LABELS.get(name, name)
    if name == "likelihood" and value is not None:
        shown = f"{label} {value:.2f} nats"
    elif value is not None:
        shown = f"{label} {value:.3g}" if name in ("keyword", "meta") else f"{label} {value:.2f}"
    else:
        shown = f"{label} not rated (below the re-scored few)"
    return shown + (f" ({added:+.2f})" if added is not None else "")


def explain(hits: list[SearchHit], text: str | None, mode: str, filters: Filters | None = None,
            catalogue: dict[int, str] | None = None, positive_ids=(), negative_ids=()) -> list[Explanation]:
    """A readable reason for each of ``hits`` (see module doc); ``catalogue``: {id: catalogue text}."""
    words: list[str] = []
    if text:
        parsed = parse_query(text)
        words = list(dict.fromkeys(w for t, _ in parsed.terms for w in term_words(t) if w not in STOPWORDS))
    captions = _words_in({h.id: h.caption for h in hits if h.caption}, words)
    in_catalogue = _words_in({i: t for i, t in (catalogue or {}).items() if t}, words)
    applied = filters.describe() if filters is not None and filters.active else []
    marked = ""
    if len(positive_ids) or len(negative_ids):
        marked = (f"query moved towards {len(positive_ids)} image(s) marked good and away from "
                  f"{len(negative_ids)} marked bad; near copies of the bad ones left out")
    out = []
    for hit in hits:
        e = Explanation(hit.id, captions.get(hit.id, []), in_catalogue.get(hit.id, []), filters=applied,
                        feedback=marked or None)
        names = list(dict.fromkeys([*hit.contributions, *hit.scores]))
        for name in names:
            e.signals.append({"signal": name, "label": LABELS.get(name, name), "value": hit.scores.get(name),
                              "added": hit.contributions.get(name)})
        parts = []
        if e.caption_words:
            parts.append("caption has " + ", ".join(f'"{w}"' for w in e.caption_words))
        elif words and mode in ("fused", "keyword"):
            parts.append("no query word in the caption")
        if e.catalogue_words:
            parts.append("catalogue has " + ", ".join(f'"{w}"' for w in e.catalogue_words))
        if mode != "fused" and hit.scores:
            parts.append("ranked by " + _signal_text(mode if mode in hit.scores else names[0],
                                                      hit.scores.get(mode, hit.score), None))
        else:
            for s in e.signals:
                if s["added"] is None:  # a signal with no weight in this search
                    continue
                parts.append(_signal_text(s["signal"], s["value"], s["added"]))
        if applied:
            parts.append("filters: " + ", ".join(applied))
        if marked:
            parts.append("feedback: " + marked)
        e.text = " · ".join(parts)
        out.append(e)
    return out
