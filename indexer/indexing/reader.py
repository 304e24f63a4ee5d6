"""The reading stage of indexing: each file is read once, hashed, and decoded only when its content is new.

Runs on reader threads, with PIL and numpy only: a torch operation on a reader thread would start an
OpenMP team there that competes with the model stage for the cores (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from indexer.indexing.discover import FileEntry, hash_bytes
from indexer.indexing.models import ImageModels
from retrieval.errors import ImageDecodeError
from retrieval.images import load_image


@dataclass
class ReadResult:
    entry: FileEntry | None  # None when an indexed image is read again (recaption)
    content_hash: str | None = None
    pixels: torch.Tensor | None = None  # (3, H, W) for the encoder, only when the file needs embedding
    cap_pixels: torch.Tensor | None = None  # (3, H', W') for a captioner with its own preprocessing
    width: int = 0
    height: int = 0
    taken_at: object = None
    error: str | None = None


def decode_into(result: ReadResult, data: bytes, models: ImageModels) -> ReadResult:
    """Decode ``data`` once and preprocess it for every model; errors land in ``result.error``."""
    try:
        decoded = load_image(data)
        result.pixels, result.cap_pixels = models.preprocess(decoded.image)
    except ImageDecodeError as exc:
        result.error = str(exc).replace("<bytes>: ", "")
        return result
    result.width, result.height, result.taken_at = decoded.width, decoded.height, decoded.taken_at
    return result


def read_file(path: str, entry: FileEntry | None, models: ImageModels,
              known_hashes: frozenset[str] | None = None) -> ReadResult:
    """Read ``path`` once: hash it, and decode it unless its hash is in ``known_hashes`` (content the index
    already holds, whose vectors are copied instead)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return ReadResult(entry, error=f"cannot read file ({type(exc).__name__}: {exc.strerror or exc})")
    result = ReadResult(entry, content_hash=hash_bytes(data))
    if known_hashes is not None and result.content_hash in known_hashes:
        return result  # its vectors are already in the index: no decode
    return decode_into(result, data, models)


def read_in_order(pool: ThreadPoolExecutor, jobs: Iterable[tuple[str, FileEntry | None]], models: ImageModels,
                  known_hashes: frozenset[str] | None, window: int) -> Iterator[ReadResult]:
    """Read ``(path, entry)`` jobs on ``pool``, yielding results in order, at most ``window`` in flight."""
    futures = []
    for path, entry in jobs:
        futures.append(pool.submit(read_file, path, entry, models, known_hashes))
        if len(futures) >= window:
            yield futures.pop(0).result()
    for fut in futures:
        yield fut.result()
