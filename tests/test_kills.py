"""Real processes, real signals (slow: run with --run-slow): ``pixquery index`` and ``recaption`` killed
with SIGKILL at random moments, again and again, then let finish; Ctrl-C; an indexing run with four
searching processes, the app and the CLI searching beside it, and a second writer.

The oracle of a finished index is a clean build of the same folder (tests/index_state.py); after every
kill ``pixquery doctor`` must find the index consistent, and what was committed before the kill must
still be there. The commands run through tests/tiny_cli.py (tiny models, a delay per model batch so a
run lasts long enough to be hit anywhere, a checkpoint every 8 rows).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import streamlit as st

from conftest import TinyCaptioner, TinyEncoder, make_image
from index_state import snapshot
from indexer.cli.args import EXIT_BUSY, EXIT_INTERRUPTED
from indexer.config import EngineConfig
from indexer.engine import Engine
from odd_files import make_odd_files

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
KILLS = 6


def engine_at(index_dir: Path, captioner: str = "test:tiny") -> Engine:
    template = {"test:tiny": "a {} picture", "test:other": "{}, in a photo"}[captioner]
    config = EngineConfig(index_dir=index_dir, progress=False, batch_size=4, captioner=None)
    return Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner(name=captioner, template=template))


def collection(root: Path, n: int, start: int = 0) -> Path:
    colours = list(TinyEncoder.COLOURS)
    for i in range(start, start + n):
        make_image(root / f"{i // 25:02d}" / f"p{i:03d}.png", colours[i % len(colours)], size=(24, 16),
                   stripe=(i % 256, (i * 7) % 256, (i * 13) % 256))
    return root


def env(delay: float = 0.08, every: int = 8, hurry: Path | None = None) -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "PIXQUERY_TEST_DELAY": str(delay),
            "PIXQUERY_CHECKPOINT_EVERY": str(every), "PIXQUERY_TEST_HURRY": str(hurry or "")}


def spawn(*args: str, log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TESTS / "tiny_cli.py"), *args, "-q"], cwd=REPO, env=env(**kw),
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)


def committed(index_dir: Path, like: str = "%") -> tuple[int, int, int]:
    """(vector generation, rows, captions matching ``like``) as committed, read as any reader would."""
    db = index_dir / "pixquery.sqlite"
    if not db.exists():
        return 0, 0, 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            gen = conn.execute("SELECT value FROM meta WHERE key = 'vector_generation'").fetchone()
            rows = conn.execute("SELECT count(*) FROM images").fetchone()[0]
            caps = conn.execute("SELECT count(*) FROM images WHERE caption LIKE ?", (like,)).fetchone()[0]
    except sqlite3.OperationalError:  # no tables yet
        return 0, 0, 0
    return int(gen[0]) if gen else 0, rows, caps


def wait_for_commit(proc: subprocess.Popen, index_dir: Path, after: int, like: str, timeout: float = 60):
    """Poll until a generation newer than ``after`` is committed; its (generation, rows, captions), or None
    if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = committed(index_dir, like)
        if state[0] > after:
            return state
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    raise AssertionError("no checkpoint committed in time")


