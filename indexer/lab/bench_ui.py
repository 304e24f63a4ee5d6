"""``pixquery bench ui``: the app as a person meets it, timed in a real headless browser.

* first page load: from starting ``pixquery ui`` to the search box on screen;
* search: from pressing Enter in the search box to a page showing all its result thumbnails
  (images loaded in the browser): a first pass over the queries (thumbnails made as results first
  show up) and a second pass (thumbnails on disk);
* the same search measured on the server alone (one Streamlit script run, AppTest), which needs no browser.

The index is synthetic unless ``--db`` names one: the bundled sample photos are indexed with the
configured models, then hard-linked up to N files and indexed again (the pipeline copies the vectors
of content it knows, nothing is embedded twice), and each copy's vectors get a little noise so the
copies rank apart. The app's code is driven, never imported (nothing imports ``ui/``).

The report also says what the browser saw (the file names of each query's results, whether the page
or the app's log showed a traceback, how many thumbnails the app made), so the browser test
(tests/test_ui_browser.py) runs this command and checks it.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np

from indexer.config import EngineConfig
from indexer.errors import InputError

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver",)
QUERIES = ("a dog on the grass", "a plate of food", "a city at night", "people playing sports", "a cat",
           "a bridge in the fog", "a yellow car", "a person on a bicycle", "an animal in a field", "a cup of coffee")
K = 24  # results per page: the app's default


# --- a browser, if this machine has one -----------------------------------------------------------------
def find_browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or the reason there is no usable browser."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    chromium = next((p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("chromium")
    driver = next((p for p in CHROMEDRIVER_CANDIDATES if os.access(p, os.X_OK)), None) or shutil.which("chromedriver")
    if not chromium or not driver:
        return "no Chromium/ChromeDriver (Debian: apt-get install chromium chromium-driver)"
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(index_dir: Path, port: int, cache_dir: Path | None = None, log_path: Path | None = None,
              extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``pixquery ui`` on 127.0.0.1:port as its own process (stop it with ``stop_app``)."""
    cmd = [sys.executable, "-m", "indexer.cli", "ui", "--db", str(index_dir), "--port", str(port), *extra]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_app(proc: subprocess.Popen) -> None:
    """Stop the app started by ``start_app`` (its own process group: nothing it started is left behind)."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 90) -> float:
    """Seconds until the app's server answers its health check."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"pixquery ui exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"the app did not answer on port {port} within {timeout:.0f} s")


class BrowserSession:
    """One headless Chromium page on the app, driven by Selenium."""

    SEARCH_BOX = "input[aria-label='Describe the photo you are looking for']"

    def __init__(self, chromium: str, chromedriver: str, width: int = 1400, height: int = 1000) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-extensions", f"--window-size={width},{height}",
                    f"--user-data-dir={tempfile.mkdtemp(prefix='pixquery-chromium-')}"):
            opts.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)

    def close(self) -> None:
        self.driver.quit()

    def open(self, url: str, timeout: float = 90) -> float:
        """Load the app; seconds until the search box is on screen."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        t0 = time.perf_counter()
        self.driver.get(url)
        WebDriverWait(self.driver, timeout).until(ec.visibility_of_element_located((By.CSS_SELECTOR, self.SEARCH_BOX)))
        return time.perf_counter() - t0

    _STATE_JS = """
        const marker = arguments[0];
        const names = Array.from(document.querySelectorAll('[data-testid="stCaptionContainer"]'))
            .map(e => e.innerText.trim()).filter(t => /^[^\\s/]+\\.(jpe?g|png|webp|gif|bmp|tiff?)$/i.test(t));
        const loaded = Array.from(document.querySelectorAll('[data-testid="stImage"] img'))
            .filter(i => i.complete && i.naturalWidth > 0).length;
        // the script run that wrote the marker has finished: no stale results left on the page
        const app = document.querySelector('[data-testid="stApp"]');
        const running = !app || app.getAttribute('data-test-script-state') !== 'notRunning';
        return [document.body.innerText.includes(marker), names, loaded, running];
    """

    def search(self, query: str, expect: int, timeout: float = 60) -> tuple[float, list[str]]:
        """Type ``query``, press Enter; (seconds until ``expect`` results show with their images, names)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element(By.CSS_SELECTOR, self.SEARCH_BOX)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(query)
        marker = f"results for “{query}”"
        t0 = time.perf_counter()
        box.send_keys(Keys.ENTER)
        while time.perf_counter() - t0 < timeout:
            shown, names, loaded, running = self.driver.execute_script(self._STATE_JS, marker)
            if shown and not running and len(names) >= expect and loaded >= expect:
                return time.perf_counter() - t0, names
            time.sleep(0.01)
        raise TimeoutError(f"{expect} results for {query!r} did not show within {timeout:.0f} s")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


