"""Decode image files once, cheaply and safely, into RGB ``PIL`` images.

Large JPEGs are decoded in draft mode (DCT scaling) so a 12-megapixel photo is never fully
decoded just to be shrunk to 224 px; EXIF orientation is applied; palette, alpha, CMYK,
16-bit and grayscale images all come out as 8-bit RGB.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from retrieval.errors import ImageDecodeError

if TYPE_CHECKING:  # torch is imported only by to_tensor: decoding worker processes never load it
    import torch

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# refuse decompression bombs beyond this many pixels: Pillow's own limit (it warns beyond it, which is an
# error here), so the check below and Pillow's agree on one number
MAX_PIXELS = Image.MAX_IMAGE_PIXELS

_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
_EXIF_ORIENTATION = 0x0112
_EXIF_IFD = 0x8769
_EXIF_DATETIME_ORIGINAL = 0x9003
_EXIF_DATETIME = 0x0132


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, possibly reduced by draft mode
    width: int  # size of the stored picture as displayed (after EXIF rotation)
    height: int
    taken_at: datetime | None  # EXIF date taken, if the file has one


def _exif_taken_at(exif: Image.Exif) -> datetime | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's "Corrupt EXIF data": the date is lost, that is all
            raw = exif.get_ifd(_EXIF_IFD).get(_EXIF_DATETIME_ORIGINAL) or exif.get(_EXIF_DATETIME)
    except Exception:  # noqa: BLE001 - a damaged EXIF block costs the date, never the image
        return None
    if not isinstance(raw, str):
        return None
    try:
        return datetime.strptime(raw.strip("\x00 ").strip(), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit samples: 65535 is white (a dark picture stays dark); wider integers: scaled by their maximum
        hi = 65535.0 if im.mode != "I" or arr.max(initial=0) <= 65535 else arr.max()
        return Image.fromarray((arr / hi * 255.0).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_image(source: str | Path | bytes, draft_size: int = 448) -> DecodedImage:
    """Decode ``source`` (a path or the file's bytes) into an RGB image.

    ``draft_size``: JPEGs larger than this are DCT-downscaled while decoding (never below it).
    Raises :class:`ImageDecodeError` for anything that is not a readable image.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow on damaged metadata: tags dropped, pixels fine
            with Image.open(stream) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageDecodeError(f"{name}: too many pixels to index ({im.width}x{im.height}; "
                                           f"the limit is {MAX_PIXELS:,})")
                width, height = im.size
                if im.format == "JPEG" and min(im.size) > draft_size:
                    im.draft("RGB", (draft_size, draft_size))
                im.seek(0)  # first frame of animated GIF/WebP/TIFF
                im.load()  # before the EXIF: a PNG's may follow the pixels, and a damaged file must fail here
                try:
                    exif = im.getexif()
                    orientation = exif.get(_EXIF_ORIENTATION, 1)
                except Exception:  # noqa: BLE001 - a damaged EXIF block: the picture as stored
                    exif, orientation = Image.Exif(), 1
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
                rgb = _to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im)
                if rgb is im:
                    rgb = im.copy()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{name}: too many pixels to index ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow's parsers raise many kinds on hostile files; each is "unreadable"
        detail = _OBJECT_REPR.sub("", str(exc)).strip()  # "<_io.BytesIO object at 0x...>" says nothing, differently each time
        raise ImageDecodeError(f"{name}: not a readable image ({type(exc).__name__}: {detail})") from exc
    if rgb.width < 1 or rgb.height < 1:
        raise ImageDecodeError(f"{name}: image has no pixels")
    return DecodedImage(rgb, width, height, _exif_taken_at(exif))


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """The whole picture (no crop) resized to ``size`` x ``size``, as every native model reads it."""
    return image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)


def to_raw(image: Image.Image, size: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` -> (size, size, 3) uint8, to be normalised by the model stage
    (:func:`normalize_raw`): 4x fewer bytes to move between processes and to the GPU than floats."""
    return np.asarray(resize_square(image, size), dtype=np.uint8)


def to_array(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Resize to ``size`` x ``size`` (whole picture, no crop) and normalise: -> (3, size, size) float32."""
    # numpy, not torch: this runs on the reader threads, and a torch op there would start an OpenMP
    # team per thread whose spinning slows the model running on the main thread (docs/BENCHMARKS.md)
    x = to_raw(image, size).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)  # (3, H, W)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - m) / s)


def to_tensor(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> "torch.Tensor":
    """:func:`to_array` as a tensor: -> (3, size, size) float32."""
    import torch

    return torch.from_numpy(to_array(image, size, mean, std))


def normalize_raw(raw: "torch.Tensor", mean: tuple[float, ...], std: tuple[float, ...],
                  dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """(B, H, W, 3) uint8 from :func:`to_raw` -> (B, 3, H, W) normalised, on ``raw``'s device (the GPU's
    share of preprocessing), computed in float32 (bit for bit what :func:`to_array` gives) and then
    cast to ``dtype``."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32, device=raw.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=raw.device).view(1, 3, 1, 1)
    full = torch.tensor(255.0, dtype=torch.float32, device=raw.device)  # a tensor: a true division on CUDA too
    x = ((raw.permute(0, 3, 1, 2).float() / full - m) / s).contiguous()  # (B, 3, H, W), the layout of to_array
    return x if dtype is None or dtype == torch.float32 else x.to(dtype)
