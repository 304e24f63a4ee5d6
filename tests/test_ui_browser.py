"""End to end in a real headless browser: ``pixquery ui`` on localhost, a typed query, the expected photo first.

Runs ``pixquery bench ui`` (which starts the app, drives Debian's chromium through Selenium and reports
what the page showed) on an index of five bundled sample photos, embedded and captioned by the real
default models, so the ranking is deterministic. ``.ci/run`` installs chromium and chromium-driver; the
test skips, with the reason, only where no browser can be had.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.config import EngineConfig
from indexer.engine import Engine

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "indexer" / "sample_photos"
PHOTOS = ("beagle_dog_on_table_01.jpg", "pizza_pepperoni_01.jpg", "surfer_on_wave_01.jpg",
          "yellow_sports_car_01.jpg", "elephant_closeup_01.jpg")


def no_browser() -> str | None:
    """Why no browser test can run here (None: it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not (shutil.which("chromium") or Path("/usr/bin/chromium").exists()) or not shutil.which("chromedriver"):
        return "no Chromium/ChromeDriver (Debian: apt-get install chromium chromium-driver)"
    return None


@pytest.mark.slow
def test_search_in_a_real_browser(tmp_path):
    reason = no_browser()
    if reason:
        pytest.skip(reason)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(SAMPLES / name, photos / name)
    index_dir = tmp_path / "idx"
    with Engine(EngineConfig(index_dir=index_dir, progress=False)) as engine:
        assert engine.index(photos).new == len(PHOTOS)
    shot = Path(os.environ.get("PIXQUERY_SCREENSHOT_DIR", tmp_path)) / "ui-browser-test.png"
    query = "a surfer riding a wave"
    out = subprocess.run([sys.executable, "-m", "indexer.cli", "bench", "ui", "--use-db", "--db", str(index_dir),
                          "--runs", "1", "--query", query, "-k", str(len(PHOTOS)), "--screenshot", str(shot), "-q"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    names = report["results"][query]
    assert names[0] == "surfer_on_wave_01.jpg", names
    assert sorted(names) == sorted(PHOTOS)
    assert shot.stat().st_size > 10_000
    assert report["page_shows_traceback"] is False and report["app_log_tracebacks"] == 0
    assert report["thumbnails_made"] >= len(PHOTOS)  # thumbnails come from the app's own cache
