"""The model stage of indexing: image embeddings and captions for one batch of decoded images.

When the encoder is a :class:`~retrieval.encoder.GridEncoder` (the native encoder), its tower runs
once per image and the grid feeds the embedding head, a :class:`~captioning.captioner.GridCaptioner`
(the native captioner) and, when the index ranks with a caption scorer (a
:class:`~captioning.captioner.TextScorer`), the scorer's per-image decoder memory. Other encoders and
captioners each read their own pixels.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from captioning.captioner import Captioner, DecodeOptions, GridCaptioner, TextScorer
from indexer.indexing.procreader import PixelSpec
from indexer.storage.vectors import MemoryCodec
from retrieval.encoder import GridEncoder, JointEncoder


@dataclass
class BatchOutput:
    vectors: np.ndarray  # (B, D) image embeddings
    captions: list[str | None]  # one per image; None where no captioner ran or it wrote nothing
    # (B, S * D_dec) scorer memories (float32, or uint8 codes), None without a scorer
    memories: np.ndarray | None = None


class ImageModels:
    """Encoder plus optional captioner behind two calls: ``preprocess`` (threads) and ``run`` (batches)."""

    def __init__(self, encoder: JointEncoder, captioner: Captioner | None = None,
                 options: DecodeOptions = DecodeOptions(), scorer: TextScorer | None = None) -> None:
        self.encoder, self.captioner, self.options = encoder, captioner, options
        grid = isinstance(encoder, GridEncoder)
        self.shared = grid and isinstance(captioner, GridCaptioner)  # one tower pass for both
        # the scorer rates query text against images from memories computed on the encoder's grid
        self.scorer = scorer if grid else None
        self.device: torch.device = getattr(encoder, "device", torch.device("cpu"))
        self._pinned: list[torch.Tensor] = []  # batch buffers (page-locked for a GPU), reused
        self._events: list = []
        self.seconds: Counter[str] = Counter()  # wall seconds per stage: model, memories, caption, caption_embed

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
        """Embeddings, captions and scorer memories of one batch; ``codes``: the memories as the 8-bit codes
        the index stores (:class:`~indexer.storage.vectors.MemoryCodec`, computed on the model's device:
        4x fewer bytes back from a GPU, and the coding off the main thread's CPU time), else float32."""
        with self._timed("model"):  # backbone and embedding head (GPU work is waited for: numpy out)
            grid = self._grid(enc_pixels)
            vectors = self.encoder.encode_grid(grid) if grid is not None else self.encoder.encode_pixels(enc_pixels)
        captions, memories = self._captions_and_memories(grid, cap_pixels, len(enc_pixels), codes)
        self._copied()
        return BatchOutput(vectors, captions, memories)

    def caption_only(self, enc_pixels: torch.Tensor,
                     cap_pixels: torch.Tensor | None) -> tuple[list[str | None], np.ndarray | None]:
        """Captions and scorer memories without touching image embeddings (``recaption``)."""
        out = self._captions_and_memories(self._grid(enc_pixels), cap_pixels, len(enc_pixels))
        self._copied()
        return out

    def _grid(self, enc_pixels: torch.Tensor) -> torch.Tensor | None:
        """(B, 1280, 7, 7): one backbone pass for everything that reads the grid; None when nothing does."""
        return self.encoder.grid(enc_pixels) if self.shared or self.scorer is not None else None

    def _captions_and_memories(self, grid: torch.Tensor | None, cap_pixels: torch.Tensor | None,
                               n: int, codes: bool = False) -> tuple[list[str | None], np.ndarray | None]:
        with self._timed("memories"):
            memories = None
            if self.scorer is not None and codes and hasattr(self.scorer, "memory_tensor"):
                memories = code_on_device(self.scorer.memory_tensor(grid))
            elif self.scorer is not None:
                memories = self.scorer.memory(grid)
        if self.captioner is None:
            return [None] * n, memories
        with self._timed("caption"):
            if self.shared:
                captions = self.captioner.caption_grid(grid, self.options)
            else:
                captions = self.captioner.caption_pixels(cap_pixels, self.options)
        return [clean_caption(c) for c in captions], memories

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