def _run_started(index_dir: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{index_dir / 'pixquery.sqlite'}?mode=ro", uri=True, timeout=10) as conn:
            return conn.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.OperationalError:
        return False


def doctor_problems(index_dir: Path) -> list:
    with engine_at(index_dir) as engine:
        findings, _, _ = engine.doctor()
    return [(c.name, c.message) for c in findings.problems]


def wait_for_lock(proc: subprocess.Popen, index_dir: Path, timeout: float = 60) -> bool:
    """Wait until ``proc`` holds the index's write lock (its models loaded, its run begun); False if it ended."""
    deadline = time.monotonic() + timeout
    lock = index_dir / "write.lock"
    while time.monotonic() < deadline:
        if lock.exists() and lock.read_text().startswith(f"pid {proc.pid} "):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise AssertionError("the run never took the lock")


def kill_repeatedly(args: list[str], index_dir: Path, log: Path, like: str, rng: random.Random) -> list[dict]:
    """Start ``args`` and SIGKILL it, KILLS times: even kills at a random moment up to 0.6 s after a
    checkpoint committed, odd kills at a random moment up to 1.5 s after the run took the write lock
    (listing files, reading, embedding, committing, collecting garbage). After each: what was committed
    is still there, and doctor finds the index consistent."""
    kills = []
    while len(kills) < KILLS:
        before = committed(index_dir, like)
        proc = spawn(*args, log=log)
        seen = before
        if len(kills) % 2 == 0:
            state = wait_for_commit(proc, index_dir, before[0], like)
            if state is None:
                break  # it finished: nothing left to interrupt
            seen = state
            time.sleep(rng.uniform(0, 0.6))
        else:
            if not wait_for_lock(proc, index_dir):
                break
            time.sleep(rng.uniform(0, 1.5))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        after = committed(index_dir, like)
        assert after[1] >= seen[1] and after[2] >= seen[2], (seen, after)  # committed work survives the kill
        problems = doctor_problems(index_dir)
        assert not problems, problems
        kills.append({"rows_before": before[1], "committed_seen": seen[1], "rows_after": after[1],
                      "captions_after": after[2], "generation": after[0]})
    return kills


def test_index_killed_at_random_moments_then_finished_equals_a_clean_build(tmp_path):
    rng = random.Random(int(os.environ.get("PIXQUERY_KILL_SEED", time.time_ns() % 10**6)))
    photos = collection(tmp_path / "photos", 160)
    make_odd_files(photos / "odd")  # skip records must come out the same too
    index_dir, log = tmp_path / "idx", tmp_path / "index.log"
    kills = kill_repeatedly(["index", str(photos), "--db", str(index_dir), "--batch-size", "4", "--captioner",
                             "test:tiny"], index_dir, log, "%", rng)
    assert len(kills) >= 5, (kills, log.read_text()[-2000:])
    assert kills[-1]["rows_after"] > kills[0]["rows_before"]  # repeated kills still make progress
    final = spawn("index", str(photos), "--db", str(index_dir), "--batch-size", "4", "--captioner", "test:tiny",
                  log=log, delay=0)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert not doctor_problems(index_dir)
    engine_at(tmp_path / "clean").index(photos)
    got, want = snapshot(index_dir), snapshot(tmp_path / "clean")
    assert got["ids"] == got["unique_paths"] == got["vectors"] == want["ids"]  # nothing missing or twice
    assert got["rows"] == want["rows"] and got["skipped"] == want["skipped"]
    (tmp_path.parent / "kills-index.json").write_text(json.dumps({"seed": rng.random(), "kills": kills}))
    print("index kills:", json.dumps(kills))


def test_recaption_killed_at_random_moments_then_finished_equals_a_clean_build(tmp_path):
    rng = random.Random(int(os.environ.get("PIXQUERY_KILL_SEED", time.time_ns() % 10**6)))
    photos = collection(tmp_path / "photos", 160)
    index_dir, log = tmp_path / "idx", tmp_path / "recaption.log"
    with engine_at(index_dir) as engine:
        engine.index(photos)
    args = ["recaption", "--db", str(index_dir), "--batch-size", "4", "--captioner", "test:other"]
    kills = kill_repeatedly(args, index_dir, log, "%, in a photo", rng)
    assert len(kills) >= 5, (kills, log.read_text()[-2000:])
    assert kills[-1]["captions_after"] > 0
    assert [k["captions_after"] for k in kills] == sorted(k["captions_after"] for k in kills)  # never lost
    final = spawn(*args, log=log, delay=0)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "already done by an interrupted run" in log.read_text()
    engine_at(tmp_path / "clean", "test:other").index(photos)
    got, want = snapshot(index_dir), snapshot(tmp_path / "clean")
    assert got["ids"] == got["unique_paths"] == want["ids"] and got["rows"] == want["rows"]
    print("recaption kills:", json.dumps(kills))


def test_ctrl_c_on_a_running_process_commits_and_exits_130(tmp_path):
    photos = collection(tmp_path / "photos", 120)
    index_dir, log = tmp_path / "idx", tmp_path / "sigint.log"
    proc = spawn("index", str(photos), "--db", str(index_dir), "--batch-size", "4", "--captioner", "test:tiny",
                 log=log, every=1000)  # no checkpoint of its own before the end: only Ctrl-C makes one
    deadline = time.monotonic() + 60
    while not _run_started(index_dir):
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.05)
    time.sleep(1.5)  # some batches embedded, none committed
    assert committed(index_dir)[1] == 0
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == EXIT_INTERRUPTED, log.read_text()[-2000:]
    text = log.read_text()
    assert "stopping after the current batch" in text and "Traceback" not in text
    kept = committed(index_dir)[1]
    assert 0 < kept < 120  # what was embedded, committed on the way out
    assert not doctor_problems(index_dir)


