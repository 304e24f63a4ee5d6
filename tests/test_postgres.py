"""PostgreSQL as the metadata database: the keyword index ranks as SQLite's FTS5 does, stays in step with
the captions whatever writes them, migrates, and a server that is down or misnamed is a clear message.

The store, pipeline, ranking, filter and duplicate tests run on both databases through the ``db``
fixture (tests/conftest.py); this file holds what only PostgreSQL has. A real server is started by
tests/pg_server.py; without one these tests skip, saying why.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from conftest import FLICKR8K, TinyCaptioner, TinyEncoder
from indexer.cli import main
from indexer.cli.args import EXIT_ERROR, EXIT_OK
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import DatabaseUnavailableError, IndexNotFoundError, InputError
from indexer.storage.pg_keywords import PostgresKeywords
from indexer.storage.pool_keywords import PoolKeywords
from indexer.storage.schema import SCHEMA_VERSION, ImageRow
from indexer.storage.store import Store, WriteBatch, safe_url, with_driver

WORDS = ("a an the dog dogs running runs run park bench man woman child children ball grass snow red blue "
         "on in with near two café naïve über 42 x2 jumps jumping").split()


def synthetic_captions(n: int, seed: int = 0) -> dict[int, str | None]:
    """Captions of 1 to 14 words, with repeats, unicode and numbers; every 17th image has none."""
    rng = random.Random(seed)
    return {i: None if i % 17 == 0 else " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))
            for i in range(1, n + 1)}


def rows_for(captions: dict[int, str | None]) -> list[ImageRow]:
    return [ImageRow(id=i, path=f"/photos/{i}.jpg", content_hash=f"h{i}", byte_size=1, mtime=1.0, width=1, height=1,
                     file_type="jpg", encoder="test", caption=c) for i, c in captions.items()]


def two_stores(tmp_path: Path, pg_url: str, captions: dict[int, str | None]) -> tuple[Store, Store]:
    stores = Store(f"sqlite:///{tmp_path / 'meta.sqlite'}"), Store(pg_url)
    for store in stores:
        store.write(WriteBatch(rows=rows_for(captions)))
    return stores


QUERIES = [["dog"], ["dogs"], ["park bench"], ["dog", "park bench", "red"], ["runs running"], ["the"],
           ["dog dog"], ["a dog"], ["zebra"], ["cafe"], ["café"], ["naive"], ["42"], ["x2 jumps"],
           ["red", "blue", "snow", "grass", "ball"], ["bench park"], ["children play"], ["uber"]]


def assert_same_ranking(sqlite: Store, pg: Store, phrases: list[str], limit: int, allowed=None) -> None:
    """The same scores in the same order; ids may swap only among equal scores (and, at the cut, among
    the captions tied for the last place)."""
    want = sqlite.keywords.top(phrases, limit, allowed)
    got = pg.keywords.top(phrases, limit, allowed)
    assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-9), phrases
    groups_want, groups_got = _by_score(want), _by_score(got)
    assert list(groups_want) == list(groups_got), phrases
    last = list(groups_want)[-1:] if len(want) == limit else []
    for score in groups_want:
        if score not in last:
            assert groups_got[score] == groups_want[score], (phrases, score)


def _by_score(ranked: list[tuple[int, float]]) -> dict[float, set[int]]:
    out: dict[float, set[int]] = {}
    for i, s in ranked:
        out.setdefault(float(f"{s:.9g}"), set()).add(i)
    return out


@pytest.mark.parametrize("limit", [5, 1000])
def test_keyword_ranking_equals_sqlite_fts5(tmp_path, pg_url, limit):
    sqlite, pg = two_stores(tmp_path, pg_url, synthetic_captions(600))
    assert isinstance(pg.keywords, PostgresKeywords)
    for phrases in QUERIES:
        assert_same_ranking(sqlite, pg, phrases, limit)
        assert_same_ranking(sqlite, pg, phrases, limit, allowed=set(range(1, 601, 7)))
    assert pg.keywords.top(["dog"], 10, allowed=set()) == [] and pg.keywords.top([], 10) == []
    with PoolKeywords({}) as tokenizer:
        tokens = sorted({t for w in WORDS for t in tokenizer.tokens(w)} | {"nothing", "dog dog"})
    assert pg.keywords.doc_freq(tokens) == sqlite.keywords.doc_freq(tokens)
    # fused ranking's pool scores (pool_keywords.py) use doc_freq: the same on both
    pool = {i: c for i, c in synthetic_captions(600).items() if i % 5 == 0}
    with PoolKeywords(pool) as texts:
        phrases = [("dog", 1.0), ("park bench", 2.0), ("snow", 0.5)]
        assert texts.bm25(phrases, pg.keywords.doc_freq, 600) == texts.bm25(phrases, sqlite.keywords.doc_freq, 600)


@pytest.mark.data
def test_keyword_ranking_equals_sqlite_fts5_on_flickr8k_captions(tmp_path, pg_url):
    lines = (FLICKR8K / "captions.tsv").read_text().splitlines()[:3000]
    captions = {i: line.split("\t", 1)[1] for i, line in enumerate(lines, start=1)}
    sqlite, pg = two_stores(tmp_path, pg_url, captions)
    for phrases in (["dog"], ["black dog"], ["dog", "snow"], ["man", "red shirt"], ["children playing", "water"],
                    ["a dog runs through the grass"], ["bicycle"], ["girl", "pink dress", "stairs"]):
        assert_same_ranking(sqlite, pg, phrases, 50)
        assert_same_ranking(sqlite, pg, phrases, 20, allowed=set(range(1, 3001, 3)))


def test_keyword_entries_follow_captions_whatever_writes_them(pg_url):
    store = Store(pg_url)
    store.write(WriteBatch(rows=rows_for({1: "a red dog", 2: "a blue ball", 3: None})))
    kw = store.keywords
    assert [i for i, _ in kw.top(["red"], 10)] == [1] and kw.check() == []
    with store.engine.begin() as conn:  # a hand-written UPDATE: the trigger drops the stale entry
        conn.exec_driver_sql("UPDATE images SET caption = 'a green cat' WHERE id = 1")
        conn.exec_driver_sql("UPDATE images SET caption = 'a red fox' WHERE id = 3")
    assert kw.top(["red"], 10) == [] and kw.top(["cat"], 10) == []  # stale never, missing at worst
    assert kw.check() == ["2 captioned images are missing from the keyword index"]
    store.close()
    store = Store(pg_url)  # opening fills what is missing
    assert [i for i, _ in store.keywords.top(["red"], 10)] == [3]
    assert [i for i, _ in store.keywords.top(["cat"], 10)] == [1] and store.keywords.check() == []
    # a row rewritten through the store: its entry follows; a deleted row: its entry goes
    row = store.images_by_ids([2])[2]
    row.caption = "two red balls"
    store.write(WriteBatch(rows=[row], deletes=[3]))
    assert [i for i, _ in store.keywords.top(["red"], 10)] == [2]
    assert store.keywords.doc_freq(["red", "fox", "ball"]) == {"red": 1, "fox": 0, "ball": 1}
    with store.engine.begin() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM keyword_docs").scalar() == 2
        conn.exec_driver_sql("DELETE FROM keyword_terms")  # damage it by hand
    assert store.keywords.top(["red"], 10) == []
    store.keywords.rebuild()
    assert [i for i, _ in store.keywords.top(["red"], 10)] == [2] and store.keywords.check() == []
    with store.engine.begin() as conn:  # totals and vocabulary damaged by hand are found, and rebuilt
        conn.exec_driver_sql("UPDATE keyword_stats SET tokens = tokens + 1")
        conn.exec_driver_sql("UPDATE keyword_vocab SET docs = 7 WHERE term = 'red'")
    assert store.keywords.check() == ["the keyword index's row and token totals differ from a recount",
                                      "1 document frequencies in the keyword index differ from a recount"]
    store.keywords.rebuild()
    assert store.keywords.check() == [] and store.keywords.doc_freq(["red"]) == {"red": 1}
    store.close()


def test_schema_1_database_is_migrated_on_postgres(pg_url):
    import psycopg

    with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT);
            INSERT INTO meta VALUES ('schema_version', '1');
            CREATE TABLE runs (id SERIAL PRIMARY KEY, root TEXT, started_at TIMESTAMP, finished_at TIMESTAMP,
                summary TEXT);
            CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT UNIQUE, content_hash VARCHAR(64), byte_size BIGINT,
                mtime FLOAT, width INTEGER, height INTEGER, file_type VARCHAR(16), taken_at TIMESTAMP,
                indexed_at TIMESTAMP, encoder VARCHAR(255), run_id INTEGER REFERENCES runs(id));
            INSERT INTO images VALUES (1, '/x.jpg', 'h', 1, 1.0, 2, 2, 'jpg', NULL, '2026-01-01 00:00:00', 'e', NULL);
        """)
    store = Store(pg_url)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    row = store.all_images()[0]
    assert row.path == "/x.jpg" and row.caption is None and row.captioned_at is None
    row.caption = "a dog on the grass"
    store.write(WriteBatch(rows=[row]))
    assert [i for i, _ in store.keywords.top(["grass"], 5)] == [1]
    assert {"keyword_docs", "keyword_terms"} <= set(inspect(store.engine).get_table_names())
    store.close()