# --- the synthetic index -------------------------------------------------------------------------------------
def build_synthetic_index(workdir: Path, n_images: int, config: EngineConfig, noise: float = 0.35,
                          seed: int = 0) -> Path:
    """Index ``n_images`` hard links of the bundled sample photos into ``workdir/index``; returns the index folder."""
    from indexer.engine import Engine

    photos = sorted(Path(str(resources.files("indexer") / "sample_photos")).glob("*.jpg"))
    folder = workdir / "photos"
    for i in range(n_images):
        src = photos[i % len(photos)]
        # the first copy of each photo in base/, the rest in copies/: a run only recognises content
        # indexed by an earlier run, so base/ is indexed first and copies/ costs no model work
        sub = "base" if i < len(photos) else f"copies/{i // 1000:02d}"
        dst = folder / sub / f"{i:05d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    cfg = replace(config, index_dir=workdir / "index", progress=False)
    with Engine(cfg) as engine:
        engine.index(folder / "base")
        if (folder / "copies").is_dir():
            engine.index(folder / "copies")
        writer = engine.writer()
        rng = np.random.default_rng(seed)
        for index in (writer.vectors.images, writer.vectors.captions):
            ids = index.ids()
            if not len(ids):
                continue
            vecs = index.reconstruct(ids)
            vecs = vecs + rng.standard_normal(vecs.shape).astype(np.float32) * (noise / np.sqrt(vecs.shape[1]))
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            index.put(ids, vecs.astype(np.float32))
        writer.checkpoint()
    return cfg.index_dir


# --- the benchmark ---------------------------------------------------------------------------------------------
def server_side_search_s(index_dir: Path, cache_dir: Path, queries: tuple[str, ...], k: int) -> list[float]:
    """One Streamlit script run per search (AppTest, no browser): engine + thumbnails + page building."""
    from streamlit.testing.v1 import AppTest

    from indexer.cli.everyday import app_path

    os.environ["PIXQUERY_DB"], os.environ["PIXQUERY_CACHE_DIR"] = str(index_dir), str(cache_dir)
    at = AppTest.from_file(str(app_path()), default_timeout=120)
    at.run()
    at.sidebar.select_slider(key="k").set_value(k).run()
    times = []
    for q in queries:
        at.text_input(key="query_input").set_value(q)
        at.form_submit_button[0].click()
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
        if at.exception or not any("results for" in m.value for m in at.markdown):
            raise InputError(f"the app showed no results for {q!r}")
    return times


def bench_ui(config: EngineConfig, n_images: int, runs: int, index_dir: Path | None = None,
             screenshot: Path | None = None, queries: tuple[str, ...] | None = None, k: int = K) -> dict:
    """Timings of the app; ``index_dir`` None: a synthetic index of ``n_images`` in a temporary folder."""
    from indexer.lab.bench import machine

    if runs < 1 or k < 1 or (index_dir is None and n_images < k):
        raise InputError(f"need --runs >= 1, -k >= 1 and --images >= k ({k})")
    pool = queries or QUERIES
    queries = tuple((pool * (runs // len(pool) + 1))[:runs])
    report: dict = {"k": k, "runs": runs, "load_average_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="pixquery-bench-ui-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        if index_dir is None:
            index_dir = build_synthetic_index(tmp_path, n_images, config)
            report["synthetic_index_s"] = round(time.perf_counter() - t0, 1)
        from indexer.engine import Engine

        with Engine(replace(config, index_dir=index_dir)) as engine:
            report["images"] = engine.stats()["images"]
            report["encoder"] = engine.index_info.name
        cache_dir = tmp_path / "cache"  # fresh thumbnails; models come from the package
        browser = find_browser()
        if isinstance(browser, str):
            report["browser"] = f"skipped: {browser}"
        else:
            port = free_port()
            t0 = time.perf_counter()
            proc = start_app(index_dir, port, cache_dir=cache_dir, log_path=tmp_path / "app.log")
            session = None
            try:
                report["first_load_server_ready_s"] = round(wait_healthy(port, proc), 2)
                session = BrowserSession(*browser)
                session.open(f"http://127.0.0.1:{port}")
                report["first_load_search_box_s"] = round(time.perf_counter() - t0, 2)
                session.driver.execute_script("window.scrollTo(0, 0)")
                # first pass: thumbnails are made as results first show up; second pass: all on disk
                first = [session.search(q, expect=k) for q in queries]
                warm = [session.search(q, expect=k)[0] for q in queries]
                report["browser_search_first_pass_s"] = _summary([t for t, _ in first])
                report["browser_search_second_pass_s"] = _summary(warm)
                report["results"] = {q: names for q, (_, names) in zip(queries, first)}
                if screenshot is not None:
                    session.search(queries[0], expect=k)
                    report["screenshot"] = str(session.screenshot(screenshot))
                report["page_shows_traceback"] = "Traceback" in session.driver.find_element("tag name", "body").text
            finally:
                if session is not None:
                    session.close()
                stop_app(proc)
            log = (tmp_path / "app.log").read_text(errors="replace")
            report["app_log_tracebacks"] = log.count("Traceback")
            report["thumbnails_made"] = len(list((cache_dir / "thumbnails").glob("*.jpg")))
        report["server_side_search_s"] = _summary(server_side_search_s(index_dir, cache_dir, queries, k))
    report["load_average_after"] = round(os.getloadavg()[0], 2)  # other work on this machine skews the figures
    report["machine"] = machine()
    return report


def _summary(times: list[float]) -> dict:
    return {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
            "max": round(max(times), 3), "n": len(times)}
