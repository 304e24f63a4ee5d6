"""The query language: plain words, ``"quoted phrases"``, ``-excluded`` terms and ``term^2`` weights.

    beach -people              beach photos; results whose caption mentions people are left out
    dog grass^2                a dog, and grass counts twice as much
    "park bench" -"red car"    phrases work everywhere a word does

Anything else is taken literally: FTS operators (AND, OR, NEAR, ``*``, ``:``), brackets, quotes
that never close and SQL fragments are just more words. The keyword index only ever sees the
output of :func:`fts_expression`, where every term is a double-quoted string of word characters.
"""

from __future__ import annotations

import re

from indexer.errors import InputError
from indexer.query import ParsedQuery

MAX_QUERY_CHARS = 2000
MAX_WEIGHT = 10.0
# a term: optional '-', then a "phrase" or a bare word, then an optional ^weight
_TERM = re.compile(r'(?P<neg>-)?(?:"(?P<phrase>[^"]*)"|(?P<word>[^\s"^]+))(?:\^(?P<weight>\d+(?:\.\d+)?))?')
_WORD = re.compile(r"\w+", re.UNICODE)
# words too common in captions to find anything by: left out of the keyword index's query (they still
# count in the embeddings); without them, "a dog on the grass" does not score every caption with "a"
STOPWORDS = frozenset(
    "a an the of in on at to is are was be and or with by for from into its his her their it this that "
    "as some".split()
)


def parse_query(text: str) -> ParsedQuery:
    """Take a query string apart; raises :class:`InputError` when nothing is left to look for."""
    raw = (text or "").strip()
    if not raw:
        raise InputError("the query is empty")
    if len(raw) > MAX_QUERY_CHARS:
        raise InputError(f"the query is {len(raw)} characters long; the limit is {MAX_QUERY_CHARS}")
    terms: list[tuple[str, float]] = []
    negative: list[str] = []
    for m in _TERM.finditer(raw):
        body = m.group("phrase") if m.group("phrase") is not None else m.group("word")
        body = " ".join(body.split())
        if not body or not _WORD.search(body):
            continue  # a lone '-', '""' or punctuation: nothing to look for
        if m.group("neg"):
            negative.append(body)
            continue
        weight = float(m.group("weight")) if m.group("weight") else 1.0
        if weight > MAX_WEIGHT:
            raise InputError(f"term weight {weight:g} for {body!r} is above the limit of {MAX_WEIGHT:g}")
        if weight > 0:
            terms.append((body, weight))
    if not terms:
        raise InputError("the query has nothing to look for" + (" (only excluded terms)" if negative else "")
                         + '; add at least one word, e.g. "beach -people"')
    return ParsedQuery(terms=tuple(terms), negative=tuple(negative), raw=raw)


def term_words(term: str) -> list[str]:
    """Lower-cased word tokens of a term (what the keyword index can match)."""
    return [w.lower() for w in _WORD.findall(term)]


def fts_phrase(term: str, drop_stopwords: bool = True) -> str | None:
    """One term as a safe FTS5 string: ``"park bench"``; None when nothing matchable is left."""
    words = term_words(term)
    if drop_stopwords and len(words) == 1 and words[0] in STOPWORDS:
        return None
    if not words:
        return None
    return '"' + " ".join(words).replace('"', '""') + '"'


def keyword_pieces(term: str) -> list[str]:
    """What the keyword index looks for in one term: a phrase (a term with spaces) stays one phrase; a
    bare word with punctuation inside ("1=1;", "NEAR(a") becomes its separate words; lone stopwords go."""
    pieces = [term] if " " in term else term_words(term)
    return [" ".join(term_words(p)) for p in pieces if fts_phrase(p)]


def fts_expression(terms: list[str] | tuple[str, ...]) -> str:
    """OR of the terms' :func:`keyword_pieces` as quoted FTS5 strings."""
    parts: list[str] = []
    for term in terms:
        for piece in keyword_pieces(term):
            phrase = fts_phrase(piece)
            if phrase and phrase not in parts:
                parts.append(phrase)
    return " OR ".join(parts)
