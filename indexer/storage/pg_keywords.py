"""The keyword index on PostgreSQL: FTS5's BM25, computed in SQL over the tokens FTS5 would store.

PostgreSQL's own full-text search (``tsvector``, ``ts_rank``) splits and stems words differently from
SQLite's ``porter unicode61`` tokenizer and ranks by another formula, so the same query would find
and order captions differently on the two databases. Instead, the captions are tokenized here by
that very tokenizer (an in-memory SQLite FTS5 table, ``indexer/storage/pool_keywords.py``), and the
tokens go into tables that PostgreSQL indexes with b-trees:

    keyword_docs   (image_id -> images.id, length)          one row per captioned image: its token count
    keyword_terms  (term, image_id, tf, length, positions[]) one row per distinct token of a caption
    keyword_vocab  (term, docs)                             captions holding each token (FTS5's fts5vocab)
    keyword_stats  (images, tokens)                         FTS5's totals: rows and tokens

BM25 is then FTS5's formula in SQL, in double precision: for each phrase, its exact document
frequency (a phrase counts where its tokens stand in a row, as in FTS5), IDF = ln((N - n + 0.5) /
(n + 0.5)) (at least 1e-6), N = rows of ``images`` (FTS5's external-content table counts uncaptioned
rows too), the average length = all tokens / N, k1 = 1.2, b = 0.75. So ``top`` and ``doc_freq``
answer what ``SqliteKeywords`` answers for the same captions, to the last bit or nearly (the order of
a sum of phrases may differ; tests/test_postgres.py compares them).

Keeping it in step: ``Store.write`` calls :meth:`PostgresKeywords.update` for the rows it writes, in
the same transaction. A trigger on ``images`` deletes an image's entry whenever its caption changes
(by any path, pixquery's or a hand-written UPDATE), and deleting an image deletes its entry (foreign
keys ``ON DELETE CASCADE``), so an entry is never stale: at worst missing, and every
:meth:`install` (each time a store opens) and :meth:`update` fills what is missing. Statement-level
triggers keep the totals and the vocabulary in step with the rows. Writers take a transaction-level
advisory lock, so two processes never fill the same entry at once.

User text never reaches SQL: phrases become token lists bound as parameters; the only thing
formatted into a statement is the shape of the query (how many phrases and tokens), as integers.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping, Sequence

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from indexer.storage.keywords import KeywordIndex
from indexer.storage.pool_keywords import B, K1, PoolKeywords

log = logging.getLogger(__name__)

DOCS, TERMS, VOCAB, STATS = "keyword_docs", "keyword_terms", "keyword_vocab", "keyword_stats"
TABLES = (TERMS, DOCS, VOCAB, STATS)  # in the order they can be dropped
PREFIX = "pixquery_kw_"  # of every trigger and function here
FILL_CHUNK = 2000  # captions tokenized and inserted at a time
VACUUM_AFTER = 5000  # entries filled at once after which the tables are vacuumed (see settle())


def _counter(name: str, table: str, insert_sql: str, delete_sql: str) -> tuple[str, ...]:
    """A function and two statement-level triggers on ``table`` that keep a running total from its
    inserted (``new_rows``) and deleted (``old_rows``) rows."""
    return (
        f"CREATE OR REPLACE FUNCTION {PREFIX}{name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF TG_OP = 'INSERT' THEN {insert_sql}; ELSE {delete_sql}; END IF; RETURN NULL; END $$",
        f"CREATE TRIGGER {PREFIX}{name}_ins AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {PREFIX}{name}()",
        f"CREATE TRIGGER {PREFIX}{name}_del AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {PREFIX}{name}()",
    )


_DDL = (
    f"CREATE TABLE {DOCS} (image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE, "
    f"length INTEGER NOT NULL)",
    # tf (= the positions' count) and length (the caption's tokens again) in the primary key's index, so
    # that ranking by single words reads the index only
    # (no foreign key to keyword_docs: a row-by-row check per token costs more than the whole insert; the
    # docs' delete trigger below removes their terms instead)
    f'CREATE TABLE {TERMS} (term TEXT COLLATE "C" NOT NULL, image_id INTEGER NOT NULL, '
    f"tf INTEGER NOT NULL, length INTEGER NOT NULL, "
    f"positions INTEGER[] NOT NULL, PRIMARY KEY (term, image_id) INCLUDE (tf, length))",
    f"CREATE INDEX {TERMS}_image ON {TERMS} (image_id)",
    f'CREATE TABLE {VOCAB} (term TEXT COLLATE "C" PRIMARY KEY, docs INTEGER NOT NULL)',  # FTS5's fts5vocab
    f"CREATE TABLE {STATS} (id INTEGER PRIMARY KEY CHECK (id = 1), images BIGINT NOT NULL, tokens BIGINT NOT NULL)",
    f"INSERT INTO {STATS} VALUES (1, (SELECT count(*) FROM images), 0)",
    # a changed caption's entry goes (and is filled again by update() or the next install())
    f"CREATE OR REPLACE FUNCTION {PREFIX}stale() RETURNS trigger LANGUAGE plpgsql AS "
    f"$$ BEGIN DELETE FROM {DOCS} WHERE image_id = OLD.id; RETURN NULL; END $$",
    f"CREATE TRIGGER {PREFIX}stale AFTER UPDATE OF caption ON images FOR EACH ROW "
    f"WHEN (OLD.caption IS DISTINCT FROM NEW.caption) EXECUTE FUNCTION {PREFIX}stale()",
    # FTS5's totals: rows (every image, captioned or not, as FTS5's external-content table counts them),
    # tokens, and each token's document frequency
    *_counter("images", "images", f"UPDATE {STATS} SET images = images + (SELECT count(*) FROM new_rows)",
              f"UPDATE {STATS} SET images = images - (SELECT count(*) FROM old_rows)"),
    *_counter("docs", DOCS, f"UPDATE {STATS} SET tokens = tokens + (SELECT coalesce(sum(length), 0) FROM new_rows)",
              f"UPDATE {STATS} SET tokens = tokens - (SELECT coalesce(sum(length), 0) FROM old_rows); "
              f"DELETE FROM {TERMS} WHERE image_id IN (SELECT image_id FROM old_rows)"),
    *_counter("terms", TERMS,
              f"INSERT INTO {VOCAB} AS v (term, docs) SELECT term, count(*) FROM new_rows GROUP BY term "
              f"ON CONFLICT (term) DO UPDATE SET docs = v.docs + excluded.docs",
              f"UPDATE {VOCAB} v SET docs = v.docs - o.n FROM (SELECT term, count(*) AS n FROM old_rows "
              f"GROUP BY term) o WHERE v.term = o.term"),
)
TRIGGERS = {  # name -> table
    f"{PREFIX}stale": "images", f"{PREFIX}images_ins": "images", f"{PREFIX}images_del": "images",
    f"{PREFIX}docs_ins": DOCS, f"{PREFIX}docs_del": DOCS, f"{PREFIX}terms_ins": TERMS, f"{PREFIX}terms_del": TERMS,
}

# captioned images without an entry (new, or whose caption changed); ``AND i.id = ANY(:ids)`` narrows it
_MISSING = (f"SELECT i.id, i.caption FROM images i LEFT JOIN {DOCS} d ON d.image_id = i.id "
            f"WHERE i.caption IS NOT NULL AND d.image_id IS NULL")


def lock_writers(conn: Connection) -> None:
    """Serialise writers of one index (one schema of one database) until this transaction ends."""
    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('pixquery:' || current_schema()))")


def _phrase_hits(n: int, tokens: Sequence[str], params: dict) -> str:
    """SQL giving (image_id, tf, length) for every caption containing the token run ``tokens`` (two or more)."""
    for k, token in enumerate(tokens):
        params[f"t{n}_{k}"] = token
    # captions holding every token (a join on image_id), then the positions where the run starts
    joins = " ".join(f"JOIN {TERMS} x{k} ON x{k}.image_id = x0.image_id AND x{k}.term = :t{n}_{k}"
                     for k in range(1, len(tokens)))
    follows = " AND ".join(f"o.pos + {k} = ANY(x{k}.positions)" for k in range(1, len(tokens)))
    return (f"SELECT image_id, tf, length FROM (SELECT x0.image_id, x0.length, "
            f"(SELECT count(*) FROM unnest(x0.positions) AS o(pos) WHERE {follows}) AS tf "
            f"FROM {TERMS} x0 {joins} WHERE x0.term = :t{n}_0) m WHERE tf > 0")


class PostgresKeywords(KeywordIndex):
    """BM25 over the captions of a PostgreSQL store, ranked as SQLite's FTS5 ranks them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._filled = 0  # entries filled by install() since the last settle()

    # --- keeping it in step ---------------------------------------------------------------------------
    def install(self, conn: Connection) -> None:
        lock_writers(conn)
        tables = conn.execute(text("SELECT count(*) FROM unnest(CAST(:t AS text[])) AS t(name) "
                                   "WHERE to_regclass(name) IS NOT NULL"), {"t": list(TABLES)}).scalar()
        triggers = conn.execute(text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND "
                                     "tgname = ANY(CAST(:g AS text[]))"), {"g": list(TRIGGERS)}).scalar()
        if (tables, triggers) != (len(TABLES), len(TRIGGERS)):  # new, or from before keyword search: make it
            self.uninstall(conn)
            for statement in _DDL:
                conn.exec_driver_sql(statement)
        self._filled += self._fill(conn, None)

    def settle(self) -> None:
        """After a large fill has committed: VACUUM (ANALYZE) the tables, so that ranking reads the
        indexes only from the start (index-only scans need the visibility map that VACUUM sets;
        autovacuum would get there later). Needs no transaction; a refusal (not the tables' owner) is
        only logged."""
        if self._filled < VACUUM_AFTER:
            return
        self._filled = 0
        try:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                for table in (TERMS, DOCS, VOCAB):
                    conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")
        except DBAPIError as exc:
            log.warning("could not vacuum the keyword index's tables (autovacuum will): %s", exc.orig)

    def uninstall(self, conn: Connection) -> None:
        for name, table in TRIGGERS.items():
            if conn.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar() is not None:
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        for name in ("stale", "images", "docs", "terms"):
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {PREFIX}{name}()")
        for table in TABLES:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")

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
            sql, params = _MISSING + " AND i.id = ANY(CAST(:ids AS integer[]))", {"ids": ids}
        missing = conn.execute(text(sql + " ORDER BY i.id"), params).all()
        for start in range(0, len(missing), FILL_CHUNK):
            chunk = {int(i): c for i, c in missing[start:start + FILL_CHUNK]}
            with PoolKeywords(chunk) as tokenized:
                doc_lengths = [tokenized.lengths.get(i, 0) for i in chunk]
                terms = [(term, i, ",".join(map(str, sorted(offsets))), tokenized.lengths[i])
                         for i, where in tokenized.positions.items() for term, offsets in where.items()]
            # one statement per chunk, its rows as arrays (positions as "0,3" strings: arrays of arrays
            # must be rectangular)
            conn.execute(text(f"INSERT INTO {DOCS} (image_id, length) SELECT * FROM unnest(CAST(:ids AS integer[]), "
                              f"CAST(:lengths AS integer[])) ON CONFLICT DO NOTHING"),
                         {"ids": list(chunk), "lengths": doc_lengths})
            if terms:
                words, term_ids, positions, term_lengths = (list(column) for column in zip(*terms))
                conn.execute(text(
                    f"INSERT INTO {TERMS} (term, image_id, tf, length, positions) "
                    f"SELECT t, i, cardinality(string_to_array(p, ',')), n, string_to_array(p, ',')::integer[] "
                    f"FROM unnest(CAST(:t AS text[]), "
                    f"CAST(:i AS integer[]), CAST(:p AS text[]), CAST(:n AS integer[])) AS u(t, i, p, n) "
                    f"ON CONFLICT DO NOTHING"), {"t": words, "i": term_ids, "p": positions, "n": term_lengths})
        return len(missing)

    def check(self) -> list[str]:
        """What disagrees with the captions: captioned images without an entry, entries of images without
        a caption, and totals (rows, tokens, document frequencies) that differ from a recount (empty when
        consistent). Entries are never stale (see the module's notes)."""
        with self.engine.connect() as conn:
            missing = conn.execute(text(f"SELECT count(*) FROM ({_MISSING}) m")).scalar()
            extra = conn.execute(text(f"SELECT count(*) FROM {DOCS} d JOIN images i ON i.id = d.image_id "
                                      f"WHERE i.caption IS NULL")).scalar()
            totals = conn.execute(text(
                f"SELECT s.images = (SELECT count(*) FROM images) AND s.tokens = (SELECT coalesce(sum(length), 0) "
                f"FROM {DOCS}) FROM {STATS} s")).scalar()
            vocab = conn.execute(text(
                f"SELECT count(*) FROM (SELECT term, count(*) AS n FROM {TERMS} GROUP BY term) t "
                f"FULL JOIN (SELECT * FROM {VOCAB} WHERE docs <> 0) v ON v.term = t.term "
                f"WHERE v.docs IS DISTINCT FROM t.n")).scalar()
        problems = []
        if missing:
            problems.append(f"{missing} captioned images are missing from the keyword index")
        if extra:
            problems.append(f"{extra} images without a caption are in the keyword index")
        if not totals:
            problems.append("the keyword index's row and token totals differ from a recount")
        if vocab:
            problems.append(f"{vocab} document frequencies in the keyword index differ from a recount")
        return problems

    def rebuild(self) -> None:
        with self.engine.begin() as conn:
            lock_writers(conn)
            self.uninstall(conn)
            for statement in _DDL:
                conn.exec_driver_sql(statement)
            self._filled += self._fill(conn, None)
        self.settle()

    # --- asking it ------------------------------------------------------------------------------------
    def top(self, phrases: Sequence[str], limit: int, allowed: set[int] | None = None) -> list[tuple[int, float]]:
        if not phrases or limit < 1 or (allowed is not None and not allowed):
            return []
        with PoolKeywords({}) as tokenizer:
            runs = [tokens for tokens in (tokenizer.tokens(p) for p in dict.fromkeys(phrases)) if tokens]
        if not runs:  # phrases with no token the tokenizer keeps: FTS5 matches nothing either
            return []
        f = "::float8"
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SET LOCAL jit = off")  # compiling these small queries costs more than running them
            n_rows, n_tokens = conn.execute(text(f"SELECT images, tokens FROM {STATS}")).one()
            if not n_rows:
                return []
            singles = self._doc_freq(conn, [run[0] for run in runs if len(run) == 1])
            params: dict = {"limit": int(limit), "avgdl": n_tokens / n_rows, "n_rows": float(n_rows)}
            ctes, parts = [], []
            for n, run in enumerate(runs):
                # FTS5's bm25() (fts5_aux.c), one phrase at a time, in double precision; a single token's IDF
                # from its document frequency (computed here as FTS5 computes it), a phrase's from its hits
                bm25 = (f"((tf{f} * ({K1}{f} + 1.0{f})) / (tf{f} + {K1}{f} * (1.0{f} - {B}{f} + {B}{f} * "
                        f"length{f} / :avgdl)))")
                if len(run) == 1:
                    df = singles.get(run[0], 0)
                    if not df:
                        continue
                    params[f"t{n}_0"], params[f"idf{n}"] = run[0], _idf(n_rows, df)
                    parts.append(f"SELECT image_id, :idf{n} * {bm25} AS s FROM {TERMS} WHERE term = :t{n}_0")
                else:
                    idf = f"ln((:n_rows - k.n + 0.5{f}) / (k.n + 0.5{f}))"
                    ctes.append(f"p{n} AS MATERIALIZED ({_phrase_hits(n, run, params)})")
                    parts.append(f"SELECT image_id, (CASE WHEN {idf} <= 0 THEN 1e-6{f} ELSE {idf} END) * {bm25} AS s "
                                 f"FROM p{n} CROSS JOIN (SELECT count(*){f} AS n FROM p{n}) k")
            if not parts:
                return []
            where = ""
            if allowed is not None:
                params["allowed"] = sorted(int(i) for i in allowed)
                where = "WHERE image_id = ANY(CAST(:allowed AS integer[]))"
            sql = (("WITH " + ", ".join(ctes) + " " if ctes else "")
                   + f"SELECT image_id, sum(s) AS score FROM ({' UNION ALL '.join(parts)}) x {where} "
                   f"GROUP BY image_id ORDER BY score DESC, image_id LIMIT :limit")
            return [(int(i), float(score)) for i, score in conn.execute(text(sql), params)]

    def doc_freq(self, tokens: Iterable[str]) -> dict[str, int]:
        tokens = list(dict.fromkeys(tokens))
        if not tokens:
            return {}
        with self.engine.connect() as conn:
            return self._doc_freq(conn, tokens)

    @staticmethod
    def _doc_freq(conn: Connection, tokens: list[str]) -> dict[str, int]:
        found: Mapping[str, int] = dict(conn.execute(text(
            f"SELECT term, docs FROM {VOCAB} WHERE term = ANY(CAST(:tokens AS text[]))"), {"tokens": tokens}).all())
        return {t: int(found.get(t, 0)) for t in tokens}


def _idf(n_rows: int, df: int) -> float:
    """FTS5's IDF (fts5_aux.c): log((N - n + 0.5) / (n + 0.5)), 1e-6 where that is not positive."""
    idf = math.log((n_rows - df + 0.5) / (df + 0.5))
    return idf if idf > 0 else 1e-6
