"""What the app lets in from the browser (ui/security.py), its thumbnails, and how ``pixquery ui`` starts it."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import TinyEncoder, make_image
from indexer.cli import build_parser, main
from indexer.cli.args import EXIT_USAGE
from indexer.cli.everyday import ui_command
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.indexing.discover import hash_bytes
from ui.security import (MAX_UPLOAD_BYTES, ImageUnavailable, UploadRejected, check_upload, indexed_file,
                         parse_image_id, save_upload)
from ui.thumbnails import THUMB_SIZE, thumbnail, thumbnail_path


def png_bytes(size=(40, 30), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def engine(tmp_path, photo_dir):
    e = Engine(EngineConfig(index_dir=tmp_path / "idx", cache_dir=tmp_path / "cache", progress=False,
                            captioner=None), encoder=TinyEncoder())
    e.index(photo_dir)
    yield e
    e.close()


def test_images_are_served_by_index_id_only(engine, photo_dir):
    red_id = next(i for i, p in engine.paths().items() if p.endswith("a/red.png"))
    row, path = indexed_file(engine, red_id)
    assert path == photo_dir / "a" / "red.png" and row.id == red_id
    assert indexed_file(engine, str(red_id))[1] == path  # an id that arrived as text
    for bad in ("../../etc/passwd", "/etc/passwd", "1; DROP TABLE images", "-1", True, "1.5", ""):
        with pytest.raises(InputError):
            indexed_file(engine, bad)
    with pytest.raises(InputError, match="no image with id"):
        indexed_file(engine, 10**6)
    (photo_dir / "a" / "red.png").unlink()
    with pytest.raises(ImageUnavailable, match="missing"):
        indexed_file(engine, red_id)
    assert parse_image_id(7) == 7 and parse_image_id(" 12 ") == 12


def test_uploads_are_bounded_in_bytes_pixels_and_format(tmp_path):
    assert check_upload(png_bytes()).size == (40, 30)
    big = check_upload(png_bytes((3000, 2000)))
    assert max(big.size) == 1024 and big.mode == "RGB"  # shrunk before anyone uses it
    with pytest.raises(UploadRejected, match="empty"):
        check_upload(b"")
    with pytest.raises(UploadRejected, match="limit is 20 MB"):
        check_upload(b"\xff" * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(UploadRejected, match="not a readable image"):
        check_upload(b"GIF89a but not really" * 10)
    bomb = png_bytes((10_000, 6_000), mode="1")  # 60 megapixels in a few KB
    assert len(bomb) < 100_000
    with pytest.raises(UploadRejected, match="megapixels"):
        check_upload(bomb)
    with pytest.raises(UploadRejected, match="not accepted"):
        check_upload(png_bytes(fmt="PPM"))
    kept = save_upload(png_bytes(), tmp_path / "uploads")
    assert kept.parent == tmp_path / "uploads" and kept.suffix == ".png" and len(kept.stem) == 32
    assert save_upload(png_bytes(), tmp_path / "uploads") == kept  # same content, same file
    assert not list((tmp_path / "uploads").glob("*.tmp"))


def content(path: Path) -> str:
    return hash_bytes(path.read_bytes())


def test_thumbnails_are_made_once_small_and_keyed_by_content(tmp_path):
    src = make_image(tmp_path / "big.jpg", "green", size=(1200, 800))
    cache, digest = tmp_path / "cache", content(src)
    t = thumbnail(cache, src, digest, THUMB_SIZE)
    assert t == thumbnail_path(cache, digest, THUMB_SIZE) == cache / "thumbnails" / f"{digest}-{THUMB_SIZE}.jpg"
    with Image.open(t) as im:
        assert im.size == (THUMB_SIZE, 240) and im.format == "JPEG"
    mtime = t.stat().st_mtime_ns
    src.unlink()
    assert thumbnail(cache, src, digest, THUMB_SIZE).stat().st_mtime_ns == mtime  # from disk, not remade
    with pytest.raises(ImageUnavailable, match="missing"):
        thumbnail(cache, src, "def456", THUMB_SIZE)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageUnavailable, match="cannot be read"):
        thumbnail(cache, tmp_path / "bad.jpg", content(tmp_path / "bad.jpg"), THUMB_SIZE)
    with pytest.raises(ValueError):
        thumbnail_path(cache, "../../x", 320)
    tall = make_image(tmp_path / "tall.png", "red", size=(300, 900))
    preview = thumbnail(cache, tall, content(tall), 600)
    with Image.open(preview) as im:
        assert im.size == (200, 600)  # previews keep the whole picture


def test_thumbnails_come_only_from_the_indexed_bytes(tmp_path):
    src = make_image(tmp_path / "photo.png", "green")
    digest = content(src)
    make_image(src, "red")  # rewritten after indexing
    with pytest.raises(ImageUnavailable, match="changed since it was indexed"):
        thumbnail(tmp_path / "cache", src, digest, THUMB_SIZE)
    assert not (tmp_path / "cache" / "thumbnails").exists() or not list((tmp_path / "cache" / "thumbnails").iterdir())


def test_ui_command_binds_localhost_and_passes_settings(tmp_path):
    args = build_parser().parse_args(["ui", "--db", str(tmp_path / "idx"), "--port", "8600", "--offline",
                                      "--read-only"])
    cmd, env = ui_command(args)
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and Path(cmd[4]).name == "app.py"
    opts = dict(zip(cmd[5::2], cmd[6::2]))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8600"
    assert opts["--browser.gatherUsageStats"] == "false" and opts["--server.maxUploadSize"] == "20"
    assert opts["--client.showErrorDetails"] == "none"
    assert env["PIXQUERY_DB"] == str((tmp_path / "idx").resolve()) and env["PIXQUERY_OFFLINE"] == "1"
    assert env["PIXQUERY_UI_READ_ONLY"] == "1"


def test_pixquery_ui_warns_when_exposed_and_rejects_bad_ports(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(os, "execvpe", lambda exe, cmd, env: started.append(cmd) or 0)
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: started.append(cmd) or 0)
    assert main(["ui", "--host", "0.0.0.0", "--db", str(tmp_path)]) in (0, None)
    err = capsys.readouterr().err
    assert "anyone who can reach this address can search and see your photos" in err
    assert "--server.address" in started[0] and "0.0.0.0" in started[0]
    assert main(["ui", "--port", "70000"]) == EXIT_USAGE
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    main(["ui", "--db", str(tmp_path)])
    assert "warning" not in capsys.readouterr().err and len(started) == 2
