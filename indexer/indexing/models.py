"""The model stage of indexing: image embeddings, captions, tags and caption confidence for one batch.

When the encoder is a :class:`~retrieval.encoder.GridEncoder` (the native encoder), its tower runs
once per image and the grid feeds the embedding head, a :class:`~captioning.captioner.GridCaptioner`
(the native captioner), the scorer's per-image decoder memory (when the index ranks with a caption
scorer, a :class:`~captioning.captioner.TextScorer`), and the :class:`~retrieval.tagging.Tagger`
(the tower's own ImageNet classifier on the pooled grid). Other encoders and captioners each read their
own pixels, and get no tags.

Each caption is rated (captioning/confidence.py) from what this stage has at hand: the image and
caption embeddings, the tags, and the captioner's own likelihood of its caption when it can rate text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from captioning.captioner import Captioner, DecodeOptions, GridCaptioner, TextScorer
from captioning.confidence import ConfidenceModel, likelihood_per_word, measure
from retrieval.encoder import GridEncoder, JointEncoder
from retrieval.tagging import Classes, Tagger


@dataclass
class BatchOutput:
    vectors: np.ndarray | None  # (B, D) image embeddings (None when only captions were asked for)
    captions: list[str | None]  # one per image; None where no captioner ran or it wrote nothing
    memories: np.ndarray | None = None  # (B, S * D_dec) scorer memories, None without a scorer
    caption_where: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # positions with a caption
    caption_vectors: np.ndarray | None = None  # (len(caption_where), D) text embeddings of those captions
    classes: list[Classes] | None = None  # per image, its classes (None: no tagger)
    confidence: list[float | None] = field(default_factory=list)  # per image (None: no caption, or not rated)


class ImageModels:
    """Encoder, optional captioner, scorer, tagger and confidence model behind ``preprocess`` (threads)
    and ``run`` (batches)."""

    def __init__(self, encoder: JointEncoder, captioner: Captioner | None = None,
                 options: DecodeOptions = DecodeOptions(), scorer: TextScorer | None = None,
                 tagger: Tagger | None = None, confidence: ConfidenceModel | None = None) -> None:
        self.encoder, self.captioner, self.options = encoder, captioner, options
        grid = isinstance(encoder, GridEncoder)
        self.shared = grid and isinstance(captioner, GridCaptioner)  # one tower pass for both
        # the scorer rates query text against images from memories computed on the encoder's grid; the
        # tagger classifies the same grid
        self.scorer = scorer if grid else None
        self.tagger = tagger if grid else None
        # captions are rated when the tags and both text spaces are at hand (the native encoder)
        self.confidence = confidence if self.tagger is not None and hasattr(encoder, "encode_texts_pooled") else None

    @property
    def tagger_fingerprint(self) -> str | None:
        return self.tagger.info.fingerprint if self.tagger is not None else None

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (encoder pixels, captioner pixels or None when the backbone is shared or absent)."""
        x = self.encoder.preprocess(image)
        if self.captioner is None or self.shared:
            return x, None
        return x, self.captioner.preprocess(image)

    def run(self, enc_pixels: torch.Tensor, cap_pixels: torch.Tensor | None) -> BatchOutput:
        grid = self._grid(enc_pixels)
        vectors = self.encoder.encode_grid(grid) if grid is not None else self.encoder.encode_pixels(enc_pixels)
        return self._rest(grid, cap_pixels, len(enc_pixels), vectors)

    def caption_only(self, enc_pixels: torch.Tensor, cap_pixels: torch.Tensor | None) -> BatchOutput:
        """Captions, their vectors, scorer memories, tags and confidence, without new image embeddings
        (``recaption``: ``vectors`` is None)."""
        grid = self._grid(enc_pixels)
        out = self._rest(grid, cap_pixels, len(enc_pixels), None)
        return out

    def tag_only(self, enc_pixels: torch.Tensor, captions: list[str | None]) -> tuple[list[Classes], list[float | None]]:
        """Tags of a batch and the confidence of the captions it already has (``retag``)."""
        if self.tagger is None:
            return [[] for _ in captions], [None] * len(captions)
        grid = self.encoder.grid(enc_pixels)
        classes = self.tagger.classify_grid(grid)
        where = np.array([i for i, c in enumerate(captions) if c], dtype=np.int64)
        return classes, self._rate(grid, captions, where, None, classes)

    def _grid(self, enc_pixels: torch.Tensor) -> torch.Tensor | None:
        """(B, 1280, 7, 7): one backbone pass for everything that reads the grid; None when nothing does."""
        if self.shared or self.scorer is not None or self.tagger is not None:
            return self.encoder.grid(enc_pixels)
        return None

    def _rest(self, grid: torch.Tensor | None, cap_pixels: torch.Tensor | None, n: int,
              vectors: np.ndarray | None) -> BatchOutput:
        memories = self.scorer.memory(grid) if self.scorer is not None else None
        if self.captioner is None:
            captions: list[str | None] = [None] * n
        elif self.shared:
            captions = [clean_caption(c) for c in self.captioner.caption_grid(grid, self.options)]
        else:
            captions = [clean_caption(c) for c in self.captioner.caption_pixels(cap_pixels, self.options)]
        classes = self.tagger.classify_grid(grid) if self.tagger is not None else None
        where = np.array([i for i, c in enumerate(captions) if c], dtype=np.int64)
        units = None
        if self.confidence is not None and len(where):
            cap_vecs, units = self.encoder.encode_texts_pooled([captions[i] for i in where])
        else:
            where, cap_vecs = self.embed_captions(captions)
        confidence = self._rate(grid, captions, where, (cap_vecs, units), classes, vectors)
        return BatchOutput(vectors, captions, memories, where, cap_vecs, classes, confidence)

    def _rate(self, grid: torch.Tensor, captions: list[str | None], where: np.ndarray,
              embedded: tuple[np.ndarray, np.ndarray | None] | None, classes: list[Classes] | None,
              vectors: np.ndarray | None = None) -> list[float | None]:
        """Confidence of each image's caption (None: no caption, or no confidence model)."""
        out: list[float | None] = [None] * len(captions)
        if self.confidence is None or classes is None or not len(where):
            return out
        texts = [captions[i] for i in where]
        cap_vecs, units = embedded if embedded is not None and embedded[1] is not None else \
            self.encoder.encode_texts_pooled(texts)
        image = vectors[where] if vectors is not None else self.encoder.encode_grid(grid[torch.from_numpy(where)])
        rater = self.captioner if isinstance(self.captioner, TextScorer) and self.shared else None
        likelihood = likelihood_per_word(rater, grid[torch.from_numpy(where)], texts) if rater is not None else None
        rated = [classes[i] for i in where]
        feats = measure(image, cap_vecs, units, self.tagger.concepts(rated),
                        np.array([c[0][1] if c else 0.0 for c in rated]), likelihood)
        for i, p in zip(where.tolist(), self.confidence.predict(feats).tolist()):
            out[i] = float(p)
        return out

    def embed_captions(self, captions: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """-> (positions of non-empty captions, their (n, D) text embeddings)."""
        keep = np.array([i for i, c in enumerate(captions) if c], dtype=np.int64)
        if not len(keep):
            return keep, np.zeros((0, self.encoder.dim), dtype=np.float32)
        return keep, self.encoder.encode_texts([captions[i] for i in keep])


def clean_caption(text: str | None) -> str | None:
    """Collapse whitespace; an empty caption becomes None (never stored as '')."""
    if text is None:
        return None
    text = " ".join(text.split())
    return text or None
