"""The query language: plain words, ``"quoted phrases"``, ``-excluded`` terms and ``term^2`` weights.

    beach -people              beach photos; results whose caption mentions people are left out
    dog grass^2                a dog, and grass counts twice as much
    "park bench" -"red car"    phrases work everywhere a word does

Anything else is taken literally: FTS operators (AND, OR, NEAR, ``*``, ``:``), brackets, quotes
that never close and SQL fragments are just more words. A keyword index only ever receives
:func:`keyword_phrases`: runs of lower-cased word characters, which each backend quotes in its own
syntax and binds as a parameter (``indexer/storage/keywords.py``).
"""

from __future__ import annotations

import re

from retrieval.errors import InputError
from retrieval.query import ParsedQuery

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


def phrase_of(term: str, drop_stopwords: bool = True) -> str | None:
    """One term as the run of lower-cased words a keyword index looks for (``"park bench"``); None when
    nothing matchable is left (no word, or a lone stopword when ``drop_stopwords``)."""
    words = term_words(term)
    if not words or (drop_stopwords and len(words) == 1 and words[0] in STOPWORDS):
        return None
    return " ".join(words)


def keyword_pieces(term: str) -> list[str]:
    """What the keyword index looks for in one term: a phrase (a term with spaces) stays one phrase; a
    bare word with punctuation inside ("1=1;", "NEAR(a") becomes its separate words; lone stopwords go."""
    pieces = [term] if " " in term else term_words(term)
    return [phrase for phrase in (phrase_of(p) for p in pieces) if phrase]


def keyword_phrases(terms: list[str] | tuple[str, ...]) -> list[str]:
    """The distinct phrases of every term's :func:`keyword_pieces`, in order: a caption matches the
    terms when it contains any of them."""
    return list(dict.fromkeys(piece for term in terms for piece in keyword_pieces(term)))


def excluded_phrases(negative: list[str] | tuple[str, ...]) -> list[str]:
    """The phrases of excluded terms (stopwords kept: ``-the`` means what it says)."""
    return list(dict.fromkeys(p for p in (phrase_of(t, drop_stopwords=False) for t in negative) if p))
