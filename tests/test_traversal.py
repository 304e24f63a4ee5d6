"""No path traversal, and no read of a file that is not an indexed image, through the Engine's by-id lookups,
ui/security.py, thumbnails and the app (AppTest): ``..``, absolute paths, encoded slashes, NUL bytes, odd
numbers, ids that do not exist, and an indexed symbolic link pointed elsewhere after indexing.

Every file opened while the attempts run is recorded; none may be outside the photo folder, the index and
the app's cache. (The HTTP API of issue 21 brings its own endpoints: it must run the same list there.)
"""

from __future__ import annotations

import builtins
import io
import os
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import TinyCaptioner, TinyEncoder, make_image
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from ui import resources
from ui.security import ImageUnavailable, indexed_file
from ui.thumbnails import THUMB_SIZE, thumbnail

REPO = Path(__file__).resolve().parents[1]
HOSTILE = [
    "../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..\\..\\secret",
    "....//....//etc/passwd", "/etc/passwd\x00.png", "file:///etc/passwd", "\x00", "", " ", "1/../2", "1%2F..%2F2",
    "1e3", "0x10", "1.5", "-1", "+1", "1 OR 1=1", "1; DROP TABLE images", "９", "9" * 30, 10**30, -5, 1.5, float("nan"),
    True, None, [], {"id": 1}, b"1", 10**6,
]  # the secret's own path is added per test


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Photos (one a symbolic link to a picture), a secret folder beside them, the index, and a recorder of
    every file this process opens."""
    photos, secret = tmp_path / "photos", tmp_path / "secret"
    for name in ("red", "green", "blue"):
        make_image(photos / f"{name}.png", name)
    make_image(tmp_path / "linked-target.png", "yellow")
    os.symlink(tmp_path / "linked-target.png", photos / "link.png")
    make_image(secret / "private.png", "purple")
    (secret / "passwords.txt").write_text("hunter2")
    config = EngineConfig(index_dir=tmp_path / "idx", cache_dir=tmp_path / "cache", progress=False, captioner=None)
    engine = Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner())
    engine.index(photos)
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def record_open(file, *a, **kw):  # noqa: ANN001, ANN202
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(file))
        return real_open(file, *a, **kw)

    def record_os_open(path, *a, **kw):  # noqa: ANN001, ANN202
        opened.append(os.fsdecode(path))
        return real_os_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", record_open)
    monkeypatch.setattr(io, "open", record_open)
    monkeypatch.setattr(os, "open", record_os_open)
    yield engine, photos, secret, opened
    engine.close()


def secret_reads(opened: list[str], secret: Path, photos: Path) -> list[str]:
    """Opens of the secret folder or of what the hostile values name (libraries read /etc/mime.types and such)."""
    return [p for p in opened if p.startswith(str(secret)) or p.startswith("/etc/passwd")
            or os.path.realpath(p).startswith(str(secret))]


def test_by_id_lookups_refuse_everything_that_is_not_an_indexed_id(world):
    engine, photos, secret, opened = world
    attempts = HOSTILE + [str(secret / "private.png"), str(secret / "passwords.txt"), secret / "private.png"]
    tried = 0
    for value in attempts:
        for lookup in (engine.image, lambda v: indexed_file(engine, v), lambda v: engine.more_like_this(v, k=3),
                       lambda v: engine.image_vectors([v])):
            tried += 1
            try:
                result = lookup(value)
            except (InputError, ImageUnavailable):
                continue
            # no error: only "no such image" (None) for an id that does not exist, or nothing for no ids ([])
            nothing = result is None and isinstance(value, int) and not engine.image(value)
            assert nothing or isinstance(result, np.ndarray) and result.size == 0 and value == [], (value, result)
    assert not secret_reads(opened, secret, photos), secret_reads(opened, secret, photos)
    print(f"by-id lookups: {tried} hostile attempts, 0 succeeded")


def test_an_indexed_link_pointed_elsewhere_shows_nothing(world, tmp_path):
    engine, photos, secret, opened = world
    link_id = next(i for i, p in engine.paths().items() if p.endswith("link.png"))
    row, _ = indexed_file(engine, link_id)
    os.remove(photos / "link.png")
    os.symlink(secret / "private.png", photos / "link.png")  # swapped after indexing
    with pytest.raises(ImageUnavailable, match="changed since it was indexed"):
        thumbnail(tmp_path / "cache", Path(row.path), row.content_hash, THUMB_SIZE)
    os.remove(photos / "link.png")
    os.symlink(secret / "passwords.txt", photos / "link.png")
    with pytest.raises(ImageUnavailable, match="changed since it was indexed"):
        thumbnail(tmp_path / "cache", Path(row.path), row.content_hash, 600)
    assert not list((tmp_path / "cache").rglob("*.jpg"))  # no thumbnail of what the link points at now


def test_the_app_shows_nothing_for_hostile_ids_uploads_or_swapped_links(world, tmp_path, monkeypatch):
    engine, photos, secret, opened = world
    config = engine.config
    monkeypatch.setattr(resources, "engine_factory",
                        lambda: Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner()))
    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=60)
    at.run()
    at.text_input(key="query_input").set_value("red")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception
    link_id = next(i for i, p in engine.paths().items() if p.endswith("link.png"))
    os.remove(photos / "link.png")
    os.symlink(secret / "private.png", photos / "link.png")
    before = set((config.cache_dir / "thumbnails").glob("*"))  # made for the results so far
    tried = 0
    for value in HOSTILE + [str(secret / "private.png"), link_id]:
        red = {"kind": "text", "text": "red", "upload": None}
        for key, selected, source in (("selected", value, red), ("source", None, {"kind": "similar", "id": value})):
            tried += 1
            at.session_state["selected"], at.session_state["source"] = selected, source
            at.run()
            assert not at.exception, (value, [e.value for e in at.exception])
            page = "\n".join(str(e.value) for kind in ("markdown", "caption", "warning", "error", "info")
                             for e in getattr(at, kind))
            # a refusal names the value it refused (at most 80 characters of it): the attacker's own input, not
            # something read from the disk; before, this check passed only where pytest's folder made that
            # path longer than 80 characters
            shown = page.replace(repr(str(value)[:80]), "'<the value sent>'") if value is not None else page
            assert "hunter2" not in page and "private.png" not in shown and "Traceback" not in page, (value, key, page[-800:])
            if value is None and key == "selected":  # nothing selected: the results alone
                assert "results for" in page
            elif value != link_id:  # refused, with a message
                assert "not an image id" in page or "no image with id" in page, (value, page[-500:])
            else:  # the indexed link: its details, but no picture of what it points at now
                assert key == "source" or "changed since it was indexed" in page
    # an upload named like a path is kept under the cache, by content, whatever its name says
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, "PNG")
    at.session_state["source"] = None
    at.file_uploader(key="upload").set_value(("../../../../" + str(tmp_path / "evil.png"), buf.getvalue(), "image/png"))
    at.text_input(key="query_input").set_value("")
    at.form_submit_button[0].click()
    at.run()
    tried += 1
    assert not at.exception and not (tmp_path / "evil.png").exists()
    assert [p.parent for p in (config.cache_dir / "uploads").glob("*.png")] == [config.cache_dir / "uploads"]
    made = set((config.cache_dir / "thumbnails").glob("*")) - before
    assert all(np.asarray(Image.open(p)).mean(axis=(0, 1))[2] < 150 for p in made)  # none is the purple secret
    # link.png was opened (to compare its size with the indexed one: the secret's differs), never read
    assert not secret_reads([p for p in opened if not p.endswith("link.png")], secret, photos)
    st.cache_resource.clear()
    print(f"app: {tried} hostile attempts, 0 succeeded")
