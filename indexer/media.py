"""What the app and the HTTP API let through from a client, in one place (no Streamlit or web framework
here, so it is easy to test; ``ui/security.py`` re-exports it for the app).

* Image bytes are only ever served for files that are in the index: the browser names an image by
  its index id (an int), the path comes from the index, never from the request; and only while the
  file still holds the content that was indexed (its hash is checked when a thumbnail is made), so a
  file swapped or a symbolic link pointed elsewhere after indexing shows nothing. The browser gets
  re-encoded thumbnails and previews, never a file's own bytes.
* An uploaded query image is bounded in bytes and in pixels, decoded with Pillow before anything
  else sees it, and re-encoded into the server's own cache folder under a name derived from its
  content; the client's file name is never used as a path.
* Nothing typed in the app is run as code or spliced into SQL: queries go to the Engine as plain
  strings and filters as typed values (:class:`indexer.storage.filters.Filters`).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from indexer.errors import InputError, PixqueryError

MAX_UPLOAD_BYTES = 20_000_000  # 20 MB (Streamlit itself refuses more than 20 MiB: pixquery ui sets it)
MAX_UPLOAD_PIXELS = 50_000_000  # 50 megapixels; Pillow's own bomb check would allow ~179 M before erroring
UPLOAD_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
UPLOAD_SIDE = 1024  # an uploaded query image is shrunk to at most this many pixels a side before it is kept


class UploadRejected(InputError):
    """An uploaded file that the app will not take (too big, not an image, too many pixels)."""


class UploadTooLarge(UploadRejected):
    """An upload over the limit in bytes or in pixels (HTTP 413)."""


class ImageUnavailable(PixqueryError):
    """An indexed image whose file is missing or unreadable now."""


def parse_image_id(value: object) -> int:
    """An image id from anywhere outside the app's own code: a non-negative int (or its ASCII decimal digits,
    nothing else: no sign, exponent, other scripts' digits), or InputError."""
    if isinstance(value, bool):
        raise InputError(f"not an image id: {value!r}")
    if isinstance(value, int):
        image_id = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        image_id = int(value.strip())
    else:
        raise InputError(f"not an image id: {str(value)[:80]!r}")
    if not 0 <= image_id < 2**63:
        raise InputError(f"not an image id: {str(value)[:80]!r}")
    return image_id


def indexed_file(engine, image_id: object):
    """(row, path) of an indexed image, looked up by id in the index; the file must exist now.

    Raises InputError for an id that is not in the index and ImageUnavailable for a file that is gone.
    """
    image_id = parse_image_id(image_id)
    row = engine.image(image_id)
    if row is None:
        raise InputError(f"no image with id {image_id} in the index")
    path = Path(row.path)
    if not path.is_file():
        raise ImageUnavailable(f"{row.path} is missing (moved or deleted since it was indexed; re-index its folder)")
    return row, path


MAX_INDEXED_BYTES = 1 << 30  # as indexing reads at most (indexer/indexing/discover.py)


def indexed_bytes(path: Path, content_hash: str, byte_size: int | None = None) -> bytes:
    """The bytes of an indexed file, only if they are still the content that was indexed (``content_hash``,
    BLAKE2b-256 as indexing computes it). ``byte_size``: the size indexed; a file of another size is not
    even read. Raises ImageUnavailable otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a pipe put in its place never blocks us
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEXED_BYTES or \
                    byte_size is not None and st.st_size != byte_size:
                raise ImageUnavailable(f"{path} changed since it was indexed; re-index its folder to see it")
            data = fh.read(MAX_INDEXED_BYTES + 1)
    except FileNotFoundError:
        raise ImageUnavailable(f"{path} is missing (moved or deleted since it was indexed)") from None
    except OSError as exc:
        raise ImageUnavailable(f"{path} cannot be read any more ({type(exc).__name__})") from None
    if hashlib.blake2b(data, digest_size=32).hexdigest() != content_hash:
        raise ImageUnavailable(f"{path} changed since it was indexed; re-index its folder to see it")
    return data


def check_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """Decode an uploaded query image after bounding its size; returns an RGB image no larger than UPLOAD_SIDE."""
    if not data:
        raise UploadRejected("the uploaded file is empty")
    if len(data) > max_bytes:
        raise UploadTooLarge(f"the uploaded file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in UPLOAD_FORMATS:
                    raise UploadRejected(f"{im.format} files are not accepted; upload a JPEG, PNG, WebP, GIF, BMP or TIFF")
                if im.width * im.height > max_pixels:  # checked from the header, before any pixel is decoded
                    raise UploadTooLarge(f"the uploaded image is {im.width}x{im.height} pixels; the limit is "
                                         f"{max_pixels / 1e6:.0f} megapixels")
                im.draft("RGB", (UPLOAD_SIDE, UPLOAD_SIDE))
                im.thumbnail((UPLOAD_SIDE, UPLOAD_SIDE))
                return im.convert("RGB")
    except UploadRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadTooLarge(f"the uploaded image has too many pixels ({type(exc).__name__})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UploadRejected(f"the uploaded file is not a readable image ({type(exc).__name__})") from None


def save_upload(data: bytes, folder: Path) -> Path:
    """Check an upload and keep a re-encoded copy in ``folder`` named by its content: the path to search with."""
    image = check_upload(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.blake2b(data, digest_size=16).hexdigest()}.png"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    return path
