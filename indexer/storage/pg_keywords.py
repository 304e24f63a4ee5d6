"""The keyword index on PostgreSQL: FTS5's BM25, computed in SQL over the tokens FTS5 would store.

PostgreSQL's own full-text search (``tsvector``, ``ts_rank``) splits and stems words differently from
SQLite's ``porter unicode61`` tokenizer and ranks by another formula, so the same query would find
and order captions differently on the two databases. Instead, the captions are tokenized here by
that very tokenizer (an in-memory SQLite FTS5 table, ``indexer/storage/pool_keywords.py``), and the
tokens go into two tables that PostgreSQL indexes with b-trees:

    keyword_docs   (image_id -> images.id, length)    one row per captioned image: its token count
    keyword_terms  (term, image_id, positions[])      one row per distinct token of a caption

BM25 is then FTS5's formula in SQL, in double precision: for each phrase, its exact document
frequency (a phrase counts where its tokens stand in a row, as in FTS5), IDF = ln((N - n + 0.5) /
(n + 0.5)) (at least 1e-6), N = rows of ``images`` (FTS5's external-content table counts uncaptioned
rows too), the average length = all tokens / N, k1 = 1.2, b = 0.75. So ``top`` and ``doc_freq``
answer what ``SqliteKeywords`` answers for the same captions (tests/test_postgres.py compares them).

Keeping it in step: ``Store.write`` calls :meth:`PostgresKeywords.update` for the rows it writes, in
the same transaction. A trigger on ``images`` deletes an image's entry whenever its caption changes
(by any path, pixquery's or a hand-written UPDATE), and deleting an image deletes its entry (foreign
keys ``ON DELETE CASCADE``), so an entry is never stale: at worst missing, and every
:meth:`install` (each time a store opens) and :meth:`update` fills what is missing. Writers take a
transaction-level advisory lock, so two processes never fill the same entry at once.

User text never reaches SQL: phrases become token lists bound as parameters; the only thing
formatted into a statement is the shape of the query (how many phrases and tokens), as integers.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from indexer.storage.keywords import KeywordIndex
from indexer.storage.pool_keywords import B, K1, PoolKeywords

DOCS, TERMS = "keyword_docs", "keyword_terms"
TRIGGER = FUNCTION = "pixquery_keyword_stale"
FILL_CHUNK = 2000  # captions tokenized and inserted at a time

_DDL = (
    f"CREATE TABLE IF NOT EXISTS {DOCS} ("
    f"image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE, length INTEGER NOT NULL)",
    f'CREATE TABLE IF NOT EXISTS {TERMS} (term TEXT COLLATE "C" NOT NULL, '
    f"image_id INTEGER NOT NULL REFERENCES {DOCS}(image_id) ON DELETE CASCADE, positions INTEGER[] NOT NULL, "
    f"PRIMARY KEY (term, image_id))",
    f"CREATE INDEX IF NOT EXISTS {TERMS}_image ON {TERMS} (image_id)",
    f"CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS "
    f"$$ BEGIN DELETE FROM {DOCS} WHERE image_id = OLD.id; RETURN NULL; END $$",
    f"CREATE TRIGGER {TRIGGER} AFTER UPDATE OF caption ON images FOR EACH ROW "
    f"WHEN (OLD.caption IS DISTINCT FROM NEW.caption) EXECUTE FUNCTION {FUNCTION}()",
)

# captioned images without an entry (new, or whose caption changed); ``AND i.id = ANY(:ids)`` narrows it
_MISSING = (f"SELECT i.id, i.caption FROM images i LEFT JOIN {DOCS} d ON d.image_id = i.id "
            f"WHERE i.caption IS NOT NULL AND d.image_id IS NULL")


def lock_writers(conn: Connection) -> None:
    """Serialise writers of one index (one schema of one database) until this transaction ends."""
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('pixquery:' || current_schema()))")


def _phrase_hits(n: int, tokens: Sequence[str], params: dict) -> str:
    """SQL giving (image_id, tf, phrase = n) for every caption containing the token run ``tokens``."""
    for k, token in enumerate(tokens):
        params[f"t{n}_{k}"] = token
    if len(tokens) == 1:
        return f"SELECT image_id, cardinality(positions) AS tf, {n} AS phrase FROM {TERMS} WHERE term = :t{n}_0"
    joins = " ".join(
        f"JOIN {TERMS} x{k} ON x{k}.image_id = x0.image_id AND x{k}.term = :t{n}_{k} AND o.pos + {k} = ANY(x{k}.positions)"
        for k in range(1, len(tokens)))
    return (f"SELECT x0.image_id, count(*) AS tf, {n} AS phrase FROM {TERMS} x0 "
            f"CROSS JOIN LATERAL unnest(x0.positions) AS o(pos) {joins} WHERE x0.term = :t{n}_0 GROUP BY x0.image_id")


class PostgresKeywords(KeywordIndex):
    """BM25 over the captions of a PostgreSQL store, ranked as SQLite's FTS5 ranks them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- keeping it in step ---------------------------------------------------------------------------
    def install(self, conn: Connection) -> None:
        lock_writers(conn)
        have = conn.exec_driver_sql(
            "SELECT to_regclass(%(d)s) IS NOT NULL AND to_regclass(%(t)s) IS NOT NULL AND EXISTS ("
            "SELECT 1 FROM pg_trigger WHERE tgname = %(g)s AND tgrelid = to_regclass('images'))",
            {"d": DOCS, "t": TERMS, "g": TRIGGER}).scalar()
        if not have:  # a new index, or one from before keyword search: create, then fill below
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {TRIGGER} ON images")
            for statement in _DDL:
                conn.exec_driver_sql(statement)
        self._fill(conn, None)

    def uninstall(self, conn: Connection) -> None:
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {TRIGGER} ON images")
        conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {FUNCTION}()")
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {TERMS}")
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {DOCS}")

    def update(self, conn: Connection, ids: Iterable[int]) -> None:
        """Entries for those of ``ids`` whose caption is new or changed (rows just written in ``conn``'s
        transaction; the caller holds :func:`lock_writers`)."""
        ids = sorted({int(i) for i in ids})
        if ids:
            self._fill(conn, ids)

    def _fill(self, conn: Connection, ids: list[int] | None) -> int:
        """Tokenize and insert the captions that have no entry (among ``ids``; None: all). Returns how many."""
        sql, params = _MISSING, {}
        if ids is not None:
            sql, params = _MISSING + " AND i.id = ANY(:ids)", {"ids": ids}
        missing = conn.execute(text(sql + " ORDER BY i.id"), params).all()
        for start in range(0, len(missing), FILL_CHUNK):
            chunk = {int(i): c for i, c in missing[start:start + FILL_CHUNK]}
            with PoolKeywords(chunk) as tokenized:
                docs = [{"i": i, "n": tokenized.lengths.get(i, 0)} for i in chunk]
                terms = [{"t": term, "i": i, "p": sorted(offsets)}
                         for i, where in tokenized.positions.items() for term, offsets in where.items()]
            conn.execute(text(f"INSERT INTO {DOCS} (image_id, length) VALUES (:i, :n) ON CONFLICT DO NOTHING"), docs)
            if terms:
                conn.execute(text(f"INSERT INTO {TERMS} (term, image_id, positions) VALUES (:t, :i, :p) "
                                  f"ON CONFLICT DO NOTHING"), terms)
        return len(missing)

    def check(self) -> list[str]:
        """What disagrees with the captions: captioned images without an entry, and entries of images
        without a caption (empty when consistent). Entries are never stale (see the module's notes)."""
        with self.engine.connect() as conn:
            missing = conn.execute(text(f"SELECT count(*) FROM ({_MISSING}) m")).scalar()
            extra = conn.execute(text(f"SELECT count(*) FROM {DOCS} d JOIN images i ON i.id = d.image_id "
                                      f"WHERE i.caption IS NULL")).scalar()
        problems = []
        if missing:
            problems.append(f"{missing} captioned images are missing from the keyword index")
        if extra:
            problems.append(f"{extra} images without a caption are in the keyword index")
        return problems

    def rebuild(self) -> None:
        with self.engine.begin() as conn:
            lock_writers(conn)
            conn.exec_driver_sql(f"DELETE FROM {DOCS}")
            self._fill(conn, None)

    # --- asking it ------------------------------------------------------------------------------------
    def top(self, phrases: Sequence[str], limit: int, allowed: set[int] | None = None) -> list[tuple[int, float]]:
        if not phrases or limit < 1 or (allowed is not None and not allowed):
            return []
        with PoolKeywords({}) as tokenizer:
            runs = [tokens for tokens in (tokenizer.tokens(p) for p in dict.fromkeys(phrases)) if tokens]
        if not runs:  # phrases with no token the tokenizer keeps: FTS5 matches nothing either
            return []
        params: dict = {"limit": int(limit)}
        hits = " UNION ALL ".join(_phrase_hits(n, tokens, params) for n, tokens in enumerate(runs))
        where = ""
        if allowed is not None:
            params["allowed"] = sorted(int(i) for i in allowed)
            where = "WHERE h.image_id = ANY(:allowed)"
        f = "::float8"
        idf = f"ln((s.n_rows - df.n + 0.5{f}) / (df.n + 0.5{f}))"
        sql = (
            f"WITH hits AS ({hits}), "
            f"df AS (SELECT phrase, count(*){f} AS n FROM hits GROUP BY phrase), "
            f"s AS (SELECT (SELECT count(*) FROM images){f} AS n_rows, "
            f"(SELECT coalesce(sum(length), 0) FROM {DOCS}){f} AS n_tokens) "
            f"SELECT h.image_id, sum(CASE WHEN {idf} <= 0 THEN 1e-6{f} ELSE {idf} END "
            f"* ((h.tf{f} * ({K1}{f} + 1.0{f})) / (h.tf{f} + {K1}{f} * (1.0{f} - {B}{f} "
            f"+ {B}{f} * d.length{f} / (s.n_tokens / s.n_rows))))) AS score "
            f"FROM hits h JOIN df ON df.phrase = h.phrase JOIN {DOCS} d ON d.image_id = h.image_id CROSS JOIN s "
            f"{where} GROUP BY h.image_id ORDER BY score DESC, h.image_id LIMIT :limit")
        with self.engine.connect() as conn:
            return [(int(i), float(s)) for i, s in conn.execute(text(sql), params)]

    def doc_freq(self, tokens: Iterable[str]) -> dict[str, int]:
        tokens = list(dict.fromkeys(tokens))
        if not tokens:
            return {}
        with self.engine.connect() as conn:
            found: Mapping[str, int] = dict(conn.execute(text(
                f"SELECT term, count(*) FROM {TERMS} WHERE term = ANY(:tokens) GROUP BY term"), {"tokens": tokens}).all())
        return {t: int(found.get(t, 0)) for t in tokens}
