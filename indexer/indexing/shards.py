"""Shards: what distributed workers computed for a block of files, kept on disk until the index commits it.

A Ray worker (``indexing/distributed.py``) reads a block of files, hashes them, decodes and embeds the
ones with content the index does not hold, and returns one block of columns per batch:

| column | per file |
|---|---|
| ``path``, ``size``, ``mtime`` | the file and the stat it was read with |
| ``hash``, ``error`` | its content hash, or why it could not be read or decoded (``""``: none) |
| ``width``, ``height``, ``taken_at`` | what decoding found (``taken_at`` as ISO text, ``""``: none) |
| ``embedded`` | whether the models ran on it (its content was new to the index) |
| ``vector``, ``caption``, ``caption_vec`` | (D,) image embedding, caption (``""``: none), its (D,) text embedding |
| ``memory`` | (S * D_dec,) the caption scorer's memory, only when the models have a scorer |
| ``classes``, ``confidence`` | the tagger's classes as JSON ``[[class, probability], ...]`` (``""``: no tagger) and the caption's confidence (NaN: none) |
| ``models`` | the models' key (:func:`models_key`): results of other models are never merged |

The driver writes each block it receives as a shard file (``<index>/ray-shards/*.npz``, written to a
temporary name and renamed) before it merges the block through the index's ``BatchWriter``, and
deletes it once a checkpoint has committed it. A run that stops early leaves its uncommitted shards;
the next run merges them instead of sending those files to the workers again (when the file's stat,
the models and what the index holds still say the result is valid).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from indexer.indexing.discover import FileEntry
from indexer.indexing.models import BatchOutput, ImageModels
from indexer.indexing.reader import ReadResult

SHARD_DIR = "ray-shards"


def models_key(models: ImageModels) -> str:
    """What a worker's outputs depend on: encoder, captioner, scorer, decoding options, tagger and
    confidence model."""
    parts = [models.encoder.info.fingerprint,
             models.captioner.info.fingerprint if models.captioner is not None else "",
             models.scorer.info.fingerprint if models.scorer is not None else "",
             repr(models.options) if models.captioner is not None else "",
             models.tagger.info.fingerprint if models.tagger is not None else "",
             models.confidence.info.fingerprint if models.confidence is not None else ""]
    return "||".join(parts)


@dataclass
class FileResult:
    """One file as a worker saw it (one row of a block)."""

    path: str
    size: int
    mtime: float
    content_hash: str | None
    error: str | None
    width: int = 0
    height: int = 0
    taken_at: datetime | None = None
    vector: np.ndarray | None = None  # (D,), only when embedded
    caption: str | None = None
    caption_vec: np.ndarray | None = None  # (D,), only with a caption
    memory: np.ndarray | None = None  # (S * D_dec,), only when embedded with a scorer
    classes: list[tuple[int, float]] | None = None  # the tagger's classes (None: no tagger)
    confidence: float | None = None  # the caption's confidence (None: no caption, or not rated)

    @property
    def embedded(self) -> bool:
        return self.vector is not None

    def read_result(self, entry: FileEntry) -> ReadResult:
        """What the reader stage would have handed the run for ``entry`` (pixels stay on the worker)."""
        return ReadResult(entry, content_hash=self.content_hash, width=self.width, height=self.height,
                          taken_at=self.taken_at, error=self.error)


def to_block(entries: Sequence[FileEntry], results: Sequence[ReadResult], embedded: Sequence[int],
             out: BatchOutput | None, where: np.ndarray | None, cap_vecs: np.ndarray | None,
             dim: int, memory_dim: int | None, key: str) -> dict[str, np.ndarray]:
    """The block of columns for ``entries`` read as ``results``; ``embedded`` (positions in ``results``)
    ran through the models with outputs ``out`` and caption vectors ``cap_vecs`` at ``where`` (of out)."""
    n = len(entries)
    vector = np.zeros((n, dim), dtype=np.float32)
    caption_vec = np.zeros((n, dim), dtype=np.float32)
    caption = [""] * n
    is_embedded = np.zeros(n, dtype=bool)
    memory = np.zeros((n, memory_dim), dtype=np.float32) if memory_dim else None
    classes = [""] * n
    confidence = np.full(n, np.nan, dtype=np.float64)
    if embedded:
        rows = np.asarray(embedded, dtype=np.int64)
        vector[rows] = out.vectors
        is_embedded[rows] = True
        for j, text in zip(rows, out.captions):
            caption[j] = text or ""
        if len(where):
            caption_vec[rows[where]] = cap_vecs
        if memory is not None and out.memories is not None:
            memory[rows] = out.memories
        for k, j in enumerate(rows):
            if out.classes is not None:
                classes[j] = json.dumps([[int(c), float(p)] for c, p in out.classes[k]])
            if k < len(out.confidence) and out.confidence[k] is not None:
                confidence[j] = out.confidence[k]
    block = {
        "path": np.array([e.path for e in entries], dtype=object),
        "size": np.array([e.size for e in entries], dtype=np.int64),
        "mtime": np.array([e.mtime for e in entries], dtype=np.float64),
        "hash": np.array([r.content_hash or "" for r in results], dtype=object),
        "error": np.array([r.error or "" for r in results], dtype=object),
        "width": np.array([r.width for r in results], dtype=np.int64),
        "height": np.array([r.height for r in results], dtype=np.int64),
        "taken_at": np.array([r.taken_at.isoformat() if r.taken_at else "" for r in results], dtype=object),
        "embedded": is_embedded, "vector": vector, "caption": np.array(caption, dtype=object),
        "caption_vec": caption_vec, "models": np.array([key] * n, dtype=object),
        "classes": np.array(classes, dtype=object), "confidence": confidence,
    }
    if memory is not None:
        block["memory"] = memory
    return block


def from_block(block: dict[str, np.ndarray]) -> list[FileResult]:
    """The rows of a block (as a worker returned it, or as a shard file holds it)."""
    memory = block.get("memory")
    classes = block.get("classes")
    confidence = block.get("confidence")
    out = []
    for i in range(len(block["path"])):
        embedded = bool(block["embedded"][i])
        caption = str(block["caption"][i]) or None
        taken = str(block["taken_at"][i])
        out.append(FileResult(
            path=str(block["path"][i]), size=int(block["size"][i]), mtime=float(block["mtime"][i]),
            content_hash=str(block["hash"][i]) or None, error=str(block["error"][i]) or None,
            width=int(block["width"][i]), height=int(block["height"][i]),
            taken_at=datetime.fromisoformat(taken) if taken else None,
            vector=np.asarray(block["vector"][i], dtype=np.float32) if embedded else None,
            caption=caption if embedded else None,
            caption_vec=np.asarray(block["caption_vec"][i], dtype=np.float32) if embedded and caption else None,
            memory=np.asarray(memory[i], dtype=np.float32) if embedded and memory is not None else None,
            classes=([(int(c), float(p)) for c, p in json.loads(str(classes[i]))]
                     if embedded and classes is not None and str(classes[i]) else None),
            confidence=(float(confidence[i]) if embedded and confidence is not None
                        and not np.isnan(confidence[i]) else None),
        ))
    return out


class ShardStore:
    """The shard files of one index folder (``<index>/ray-shards``), for the models of ``key``."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self._cached: tuple[Path, list[FileResult]] | None = None

    def write(self, block: dict[str, np.ndarray]) -> Path:
        """Store ``block`` as a new shard file (complete or absent: written aside, then renamed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"shard-{uuid.uuid4().hex}.npz"
        tmp = path.with_name(path.name + ".tmp")
        columns = {k: (v.astype(str) if v.dtype == object else v) for k, v in block.items()}
        with open(tmp, "wb") as fh:
            np.savez(fh, **columns)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        return path

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.npz")) if self.folder.is_dir() else []

    def reusable(self, todo: Iterable[FileEntry], known: object) -> dict[str, tuple[Path, int]]:
        """path -> (shard, row) for the files of ``todo`` whose result a shard already holds: same path
        and stat, these models, and either embedded, unreadable, or of content ``known`` to the index
        (a file a worker only hashed whose content is no longer known must go to the workers again)."""
        wanted = {e.path: e for e in todo}
        found: dict[str, tuple[Path, int]] = {}
        for shard in self.files():
            try:
                with np.load(shard, allow_pickle=False) as z:
                    if len(z["models"]) == 0 or str(z["models"][0]) != self.key:
                        continue
                    paths, sizes, mtimes = z["path"], z["size"], z["mtime"]
                    hashes, errors, embedded = z["hash"], z["error"], z["embedded"]
            except (OSError, ValueError, KeyError):
                continue  # unreadable (a crash while it was written is excluded by the rename): ignored
            for i, p in enumerate(paths):
                e = wanted.get(str(p))
                if e is None or e.size != int(sizes[i]) or e.mtime != float(mtimes[i]):
                    continue
                if embedded[i] or str(errors[i]) or str(hashes[i]) in known:
                    found[e.path] = (shard, i)
        return found

    def result(self, shard: Path, row: int) -> FileResult:
        if self._cached is None or self._cached[0] != shard:
            with np.load(shard, allow_pickle=False) as z:
                self._cached = (shard, from_block({k: z[k] for k in z.files}))
        return self._cached[1][row]

    def remove(self, shards: Iterable[Path]) -> None:
        for shard in shards:
            shard.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every shard (after a run committed everything)."""
        self._cached = None
        shutil.rmtree(self.folder, ignore_errors=True)
