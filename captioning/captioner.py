"""The interfaces every captioner implements (``create_captioner`` in ``captioning/factory.py`` builds one).

* :class:`Captioner`: pixels -> captions (every family);
* :class:`GridCaptioner`: captions from an image tower's grid, so indexing runs the tower once for the
  embedding and the caption (native captioners beside the native encoder);
* :class:`TextScorer`: rates a text against images from a per-image decoder memory stored at indexing
  time (the ``likelihood`` signal of fused ranking; native captioners).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from retrieval.errors import InputError

if TYPE_CHECKING:  # torch only where a model runs: the query path of a text search may not import it
    import torch
    from PIL import Image


@dataclass(frozen=True)
class CaptionerInfo:
    """Provenance of a captioner, stored with every caption it writes."""

    name: str  # factory name, e.g. "native:effl0-sat-v1" or "hf:Salesforce/blip-image-captioning-base"
    weights_sha256: str

    @property
    def fingerprint(self) -> str:
        return f"{self.name}|{self.weights_sha256[:16]}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DecodeOptions:
    """How captions are decoded (applies to every captioner that can honour it); checked when made."""

    beam_size: int = 3
    max_len: int = 20  # words
    length_penalty: float = 1.0
    no_repeat_ngram_size: int | None = None  # 0: off; None: the captioner's own (2 for native, docs/BENCHMARKS.md)
    complete_endings: bool = True  # native captioners never end on a function word ("... through the")

    MAX_BEAM = 20
    MAX_WORDS = 100

    def __post_init__(self) -> None:
        if not isinstance(self.beam_size, int) or not 1 <= self.beam_size <= self.MAX_BEAM:
            raise InputError(f"the beam size must be a whole number from 1 to {self.MAX_BEAM}, got {self.beam_size}")
        if not isinstance(self.max_len, int) or not 1 <= self.max_len <= self.MAX_WORDS:
            raise InputError(f"the longest caption must be 1 to {self.MAX_WORDS} words, got {self.max_len}")
        if not math.isfinite(self.length_penalty):
            raise InputError(f"the length penalty must be a finite number, got {self.length_penalty}")
        if self.no_repeat_ngram_size is not None and (
                not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0):
            raise InputError(f"the no-repeat n-gram size must be 0 (off) or more, got {self.no_repeat_ngram_size}")


class Captioner(ABC):
    """Writes one caption per image. ``preprocess`` runs on worker threads (PIL only);
    ``caption_pixels`` runs the model on ``device`` and returns one string per image; an empty
    string means "no caption" (the indexer never stores it)."""

    info: CaptionerInfo
    device: torch.device

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> (3, H, W) float tensor ready for :meth:`caption_pixels`."""

    @abstractmethod
    def caption_pixels(self, pixels: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        """(B, 3, H, W) -> B captions."""

    def caption_images(self, images: Sequence[Image.Image], options: DecodeOptions = DecodeOptions()) -> list[str]:
        if not images:
            return []
        import torch

        return self.caption_pixels(torch.stack([self.preprocess(im) for im in images]), options)


class GridCaptioner(Captioner):
    """A captioner that reads an image tower's grid (see :class:`retrieval.encoder.GridEncoder`)."""

    @abstractmethod
    def caption_grid(self, grid: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> list[str]:
        """(B, C, h, w) grid features -> B captions."""


class TextScorer(ABC):
    """Rates how likely a text is as a caption of images, from their stored decoder memories.

    :meth:`memory` runs at indexing time on the image tower's grid; :meth:`log_likelihood` runs at
    search time on stored memories, without the images.
    """

    info: CaptionerInfo

    @property
    @abstractmethod
    def memory_shape(self) -> tuple[int, int]:
        """(S, D): what is stored per image (flattened to S * D floats)."""

    @abstractmethod
    def memory(self, grid: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) grid -> (B, S * D) float32 memories."""

    @abstractmethod
    def log_likelihood(self, memory: np.ndarray, texts: str | Sequence[str]) -> np.ndarray:
        """log P(text | image) for N images given their (N, S * D) memories -> (N,)."""

    @staticmethod
    def texts_for(memory: np.ndarray, texts: str | Sequence[str]) -> list[str]:
        """One text per memory: ``texts`` repeated when it is one string (ValueError when the counts differ)."""
        texts = [texts] * len(memory) if isinstance(texts, str) else list(texts)
        if len(texts) != len(memory):
            raise ValueError(f"{len(memory)} memories but {len(texts)} texts")
        return texts
