"""One writer at a time (the index's write lock), readers alongside it, and Ctrl-C: the fast cases, in one
process or with a tiny helper process. The long runs with real kills are in tests/test_kills.py (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import TinyCaptioner, TinyEncoder, make_image
from index_state import snapshot
from indexer.cli import main
from indexer.cli.args import EXIT_BUSY, EXIT_INTERRUPTED
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import IndexBusyError
from indexer.storage.lock import LOCK_FILE, WriteLock
from tiny_cli import tiny_init

REPO = Path(__file__).resolve().parents[1]


def engine_at(index_dir: Path, captions: bool = True, **kw) -> Engine:
    config = EngineConfig(index_dir=index_dir, progress=False, batch_size=4, captioner=None, **kw)
    return Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner() if captions else None)


def many_photos(root: Path, n: int) -> Path:
    colours = list(TinyEncoder.COLOURS)
    for i in range(n):
        make_image(root / f"{i // 10:02d}" / f"p{i:03d}.png", colours[i % len(colours)], size=(24, 16),
                   stripe=(i % 256, (i * 7) % 256, 50))
    return root


def test_a_second_writer_is_refused_with_the_holder_named_or_waits(tmp_path, photo_dir):
    first, second = engine_at(tmp_path / "idx"), engine_at(tmp_path / "idx")
    first.index(photo_dir)
    with first.writing():
        with pytest.raises(IndexBusyError, match=rf"pid {os.getpid()} .* --wait to wait"):
            second.index(photo_dir)
        assert len(second.search("red", k=50)) == 16  # searches never wait for the writer
        with pytest.raises(IndexBusyError, match="after waiting 0.3 s"):
            engine_at(tmp_path / "idx", wait_for_lock=0.3).doctor()
        waiter = engine_at(tmp_path / "idx", wait_for_lock=True)
        done = threading.Event()
        thread = threading.Thread(target=lambda: (waiter.index(photo_dir), done.set()))
        thread.start()
        time.sleep(0.5)
        assert not done.is_set()  # waiting for the lock
    thread.join(timeout=30)
    assert done.is_set()
    assert second.index(photo_dir).unchanged == 16  # free again once the holders are done


def test_the_lock_of_a_killed_process_is_released_by_the_kernel(tmp_path, photo_dir, monkeypatch):
    monkeypatch.setattr(Engine, "__init__", tiny_init(Engine.__init__))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from indexer.storage.lock import WriteLock;"
         "lock = WriteLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path / "idx")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["index", str(photo_dir), "--db", str(tmp_path / "idx"), "--captioner", "none"]) == EXIT_BUSY
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        lock = WriteLock(tmp_path / "idx")
        lock.acquire()  # at once: nothing stuck
        assert f"pid {holder.pid}" not in lock.holder() and (tmp_path / "idx" / LOCK_FILE).exists()
        lock.release()
    finally:
        holder.kill()
        holder.wait()


def test_only_the_lock_holder_deletes_vector_files(tmp_path, photo_dir):
    writer = engine_at(tmp_path / "idx", checkpoint_every=2)
    writer.index(photo_dir)
    folder = writer.config.vectors_dir
    reader = engine_at(tmp_path / "idx")
    index = reader.open()  # a process that did not take the lock
    (folder / "images-00077777.rows.npy").write_bytes(b"someone else's checkpoint in progress")
    before = {p.name for p in folder.iterdir()}
    index.vectors.images.put(index.vectors.ids()[:1], TinyEncoder().encode_texts(["red"]))
    index.vectors.commit(index.store)
    assert before <= {p.name for p in folder.iterdir()}  # it wrote its generation, and deleted nothing
    make_image(photo_dir / "new.png", "orange", stripe=(9, 9, 9))
    writer.index(photo_dir)  # the writer (lock holder) collects what no kept generation names
    assert not (folder / "images-00077777.rows.npy").exists()


class InterruptingEncoder(TinyEncoder):
    """Sends this process a SIGINT (a Ctrl-C) while it embeds its ``at``-th batch."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.batches = at, 0

    def encode_pixels(self, pixels):  # noqa: ANN001, ANN201
        self.batches += 1
        if self.batches == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().encode_pixels(pixels)


def test_ctrl_c_stops_after_the_batch_in_flight_commits_and_exits_130(tmp_path, monkeypatch, capsys):
    photos = many_photos(tmp_path / "photos", 40)
    encoder = InterruptingEncoder(at=3)
    init = tiny_init(Engine.__init__)

    def with_encoder(self, config=None, **kw):  # noqa: ANN001
        kw.setdefault("encoder", encoder)
        init(self, config, **kw)

    monkeypatch.setattr(Engine, "__init__", with_encoder)
    args = ["index", str(photos), "--db", str(tmp_path / "idx"), "--captioner", "none", "--batch-size", "4", "-q"]
    assert main(args) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "stopping after the current batch" in err and "run the same command again to carry on" in err
    kept = snapshot(tmp_path / "idx")
    assert kept["ids"] == 12 == kept["vectors"]  # the batch in flight (the 3rd) was finished and committed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back
    assert main(args) == 0  # carries on: the 28 others
    assert snapshot(tmp_path / "idx")["ids"] == 40
    monkeypatch.undo()
    engine_at(tmp_path / "clean", captions=False).index(photos)
    assert snapshot(tmp_path / "idx")["rows"] == snapshot(tmp_path / "clean")["rows"]


def test_ctrl_c_during_recaption_keeps_the_new_captions_and_carries_on(tmp_path, monkeypatch, capsys):
    photos = many_photos(tmp_path / "photos", 24)
    engine = engine_at(tmp_path / "idx")
    engine.index(photos)
    engine.close()
    calls = {"n": 0}

    class Interrupting(TinyCaptioner):
        def caption_pixels(self, pixels, options=None):  # noqa: ANN001, ANN201
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return super().caption_pixels(pixels)

    init = tiny_init(Engine.__init__)
    interrupting = Interrupting(name="test:other", template="{}, in a photo")

    def with_captioner(self, config=None, **kw):  # noqa: ANN001
        kw.setdefault("captioner", interrupting if config is not None and config.captioner else None)
        init(self, config, **kw)

    monkeypatch.setattr(Engine, "__init__", with_captioner)
    args = ["recaption", "--db", str(tmp_path / "idx"), "--captioner", "test:other", "--batch-size", "4", "-q"]
    assert main(args) == EXIT_INTERRUPTED
    assert "captioned 8 of 24 images" in capsys.readouterr().out
    captions = [r[4] for r in snapshot(tmp_path / "idx")["rows"].values()]
    assert sum(c.endswith(", in a photo") for c in captions) == 8
    calls["n"] = 10
    assert main(args) == 0
    assert "captioned 16 of 24 images (8 already done by an interrupted run)" in capsys.readouterr().out
    assert all(r[4].endswith(", in a photo") for r in snapshot(tmp_path / "idx")["rows"].values())
