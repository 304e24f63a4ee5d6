"""The vector stores of one collection, kept in step: image embeddings, caption embeddings and
(optionally) the caption scorer's per-image decoder memories.

All are keyed by ``images.id``. Every image has an image vector; it has a caption vector only when
it has a caption, and a memory only when the index has a scorer (native models) and the image was
read with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.vectors import VectorIndex, memory_index


@dataclass
class Payload:
    """Everything the index holds for one image besides its file facts."""

    image: np.ndarray  # (D,)
    caption_vec: np.ndarray | None  # (D,)
    caption: str | None
    captioner: str | None
    memory: np.ndarray | None = None  # (S * D_dec,) scorer memory


class VectorBundle:
    def __init__(self, images: VectorIndex, captions: VectorIndex, image_path: Path, caption_path: Path,
                 memories: VectorIndex | None = None, memory_path: Path | None = None) -> None:
        self.images, self.captions, self.memories = images, captions, memories
        self.image_path, self.caption_path, self.memory_path = image_path, caption_path, memory_path

    @classmethod
    def load(cls, image_path: Path, caption_path: Path, dim: int,
             memory_path: Path | None = None, memory_dim: int | None = None) -> "VectorBundle":
        """``memory_path``/``memory_dim``: also keep scorer memories (None: this index has no scorer)."""
        memories = None
        if memory_path is not None and memory_dim:
            memories = VectorIndex.load(memory_path, memory_dim, use_gpu=False, factory=memory_index)
        return cls(VectorIndex.load(image_path, dim), VectorIndex.load(caption_path, dim), image_path, caption_path,
                   memories, memory_path)

    def save(self) -> None:
        self.images.save(self.image_path)
        self.captions.save(self.caption_path)
        if self.memories is not None:
            self.memories.save(self.memory_path)

    def ids(self) -> np.ndarray:
        return self.images.ids()

    def __len__(self) -> int:
        return len(self.images)

    def payload(self, row_id: int, caption: str | None, captioner: str | None) -> Payload:
        ids = np.array([row_id], dtype=np.int64)
        cap = self.captions.reconstruct(ids)[0] if caption and self.captions.contains(row_id) else None
        mem = (self.memories.reconstruct(ids)[0]
               if self.memories is not None and self.memories.contains(row_id) else None)
        return Payload(self.images.reconstruct(ids)[0], cap, caption, captioner, mem)

    def add(self, ids: np.ndarray, images: np.ndarray, caption_ids: np.ndarray, captions: np.ndarray,
            memories: np.ndarray | None = None) -> None:
        """Add vectors for ids not in the index yet (remove replaced ids first): one FAISS call each.
        ``memories`` (len(ids), S * D_dec) is dropped when this index keeps none."""
        self.images.add(ids, images)
        self.captions.add(caption_ids, captions)
        if self._keeps(memories):
            self.memories.add(ids, memories)

    def add_one(self, row_id: int, image: np.ndarray, caption_vec: np.ndarray | None,
                memory: np.ndarray | None = None) -> None:
        ids = np.array([row_id], dtype=np.int64)
        self.images.add(ids, image[None])
        if caption_vec is not None:
            self.captions.add(ids, caption_vec[None])
        if memory is not None:
            self.set_memories(ids, memory[None])

    def set_captions(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.captions.remove(ids)
        self.captions.add(ids, vectors)

    def _keeps(self, memories: np.ndarray | None) -> bool:
        """Whether these memories belong here (not: no scorer store, or another scorer's shape)."""
        return memories is not None and self.memories is not None and memories.shape[1] == self.memories.dim

    def set_memories(self, ids: np.ndarray, memories: np.ndarray) -> None:
        if not self._keeps(memories):
            return  # the likelihood signal stays off for these images
        self.memories.remove(ids)
        self.memories.add(ids, memories)

    def remove(self, ids: np.ndarray) -> None:
        self.images.remove(ids)
        self.captions.remove(ids)
        if self.memories is not None:
            self.memories.remove(ids)
