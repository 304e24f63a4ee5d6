"""Small JPEG copies of indexed images, made once and kept on disk (shared by the app and the HTTP API;
``ui/thumbnails.py`` re-exports it for the app).

``<cache_dir>/thumbnails/<content_hash>-<size>.jpg``: keyed by content, so a moved or copied file
reuses its thumbnail and a changed file gets a new one. Written to a temporary name and renamed,
so a reader never sees half a file. The source path always comes from the index, and a thumbnail is
made only from the very bytes that were indexed (``indexer.media.indexed_bytes`` checks their hash).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from PIL import Image, ImageOps

from retrieval.errors import ImageDecodeError
from retrieval.images import load_image
from indexer.media import ImageUnavailable, indexed_bytes

THUMB_SIZE = 320  # grid thumbnails: this wide, cropped to 4:3 so the grid lines up
THUMB_ASPECT = 4 / 3
PREVIEW_SIZE = 1600  # the "details" view: large enough to look at, never the original bytes


def thumbnail_path(cache_dir: Path, content_hash: str, size: int) -> Path:
    if not content_hash.isalnum():  # it comes from our own index, but never build a path from anything odd
        raise ValueError(f"bad content hash {content_hash!r}")
    return Path(cache_dir) / "thumbnails" / f"{content_hash}-{int(size)}.jpg"


_lock = threading.Lock()


def make_thumbnail(source: Path, target: Path, size: int, crop: bool = False, content_hash: str | None = None,
                   byte_size: int | None = None) -> Path:
    """Write a JPEG of ``source`` at most ``size`` pixels a side to ``target`` (EXIF rotation applied);
    ``crop``: exactly ``size`` x ``size / THUMB_ASPECT``, centre-cropped. Decoded by the indexer's own
    :func:`retrieval.images.load_image` (draft mode, decompression-bomb limit, RGB conversion).
    ``content_hash`` (and ``byte_size``): only from these bytes (the indexed content; ImageUnavailable if the
    file changed)."""
    try:
        data = (indexed_bytes(source, content_hash, byte_size) if content_hash is not None
                else Path(source).read_bytes())
        im = load_image(data, draft_size=size).image
    except FileNotFoundError:
        raise ImageUnavailable(f"{source} is missing (moved or deleted since it was indexed)") from None
    except OSError as exc:
        raise ImageUnavailable(f"{source} cannot be read any more ({type(exc).__name__})") from None
    except ImageDecodeError as exc:
        reason = type(exc.__cause__).__name__ if exc.__cause__ is not None else str(exc)
        raise ImageUnavailable(f"{source} cannot be read any more ({reason})") from None
    if crop:
        im = ImageOps.fit(im, (size, round(size / THUMB_ASPECT)), Image.Resampling.LANCZOS)
    else:
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        im.save(tmp, format="JPEG", quality=85, optimize=True)
        os.replace(tmp, target)
    except OSError as exc:  # a full or read-only cache: the grid shows a placeholder, not an error page
        raise ImageUnavailable(f"{source} cannot be shown: its thumbnail could not be written "
                               f"({type(exc).__name__})") from None
    return target


def thumbnail(cache_dir: Path, source: Path, content_hash: str, size: int = THUMB_SIZE,
              byte_size: int | None = None) -> Path:
    """The cached thumbnail of an indexed file, made on first use. Raises ImageUnavailable."""
    target = thumbnail_path(cache_dir, content_hash, size)
    if target.is_file():
        return target
    with _lock:  # two sessions asking for the same new thumbnail make it once
        if target.is_file():
            return target
        return make_thumbnail(Path(source), target, size, crop=size == THUMB_SIZE, content_hash=content_hash,
                              byte_size=byte_size)
