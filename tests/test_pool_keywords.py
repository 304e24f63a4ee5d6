"""Keyword scoring over a query's candidates (indexer/pool_keywords.py) against SQLite FTS5 itself."""

from __future__ import annotations

import sqlite3

import pytest

from indexer.storage.pool_keywords import PoolKeywords
from indexer.storage.keywords import KEYWORD_TOKENIZER

CAPTIONS = {
    1: "a dog runs on the grass",
    2: "two dogs are running through the grass with a ball",
    3: "a man sits on a park bench in the snow",
    4: "a park bench near a park",
    5: "a brown dog sleeps",
    6: "children play in the park",
    7: "",  # no caption: never matches
}


def _fts5_bm25(match: str) -> dict[int, float]:
    """FTS5's own bm25() over every caption (the collection-wide score the pool must reproduce)."""
    con = sqlite3.connect(":memory:")
    con.execute(f"CREATE VIRTUAL TABLE t USING fts5(c, tokenize='{KEYWORD_TOKENIZER}')")
    con.executemany("INSERT INTO t(rowid, c) VALUES (?, ?)", [(i, c) for i, c in CAPTIONS.items() if c])
    return {i: s for i, s in con.execute("SELECT rowid, -bm25(t) FROM t WHERE t MATCH ?", (match,))}


def _doc_freq(tokens) -> dict[str, int]:
    with PoolKeywords(CAPTIONS) as everything:
        return {t: sum(1 for terms in everything.positions.values() if t in terms) for t in tokens}


N_DOCS = sum(1 for c in CAPTIONS.values() if c)


def test_tokens_are_the_index_tokens():
    with PoolKeywords({}) as texts:
        assert texts.tokens("Dogs RUNNING, through the Grass!") == ["dog", "run", "through", "the", "grass"]


@pytest.mark.parametrize("words", [["dog"], ["grass"], ["dog", "grass"], ["park", "bench", "snow"]])
def test_bm25_over_the_whole_collection_equals_fts5(words):
    with PoolKeywords(CAPTIONS) as texts:
        mine = texts.bm25([(w, 1.0) for w in words], _doc_freq, N_DOCS)
    want = _fts5_bm25(" OR ".join(f'"{w}"' for w in words))
    assert mine.keys() == want.keys()
    for i in want:
        assert mine[i] == pytest.approx(want[i], rel=1e-6)


def test_bm25_of_a_subset_keeps_collection_statistics_weights_and_phrases():
    subset = {i: CAPTIONS[i] for i in (1, 3, 5)}
    with PoolKeywords(subset) as texts:
        alone = texts.bm25([("dog", 1.0)], _doc_freq, N_DOCS)
        doubled = texts.bm25([("dog", 2.0)], _doc_freq, N_DOCS)
        phrase = texts.bm25([("park bench", 1.0)], _doc_freq, N_DOCS)
    assert alone.keys() == {1, 5} and doubled == {i: pytest.approx(2 * s) for i, s in alone.items()}
    assert phrase.keys() == {3}  # "park ... bench" elsewhere does not count; "park bench" does
    with PoolKeywords({4: CAPTIONS[4], 6: CAPTIONS[6]}) as texts:
        assert texts.bm25([("park bench", 1.0)], _doc_freq, N_DOCS).keys() == {4}
        assert texts.bm25([("bench park", 1.0)], _doc_freq, N_DOCS) == {}


def test_matching_follows_fts5_and_binds_the_expression():
    with PoolKeywords(CAPTIONS) as texts:
        assert texts.matching(["dog"]) == {1, 2, 5}
        assert texts.matching(["park bench", "ball"]) == {2, 3, 4}
        assert texts.matching([]) == set()
        assert texts.matching(["x'); DROP TABLE pool; --"]) == set()
        assert texts.matching(['x" OR "dog']) == set()  # a quote inside a phrase stays inside it
        assert texts.matching(["dog"]) == {1, 2, 5}  # the table is still there


def test_document_frequencies_are_remembered_until_the_captions_change(tmp_path):
    """The store's keyword index remembers document frequencies between queries (FTS5 counts them by
    walking each token's whole list) and forgets them when captions change, here or in another process."""
    import subprocess
    import sys
    from datetime import datetime

    from indexer.lab.bench_latency import synthetic_columns
    from indexer.storage.store import Store, WriteBatch

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    now = datetime(2026, 1, 1)
    rows = [synthetic_columns(i, c, "enc", now) for i, c in CAPTIONS.items() if c]
    store.write(WriteBatch(inserts=rows))
    kw = store.keywords
    assert kw.doc_freq(["dog", "park", "zebra"]) == {"dog": 3, "park": 3, "zebra": 0}
    calls = []
    counted = kw._count_docs
    kw._count_docs = lambda conn, tokens: calls.append(list(tokens)) or counted(conn, tokens)
    assert kw.doc_freq(["park", "dog", "grass"]) == {"park": 3, "dog": 3, "grass": 2}
    assert calls == [["grass"]]  # the others were remembered
    store.write(WriteBatch(inserts=[synthetic_columns(20, "a zebra and a dog", "enc", now)]))
    assert kw.doc_freq(["dog", "zebra"]) == {"dog": 4, "zebra": 1}  # counted again after the write
    assert calls[-1] == ["dog", "zebra"]
    other = ("from datetime import datetime; from indexer.storage.store import Store, WriteBatch; "
             "from indexer.lab.bench_latency import synthetic_columns; s = Store(%r); "
             "s.write(WriteBatch(deletes=[1, 20])); s.close()" % url)
    subprocess.run([sys.executable, "-c", other], check=True, timeout=120)
    assert kw.doc_freq(["dog", "zebra"]) == {"dog": 2, "zebra": 0}  # another process deleted two
    store.close()
