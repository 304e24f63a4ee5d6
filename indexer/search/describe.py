"""What the index says about an image, in words: caption, how sure it is, and tags; and alt text that
never passes an uncertain caption off as sure (what exports and the HTTP API read, via ``Engine.describe``)."""

from __future__ import annotations

from dataclasses import dataclass

from indexer.storage.schema import ImageRow
from retrieval.tagging import Tag


@dataclass(frozen=True)
class ImageDescription:
    id: int
    path: str
    caption: str | None
    caption_confidence: float | None  # probability that the caption is good, fitted on train (None: not rated)
    caption_is_confident: bool | None  # against the index's threshold (None: not rated, e.g. an older index)
    tags: tuple[Tag, ...]  # most likely first; empty: no confident class, or the image was never tagged
    tagged: bool  # whether the image was tagged at all (False: an index from before tags; pixquery retag)

    def alt_text(self) -> str | None:
        """Text for an ``alt`` attribute: the caption when it is rated confident; else the tags
        ("cheeseburger, plate"); else None. An uncertain or unrated caption is never given as alt text."""
        if self.caption and self.caption_is_confident:
            return self.caption
        if self.tags:
            return ", ".join(t.name for t in self.tags)
        return None

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "caption": self.caption,
                "caption_confidence": None if self.caption_confidence is None else round(self.caption_confidence, 4),
                "caption_is_confident": self.caption_is_confident, "tags": [t.to_dict() for t in self.tags],
                "tagged": self.tagged, "alt_text": self.alt_text()}

    @classmethod
    def of(cls, row: ImageRow, tags: list[Tag] | None, threshold: float | None) -> "ImageDescription":
        conf = row.caption_confidence if row.caption else None
        sure = None if conf is None or threshold is None else bool(conf >= threshold)
        return cls(row.id, row.path, row.caption, conf, sure, tuple(tags or ()), row.tagger is not None)
