"""Keyword scores over one query's candidates only, with the collection's term statistics.

Fused ranking re-scores a pool of a few hundred candidates by BM25 of the query words in their
generated captions, and drops candidates whose caption mentions an excluded term. Asking the
index's FTS5 table for that (``MATCH ? AND rowid IN (...)``) costs as much as searching the whole
collection: SQLite's FTS5 walks every caption that shares a word with the query before the rowid
test (17 ms for a three-word query over 100,000 synthetic captions, docs/BENCHMARKS.md), however
few the candidates are.

Here the candidates' captions are split into tokens exactly as the index's tokenizer splits them
(:class:`IndexTokens`), and BM25 is computed in Python with FTS5's formula and constants, the
document frequencies of the collection (``KeywordIndex.doc_freq``, the index's own term statistics)
and the candidates' mean caption length standing in for the collection's. A quoted phrase counts
where its tokens stand in a row; its document frequency is taken as that of its rarest token (an
upper bound). An excluded phrase matches where FTS5's phrase query would: its tokens in a row.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Sequence

from indexer.storage.keywords import KEYWORD_TOKENIZER

K1, B = 1.2, 0.75  # FTS5's bm25() defaults
# every ASCII character but letters and digits separates tokens in FTS5's unicode61 (its token characters
# are the Unicode categories L*, N* and Co); tests/test_pool_keywords.py checks this against SQLite
_ASCII_SEPARATORS = re.compile(r"[\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]+")
KNOWN_PIECES_MAX = 200_000  # pieces remembered with their tokens (then forgotten all at once)


class IndexTokens:
    """Text -> the tokens the keyword index makes of it (lower-cased, stemmed, in order), exactly: the text
    is cut at ASCII separators, and each piece is tokenized once by an FTS5 table with the index's
    tokenizer (non-ASCII characters included), then remembered. Captions repeat their words, so after
    the first queries almost every piece is known and no SQL runs. Safe to share between threads (each
    has its own in-memory connection)."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[str, ...]] = {}
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(":memory:")
            con.execute(f"CREATE VIRTUAL TABLE probe USING fts5(text, tokenize='{KEYWORD_TOKENIZER}')")
            con.execute("CREATE VIRTUAL TABLE probe_tokens USING fts5vocab(probe, 'instance')")
            self._local.con = con
        return con

    def _learn(self, pieces: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Tokenize ``pieces`` (new ones) with FTS5 in one statement, remember them -> {piece: tokens}."""
        con = self._connection()
        found: dict[int, list[tuple[int, str]]] = defaultdict(list)
        con.executemany("INSERT INTO probe(rowid, text) VALUES (?, ?)", enumerate(pieces, 1))
        try:
            for doc, term, offset in con.execute("SELECT doc, term, offset FROM probe_tokens"):
                found[int(doc)].append((int(offset), term))
        finally:
            con.execute("DELETE FROM probe")
        learned = {piece: tuple(term for _, term in sorted(found.get(n, ()))) for n, piece in enumerate(pieces, 1)}
        if len(self._known) + len(pieces) > KNOWN_PIECES_MAX:
            self._known = {}
        self._known.update(learned)
        return learned

    def pieces(self, text: str) -> list[str]:
        return [p for p in _ASCII_SEPARATORS.split(text) if p]

    def many(self, texts: Iterable[str]) -> list[list[str]]:
        """The tokens of each text (new pieces of all of them tokenized at once)."""
        split = [self.pieces(t) for t in texts]
        known = self._known  # this snapshot keeps its pieces even if another thread starts afresh meanwhile
        new = list(dict.fromkeys(p for pieces in split for p in pieces if p not in known))
        learned = self._learn(new) if new else {}
        return [[token for p in pieces for token in (learned[p] if p in learned else known[p])] for pieces in split]

    def __call__(self, text: str) -> list[str]:
        return self.many([text])[0]


TOKENS = IndexTokens()  # one per process: the index's tokenizer never changes


class PoolKeywords:
    """The captions of some candidates, for keyword scoring and exclusion tests; one instance per query."""

    def __init__(self, captions: Mapping[int, str]) -> None:
        items = [(int(i), c) for i, c in captions.items() if c]
        # {id: its caption's tokens, in order}: scoring counts them in place (no per-token Python step)
        self.doc_tokens: dict[int, tuple[str, ...]] = {
            doc: tuple(tokens) for (doc, _), tokens in zip(items, TOKENS.many(c for _, c in items)) if tokens}
        self.lengths = {doc: len(tokens) for doc, tokens in self.doc_tokens.items()}
        self._positions: dict[int, dict[str, list[int]]] | None = None

    @property
    def positions(self) -> dict[int, dict[str, list[int]]]:
        """{id: {token: its offsets in the caption}} (made on first use: scoring needs only the tokens)."""
        if self._positions is None:
            self._positions = {}
            for doc, tokens in self.doc_tokens.items():
                where: dict[str, list[int]] = defaultdict(list)
                for offset, term in enumerate(tokens):
                    where[term].append(offset)
                self._positions[doc] = where
        return self._positions

    @staticmethod
    def tokens(text: str) -> list[str]:
        """``text`` as the index tokenizes it (lower-cased, stemmed words, in order)."""
        return TOKENS(text)

    def _count(self, doc: int, phrase: Sequence[str]) -> int:
        """How often the token sequence ``phrase`` occurs in caption ``doc``."""
        tokens = self.doc_tokens.get(doc, ())
        if len(phrase) == 1:
            return tokens.count(phrase[0])
        first, n, phrase = phrase[0], len(phrase), tuple(phrase)
        if first not in tokens:
            return 0
        return sum(1 for o, term in enumerate(tokens) if term == first and tokens[o:o + n] == phrase)

    def bm25(self, phrases: Sequence[tuple[str, float]],
             doc_freq: Callable[[Sequence[str]], Mapping[str, int]], n_docs: int) -> dict[int, float]:
        """{id: sum over (phrase, weight) of weight x BM25 of the phrase} for candidates matching any.

        ``doc_freq(tokens)``: {token: captions of the whole collection containing it} (a token it
        leaves out counts 0), asked once for every token of the phrases; ``n_docs``: the captions in the
        collection. IDF = log((N - df + 0.5) / (df + 0.5)), at least 1e-6, as in FTS5."""
        if not self.lengths:
            return {}
        avg_len = sum(self.lengths.values()) / len(self.lengths)
        tokenized = [(tokens, weight) for tokens, (_, weight) in zip(TOKENS.many(t for t, _ in phrases), phrases)]
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
        index's tokenizer splits and stems them: FTS5's phrase query)."""
        wanted = [t for t in TOKENS.many(phrases) if t]
        return {doc for doc in self.doc_tokens if any(self._count(doc, phrase) for phrase in wanted)}

    def close(self) -> None:
        """Nothing to release (kept so that callers can use ``with``)."""

    def __enter__(self) -> PoolKeywords:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
