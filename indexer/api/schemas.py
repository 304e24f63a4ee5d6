"""The HTTP API's request and response bodies (pydantic; they are also its OpenAPI schema at /docs)."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

Mode = Literal["image", "caption", "keyword", "tags", "fused"]


class FiltersIn(BaseModel):
    """Only images that pass every filter set (applied inside the search: k results whenever k match)."""

    model_config = ConfigDict(extra="forbid")
    folder: str | None = Field(None, max_length=4096, description="only images under this folder (a path prefix)")
    glob: str | None = Field(None, max_length=1000, description="only paths matching this shell pattern")
    after: date | None = Field(None, description="taken (EXIF date, else file date) on or after this day")
    before: date | None = Field(None, description="taken on or before this day")
    file_types: list[str] = Field(default_factory=list, max_length=50, description='e.g. ["jpg", "png"]')
    min_width: int = Field(0, ge=0, le=2**31)
    min_height: int = Field(0, ge=0, le=2**31)
    where: list[str] = Field(default_factory=list, max_length=50,
                             description='catalogue conditions, all of which must hold: ["category=shoes", '
                                         '"price<50"]; operators = != < <= > >= ~ (contains); "a|b" for any of')


class SearchIn(BaseModel):
    """A text search (and/or relevance feedback: images marked good and bad)."""

    model_config = ConfigDict(extra="forbid")
    query: str | None = Field(None, max_length=2000, description='e.g. "dog on a park bench" or "beach -people"')
    k: int = Field(10, ge=1, le=1000, description="number of results")
    mode: Mode = "fused"
    weights: dict[str, float] | None = Field(None, description='fused weights by signal, e.g. {"image": 1, '
                                                                '"meta": 0.5}; unnamed ones keep their defaults')
    filters: FiltersIn | None = None
    threshold: float | None = Field(None, description="leave out results scoring below this")
    positive_ids: list[StrictInt] = Field(default_factory=list, max_length=1000, description="images marked good")
    negative_ids: list[StrictInt] = Field(default_factory=list, max_length=1000, description="images marked bad")
    explain: bool = Field(False, description="add a readable reason to each result")


class TagOut(BaseModel):
    name: str = Field(..., description='what the classifier sees, e.g. "cheeseburger"')
    probability: float = Field(..., description="calibrated probability")
    source: str = Field(..., description='"imagenet:<class index>" or "group:<word>"')


class Hit(BaseModel):
    id: int
    path: str
    score: float
    caption: str | None
    caption_confidence: float | None = Field(None, description="probability that the caption is good (fitted on "
                                                               "Flickr8k train; null: not rated)")
    caption_is_confident: bool | None = Field(None, description="false: show the tags before the caption, "
                                                                "marked uncertain; null: not rated")
    tags: list[TagOut] = Field(default_factory=list, description="empty: no confident class, or not tagged")
    width: int
    height: int
    file_type: str
    scores: dict[str, float]
    contributions: dict[str, float] = Field(default_factory=dict, description="what each signal added (fused)")
    explanation: str | None = None
    metadata: dict[str, str | float | date] = Field(default_factory=dict)


class SearchOut(BaseModel):
    query: str | None
    mode: str
    k: int
    weights: dict[str, float]
    filters: list[str]
    results: list[Hit]


class ImageOut(BaseModel):
    id: int
    path: str
    caption: str | None
    captioner: str | None
    caption_confidence: float | None = None
    caption_is_confident: bool | None = None
    tags: list[TagOut] = Field(default_factory=list)
    tagged: bool = Field(False, description="false: an index from before tags (pixquery retag adds them)")
    alt_text: str | None = Field(None, description="the caption when rated confident, else the tags")
    width: int
    height: int
    file_type: str
    byte_size: int
    content_hash: str
    taken_at: str | None
    modified_at: float
    indexed_at: str | None
    metadata: dict[str, str | float | date]
    links: dict[str, str]


class CaptionOut(BaseModel):
    caption: str
    captioner: str


class IndexIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    folder: str = Field(..., max_length=4096, description="one of the folders listed by GET /api/index/folders")
    rebuild: bool = False


class ErrorOut(BaseModel):
    detail: str | list
    error: str
