"""What a text query asks of the ranking: the ranking modes, the fused weights and the parsed query.

Plain dataclasses shared by the Engine, the CLI and the app; the pure fusion math is in
``retrieval/fusion.py`` and the ranking over an index in ``indexer/search/ranker.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from retrieval.errors import InputError

MODES = ("image", "caption", "keyword", "tags", "fused")  # text->image ranking modes
# the signals of fused ranking, in order: the first stage ranks a candidate pool by a normalised weighted
# sum of these ...
FIRST_STAGE = ("image", "caption", "keyword", "meta", "tags")
# ... and the second stage re-scores its best few with these (read from the scorer's stored memories)
SECOND_STAGE = ("likelihood", "match")
SIGNALS = FIRST_STAGE + SECOND_STAGE  # every weight of FusionWeights, by name


@dataclass(frozen=True)
class FusionWeights:
    """How much each signal counts in ``fused`` mode (non-negative; image, caption or keyword positive).

    image: query vs image embedding; caption: query vs the embedding of the generated caption;
    keyword: BM25 of the query words in the generated caption; meta: BM25 of the query words in the
    image's imported catalogue text (SKU, title, brand...; 0 by default: on, it also brings the images
    whose catalogue text has the words into the candidates); likelihood: how likely the caption
    decoder finds the query as a caption of the image; match: how well the match head finds the query
    fits the image (these two re-score the best candidates only); tags: zero-shot score of the query
    against the image's classifier classes (its weight is scaled by how much the query names a concept,
    retrieval/tagging.py).
    Defaults: tuned on Flickr8k dev with ``pixquery eval retrieval --tune`` (before tags); tags (weight,
    gate) chosen on Flickr8k train and the tune half of the out-of-domain queries only, by
    docs/scripts/choose_tag_weights.py (docs/BENCHMARKS.md).
    """

    image: float = 1.0
    caption: float = 0.0
    keyword: float = 0.05
    likelihood: float = 0.3
    match: float = 0.1
    meta: float = 0.0
    tags: float = 1.2  # the last field: positional FusionWeights(image, caption, keyword, likelihood, match, meta) still work

    def __post_init__(self) -> None:
        values = self.to_dict()
        if any(not (v >= 0) or v > 100 for v in values.values()):  # `not >=` also catches NaN
            raise InputError(f"fusion weights must be between 0 and 100, got {values}")
        if not any(values[name] > 0 for name in FIRST_STAGE):
            raise InputError(f"at least one of the {', '.join(FIRST_STAGE)} weights must be above 0")

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in SIGNALS}

    @classmethod
    def parse(cls, spec: str) -> "FusionWeights":
        """``image=1,caption=0.3`` -> these weights, the unnamed ones at their defaults; bad specs raise
        :class:`InputError` (what ``--weights`` and the HTTP API accept)."""
        values: dict[str, float] = {}
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in SIGNALS:
                raise InputError(f"weights: expected NAME=NUMBER with NAME one of {', '.join(SIGNALS)}; got {part!r}")
            try:
                values[name] = float(value)
            except ValueError:
                raise InputError(f"weights: {value!r} is not a number") from None
        return cls(**values)


@dataclass(frozen=True)
class ParsedQuery:
    """A query string taken apart (see :func:`retrieval.query_parser.parse_query`).

    terms: (text, weight) pairs, positive weights, in query order; negative: excluded words/phrases.
    """

    terms: tuple[tuple[str, float], ...] = ()
    negative: tuple[str, ...] = ()
    raw: str = ""

    @property
    def positive_text(self) -> str:
        return " ".join(t for t, _ in self.terms)
