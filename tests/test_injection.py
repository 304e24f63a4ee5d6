"""Hostile strings never reach SQL or FTS syntax: SQL and full-text injection payloads through queries,
filters (folder, glob, dates, types), paths and ids, on SQLite and on PostgreSQL.

Each payload either finds what it literally says (usually nothing) or is refused with an InputError
(the CLI: exit code 2 and a one-line message); nothing in the database changes, nothing else is raised.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import inspect

from conftest import TinyCaptioner, TinyEncoder, make_image
from indexer.cli import main
from indexer.cli.args import EXIT_OK, EXIT_USAGE
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.storage.filters import Filters
from indexer.storage.store import Store

SQL_PAYLOADS = [
    "' OR '1'='1", "' OR 1=1 --", "'; DROP TABLE images; --", '"; DROP TABLE images; --', "1; DELETE FROM images",
    "') UNION SELECT path, 1 FROM images --", "' UNION SELECT NULL, sqlite_version() --", "admin'--", "%' --",
    "\\'; DROP TABLE meta; --", "' || (SELECT pg_sleep(3)) || '", "'; SELECT pg_sleep(3); --",
    "$$; DROP TABLE images; $$", "E'\\x27' OR true", "'; COPY images TO '/tmp/pixquery-leak'; --",
    "'; ATTACH DATABASE '/tmp/pixquery-leak.db' AS x; --", "1' AND SLEEP(3)#", "'/**/OR/**/1=1", "%00' OR 1=1",
    "'; UPDATE images SET caption = 'owned'; --", "'; PRAGMA writable_schema = 1; --", "1 OR 1=1", "%", "_", "%_%",
    "\\", "''", "' ; TRUNCATE keyword_terms; --", "'; DELETE FROM keyword_docs; --", "ＳＥＬＥＣＴ * ＦＲＯＭ images",
]
FTS_PAYLOADS = [
    "NEAR(red blue, 2)", "red NEAR/2 blue", "red AND blue", "red OR blue", "NOT red", "red NOT blue", "red*", "^red",
    "caption:red", "{caption}: red", "captions_fts:red", "rank:red", '"red', 'red"', '"""', "(red", "red)",
    "+red", "- red", "* red", "red & blue", "red | !blue", "red <-> blue", "red:*", "!!red", "'red':A",
    'red" OR "1', "\"red\" OR \"x\" AND NOT \"blue\"", "MATCH 'red'", "red\u0000blue", "r\u200bed \u202eder",
]
PAYLOADS = SQL_PAYLOADS + FTS_PAYLOADS
MODES = ("image", "caption", "keyword", "fused")
# file names made of payloads (a '/' or a NUL byte cannot be in a name)
NAME_PAYLOADS = [p for p in PAYLOADS if "/" not in p and "\x00" not in p and p not in ("''", "\\")][:20]


@pytest.fixture
def hostile(tmp_path, db) -> Engine:
    """A captioned index whose folders and file names are payloads too, on SQLite and on PostgreSQL."""
    root = tmp_path / "photos"
    colours = list(TinyEncoder.COLOURS)
    for i, name in enumerate(NAME_PAYLOADS):
        make_image(root / name / f"{name}.png", colours[i % len(colours)], stripe=(i * 11 % 255, 7, 9))
    make_image(root / "plain" / "red.png", "red")
    cfg = EngineConfig(index_dir=tmp_path / "idx", db_url=db.url("idx"), progress=False, captioner="test", scorer=None)
    engine = Engine(cfg, encoder=TinyEncoder(), captioner=TinyCaptioner())
    assert engine.index(root).new == len(NAME_PAYLOADS) + 1
    yield engine
    engine.close()


def snapshot(store: Store) -> tuple[list[str], dict[str, list]]:
    """Every table's name and rows (the keyword index's own tables included)."""
    names = sorted(inspect(store.engine).get_table_names())
    with store.engine.connect() as conn:
        return names, {t: sorted((tuple(r) for r in conn.exec_driver_sql(f'SELECT * FROM "{t}"')), key=repr)
                       for t in names}


def refused_or_done(call) -> object:
    """The call's result, or None when it was refused with an InputError (anything else fails the test)."""
    try:
        return call()
    except InputError:
        return None


