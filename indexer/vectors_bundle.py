"""The two vector indexes of one collection, kept in step: image embeddings and caption embeddings.

Both are keyed by ``images.id``. Every image has an image vector; it has a caption vector only
when it has a caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.vectors import VectorIndex


@dataclass
class Payload:
    """Everything the index holds for one image besides its file facts."""

    image: np.ndarray  # (D,)
    caption_vec: np.ndarray | None  # (D,)
    caption: str | None
    captioner: str | None


class VectorBundle:
    def __init__(self, images: VectorIndex, captions: VectorIndex, image_path: Path, caption_path: Path) -> None:
        self.images, self.captions = images, captions
        self.image_path, self.caption_path = image_path, caption_path

    @classmethod
    def load(cls, image_path: Path, caption_path: Path, dim: int) -> "VectorBundle":
        return cls(VectorIndex.load(image_path, dim), VectorIndex.load(caption_path, dim), image_path, caption_path)

    def save(self) -> None:
        self.images.save(self.image_path)
        self.captions.save(self.caption_path)

    def ids(self) -> np.ndarray:
        return self.images.ids()

    def __len__(self) -> int:
        return len(self.images)

    def payload(self, row_id: int, caption: str | None, captioner: str | None) -> Payload:
        ids = np.array([row_id], dtype=np.int64)
        cap = self.captions.reconstruct(ids)[0] if caption and self.captions.contains(row_id) else None
        return Payload(self.images.reconstruct(ids)[0], cap, caption, captioner)

    def add(self, ids: np.ndarray, images: np.ndarray, caption_ids: np.ndarray, captions: np.ndarray) -> None:
        """Add vectors for ids not in the index yet (remove replaced ids first): one FAISS call each."""
        self.images.add(ids, images)
        self.captions.add(caption_ids, captions)

    def add_one(self, row_id: int, image: np.ndarray, caption_vec: np.ndarray | None) -> None:
        ids = np.array([row_id], dtype=np.int64)
        if caption_vec is None:
            self.images.add(ids, image[None])
        else:
            self.add(ids, image[None], ids, caption_vec[None])

    def set_captions(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.captions.remove(ids)
        self.captions.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> None:
        self.images.remove(ids)
        self.captions.remove(ids)
