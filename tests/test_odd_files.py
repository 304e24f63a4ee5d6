"""Every odd file a collection can hold (tests/odd_files.py): each is indexed correctly or skipped with its
reason recorded, the run never stops, says how many it skipped and why, and ``pixquery stats --skipped``
lists them. Files that change under the run are made to change at the worst moment through the reader's
one seam for opening files (``reader._open_file``)."""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TinyCaptioner, TinyEncoder, make_image
from indexer.cli import main
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.indexing import reader
from tiny_cli import tiny_init
from odd_files import (INDEXED, INVERSE, LEVELS, QUADRANTS, encode, gray_levels, half_transparent, make_odd_files,
                       palette_transparent, upright)


def engine_at(index_dir: Path, workers: int = 2) -> Engine:
    config = EngineConfig(index_dir=index_dir, progress=False, batch_size=4, captioner=None, workers=workers)
    return Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner())


def outcomes(engine: Engine, root: Path) -> dict[str, str]:
    """{path relative to root: "indexed" or the skip reason} of everything the index knows under root."""
    out = {os.path.relpath(p, root): INDEXED for p in engine.paths().values()}
    out.update({os.path.relpath(s["path"], root): s["reason"] for s in engine.skipped_files()})
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """The odd folder indexed once (module scope: the 2 GiB sparse file and 10 MB blocks are made once)."""
    base = tmp_path_factory.mktemp("odd")
    expected = make_odd_files(base / "photos", base / "elsewhere")
    engine = engine_at(base / "idx")
    summary = engine.index(base / "photos")
    yield base, expected, engine, summary
    engine.close()


def test_each_odd_file_is_indexed_or_skipped_with_its_reason(odd):
    base, expected, engine, summary = odd
    got = outcomes(engine, base / "photos")
    assert set(got) == set(expected), set(got) ^ set(expected)
    wrong = {name: (want, got[name]) for name, want in expected.items()
             if not (got[name] == INDEXED if want == INDEXED else got[name].startswith(want))}
    assert not wrong
    n_skipped = sum(want != INDEXED for want in expected.values())
    assert summary.skipped == n_skipped and summary.total_images == len(expected) - n_skipped
    kinds = {reason.split(" (")[0] for name, reason in got.items() if reason != INDEXED}
    assert set(summary.skipped_reasons) == kinds and sum(summary.skipped_reasons.values()) == n_skipped
    assert not any("secret" in p for p in engine.paths().values())  # nothing from outside the root


def test_pictures_are_indexed_as_they_look(odd):
    base, _, engine, _ = odd
    root = base / "photos"
    by_name = {os.path.relpath(p, root): i for i, p in engine.paths().items()}
    enc = TinyEncoder()

    def vec(name: str) -> np.ndarray:
        return engine.image_vectors([by_name[name]])[0]

    def embed(im: Image.Image) -> np.ndarray:
        return enc.encode_images([im])[0]

    up = embed(Image.open(io.BytesIO(encode(upright(), "JPEG", quality=95))))
    for n in range(2, 9):  # EXIF orientations: indexed upright, and stored otherwise
        assert cosine(vec(f"exif-{n}.jpg"), up) > 0.99, n
        assert cosine(embed(upright().transpose(INVERSE[n])), up) < 0.9, n  # (the oracle tells them apart)
        row = engine.image(by_name[f"exif-{n}.jpg"])
        assert (row.width, row.height) == (96, 64)  # as displayed (stored 64 x 96 for 5-8)
    for name in ("cmyk.jpg", "ycck.jpg", "progressive.jpg", "still.tiff", "still.bmp", "still.webp",
                 "link-to-file.bmp", "name with spaces.jpg", "broken-exif.jpg"):
        assert cosine(vec(name), up) > 0.99, name
    assert cosine(vec("gray16.png"), embed(Image.fromarray(gray_levels()).convert("RGB"))) > 0.999
    assert cosine(vec("rgb16.png"), embed(upright())) > 0.999
    assert cosine(vec("gray-alpha.png"), embed(half_transparent()[1])) > 0.999  # flattened on white
    assert cosine(vec("palette-transparent.png"), embed(palette_transparent()[1])) > 0.999
    stretched = (gray_levels() / max(LEVELS) * 255).astype(np.uint8)  # (the oracle sees a wrong scale)
    assert cosine(embed(Image.fromarray(stretched).convert("RGB")), embed(Image.fromarray(gray_levels()).convert("RGB"))) < 0.99
    for name in ("animated.gif", "animated.webp"):  # the first frame
        assert cosine(vec(name), embed(Image.new("RGB", (8, 8), QUADRANTS[0]))) > 0.99, name
    assert cosine(vec("panorama.jpg"), embed(Image.new("RGB", (8, 8), QUADRANTS[1]))) > 0.99
    pano = engine.image(by_name["panorama.jpg"])
    assert (pano.width, pano.height) == (20_000, 100)
    assert engine.image(by_name["ünïcødé 写真 📷.png"]).caption == "a yellow picture"
    assert engine.image(by_name["new\nline.png"]).caption == "a black picture"