def test_queries_in_every_mode(hostile):
    store = hostile.open().store
    before = snapshot(store)
    for payload in PAYLOADS:
        for mode in MODES:
            hits = refused_or_done(lambda: hostile.search(payload, k=5, mode=mode))
            if hits and mode == "keyword":  # keyword hits share a word with the query, taken literally
                words = set(re.findall(r"\w+", payload.lower()))
                assert all(words & set(h.caption.split()) for h in hits), (payload, mode)
        refused_or_done(lambda: hostile.search(f"red {payload} -{payload} {payload}^2", k=5, mode="fused"))
    assert snapshot(store) == before and store.keywords.check() == []
    assert [h.caption for h in hostile.search("red", k=1, mode="keyword")] == ["a red picture"]


def test_filters(hostile, tmp_path):
    store = hostile.open().store
    before = snapshot(store)
    for payload in PAYLOADS:
        for filters in (dict(folder=payload), dict(folder=f"/{payload}"), dict(glob=payload), dict(glob=f"*{payload}*"),
                        dict(file_types=(payload,)), dict(file_types=("png", payload))):
            got = refused_or_done(lambda: store.filter_ids(Filters(**filters)))
            if got is not None and "glob" not in filters and filters != dict(file_types=("png", payload)):
                assert got.tolist() == [], (payload, filters)  # no folder or type is named like this
            refused_or_done(lambda: hostile.search("red", k=3, filters=Filters(**filters)))
    # the folders whose names are payloads are matched literally, and only by themselves
    root = (tmp_path / "photos").resolve()
    for name in NAME_PAYLOADS:
        hits = hostile.search("picture", k=50, filters=Filters(folder=str(root / name)))
        assert [Path(h.path).name for h in hits] == [f"{name}.png"], name
    assert snapshot(store) == before


def test_paths_and_ids(hostile, tmp_path):
    store = hostile.open().store
    before = snapshot(store)
    for payload in PAYLOADS:
        for image in (payload, f"/{payload}", f"../{payload}"):
            with pytest.raises(InputError):
                hostile.more_like_this(image)
            with pytest.raises(InputError):
                hostile.search(image=image)
        assert store.image_by_path(payload) is None
    for bad_id in (0, -1, 2**31, 2**63, 2**70, -(2**70)):
        with pytest.raises(InputError, match="no image with id|not an image id"):
            hostile.more_like_this(bad_id)
        try:
            assert hostile.image(bad_id) is None  # a well-formed id nobody has
        except InputError as exc:  # or one out of any id's range, refused as such
            assert "not an image id" in str(exc)
    root = (tmp_path / "photos").resolve()
    for name in NAME_PAYLOADS:  # files named like payloads are found by their path, and by no other
        path = root / name / f"{name}.png"
        assert store.image_by_path(str(path)).path == str(path)
        assert len(hostile.more_like_this(str(path), k=3)) == 3
    assert snapshot(store) == before


def test_cli_queries_filters_dates_and_paths(hostile, tmp_path, capsys, monkeypatch):
    hostile.close()
    monkeypatch.setattr("indexer.engine.Engine.encoder", property(lambda self: self._encoder or TinyEncoder()))
    db_url = hostile.config.db_url
    flags = ["--db", str(tmp_path / "idx"), *(["--db-url", db_url] if db_url else []), "--json"]
    store = Store(hostile.config.url)
    before = snapshot(store)
    store.close()
    # every third payload (each CLI run opens the index anew); a NUL byte cannot be in a command line
    payloads = [p for p in PAYLOADS if "\x00" not in p][::3]
    for payload in payloads:
        runs = [["search", payload, "--mode", "keyword"], ["search", "red", "--folder", payload],
                ["search", "red", "--glob", payload], ["search", "red", "--type", payload],
                ["search", "red", "--after", payload], ["search", "red", "--before", payload],
                ["similar", payload]]
        for argv in runs:
            try:
                code = main([*argv, *flags])
            except SystemExit as exc:  # argparse's own usage errors
                code = exc.code
            out, err = capsys.readouterr()
            assert code in (EXIT_OK, EXIT_USAGE), (argv, code, err)
            assert "Traceback" not in err and (code == EXIT_OK or "error:" in err), (argv, err)
    store = Store(hostile.config.url)
    assert snapshot(store) == before
    store.close()