def test_searches_during_an_indexing_run_see_committed_states_and_a_second_writer_is_refused(tmp_path, monkeypatch):
    photos = collection(tmp_path / "photos", 40)
    index_dir, log, stop, hurry = tmp_path / "idx", tmp_path / "run.log", tmp_path / "stop", tmp_path / "hurry"
    with engine_at(index_dir) as engine:
        engine.index(photos)  # searchers start on a committed index
    collection(photos, 200, start=40)
    searchers = [subprocess.Popen([sys.executable, str(TESTS / "search_loop.py"), str(index_dir), str(photos),
                                   str(stop), kind], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
                 for kind in ("shared", "fresh", "shared", "fresh")]
    t0 = time.monotonic()
    try:
        for s in searchers:
            assert s.stdout.readline().strip() == "ready"
        t_ready = time.monotonic() - t0
        indexer = spawn("index", str(photos), "--db", str(index_dir), "--batch-size", "4", "--captioner",
                        "test:tiny", log=log, delay=1.0, hurry=hurry)  # a second a batch until the checks are done
        wait_for_commit(indexer, index_dir, committed(index_dir)[0], "%")
        tiny = [sys.executable, str(TESTS / "tiny_cli.py")]
        second = subprocess.Popen(tiny + ["index", str(photos), "--db", str(index_dir)], cwd=REPO, env=env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cli = subprocess.Popen(tiny + ["search", "red", "--json", "-k", "500", "--db", str(index_dir)], cwd=REPO,
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        app_results = _search_in_the_app(index_dir, tmp_path / "cache", monkeypatch)
        app_during = indexer.poll() is None
        second_out, second_err = second.communicate(timeout=120)
        cli_out, cli_err = cli.communicate(timeout=120)
        cli_during = indexer.poll() is None
        t_checked = time.monotonic() - t0
        hurry.touch()
        assert indexer.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        stop.touch()
        reports = [json.loads(s.communicate(timeout=120)[0].strip().splitlines()[-1]) for s in searchers]
    print("searchers:", json.dumps(reports)[:3000])
    assert app_during and cli_during, "the indexing run ended before the app and the CLI had searched"
    assert second.returncode == EXIT_BUSY and "another pixquery process is writing the index" in second_err
    assert cli.returncode == 0 and 40 <= len(json.loads(cli_out)["results"]) <= 240, cli_err[-2000:]
    assert app_results and all(0 < n for n in app_results)
    searches = sum(r["searches"] for r in reports)
    errors = [e for r in reports for e in r["errors"]] + [e for r in reports for e in r["inconsistent"]]
    print(f"searches during the run: {searches} by 4 processes; errors: {len(errors)}; "
          f"generations seen: {[r['generations'] for r in reports]}; searchers ready after {t_ready:.0f} s, "
          f"app, CLI and second writer checked after {t_checked:.0f} s, all done after {time.monotonic() - t0:.0f} s")
    assert not errors, errors[:10]
    assert all(r["searches"] > 10 and r["generations"] > 1 for r in reports), reports  # they saw the run progress
    assert all(r["counts"] == sorted(r["counts"]) and r["counts"][-1] == 240 for r in reports if r["counts"])
    (tmp_path.parent / "searches-during-run.json").write_text(json.dumps(
        {"searches": searches, "errors": len(errors), "processes": 4,
         "generations_seen": [r["generations"] for r in reports]}))


def _search_in_the_app(index_dir: Path, cache: Path, monkeypatch) -> list[int]:
    """Two searches through the Streamlit app (AppTest) while the run goes on: how many results each showed."""
    from streamlit.testing.v1 import AppTest

    from ui import resources

    def factory() -> Engine:
        return Engine(EngineConfig(index_dir=index_dir, cache_dir=cache, progress=False, captioner=None),
                      encoder=TinyEncoder(), captioner=TinyCaptioner())

    monkeypatch.setattr(resources, "engine_factory", factory)
    st.cache_resource.clear()
    at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=120)
    at.run()
    shown = []
    for query in ("red", "blue"):
        at.text_input(key="query_input").set_value(query)
        at.form_submit_button[0].click()
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        shown.append(sum(1 for c in at.caption if str(c.value).endswith(".png") and "/" not in str(c.value)))
    st.cache_resource.clear()
    return shown
