"""A folder of every odd file a photo collection can hold, each with what indexing must do with it.

Used by tests/test_odd_files.py, and runnable to make the folder for a manual check with the real models::

    PYTHONPATH=. python tests/odd_files.py /tmp/odd && pixquery index /tmp/odd --db /tmp/odd-index
    pixquery stats --skipped --db /tmp/odd-index

:func:`make_odd_files` returns ``{relative path: expected}``, where expected is ``"indexed"`` or the start of
the skip reason. Orientation files are named ``exif-<n>.jpg`` and show :data:`UPRIGHT` once rotated upright.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

INDEXED = "indexed"
UNREADABLE = "not a readable image"

# quadrants of four colours: every flip and rotation of it looks different (even to a 4x4 grid of means)
QUADRANTS = ((220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40))
# EXIF orientation -> the transpose that shows a picture stored that way upright (what exif_transpose does)
ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}
INVERSE = {**ORIENT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}  # 2-5, 7 undo themselves


def upright(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """The picture every ``exif-<n>.jpg`` shows once its orientation is applied."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2], arr[: h // 2, w // 2:] = QUADRANTS[0], QUADRANTS[1]
    arr[h // 2:, : w // 2], arr[h // 2:, w // 2:] = QUADRANTS[2], QUADRANTS[3]
    arr[: h // 8, : w // 8] = (255, 255, 255)  # a white corner: left-right and top-bottom differ too
    return Image.fromarray(arr)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_raw(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour, nor lie about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def png16(im: Image.Image) -> bytes:
    """``im`` (RGB) as a 16-bit-per-sample RGB PNG holding the same colours (each 8-bit value * 257)."""
    arr = np.asarray(im.convert("RGB")).astype(">u2") * 257  # (H, W, 3) big-endian 16-bit
    rows = b"".join(b"\x00" + row.tobytes() for row in arr)
    return png_raw(im.width, im.height, 16, 2, rows)


LEVELS = (40, 100, 160, 220)  # grey levels of the 16-bit grayscale picture


def gray_levels() -> np.ndarray:
    """(24, 32) 8-bit grey quadrants of LEVELS."""
    arr = np.zeros((24, 32), np.uint8)
    arr[:12, :16], arr[:12, 16:], arr[12:, :16], arr[12:, 16:] = LEVELS
    return arr


def half_transparent() -> tuple[Image.Image, Image.Image]:
    """(a grey+alpha picture, how it looks on white): left grey 90 at alpha 200, right grey 200 opaque."""
    la = Image.new("LA", (32, 24), (200, 255))
    la.paste((90, 200), (0, 0, 16, 24))
    on_white = Image.new("RGB", (32, 24), (200, 200, 200))
    grey = round(90 * 200 / 255 + 255 * 55 / 255)
    on_white.paste((grey, grey, grey), (0, 0, 16, 24))
    return la, on_white


def palette_transparent() -> tuple[Image.Image, Image.Image]:
    """(a palette picture whose left half is the transparent index, how it looks on white)."""
    pal = Image.new("P", (32, 24), 1)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.paste(0, (0, 0, 16, 24))
    on_white = Image.new("RGB", (32, 24), (200, 30, 30))
    on_white.paste((255, 255, 255), (0, 0, 16, 24))
    return pal, on_white


def ycck_jpeg(rgb: Image.Image) -> bytes:
    """An Adobe YCCK JPEG of ``rgb`` (Pillow writes CMYK only: the YCC transform is done here, and the Adobe
    marker's transform flag set to 2)."""
    c = np.asarray(rgb.convert("CMYK")).astype(np.float64)
    r, g, b = 255 - c[..., 0], 255 - c[..., 1], 255 - c[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    ycck = np.stack([y, cb, cr, c[..., 3]], -1).clip(0, 255).round().astype(np.uint8)
    data = bytearray(encode(Image.fromarray(ycck, "CMYK"), "JPEG", quality=95))
    at = data.find(b"Adobe")
    data[at + 11] = 2  # Adobe APP14: version(2) flags0(2) flags1(2) transform(1) after the 5-byte name
    return bytes(data)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_odd_files(root: Path, outside: Path | None = None) -> dict[str, str]:
    """Write the odd files under ``root`` (``outside``: a folder beside it, for a symbolic link that leaves
    the root) and return what indexing must do with each one."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}
    plain = Image.new("RGB", (64, 48), QUADRANTS[0])

    def put(name: str, data: bytes, expected: str = INDEXED) -> None:
        write(root / name, data)
        expect[name] = expected

    good_jpeg = encode(upright(), "JPEG", quality=90)
    good_png = encode(upright(), "PNG")
    put("zero-byte.jpg", b"", "empty file")
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], UNREADABLE)
    corrupt = bytearray(good_png)
    at = corrupt.find(b"IDAT")
    corrupt[at + 4: at + 6] = b"\x12\x34"  # the pixel data's zlib header is garbage
    put("corrupt-data.png", bytes(corrupt), UNREADABLE)
    corrupt = bytearray(good_png)
    corrupt[29] ^= 0xFF  # the header chunk's CRC no longer matches
    put("corrupt-header.png", bytes(corrupt), UNREADABLE)
    put("text-named.jpg", b"Dear diary, today I renamed a text file.\n" * 20, UNREADABLE)
    put("html-named.png", b"<!doctype html><html><body><img src=x></body></html>\n", UNREADABLE)
    # a decompression bomb: 100,000 x 100,000 declared in the header, a few bytes of data
    put("bomb.png", png_raw(100_000, 100_000, 1, 0, b"\x00" * 16), "too many pixels to index")
    for n in range(2, 9):  # stored turned, upright once the orientation is applied
        exif = Image.Exif()
        exif[0x0112] = n
        put(f"exif-{n}.jpg", encode(upright().transpose(INVERSE[n]), "JPEG", quality=95, exif=exif))
    put("cmyk.jpg", encode(upright().convert("CMYK"), "JPEG", quality=95))
    put("ycck.jpg", ycck_jpeg(upright()))
    put("progressive.jpg", encode(upright(), "JPEG", quality=90, progressive=True))
    put("gray16.png", encode(Image.fromarray(gray_levels().astype(np.uint16) * 257), "PNG"))
    put("rgb16.png", png16(upright()))
    put("gray-alpha.png", encode(half_transparent()[0], "PNG"))
    put("palette-transparent.png", encode(palette_transparent()[0], "PNG", transparency=0))
    frames = [Image.new("RGB", (32, 24), c) for c in QUADRANTS]
    put("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100))
    put("animated.webp", encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100))
    put("still.tiff", encode(upright(), "TIFF"))
    put("still.bmp", encode(upright(), "BMP"))
    put("still.webp", encode(upright(), "WEBP", quality=90))
    put("one-pixel.png", encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    put("panorama.jpg", encode(Image.new("RGB", (20_000, 100), QUADRANTS[1]), "JPEG", quality=80))
    big = os.urandom(10_000_000)  # 10 MB: split over ~150 APP2 markers in a JPEG
    put("icc-10mb.jpg", encode(plain, "JPEG", icc_profile=big))
    put("icc-10mb.png", encode(plain, "PNG", icc_profile=big), UNREADABLE)  # Pillow's 1 MB limit on iCCP
    exif = Image.Exif()
    exif[0x010E] = "x" * 10_000_000  # ImageDescription: a 10 MB EXIF block
    put("exif-10mb.png", encode(plain, "PNG", exif=exif))
    put("exif-10mb.webp", encode(plain, "WEBP", exif=exif.tobytes()))
    junk = b"Exif\x00\x00MM\x00\x2a" + struct.pack(">I", 0x7FFFFFFF) + bytes(20)  # first IFD far past the end
    put("broken-exif.jpg", good_jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + good_jpeg[2:])
    put("name with spaces.jpg", good_jpeg)
    put("ünïcødé 写真 📷.png", encode(Image.new("RGB", (16, 16), QUADRANTS[3]), "PNG"))
    put("new\nline.png", encode(Image.new("RGB", (16, 16), (40, 40, 40)), "PNG"))
    bad = os.fsencode(root) + b"/latin1-\xe9t\xe9.jpg"  # not UTF-8: kept by Python as surrogates
    with open(bad, "wb") as fh:
        fh.write(good_jpeg)
    expect["latin1-\\xe9t\\xe9.jpg"] = "file name is not valid UTF-8"
    os.symlink(root / "does-not-exist.jpg", root / "broken-link.jpg")
    expect["broken-link.jpg"] = "broken symbolic link"
    os.symlink(root / "loop-b.jpg", root / "loop-a.jpg")
    os.symlink(root / "loop-a.jpg", root / "loop-b.jpg")
    expect["loop-a.jpg"] = expect["loop-b.jpg"] = "symbolic link loop"
    os.symlink(root / "still.bmp", root / "link-to-file.bmp")  # a link to a file is followed
    expect["link-to-file.bmp"] = INDEXED
    os.mkfifo(root / "pipe.jpg")
    expect["pipe.jpg"] = "not a regular file"
    with open(root / "sparse-2gib.jpg", "wb") as fh:  # 2 GiB on paper, nothing on disk
        fh.truncate(2 << 30)
    expect["sparse-2gib.jpg"] = "file too large to index"
    if outside is not None:
        outside.mkdir(parents=True, exist_ok=True)
        write(outside / "secret.png", encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG"))
        os.symlink(outside, root / "linked-folder")
        expect["linked-folder"] = "symbolic link to a folder"
    return expect


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "odd-files")
    expected = make_odd_files(folder / "photos", folder / "elsewhere")
    for name, what in sorted(expected.items()):
        print(f"{what:32s} {name!r}")
    print(f"{len(expected)} odd files in {folder / 'photos'}")
