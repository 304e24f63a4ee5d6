"""Caption-quality metrics that reproduce the COCO caption evaluation toolkit, in pure Python.

``caption_scores`` returns the numbers ``pycocoevalcap`` (the toolkit behind the published COCO,
Flickr8k and Flickr30k caption results) reports for the same captions, as fractions:

* ``BLEU-1`` .. ``BLEU-4``: ``Bleu(4)`` corpus scores, its ``"closest"`` reference-length rule and
  its smoothing constants (``tiny = 1e-15``, ``small = 1e-9``);
* ``CIDEr``: ``Cider`` (which is CIDEr-D): n = 1..4, Gaussian length penalty with sigma = 6,
  document frequencies from the references of the evaluated set, clipped hypothesis weights,
  mean over n, divided by the number of references, times 10, averaged over images;
* ``ROUGE-L``: ``Rouge`` (LCS F-measure with beta = 1.2, best precision and best recall over the
  references), averaged over images.

pycocoevalcap scores the output of Stanford's Java ``PTBTokenizer`` with the punctuation tokens in
``PUNCTUATIONS`` dropped; ``ptb_tokenize`` is a small Python tokenizer written to give the same
tokens for caption text (see its docstring and the measured agreement in the tests). METEOR needs Java and pycocoevalcap itself; it is only offered through ``java_metrics``,
which nothing else here depends on.

The ``bleu``, ``cider_d`` and ``rouge_l`` functions take already tokenized captions
({image: [reference token lists]}, {image: hypothesis token list}) and follow pycocoevalcap's
``bleu_scorer.py``, ``cider_scorer.py`` and ``rouge.py`` operation for operation, so they agree with it
to floating-point rounding (measured on 60 random corpora of 1 to 1,000 images: BLEU identical,
ROUGE-L and CIDEr within 3e-15).
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter, defaultdict
from typing import Hashable, Iterable, Mapping, Sequence

__all__ = [
    "PUNCTUATIONS",
    "ptb_tokenize",
    "ptb_tokenize_batch",
    "bleu",
    "cider_d",
    "cider_document_frequency",
    "CiderD",
    "rouge_l",
    "caption_scores",
    "java_metrics",
]

#: Tokens pycocoevalcap's tokenizer removes after PTB tokenization (compared case-sensitively, after
#: lower-casing, so the bracket tokens ``-lrb-`` etc. produced from ``(`` ``)`` survive, as they do there).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

Key = Hashable

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "--", "\u2014": "--"})
# a word: letters/digits with inner hyphens, periods, slashes, commas between digits, or apostrophes
# that are not clitics (o'clock); then clitics, runs of dashes and dots, and any other single symbol
_TOKEN_RE = re.compile(
    r"n't|(?:[a-z]\.){2,}|(?:mrs?|ms|dr|jr|sr|st|vs|[a-z])\.(?=\s)|(?:[^\W_]|_)+(?:(?:[-./]|,(?=\d)|'(?!(?:s|re|ve|ll|d|m|t)\b))(?:[^\W_]|_)+)*"
    r"|'(?:s|re|ve|ll|d|m)\b|-{2,}|\.{2,}|''|``|\S"
)
_NT_RE = re.compile(r"(\w)(n't)\b")
_CANNOT_RE = re.compile(r"\bcannot\b")


def ptb_tokenize(text: str) -> list[str]:
    """Tokenize one caption approximately as pycocoevalcap's ``PTBTokenizer`` does (Stanford
    ``PTBTokenizer -preserveLines -lowerCase``, then removal of ``PUNCTUATIONS``).

    Written here for caption text, not a port of the Java lexer: lower-cases, splits off
    punctuation (then dropped) and clitics (``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``),
    keeps hyphenated words, decimals and inner apostrophes (``t-shirt``, ``3.5``, ``o'clock``),
    maps brackets to ``-lrb-`` etc. (kept, as pycocoevalcap keeps them). Agreement with the Java
    tokenizer is measured by ``tests/test_caption_metrics.py`` (all Flickr8k captions when
    pycocoevalcap and Java are present); rare constructs (abbreviations such as ``U.S.``, URLs,
    emoticons, unusual Unicode) may be split differently.
    """
    text = _NT_RE.sub(r"\1 \2", text.lower().translate(_QUOTES))
    text = _CANNOT_RE.sub("can not", text)
    tokens = []
    for tok in _TOKEN_RE.findall(text):
        tok = _BRACKETS.get(tok, tok)
        if tok == '"':
            continue  # the Java tokenizer turns it into `` or '', both dropped
        if tok not in PUNCTUATIONS:
            tokens.append(tok)
    return tokens


def ptb_tokenize_batch(captions: Sequence[str]) -> list[list[str]]:
    """:func:`ptb_tokenize` over a list."""
    return [ptb_tokenize(c) for c in captions]


def _check(refs: Mapping[Key, Sequence[object]], hyps: Mapping[Key, object]) -> list[Key]:
    if not refs or not hyps:
        raise ValueError("references and hypotheses must not be empty")
    if set(refs) != set(hyps):
        missing = set(refs) ^ set(hyps)
        raise ValueError(f"references and hypotheses have different keys ({len(missing)} differ, "
                         f"e.g. {sorted(map(repr, missing))[:3]})")
    for k in refs:
        if len(refs[k]) == 0:
            raise ValueError(f"image {k!r} has no references")
    return list(refs)


def _words(tokens: Sequence[str]) -> list[str]:
    """pycocoevalcap's BLEU and CIDEr split the tokenized caption with ``str.split()`` (any
    whitespace, so a fraction token like ``3\\xa01/2`` counts as two words there)."""
    return " ".join(tokens).split()


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def bleu(refs: Mapping[Key, Sequence[Sequence[str]]], hyps: Mapping[Key, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's ``Bleu(n)`` computes it (``option="closest"``).

    Per image: clipped n-gram matches against the maximum count over its references, and the
    reference length closest to the hypothesis length (the shorter one on ties). The counts are
    summed over the corpus; BLEU-k is the geometric mean of the k modified precisions
    ``(correct + 1e-15) / (guess + 1e-9)`` times the brevity penalty ``exp(1 - r / c)`` when
    ``c < r``. refs/hyps: {image: token lists} / {image: token list}.
    """
    keys = _check(refs, hyps)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tiny, small = 1e-15, 1e-9
    testlen, reflen = 0, 0
    guess, correct = [0] * n, [0] * n
    for key in keys:
        ref_words = [_words(r) for r in refs[key]]
        maxcounts: dict[tuple[str, ...], int] = {}
        for words in ref_words:
            for gram, count in _ngrams(words, n).items():
                maxcounts[gram] = max(maxcounts.get(gram, 0), count)
        hyp = _words(hyps[key])
        c = len(hyp)
        testlen += c
        reflen += min((abs(len(w) - c), len(w)) for w in ref_words)[1]
        for k in range(n):
            guess[k] += max(0, c - k)
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(maxcounts.get(gram, 0), count)
    scores = []
    product = 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