def test_newer_schema_is_refused(pg_url):
    store = Store(pg_url)
    store.set_meta({"schema_version": str(SCHEMA_VERSION + 1)})
    store.close()
    with pytest.raises(Exception, match="newer pixquery"):
        Store(pg_url)


def test_stores_opening_a_new_database_at_once_create_it_once(pg_url):
    errors, stores = [], []

    def open_one() -> None:
        try:
            stores.append(Store(pg_url))
        except Exception as exc:  # noqa: BLE001 - every failure counts
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 6
    assert stores[0].get_meta("schema_version") == str(SCHEMA_VERSION)
    for s in stores:
        s.close()


def test_urls_name_the_driver_and_never_print_a_password():
    assert with_driver("postgresql://me@db.example/photos") == "postgresql+psycopg://me@db.example/photos"
    assert with_driver("postgres://me@db.example/photos") == "postgresql+psycopg://me@db.example/photos"
    assert with_driver("sqlite:////tmp/x.sqlite") == "sqlite:////tmp/x.sqlite"
    assert safe_url("postgresql+psycopg://me:s3cret@db.example/photos") == "postgresql+psycopg://me:***@db.example/photos"
    with pytest.raises(InputError, match="not a database URL"):
        with_driver("not a url")


def test_a_server_that_cannot_be_reached_is_a_clear_error(tmp_path, pg_server, capsys):
    down = f"postgresql://me:s3cret@127.0.0.1:{_closed_port()}/photos?connect_timeout=3"
    engine = Engine(EngineConfig(index_dir=tmp_path / "idx", db_url=down, progress=False), encoder=TinyEncoder())
    with pytest.raises(DatabaseUnavailableError, match="cannot reach the database") as err:
        engine.search("red")
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    with pytest.raises(DatabaseUnavailableError):
        Store(down)
    assert main(["search", "red", "--db", str(tmp_path / "idx"), "--db-url", down]) == EXIT_ERROR
    message = capsys.readouterr().err
    assert message.startswith("pixquery: error: cannot reach the database") and "s3cret" not in message
    assert "Traceback" not in message
    # a server that is up, but a database that does not exist: also unavailable, not "no index"
    missing = pg_server.url("no_such_database")
    with pytest.raises(DatabaseUnavailableError, match="no_such_database"):
        Engine(EngineConfig(index_dir=tmp_path / "idx", db_url=missing)).search("red")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def test_env_var_cli_flag_rebuild_and_drop(tmp_path, pg_url, photo_dir, monkeypatch, capsys):
    monkeypatch.setenv("PIXQUERY_DB_URL", pg_url.replace("postgresql+psycopg", "postgresql"))
    config = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner=None)
    assert config.db_file is None and config.url.startswith("postgresql")
    engine = Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner())
    engine.index(photo_dir)
    assert engine.stats()["images"] == 16 and not (tmp_path / "idx" / "pixquery.sqlite").exists()
    assert list((tmp_path / "idx" / "vectors").iterdir())  # the vectors stay in the index folder
    summary = engine.index(photo_dir, rebuild=True)
    assert summary.new == 16 and engine.stats()["images"] == 16
    engine.drop()
    bare = create_engine(pg_url)
    assert not engine.exists and inspect(bare).get_table_names() == []  # every table went, the database stays
    bare.dispose()
    assert not (tmp_path / "idx" / "vectors").exists() and sum(1 for _ in photo_dir.rglob("*.*")) == 16
    with pytest.raises(IndexNotFoundError, match="pixquery index"):
        Engine(EngineConfig(index_dir=tmp_path / "idx", progress=False)).search("red")


