"""Decoding odd images: draft mode, EXIF rotation, every colour mode, damaged files."""

import io

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import ImageDecodeError
from retrieval.images import load_image, to_tensor


def jpeg_bytes(size, colour=(200, 100, 50), exif=None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", exif=exif or Image.Exif())
    return buf.getvalue()


def test_large_jpeg_uses_draft_mode_but_reports_true_size():
    d = load_image(jpeg_bytes((3000, 2000)), draft_size=448)
    assert (d.width, d.height) == (3000, 2000)
    assert 448 <= min(d.image.size) < 2000  # decoded at a reduced DCT scale, never below the draft size


def test_exif_orientation_and_date_taken():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    exif.get_ifd(0x8769)[0x9003] = "2021:07:04 12:30:00"
    d = load_image(jpeg_bytes((80, 40), exif=exif))
    assert (d.width, d.height) == (40, 80) and d.image.size == (40, 80)
    assert d.taken_at is not None and d.taken_at.year == 2021 and d.taken_at.month == 7


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1", "F"])
def test_every_mode_becomes_rgb(mode, tmp_path):
    im = Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16", "F") else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    im.save(path, fmt)
    d = load_image(path)
    assert d.image.mode == "RGB" and d.image.size == (20, 10)


def test_transparent_png_is_flattened_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    path = tmp_path / "t.png"
    im.save(path)
    assert load_image(path).image.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_first_frame_and_tiny_image(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    px = load_image(path).image.getpixel((0, 0))
    assert px[0] > 200 and px[2] < 50
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1)).save(one)
    assert to_tensor(load_image(one).image, 224, (0.5,) * 3, (0.5,) * 3).shape == (3, 224, 224)


@pytest.mark.parametrize("data", [b"", b"not an image at all", jpeg_bytes((64, 64))[:200]])
def test_damaged_data_is_a_typed_error(data):
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        load_image(data)


def test_to_tensor_normalises():
    x = to_tensor(Image.new("RGB", (10, 10), (255, 0, 127)), 8, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), [1.0, -1.0, (127 / 255 - 0.5) / 0.5], atol=1e-6)