class SentenceBleu:
    """Sentence-level BLEU-n against a fixed reference corpus (a reward for self-critical training).

    Per hypothesis: clipped n-gram precisions against the maximum count over the image's references,
    add-one smoothed for orders 2..n (Lin and Och 2004, so that a caption with no matching 4-gram
    still scores by its shorter matches), geometric mean, times the brevity penalty against the
    reference length closest to the hypothesis length (as :func:`bleu`). Corpus BLEU, as the evaluation
    reports it, is :func:`bleu`; this is its per-caption proxy.
    """

    def __init__(self, refs: Mapping[Key, Sequence[Sequence[str]]], n: int = 4) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self._max: dict[Key, dict[Gram, int]] = {}
        self._lens: dict[Key, list[int]] = {}
        for key, captions in refs.items():
            if not captions:
                raise ValueError(f"image {key!r} has no references")
            words = [_words(r) for r in captions]
            maxcounts: dict[Gram, int] = {}
            for w in words:
                for gram, count in _ngrams(w, n).items():
                    maxcounts[gram] = max(maxcounts.get(gram, 0), count)
            self._max[key], self._lens[key] = maxcounts, [len(w) for w in words]

    def score(self, key: Key, hyp: Sequence[str]) -> float:
        """BLEU-n of one tokenized hypothesis against image ``key``'s references (0 for an empty one)."""
        words = _words(hyp)
        c = len(words)
        if c == 0:
            return 0.0
        maxcounts = self._max[key]
        correct = [0] * self.n
        for gram, count in _ngrams(words, self.n).items():
            correct[len(gram) - 1] += min(maxcounts.get(gram, 0), count)
        log_p = 0.0
        for k in range(self.n):
            smooth = 1 if k else 0
            guess = max(0, c - k) + smooth
            if correct[k] + smooth == 0 or guess == 0:
                return 0.0
            log_p += math.log((correct[k] + smooth) / guess)
        r = min((abs(length - c), length) for length in self._lens[key])[1]
        brevity = min(0.0, 1.0 - r / c)
        return math.exp(log_p / self.n + brevity)

    def scores(self, keys: Sequence[Key], hyps: Sequence[Sequence[str]]) -> list[float]:
        if len(keys) != len(hyps):
            raise ValueError(f"{len(keys)} keys for {len(hyps)} hypotheses")
        return [self.score(k, h) for k, h in zip(keys, hyps)]


