"""What a search asks for: ranking weights, filters and the parsed query text.

These are plain dataclasses shared by the Engine, the CLI and the app; the ranking itself lives in
``indexer/ranking.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from indexer.errors import InputError

MODES = ("image", "caption", "keyword", "fused")  # text->image ranking modes


@dataclass(frozen=True)
class FusionWeights:
    """How much each signal counts in ``fused`` mode (non-negative; image, caption or keyword positive).

    image: query vs image embedding; caption: query vs the embedding of the generated caption;
    keyword: BM25 of the query words in the generated caption; likelihood: how likely the caption
    decoder finds the query as a caption of the image; match: how well the match head finds the query
    fits the image (these two re-score the best candidates only).
    Defaults: tuned on Flickr8k dev with ``pixquery eval retrieval --tune`` (docs/BENCHMARKS.md).
    """

    image: float = 1.0
    caption: float = 0.0
    keyword: float = 0.05
    likelihood: float = 0.3
    match: float = 0.1

    def __post_init__(self) -> None:
        values = (self.image, self.caption, self.keyword, self.likelihood, self.match)
        if any(not (v >= 0) or v > 100 for v in values):  # `not >=` also catches NaN
            raise InputError(f"fusion weights must be between 0 and 100, got {self.to_dict()}")
        if not any(v > 0 for v in values[:3]):
            raise InputError("at least one of the image, caption and keyword weights must be above 0")

    def to_dict(self) -> dict[str, float]:
        return {"image": self.image, "caption": self.caption, "keyword": self.keyword, "likelihood": self.likelihood,
                "match": self.match}


@dataclass(frozen=True)
class Filters:
    """Restrict a search to part of the collection; applied inside the search, so k results still come back
    whenever k images match.

    folder: only images under this folder (absolute or relative to the working directory);
    glob: only paths matching this shell pattern (``*`` and ``?`` as in fnmatch, matched on the full path);
    after / before: date taken (EXIF), else file modification date, inclusive;
    file_types: lower-case extensions without the dot, e.g. ("jpg", "png");
    min_width / min_height: in pixels.
    """

    folder: str | None = None
    glob: str | None = None
    after: date | None = None
    before: date | None = None
    file_types: tuple[str, ...] = ()
    min_width: int = 0
    min_height: int = 0

    def __post_init__(self) -> None:
        if self.min_width < 0 or self.min_height < 0:
            raise InputError("minimum width and height cannot be negative")
        if self.after and self.before and self.after > self.before:
            raise InputError(f"the date range is empty: {self.after} is after {self.before}")
        object.__setattr__(self, "file_types", tuple(t.lower().lstrip(".") for t in self.file_types))

    @property
    def active(self) -> bool:
        return any((self.folder, self.glob, self.after, self.before, self.file_types, self.min_width,
                    self.min_height))


@dataclass(frozen=True)
class ParsedQuery:
    """A query string taken apart (see :func:`indexer.query_parser.parse_query`).

    terms: (text, weight) pairs, positive weights, in query order; negative: excluded words/phrases.
    """

    terms: tuple[tuple[str, float], ...] = ()
    negative: tuple[str, ...] = ()
    raw: str = ""

    @property
    def positive_text(self) -> str:
        return " ".join(t for t, _ in self.terms)


@dataclass(frozen=True)
class SearchRequest:
    """Everything one search needs besides the index (the app keeps one of these in session state)."""

    text: str | None = None
    image: str | None = None  # path of an example image
    k: int = 10
    mode: str = "fused"
    weights: FusionWeights = field(default_factory=FusionWeights)
    filters: Filters = field(default_factory=Filters)
    threshold: float | None = None  # drop hits whose final score is below this
