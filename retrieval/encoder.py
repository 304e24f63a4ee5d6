"""The one interface every joint image-text encoder implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # torch only where a model runs: the query path of a text search may not import it
    import torch
    from PIL import Image


@dataclass(frozen=True)
class EncoderInfo:
    """Provenance of an encoder, recorded with every index it builds.

    Two encoders produce compatible vectors exactly when their ``fingerprint`` is equal.
    """

    name: str  # the factory name, e.g. "native:effl0-minilm-v1" or "openclip:ViT-B-32/laion2b_s34b_b79k"
    weights_sha256: str  # hash of the weights that decide the embedding space
    dim: int
    normalized: bool = True

    @property
    def fingerprint(self) -> str:
        return f"{self.name}|{self.weights_sha256[:16]}|{self.dim}|{'l2' if self.normalized else 'raw'}"

    def to_dict(self) -> dict:
        return asdict(self)


class JointEncoder(ABC):
    """Maps images and texts into one space where cosine similarity means relevance.

    ``preprocess`` runs on worker threads (PIL only); ``encode_*`` run the model on ``device``
    and return L2-normalised float32 numpy arrays of shape (B, dim).
    """

    info: EncoderInfo
    device: torch.device

    @property
    def dim(self) -> int:
        return self.info.dim

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> (3, H, W) float tensor ready for :meth:`encode_pixels`."""

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) -> (B, dim) float32, L2-normalised."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """B strings -> (B, dim) float32, L2-normalised."""

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))


class GridEncoder(JointEncoder):
    """An encoder whose image tower yields a feature grid that other models can read (the native fast
    path): the model stage runs :meth:`grid` once per image and hands the same grid to the embedding
    head (:meth:`encode_grid`), a :class:`captioning.captioner.GridCaptioner` and a caption scorer."""

    @abstractmethod
    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, C, h, w) grid features."""

    @abstractmethod
    def encode_grid(self, grid: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) grid features -> (B, dim) float32, L2-normalised."""

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return self.encode_grid(self.grid(pixels))


def l2_normalize(x: torch.Tensor) -> np.ndarray:
    """(B, D) tensor -> float32 numpy with unit rows (zero rows stay zero)."""
    import torch

    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32, copy=False)
