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

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from captioning.captioner import Captioner, DecodeOptions, GridCaptioner, TextScorer
from captioning.confidence import ConfidenceModel, likelihood_per_word, measure
from indexer.indexing.procreader import PixelSpec
from indexer.storage.vectors import MemoryCodec
from retrieval.encoder import GridEncoder, JointEncoder
from retrieval.tagging import Classes, Tagger


@dataclass
class BatchOutput:
    vectors: np.ndarray | None  # (B, D) image embeddings (None when only captions were asked for)
    captions: list[str | None]  # one per image; None where no captioner ran or it wrote nothing
    # (B, S * D_dec) scorer memories (float32, or uint8 codes), None without a scorer
    memories: np.ndarray | None = None
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
        self.device: torch.device = getattr(encoder, "device", torch.device("cpu"))
        self._pinned: list[torch.Tensor] = []  # batch buffers (page-locked for a GPU), reused
        self._events: list = []
        self.seconds: Counter[str] = Counter()  # wall seconds per stage: model, memories, caption, caption_embed

    @property
    def tagger_fingerprint(self) -> str | None:
        return self.tagger.info.fingerprint if self.tagger is not None else None

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0

    def pixel_spec(self) -> PixelSpec | None:
        """How a decoding worker process may prepare pixels for these models (raw uint8 at the encoder's
        size, normalised by the encoder on its device), or None when some model needs its own
        preprocessing (then the reader uses threads)."""
        spec = getattr(self.encoder, "pixel_spec", None)
        if spec is None or not isinstance(self.encoder, GridEncoder):
            return None
        if self.captioner is not None and not self.shared:
            return None
        return PixelSpec(*spec)

    def collate(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Stack one batch of pixels into a buffer kept between batches (a fresh 38 MB tensor per batch
        costs its page faults: 4x the copy); for a GPU into page-locked memory, two buffers in turn, so
        the copy to the device runs asynchronously and at full speed. The result is valid until the
        next call."""
        shape, dtype = (len(pixels), *pixels[0].shape), pixels[0].dtype
        cuda = self.device.type == "cuda"
        if not self._pinned or self._pinned[0].shape[1:] != shape[1:] or self._pinned[0].dtype != dtype \
                or self._pinned[0].shape[0] < shape[0]:
            make = (lambda: torch.empty(shape, dtype=dtype).pin_memory()) if cuda else \
                (lambda: torch.empty(shape, dtype=dtype))
            self._pinned = [make() for _ in range(2 if cuda else 1)]
            self._events = [None] * len(self._pinned)
        self._pinned.reverse()
        self._events.reverse()
        if self._events[0] is not None:
            self._events[0].synchronize()  # the copy that last read this buffer has finished
        return torch.stack(pixels, out=self._pinned[0][: len(pixels)])

    def _copied(self) -> None:
        """Record when the work queued on the batch in the current staging buffer is done (its copy to
        the device is part of it): the buffer is not refilled before."""
        if self.device.type == "cuda" and self._pinned:
            event = torch.cuda.Event()
            event.record()
            self._events[0] = event

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (encoder pixels, captioner pixels or None when the backbone is shared or absent)."""
        x = self.encoder.preprocess(image)
        if self.captioner is None or self.shared:
            return x, None
        return x, self.captioner.preprocess(image)

    def run(self, enc_pixels: torch.Tensor, cap_pixels: torch.Tensor | None, codes: bool = False) -> BatchOutput:
        """Embeddings, captions (and their text vectors), scorer memories, tags and caption confidence of
        one batch; ``codes``: the memories as the 8-bit codes the index stores
        (:class:`~indexer.storage.vectors.MemoryCodec`, computed on the model's device: 4x fewer bytes back
        from a GPU, and the coding off the main thread's CPU time), else float32."""
        with self._timed("model"):  # backbone and embedding head (GPU work is waited for: numpy out)
            grid = self._grid(enc_pixels)
            vectors = self.encoder.encode_grid(grid) if grid is not None else self.encoder.encode_pixels(enc_pixels)
        out = self._rest(grid, cap_pixels, len(enc_pixels), vectors, codes)
        self._copied()
        return out

    def caption_only(self, enc_pixels: torch.Tensor, cap_pixels: torch.Tensor | None) -> BatchOutput:
        """Captions, their vectors, scorer memories, tags and confidence, without new image embeddings
        (``recaption``: ``vectors`` is None)."""
        out = self._rest(self._grid(enc_pixels), cap_pixels, len(enc_pixels), None)
        self._copied()
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
              vectors: np.ndarray | None, codes: bool = False) -> BatchOutput:
        with self._timed("memories"):
            memories = None
            if self.scorer is not None and codes and hasattr(self.scorer, "memory_tensor"):
                memories = code_on_device(self.scorer.memory_tensor(grid))
            elif self.scorer is not None:
                memories = self.scorer.memory(grid)
        captions: list[str | None] = [None] * n
        if self.captioner is not None:
            with self._timed("caption"):
                if self.shared:
                    raw = self.captioner.caption_grid(grid, self.options)
                else:
                    raw = self.captioner.caption_pixels(cap_pixels, self.options)
            captions = [clean_caption(c) for c in raw]
        with self._timed("tags"):
            classes = self.tagger.classify_grid(grid) if self.tagger is not None else None
        where = np.array([i for i, c in enumerate(captions) if c], dtype=np.int64)
        units = None
        if self.confidence is not None and len(where):
            with self._timed("caption_embed"):  # the caption vectors and the pooled units in one pass
                cap_vecs, units = self.encoder.encode_texts_pooled([captions[i] for i in where])
        else:
            where, cap_vecs = self.embed_captions(captions)
        with self._timed("confidence"):
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
        rows = torch.from_numpy(where).to(grid.device)
        image = vectors[where] if vectors is not None else self.encoder.encode_grid(grid[rows])
        rater = self.captioner if isinstance(self.captioner, TextScorer) and self.shared else None
        likelihood = likelihood_per_word(rater, grid[rows], texts) if rater is not None else None
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
        with self._timed("caption_embed"):
            return keep, self.encoder.encode_texts([captions[i] for i in keep])


@torch.inference_mode()
def code_on_device(memory: torch.Tensor) -> np.ndarray:
    """(B, W) float32 memories on any device -> (B, W) uint8 codes: :meth:`MemoryCodec.compute_codes`'s
    arithmetic in torch, bit for bit (float32 subtraction, true division by a tensor, clamp, product, a
    truncating cast: every step correctly rounded on CPUs and GPUs alike; a test compares them)."""
    codec = MemoryCodec(memory.shape[1])
    vmin = torch.tensor(float(codec.vmin), dtype=torch.float32, device=memory.device)
    vdiff = torch.tensor(float(codec.vdiff), dtype=torch.float32, device=memory.device)
    unit = ((memory.float() - vmin) / vdiff).clamp_(0.0, 1.0)
    return (unit * torch.tensor(255.0, device=memory.device)).to(torch.uint8).cpu().numpy()


def clean_caption(text: str | None) -> str | None:
    """Collapse whitespace; an empty caption becomes None (never stored as '')."""
    if text is None:
        return None
    text = " ".join(text.split())
    return text or None