def test_a_second_run_changes_nothing_and_stats_lists_the_skipped(odd, capsys):
    base, expected, engine, first = odd
    again = engine.index(base / "photos")
    assert (again.new, again.changed, again.deleted, again.embedded) == (0, 0, 0, 0)
    assert again.skipped == first.skipped and again.total_images == first.total_images
    assert main(["stats", "--skipped", "--db", str(engine.config.index_dir)]) == 0
    out = capsys.readouterr().out
    for name, want in expected.items():
        if want != INDEXED:
            assert f"skipped {base / 'photos' / name}: {want}" in out, name


def test_the_run_says_how_many_it_skipped_and_why(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    make_image(photos / "red.png", "red")
    (photos / "notes.jpg").write_text("not a picture")
    (photos / "empty.png").write_bytes(b"")
    os.symlink(photos / "gone.jpg", photos / "dangling.jpg")
    monkeypatch.setattr(Engine, "__init__", tiny_init(Engine.__init__))
    assert main(["index", str(photos), "--db", str(tmp_path / "idx"), "--captioner", "none", "-q"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3" in out
    assert "skipped files by reason: broken symbolic link: 1, empty file: 1, not a readable image: 1" in out


@pytest.fixture
def live(tmp_path, monkeypatch):
    """Files under ``photos`` plus a hook: ``on_open[name]`` runs when the reader opens that file."""
    photos = tmp_path / "photos"
    for i, colour in enumerate(TinyEncoder.COLOURS):
        make_image(photos / f"{i:02d}-{colour}.png", colour)
    for name in ("a", "b", "c"):
        make_image(photos / "going" / f"{name}.png", "green", stripe=(ord(name), 0, 0))
    hooks: dict[str, callable] = {}
    real = reader._open_file

    def open_file(path: str):
        hook = hooks.pop(os.path.basename(path), None)
        return hook(path, real) if hook is not None else real(path)

    monkeypatch.setattr(reader, "_open_file", open_file)
    return photos, hooks


class Midway:
    """A file object that lets ``change()`` happen after half of the file was read."""

    def __init__(self, fh, change) -> None:
        self.fh, self.change = fh, change

    def fileno(self) -> int:
        return self.fh.fileno()

    def read(self, n: int = -1) -> bytes:
        size = os.fstat(self.fh.fileno()).st_size
        first = self.fh.read(size // 2)
        self.change()
        return first + self.fh.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def test_files_that_change_while_they_are_read_are_skipped_then_indexed(tmp_path, live):
    photos, hooks = live

    def delete(path, real):
        fh = real(path)
        os.unlink(path)  # open, then deleted: the bytes are still readable, but the file is gone
        return fh

    def truncate(path, real):
        return Midway(real(path), lambda: os.truncate(path, 100))

    def rewrite(path, real):
        def change() -> None:  # a new picture written over the old one, in place
            new = make_image(tmp_path / "new.png", "orange", size=(20, 20)).read_bytes()
            with open(path, "r+b") as fh:
                fh.write(new)
                fh.truncate()
            os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
        return Midway(real(path), change)

    def vanish_folder(path, real):
        shutil.rmtree(photos / "going")
        return real(path)

    hooks.update({"00-red.png": delete, "01-green.png": truncate, "02-blue.png": rewrite, "a.png": vanish_folder})
    engine = engine_at(tmp_path / "idx", workers=1)  # one reader: b and c are opened after a's folder went
    s = engine.index(photos)
    got = outcomes(engine, photos)
    assert got["00-red.png"].startswith("file was deleted or replaced while it was read")
    assert got["01-green.png"].startswith("file changed while it was read")
    assert got["02-blue.png"].startswith("file changed while it was read")
    assert all(got[f"going/{n}.png"].startswith("file vanished before it was read") for n in "abc")
    assert s.skipped == 6 and s.new == 5 and s.total_images == 5
    # the next run reads again what changed, and forgets what is gone
    s2 = engine.index(photos)
    assert (s2.new, s2.skipped) == (1, 1)
    got = outcomes(engine, photos)
    assert got["01-green.png"].startswith("not a readable image") and "00-red.png" not in got  # half a PNG
    assert got["02-blue.png"] == INDEXED
    blue = next(i for i, p in engine.paths().items() if p.endswith("02-blue.png"))
    assert engine.image(blue).caption == "a orange picture" and engine.image(blue).width == 20
    assert not any(name.startswith("going") for name in got)


def test_a_file_replaced_after_listing_is_recorded_with_what_was_read(tmp_path, live):
    photos, hooks = live

    def replace(path, real):
        make_image(Path(path), "white", size=(10, 10))
        os.utime(path, (1_000_000, 1_000_000))
        return real(path)

    hooks["03-yellow.png"] = replace
    engine = engine_at(tmp_path / "idx")
    engine.index(photos)
    row = next(engine.image(i) for i, p in engine.paths().items() if p.endswith("03-yellow.png"))
    assert (row.width, row.mtime, row.byte_size) == (10, 1_000_000, os.path.getsize(photos / "03-yellow.png"))
    assert engine.index(photos).unchanged == engine.index(photos).total_images  # nothing read again


def _as_unprivileged_reader(monkeypatch) -> None:
    """As root, permissions do not stop a read; make the reader's opens run with the file-system identity of
    user nobody (Linux ``setfsuid``, per thread), so the kernel checks them as for any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    real = reader._open_file

    def open_as_nobody(path: str):
        libc.setfsuid(65534)
        try:
            if libc.setfsuid(-1) != 65534:
                pytest.fail("setfsuid did not take effect")
            return real(path)
        finally:
            libc.setfsuid(0)

    monkeypatch.setattr(reader, "_open_file", open_as_nobody)


def test_unreadable_permissions_are_skipped_with_the_reason(monkeypatch):
    if os.geteuid() == 0:
        if not hasattr(ctypes.CDLL(None), "setfsuid"):
            pytest.skip("running as root, and this C library has no setfsuid to read as another user")
        _as_unprivileged_reader(monkeypatch)
    base = Path(tempfile.mkdtemp(prefix="pixquery-perm-"))  # not under pytest's root-only tmp folders
    try:
        base.chmod(0o755)
        photos = base / "photos"
        make_image(photos / "open.png", "red")
        make_image(photos / "locked.png", "blue")
        photos.chmod(0o755)
        (photos / "open.png").chmod(0o644)
        (photos / "locked.png").chmod(0o000)
        engine = engine_at(base / "idx")
        s = engine.index(photos)
        got = outcomes(engine, photos)
        assert got == {"open.png": INDEXED, "locked.png": "cannot read file (PermissionError: Permission denied)"}
        assert s.skipped_reasons == {"cannot read file": 1}
        engine.close()
    finally:
        (base / "photos" / "locked.png").chmod(0o644)
        shutil.rmtree(base)
