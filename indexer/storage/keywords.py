"""The keyword index over the generated captions: BM25 search, behind one interface per database.

The ranker asks it for the best captions containing any of some phrases (runs of lower-cased words
from :func:`retrieval.query_parser.keyword_phrases`, never raw user syntax), and for the collection's
document frequencies of stemmed tokens (what ``indexer/storage/pool_keywords.py`` scores a query's
candidates with). Each database fills it its own way; every phrase is quoted in that database's
syntax (or split into tokens) and bound as a parameter, never formatted into SQL.

SQLite: an FTS5 table with external content (the ``images`` table), kept in step by triggers, so
every code path that writes a caption updates it. Porter stemming lets "running" match "runs".
Ranking is FTS5's BM25 (k1 = 1.2, b = 0.75).

PostgreSQL: the same tokens (split and stemmed by the same FTS5 tokenizer, in Python) in two tables,
and FTS5's BM25 computed in SQL, so both databases find and rank the same captions alike
(``indexer/storage/pg_keywords.py``).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Iterable, Sequence

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

KEYWORD_TABLE = "captions_fts"
KEYWORD_TOKENIZER = "porter unicode61"  # FTS5 tokenizer of the keyword index (and of pool_keywords.py)


class KeywordIndex(ABC):
    """BM25 search over ``images.caption``; one per store."""

    @abstractmethod
    def install(self, conn: Connection) -> None:
        """Create what the index needs in the database (idempotent) and fill it from existing captions
        when it is new (an index from before keyword search)."""

    @abstractmethod
    def uninstall(self, conn: Connection) -> None:
        """Remove what :meth:`install` created (before the tables are dropped)."""

    def settle(self) -> None:
        """Called once :meth:`install`'s transaction has committed (housekeeping that needs none)."""

    def update(self, conn: Connection, ids: Iterable[int]) -> None:
        """Bring the entries of images ``ids`` up to date, in the transaction that just wrote their rows
        (nothing to do where triggers keep the index in step)."""

    @abstractmethod
    def check(self) -> list[str]:
        """What disagrees between the index and the captions, in words (empty: consistent)."""

    @abstractmethod
    def rebuild(self) -> None:
        """Fill the index again from the captions."""

    @abstractmethod
    def top(self, phrases: Sequence[str], limit: int, allowed: set[int] | None = None) -> list[tuple[int, float]]:
        """(id, BM25 > 0) of the best ``limit`` captions containing any of ``phrases``, best first;
        ``allowed``: only these ids (a filter)."""

    @abstractmethod
    def doc_freq(self, tokens: Iterable[str]) -> dict[str, int]:
        """{token: captions containing it} for tokens as the index stores them (stemmed)."""

    def warm(self) -> None:
        """Ready the term statistics that searches read, so that no search waits for them: what a long-lived
        process (the API, the app) does once it starts. Nothing to do where they are a lookup already."""


def fts_quote(phrase: str) -> str:
    """A phrase as an FTS5 string: ``"park bench"`` (inner quotes doubled; phrases hold only word runs)."""
    return '"' + phrase.replace('"', '""') + '"'


def fts_any(phrases: Sequence[str]) -> str:
    """The FTS5 expression matching any of ``phrases``."""
    return " OR ".join(fts_quote(p) for p in phrases)


_SQLITE_DDL = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {KEYWORD_TABLE} USING fts5("
    f"caption, content='images', content_rowid='id', tokenize='{KEYWORD_TOKENIZER}')",
    f"CREATE TRIGGER IF NOT EXISTS captions_fts_ai AFTER INSERT ON images BEGIN "
    f"INSERT INTO {KEYWORD_TABLE}(rowid, caption) VALUES (new.id, new.caption); END",
    f"CREATE TRIGGER IF NOT EXISTS captions_fts_ad AFTER DELETE ON images BEGIN "
    f"INSERT INTO {KEYWORD_TABLE}({KEYWORD_TABLE}, rowid, caption) VALUES ('delete', old.id, old.caption); END",
    f"CREATE TRIGGER IF NOT EXISTS captions_fts_au AFTER UPDATE OF caption ON images BEGIN "
    f"INSERT INTO {KEYWORD_TABLE}({KEYWORD_TABLE}, rowid, caption) VALUES ('delete', old.id, old.caption); "
    f"INSERT INTO {KEYWORD_TABLE}(rowid, caption) VALUES (new.id, new.caption); END",
)


