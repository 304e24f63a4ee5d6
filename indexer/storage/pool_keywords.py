"""Keyword scores over one query's candidates only, with the collection's term statistics.

Fused ranking re-scores a pool of a few hundred candidates by BM25 of the query words in their
generated captions, and drops candidates whose caption mentions an excluded term. Asking the
index's FTS5 table for that (``MATCH ? AND rowid IN (...)``) costs as much as searching the whole
collection: SQLite's FTS5 walks every caption that shares a word with the query before the rowid
test (17 ms for a three-word query over 100,000 synthetic captions, docs/BENCHMARKS.md), however
few the candidates are.

Here the candidates' captions go into a private in-memory FTS5 table with the index's tokenizer
(so words are split and stemmed exactly as the index does it), whose ``instance`` vocabulary gives
every stemmed token's positions. BM25 is then computed in Python with FTS5's formula and constants,
the document frequencies of the collection
(``KeywordIndex.doc_freq``, the index's own term statistics) and the candidates' mean caption
length standing in for the collection's. A quoted phrase counts where its tokens stand in a row;
its document frequency is taken as that of its rarest token (an upper bound). Exclusions are
plain FTS5 matches on the private table, so they follow the index's tokenizer exactly. All of it, for
100 candidates, takes about 2.5 ms (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from typing import Callable, Mapping, Sequence

from indexer.storage.keywords import KEYWORD_TOKENIZER, fts_any

K1, B = 1.2, 0.75  # FTS5's bm25() defaults


class PoolKeywords:
    """The captions of some candidates, for keyword scoring and exclusion tests. One instance per
    query: it owns its in-memory connection, so concurrent queries (the app's threads) share nothing.
    Texts and FTS5 expressions are bound as parameters, never formatted into SQL."""

    def __init__(self, captions: Mapping[int, str]) -> None:
        self._con = sqlite3.connect(":memory:")
        for name in ("pool", "probe"):
            self._con.execute(f"CREATE VIRTUAL TABLE {name} USING fts5(text, tokenize='{KEYWORD_TOKENIZER}')")
            self._con.execute(f"CREATE VIRTUAL TABLE {name}_tokens USING fts5vocab({name}, 'instance')")
        self._con.executemany("INSERT INTO pool(rowid, text) VALUES (?, ?)",
                              ((int(i), c) for i, c in captions.items() if c))
        self.positions: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for doc, term, offset in self._con.execute("SELECT doc, term, offset FROM pool_tokens"):
            self.positions[int(doc)][term].append(int(offset))
        self.lengths = {doc: sum(map(len, terms.values())) for doc, terms in self.positions.items()}

    def tokens(self, text: str) -> list[str]:
        """``text`` as the index tokenizes it (lower-cased, stemmed words, in order)."""
        self._con.execute("INSERT INTO probe(rowid, text) VALUES (1, ?)", (text,))
        try:
            return [t for t, in self._con.execute("SELECT term FROM probe_tokens ORDER BY offset")]
        finally:
            self._con.execute("DELETE FROM probe")

    def _count(self, doc: int, phrase: Sequence[str]) -> int:
        """How often the token sequence ``phrase`` occurs in caption ``doc``."""
        where = self.positions.get(doc, {})
        first = where.get(phrase[0], ())
        if len(phrase) == 1:
            return len(first)
        rest = [set(where.get(t, ())) for t in phrase[1:]]
        return sum(all(o + k + 1 in rest[k] for k in range(len(rest))) for o in first)

    def bm25(self, phrases: Sequence[tuple[str, float]],
             doc_freq: Callable[[Sequence[str]], Mapping[str, int]], n_docs: int) -> dict[int, float]:
        """{id: sum over (phrase, weight) of weight x BM25 of the phrase} for candidates matching any.

        ``doc_freq(tokens)``: {token: captions of the whole collection containing it} (a token it
        leaves out counts 0), asked once for every token of the phrases; ``n_docs``: the captions in the
        collection. IDF = log((N - df + 0.5) / (df + 0.5)), at least 1e-6, as in FTS5."""
        if not self.lengths:
            return {}
        avg_len = sum(self.lengths.values()) / len(self.lengths)
        tokenized = [(self.tokens(text), weight) for text, weight in phrases]
        freq = doc_freq(sorted({t for phrase, _ in tokenized for t in phrase}))
        scores: dict[int, float] = {}
        for phrase, weight in tokenized:
            if not phrase:
                continue
            df = min(freq.get(t, 0) for t in phrase)
            idf = max(1e-6, math.log((max(n_docs, df) - df + 0.5) / (df + 0.5)))
            for doc, length in self.lengths.items():
                tf = self._count(doc, phrase)
                if tf:
                    norm = tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avg_len))
                    scores[doc] = scores.get(doc, 0.0) + weight * idf * norm
        return scores

    def matching(self, phrases: Sequence[str]) -> set[int]:
        """Ids of the candidates whose caption contains any of ``phrases`` (runs of words, matched as the
        index's tokenizer splits and stems them)."""
        if not phrases:
            return set()
        return {int(i) for (i,) in self._con.execute("SELECT rowid FROM pool WHERE pool MATCH ?", (fts_any(phrases),))}

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> PoolKeywords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