def test_stats_and_messages_never_show_the_password(tmp_path, pg_server, photo_dir):
    import psycopg

    with psycopg.connect(pg_server.url().replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'alice') THEN "
                     "CREATE ROLE alice LOGIN SUPERUSER PASSWORD 's3cret'; END IF; END $$")
    url = pg_server.url().replace("pixquery@", "alice:s3cret@").rsplit("/", 1)[0] + "/" + \
        pg_server.new_database().rsplit("/", 1)[1]
    engine = Engine(EngineConfig(index_dir=tmp_path / "idx", db_url=url, progress=False, captioner=None),
                    encoder=TinyEncoder())
    with pytest.raises(IndexNotFoundError) as err:
        engine.search("red")
    assert "s3cret" not in str(err.value) and "alice:***@" in str(err.value)
    engine.index(photo_dir)
    assert engine.stats()["database"] == url.replace("s3cret", "***")
    engine.close()


def test_the_app_searches_and_indexes_on_postgres(tmp_path, monkeypatch, photo_dir, pg_url):
    import shutil

    import streamlit as st

    from test_ui_app import Env, go, result_names, search, texts
    from ui import resources

    st.cache_resource.clear()
    st.cache_data.clear()
    monkeypatch.setenv("PIXQUERY_DB_URL", pg_url)
    assert resources.engine_factory().config.db_url == pg_url  # the real app reads the variable
    env = Env(tmp_path, monkeypatch)  # its EngineConfig takes the URL from PIXQUERY_DB_URL too
    shutil.copy(photo_dir / "a" / "red.png", photo_dir / "red-copy.png")
    env.index(photo_dir)
    try:
        at = search(env.app(), "red picture")
        names = result_names(at)
        assert len(names) == 17 and names[0] in ("red.png", "red-striped.jpg", "red-copy.png")
        assert "a red picture" in texts(at)
        at = go(env.app(), "Collection")
        assert "17" in texts(at)
        at.button(key="find_dups").click().run()
        assert not at.exception and "2 files, exact copies" in texts(at)
    finally:
        resources.jobs().wait(timeout=60)
        st.cache_resource.clear()
        st.cache_data.clear()
