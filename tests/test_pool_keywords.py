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


def _fts5_tokens(text: str) -> list[str]:
    """FTS5's own tokens of the whole text (an in-memory table with the index's tokenizer)."""
    con = sqlite3.connect(":memory:")
    con.execute(f"CREATE VIRTUAL TABLE t USING fts5(c, tokenize='{KEYWORD_TOKENIZER}')")
    con.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
    con.execute("INSERT INTO t(rowid, c) VALUES (1, ?)", (text,))
    return [term for term, in con.execute("SELECT term FROM v ORDER BY offset")]


def test_tokens_are_the_index_tokens():
    with PoolKeywords({}) as texts:
        assert texts.tokens("Dogs RUNNING, through the Grass!") == ["dog", "run", "through", "the", "grass"]


def test_every_ascii_character_but_letters_and_digits_separates_tokens():
    """What IndexTokens relies on to cut a text into pieces before FTS5 tokenizes each one."""
    for code in range(1, 128):
        c = chr(code)
        want = ["ab" + c + "cd"] if c.isalnum() else ["ab", "cd"]
        assert _fts5_tokens(f"ab{c}cd") == [w.lower() for w in want], repr(c)


@pytest.mark.parametrize("text", [
    "A dog's ball -- on the grass_field; 3 dogs/cats (running) at 10:30!",
    "Café crème, naïve façade and STRASSE straße", "Ελληνικά ζώα τρέχουν", "东京 的 狗 running",
    "e\u0301te\u0301 combining marks", "emoji 🐶 dog 🐶🐶 park", "tab\tnew\nline\r\x00nul", "", "!!! ???",
    "under_score hy-phen dot.ted at@sign 100% $5 a+b=c ~tilde `tick` |pipe|",
])
def test_tokens_of_any_text_equal_fts5s_own(text):
    from indexer.storage.pool_keywords import TOKENS

    assert TOKENS(text) == _fts5_tokens(text)
    assert TOKENS(text) == _fts5_tokens(text)  # again, from the remembered pieces


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
    # after DF_ONE_BY_ONE tokens counted one at a time, the whole vocabulary is read once
    from indexer.storage import keywords

    every = sorted({t for c in CAPTIONS.values() for t in PoolKeywords({}).tokens(c)})
    want = {t: sum(t in PoolKeywords({}).tokens(c) for i, c in CAPTIONS.items() if c and i != 1) for t in every}
    keywords_before = keywords.DF_ONE_BY_ONE
    keywords.DF_ONE_BY_ONE = 3
    try:
        calls.clear()
        assert kw.doc_freq(["grass", "park"]) == {t: want[t] for t in ("grass", "park")}  # two more: 4 > 3
        assert calls == []  # read at once
        assert kw.doc_freq([*every, "zebra"]) == {**want, "zebra": 0} and calls == []
        store.write(WriteBatch(deletes=[2]))
        assert kw.doc_freq(["grass"]) == {"grass": want["grass"] - 1} and calls == [["grass"]]  # one by one again
        keywords_remembered = keywords.DF_REMEMBERED
        keywords.DF_REMEMBERED = 2  # a vocabulary too large to hold: counted one by one, never read whole again
        try:
            assert kw.doc_freq(["dog", "park", "snow"]) == {"dog": 1, "park": 3, "snow": 1}
            assert kw._df_state == keywords.DF_TOO_MANY and calls[-1] == ["dog", "park", "snow"]
            assert kw.doc_freq(["bench", "ball"]) == {"bench": 2, "ball": 0} and calls[-1] == ["bench", "ball"]
            assert kw._df_state == keywords.DF_TOO_MANY  # and stays so: never a whole read that cannot be held
            kw.warm()
            assert kw._df_state == keywords.DF_TOO_MANY
            assert kw.doc_freq(["sofa"]) == {"sofa": 0} and calls[-1] == ["sofa"]
        finally:
            keywords.DF_REMEMBERED = keywords_remembered
        # warming up reads the whole vocabulary at once: no search counts one by one after it
        store.write(WriteBatch(deletes=[3]))
        kw.warm()
        assert kw._df_state == keywords.DF_WHOLE
        calls.clear()
        assert kw.doc_freq(["dog", "park", "zebra"]) == {"dog": 1, "park": 2, "zebra": 0} and calls == []
    finally:
        keywords.DF_ONE_BY_ONE = keywords_before
    store.close()


def test_a_database_that_cannot_answer_the_warm_up_is_only_logged(tmp_path, monkeypatch, caplog):
    from datetime import datetime

    from sqlalchemy.exc import OperationalError

    from indexer.lab.bench_latency import synthetic_columns
    from indexer.storage.store import Store, WriteBatch

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.write(WriteBatch(inserts=[synthetic_columns(i, c, "enc", datetime(2026, 1, 1))
                                    for i, c in CAPTIONS.items() if c]))
    kw = store.keywords

    def busy(conn):
        raise OperationalError("SELECT term, doc", {}, Exception("database is locked"))

    monkeypatch.setattr(kw, "_all_docs", busy)
    kw.warm()  # no exception: searches count the statistics themselves
    assert "not read ahead" in caplog.text and "database is locked" in caplog.text
    assert kw._df_state == 0 and kw.doc_freq(["dog"]) == {"dog": 3}
    store.close()


def test_tokens_survive_another_thread_starting_the_remembered_pieces_afresh(monkeypatch):
    from indexer.storage.pool_keywords import IndexTokens

    tokens = IndexTokens()
    assert tokens("a dog runs") == ["a", "dog", "run"]
    learn = tokens._learn

    def learn_then_forget(pieces):  # noqa: ANN001, ANN202 - another thread filled the memory and started afresh
        out = learn(pieces)
        tokens._known = {}
        return out

    monkeypatch.setattr(tokens, "_learn", learn_then_forget)
    assert tokens("a dog sleeps on the grass") == _fts5_tokens("a dog sleeps on the grass")