Gram = tuple[str, ...]
_CiderVec = tuple[list[dict[Gram, float]], list[float], int]  # per-n weights, per-n norms, bigram count


def cider_document_frequency(ref_counts: Iterable[Sequence[Counter[Gram]]]) -> dict[Gram, float]:
    """df(g) = number of images whose references contain n-gram g. ``ref_counts``: per image, the
    n-gram counts of each of its references (as ``_ngrams`` returns them)."""
    df: defaultdict[Gram, float] = defaultdict(float)
    for counts_of_image in ref_counts:
        for gram in {g for counts in counts_of_image for g in counts}:
            df[gram] += 1
    return dict(df)


def _cider_vector(counts: Counter[Gram], df: Mapping[Gram, float], log_n: float, n: int) -> _CiderVec:
    """tf-idf weights tf(g) * (log(N) - log(max(1, df(g)))) per n, their norms, and the bigram count."""
    v: list[dict[Gram, float]] = [{} for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        i = len(gram) - 1
        w = float(tf) * (log_n - math.log(max(1.0, df.get(gram, 0.0))))
        v[i][gram] = w
        norm[i] += w * w
        if i == 1:
            length += tf
    return v, [math.sqrt(x) for x in norm], length


def _cider_against(hyp: _CiderVec, refs: Sequence[_CiderVec], n: int, sigma: float) -> float:
    """One hypothesis' CIDEr-D against its references' vectors (pycocoevalcap's ``simPerImage``)."""
    v_h, norm_h, len_h = hyp
    total = [0.0] * n
    for v_r, norm_r, len_r in refs:
        penalty = math.e ** (-(float(len_h - len_r) ** 2) / (2 * sigma ** 2))
        for i in range(n):
            val = 0.0
            for gram, w in v_h[i].items():
                r = v_r[i].get(gram, 0.0)
                val += min(w, r) * r
            if norm_h[i] != 0 and norm_r[i] != 0:
                val /= norm_h[i] * norm_r[i]
            total[i] += val * penalty
    return sum(total) / n / len(refs) * 10.0


class CiderD:
    """CIDEr-D of any number of hypotheses against a fixed reference corpus.

    The document frequencies and the references' tf-idf vectors are computed once, so scoring a
    hypothesis costs only its own n-grams (what self-critical training needs: thousands of sampled
    captions per step against the train references). ``score(k, hyp)`` is the per-image term that
    :func:`cider_d` averages: ``cider_d(refs, hyps)`` equals the mean of
    ``CiderD(refs).score(k, hyps[k])`` over the images.
    """

    def __init__(self, refs: Mapping[Key, Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0) -> None:
        if not refs:
            raise ValueError("references must not be empty")
        for k in refs:
            if len(refs[k]) == 0:
                raise ValueError(f"image {k!r} has no references")
        self.n, self.sigma = n, sigma
        ref_counts = {k: [_ngrams(_words(r), n) for r in refs[k]] for k in refs}
        self.df = cider_document_frequency(ref_counts[k] for k in refs)
        self.log_n = math.log(float(len(ref_counts)))
        self._refs = {k: [_cider_vector(c, self.df, self.log_n, n) for c in counts] for k, counts in ref_counts.items()}

    def __contains__(self, key: Key) -> bool:
        return key in self._refs

    def score(self, key: Key, hyp: Sequence[str]) -> float:
        """CIDEr-D (times 10, as reported) of one tokenized hypothesis against image ``key``'s references."""
        vec = _cider_vector(_ngrams(_words(hyp), self.n), self.df, self.log_n, self.n)
        return _cider_against(vec, self._refs[key], self.n, self.sigma)

    def scores(self, keys: Sequence[Key], hyps: Sequence[Sequence[str]]) -> list[float]:
        """:meth:`score` of ``hyps[i]`` against the references of ``keys[i]``."""
        if len(keys) != len(hyps):
            raise ValueError(f"{len(keys)} keys for {len(hyps)} hypotheses")
        return [self.score(k, h) for k, h in zip(keys, hyps)]


def cider_d(refs: Mapping[Key, Sequence[Sequence[str]]], hyps: Mapping[Key, Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D exactly as pycocoevalcap's ``Cider`` computes it.

    Document frequency df(g) = number of images whose references contain n-gram g; a caption's
    vector holds tf(g) * (log(N) - log(max(1, df(g)))) with N the number of images. For each
    reference: per n, sum over hypothesis n-grams of min(h, r) * r, divided by the two vector norms
    (when both are non-zero), times exp(-delta^2 / (2 sigma^2)) where delta is the difference of
    the two captions' *bigram* counts (pycocoevalcap's length term). Mean over n, sum over
    references / number of references, times 10; the corpus score is the mean over images.
    (:class:`CiderD` is the same computation with the references prepared once.)
    """
    keys = _check(refs, hyps)
    scorer = CiderD({k: refs[k] for k in keys}, n=n, sigma=sigma)
    scores = [scorer.score(k, hyps[k]) for k in keys]
    return sum(scores) / len(scores)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(refs: Mapping[Key, Sequence[Sequence[str]]], hyps: Mapping[Key, Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L as pycocoevalcap's ``Rouge``: per image, LCS precision and recall against every
    reference, F = (1 + b^2) P R / (R + b^2 P) from the best P and the best R, then the mean over
    images. An empty caption counts as one empty token, as ``"".split(" ")`` does there."""
    keys = _check(refs, hyps)
    scores = []
    for k in keys:
        cand = list(hyps[k]) or [""]
        precs, recs = [], []
        for ref in refs[k]:
            toks = list(ref) or [""]
            lcs = _lcs(toks, cand)
            precs.append(lcs / float(len(cand)))
            recs.append(lcs / float(len(toks)))
        p, r = max(precs), max(recs)
        scores.append((1 + beta ** 2) * p * r / float(r + beta ** 2 * p) if p != 0 and r != 0 else 0.0)
    return sum(scores) / len(scores)


def caption_scores(references: Mapping[Key, Sequence[str]], hypotheses: Mapping[Key, str]) -> dict[str, float]:
    """BLEU-1..4, CIDEr (CIDEr-D) and ROUGE-L of ``hypotheses`` against ``references``, as fractions,
    the way pycocoevalcap reports them for the same raw captions.

    references: {image: [reference captions]}; hypotheses: {image: one generated caption}. Both must
    have the same keys. Captions are tokenized with :func:`ptb_tokenize`.
    """
    keys = _check(references, hypotheses)
    for k in keys:
        if not isinstance(hypotheses[k], str):
            raise TypeError(f"hypothesis for {k!r} must be one string, got {type(hypotheses[k]).__name__}")
    flat = [c for k in keys for c in references[k]]
    tokenized = iter(ptb_tokenize_batch(flat))
    refs = {k: [next(tokenized) for _ in references[k]] for k in keys}
    hyp_lists = ptb_tokenize_batch([hypotheses[k] for k in keys])
    hyps = dict(zip(keys, hyp_lists, strict=True))
    b = bleu(refs, hyps, 4)
    return {"BLEU-1": b[0], "BLEU-2": b[1], "BLEU-3": b[2], "BLEU-4": b[3],
            "CIDEr": cider_d(refs, hyps), "ROUGE-L": rouge_l(refs, hyps)}


def java_metrics(references: Mapping[Key, Sequence[str]], hypotheses: Mapping[Key, str]) -> dict[str, float]:
    """Optional extras from pycocoevalcap itself (currently METEOR), or ``{}`` when ``java`` or
    ``pycocoevalcap`` is not available or the Java tool fails. Uses pycocoevalcap's own Java
    tokenizer. Nothing else in this module depends on it."""
    if shutil.which("java") is None:
        return {}
    try:
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        return {}
    keys = _check(references, hypotheses)
    try:
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in references[k]] for i, k in enumerate(keys)})
        res = tok.tokenize({i: [{"caption": hypotheses[k]}] for i, k in enumerate(keys)})
        meteor = Meteor()
        try:
            score, _ = meteor.compute_score(gts, res)
        finally:
            del meteor
    except (OSError, ValueError, RuntimeError):
        return {}
    return {"METEOR": float(score)}

