"""End to end in a real headless browser: ``pixquery ui`` on localhost, a typed query, the expected photo first.

Uses Debian's chromium + chromium-driver through Selenium (``.ci/run`` installs them); skipped, with
the reason, only where no browser can be had. The index holds five bundled sample photos, embedded
and captioned by the real default models, so the ranking is deterministic.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from indexer.lab.bench_ui import BrowserSession, find_browser, free_port, start_app, stop_app, wait_healthy
from indexer.config import EngineConfig
from indexer.engine import Engine

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "indexer" / "sample_photos"
PHOTOS = ("beagle_dog_on_table_01.jpg", "pizza_pepperoni_01.jpg", "surfer_on_wave_01.jpg",
          "yellow_sports_car_01.jpg", "elephant_closeup_01.jpg")


@pytest.mark.slow
def test_search_in_a_real_browser(tmp_path):
    browser = find_browser()
    if isinstance(browser, str):
        pytest.skip(browser)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(SAMPLES / name, photos / name)
    index_dir, cache_dir = tmp_path / "idx", tmp_path / "cache"
    with Engine(EngineConfig(index_dir=index_dir, progress=False)) as engine:
        assert engine.index(photos).new == len(PHOTOS)

    port = free_port()
    proc = start_app(index_dir, port, cache_dir=cache_dir, log_path=tmp_path / "app.log")
    session = None
    try:
        wait_healthy(port, proc)
        session = BrowserSession(*browser)
        session.open(f"http://127.0.0.1:{port}")
        seconds, names = session.search("a surfer riding a wave", expect=len(PHOTOS))
        shot = session.screenshot(Path(os.environ.get("PIXQUERY_SCREENSHOT_DIR", tmp_path)) / "ui-browser-test.png")
        assert names[0] == "surfer_on_wave_01.jpg", names
        assert sorted(names) == sorted(PHOTOS)
        assert shot.stat().st_size > 10_000
        body = session.driver.find_element("tag name", "body").text
        assert "Traceback" not in body and "5 results for" in body
        assert list((cache_dir / "thumbnails").glob("*-320.jpg")), "thumbnails come from the app's cache"
    finally:
        if session is not None:
            session.close()
        stop_app(proc)
    log = (tmp_path / "app.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