DF_REMEMBERED = 100_000  # tokens whose document frequency one store keeps between queries
DF_ONE_BY_ONE = 64  # tokens counted one at a time (since the index changed) before the whole vocabulary is read
DF_WHOLE = -1  # the remembered frequencies are the whole vocabulary's
DF_TOO_MANY = -2  # the vocabulary has more than DF_REMEMBERED tokens: counted one by one only


class SqliteKeywords(KeywordIndex):
    """FTS5 over the captions of an SQLite store."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._df: dict[str, int] = {}  # token -> captions containing it, while the index stays as it was
        self._df_version: tuple[bytes, ...] | None = None
        self._df_state = 0  # tokens counted one by one since the index changed, or DF_WHOLE
        self._df_lock = threading.Lock()

    def install(self, conn: Connection) -> None:
        exists = conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (KEYWORD_TABLE,)).first()
        for statement in _SQLITE_DDL:
            conn.exec_driver_sql(statement)
        if not exists:  # a new table over existing rows (an index from before schema 3): fill it
            conn.exec_driver_sql(f"INSERT INTO {KEYWORD_TABLE}({KEYWORD_TABLE}) VALUES ('rebuild')")

    def uninstall(self, conn: Connection) -> None:
        for trigger in ("captions_fts_ai", "captions_fts_ad", "captions_fts_au"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger}")
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {KEYWORD_TABLE}")

    def check(self) -> list[str]:
        with self.engine.connect() as conn:
            triggers = {name for name, in conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'captions_fts_%'")}
            missing = sorted({"captions_fts_ai", "captions_fts_ad", "captions_fts_au"} - triggers)
            try:  # FTS5 compares its index with the content table (rank 1: external content too)
                conn.exec_driver_sql(f"INSERT INTO {KEYWORD_TABLE}({KEYWORD_TABLE}, rank) VALUES ('integrity-check', 1)")
                broken = None
            except DBAPIError as exc:
                broken = str(exc.orig)
            conn.rollback()
        problems = [f"the keyword index's trigger {t} is missing" for t in missing]
        if broken:
            problems.append(f"the keyword index disagrees with the captions ({broken})")
        return problems

    def rebuild(self) -> None:
        with self.engine.begin() as conn:
            for statement in _SQLITE_DDL:  # a trigger dropped by hand comes back
                conn.exec_driver_sql(statement)
            conn.exec_driver_sql(f"INSERT INTO {KEYWORD_TABLE}({KEYWORD_TABLE}) VALUES ('rebuild')")

    def top(self, phrases: Sequence[str], limit: int, allowed: set[int] | None = None) -> list[tuple[int, float]]:
        if not phrases or limit < 1:
            return []
        sql = (f"SELECT rowid, -bm25({KEYWORD_TABLE}) AS s FROM {KEYWORD_TABLE} WHERE {KEYWORD_TABLE} MATCH ? "
               f"ORDER BY s DESC")
        match = fts_any(phrases)
        with self.engine.connect() as conn:
            if allowed is None:
                rows = conn.exec_driver_sql(sql + " LIMIT ?", (match, int(limit)))
                return [(int(r[0]), float(r[1])) for r in rows]
            out = []
            for r in conn.exec_driver_sql(sql, (match,)):  # streamed, best first
                if int(r[0]) in allowed:
                    out.append((int(r[0]), float(r[1])))
                    if len(out) >= limit:
                        break
            return out

    @staticmethod
    def _version(conn: Connection) -> tuple[bytes, ...]:
        """What changes whenever the keyword index does, in this process or another: FTS5's averages record
        (documents, tokens) and its structure record (segments; every committed write adds one)."""
        return tuple(bytes(block) for _, block in conn.exec_driver_sql(
            f"SELECT id, block FROM {KEYWORD_TABLE}_data WHERE id IN (1, 10) ORDER BY id"))

    def doc_freq(self, tokens: Iterable[str]) -> dict[str, int]:
        """Remembered between queries while the index is unchanged: FTS5 counts a token's documents by
        walking its whole list (45 ms for five common words over a million captions). Once
        :data:`DF_ONE_BY_ONE` tokens have been counted one at a time, every token's count is read at once
        (FTS5's whole vocabulary: 0.27 s for a million captions), so a long-lived process stops counting,
        while a one-off search never pays for the whole vocabulary. The app and the API read it when they
        start (:meth:`warm`)."""
        tokens = list(dict.fromkeys(tokens))
        if not tokens:
            return {}
        with self.engine.connect() as conn:
            version = self._version(conn)
            with self._df_lock:
                if version != self._df_version:
                    self._df, self._df_version, self._df_state = {}, version, 0
                known = {t: self._df[t] for t in tokens if t in self._df}
                state = self._df_state
            missing = [t for t in tokens if t not in known]
            if missing and state != DF_WHOLE:
                tried = state >= 0 and state + len(missing) > DF_ONE_BY_ONE
                found = self._all_docs(conn) if tried else None
                whole = found is not None
                found = found if whole else self._count_docs(conn, missing)
                with self._df_lock:
                    if self._df_version == version:
                        if whole:
                            self._df, self._df_state = found, DF_WHOLE
                        else:
                            if len(self._df) < DF_REMEMBERED:
                                self._df.update(found)
                            # too large a vocabulary to hold: one by one from now on
                            too_many = tried or self._df_state == DF_TOO_MANY
                            self._df_state = DF_TOO_MANY if too_many else self._df_state + len(missing)
                known.update((t, found.get(t, 0)) for t in missing)
        return {t: known.get(t, 0) for t in tokens}  # the whole vocabulary leaves out only absent tokens

    def warm(self) -> None:
        """Read every token's document frequency now (0.27 s for a million captions), which a search would
        otherwise do after :data:`DF_ONE_BY_ONE` tokens, itself waiting for it, having counted those one by
        one (45 ms for five common words over a million captions). A database that cannot answer now (busy,
        say) is only logged: searches then count as they would have."""
        try:
            with self.engine.connect() as conn:
                version = self._version(conn)
                with self._df_lock:
                    if self._df_version == version and self._df_state in (DF_WHOLE, DF_TOO_MANY):
                        return
                found = self._all_docs(conn)
        except DBAPIError as exc:
            log.warning("keyword statistics not read ahead: %s", exc)
            return
        with self._df_lock:
            if found is not None:
                self._df, self._df_version, self._df_state = found, version, DF_WHOLE
            elif self._df_version != version:  # too many to hold: counted one by one
                self._df, self._df_version, self._df_state = {}, version, DF_TOO_MANY
            else:
                self._df_state = DF_TOO_MANY

    @staticmethod
    def _vocab(conn: Connection) -> None:
        conn.exec_driver_sql(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.{KEYWORD_TABLE}_vocab "
                             f"USING fts5vocab(main, {KEYWORD_TABLE}, row)")

    @classmethod
    def _all_docs(cls, conn: Connection) -> dict[str, int] | None:
        """{token: captions containing it} for the whole vocabulary (None: more than DF_REMEMBERED tokens)."""
        cls._vocab(conn)
        rows = conn.exec_driver_sql(f"SELECT term, doc FROM temp.{KEYWORD_TABLE}_vocab LIMIT ?",
                                    (DF_REMEMBERED + 1,)).fetchall()
        return {term: int(doc) for term, doc in rows} if len(rows) <= DF_REMEMBERED else None

    @classmethod
    def _count_docs(cls, conn: Connection, tokens: list[str]) -> dict[str, int]:
        cls._vocab(conn)
        out: dict[str, int] = {}
        for token in tokens:  # fts5vocab answers `term = ?` from its b-tree; `IN (...)` would scan it
            row = conn.exec_driver_sql(f"SELECT doc FROM temp.{KEYWORD_TABLE}_vocab WHERE term = ?",
                                       (token,)).first()
            out[token] = int(row[0]) if row else 0
        return out
