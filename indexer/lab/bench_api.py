"""``pixquery bench api`` and ``pixquery bench import``: the HTTP API's warm latency under concurrent
clients, and the time to import a catalogue CSV, on the synthetic index of ``bench_latency.py``.

bench api: a real ``pixquery serve`` process (its own interpreter, so the clients do not share its
GIL) over a synthetic index of N images with the real models; once it answers, each concurrency level
in turn runs C client threads (httpx, one keep-alive connection each) that send the 20 benchmark
queries as POST /api/search (fused, k=10), one pass each; the levels take turns for ``rounds`` passes,
after one untimed pass of the largest level to warm up. Every request's wall time as a client sees it
goes into p50 / p99, beside the time the server itself spent (its ``Server-Timing`` header).

bench import: a CSV of N rows (sku, title, brand, category, price, in_stock, released), keyed by the
synthetic images' paths, imported into the same index three times: the first time (``replace``, as into
a fresh catalogue), again unchanged, and with every tenth price changed, each timed end to end (read,
check, write); then the warm latency of image-mode searches with two catalogue conditions.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.lab.bench import machine
from indexer.lab.bench_latency import QUERIES, build_synthetic_index, latency_summary
from indexer.storage.filters import Filters


def ensure_synthetic(index_dir: Path, n: int, config: EngineConfig) -> float | None:
    """Build the synthetic index at ``index_dir`` unless there is one; returns the build's seconds (None: reused)."""
    cfg = EngineConfig(**{**config.__dict__, "index_dir": index_dir, "progress": False})
    with Engine(cfg) as engine:
        if engine.exists:
            return None
        t0 = time.perf_counter()
        build_synthetic_index(engine, n)
        return round(time.perf_counter() - t0, 1)


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 600.0) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if process.poll() is not None:
            raise InputError(f"the API server exited with code {process.returncode} before it answered")
        try:
            if httpx.get(f"{url}/api/status", timeout=5).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise InputError(f"the API server did not answer within {timeout:.0f} s")


def _server_ms(response) -> float | None:  # noqa: ANN001 - httpx.Response
    for part in response.headers.get("server-timing", "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name == "app" and dur:
            return float(dur)
    return None


def _clients(url: str, concurrency: int, rounds: int, headers: dict
             ) -> tuple[list[tuple[float, str]], list[tuple[float, str]], float, int]:
    """Run ``concurrency`` client threads, each sending the benchmark queries ``rounds`` times ->
    ([(ms as the client saw it, query)], [(ms the server spent, query)], wall seconds, failed requests)."""
    import httpx

    timed: list[tuple[float, str]] = []
    served: list[tuple[float, str]] = []
    failures = [0]
    lock = threading.Lock()
    start = threading.Barrier(concurrency)

    def client(offset: int) -> None:
        mine, theirs = [], []
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            start.wait()
            for r in range(rounds):
                for i in range(len(QUERIES)):
                    query = QUERIES[(i + offset) % len(QUERIES)]  # clients start at different queries
                    t0 = time.perf_counter()
                    response = http.post("/api/search", json={"query": query, "k": 10, "mode": "fused"})
                    ms = (time.perf_counter() - t0) * 1000
                    if response.status_code == 200 and len(response.json()["results"]) == 10:
                        mine.append((ms, query))
                        if _server_ms(response) is not None:
                            theirs.append((_server_ms(response), query))
                    else:
                        with lock:
                            failures[0] += 1
        with lock:
            timed.extend(mine)
            served.extend(theirs)

    threads = [threading.Thread(target=client, args=(c * 3,)) for c in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return timed, served, time.perf_counter() - t0, failures[0]


def bench_api(index_dir: Path, n: int, config: EngineConfig, concurrency: tuple[int, ...] = (1, 8),
              rounds: int = 5, port: int | None = None) -> dict:
    """Time POST /api/search on a served synthetic index of ``n`` images (module doc)."""
    import httpx

    from indexer.api.server import free_port

    built = ensure_synthetic(index_dir, n, config)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    token = os.environ.get("PIXQUERY_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    cmd = [sys.executable, "-m", "indexer.cli", "serve", "--db", str(index_dir), "--port", str(port), "--quiet"]
    if config.device != "auto":
        cmd += ["--device", config.device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ready = _wait_ready(url, process)
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            images = http.get("/api/status").json()["images"]
        _clients(url, max(concurrency), 1, headers)  # warm, untimed: FAISS, SQLite and memory pages, the models
        results = {c: ([], [], 0.0, 0) for c in concurrency}
        for _ in range(rounds):  # the levels take turns, so a stall of the machine falls on each alike
            for c in concurrency:
                timed, served, wall, failed = _clients(url, c, 1, headers)
                t, s_, w, f = results[c]
                results[c] = (t + timed, s_ + served, w + wall, f + failed)
        levels = {}
        for c, (timed, served, wall, failed) in results.items():
            levels[str(c)] = {**latency_summary(timed), "server_p50_ms": latency_summary(served)["p50_ms"],
                              "server_p99_ms": latency_summary(served)["p99_ms"], "failed": failed,
                              "requests_per_second": round(len(timed) / wall, 1)}
    finally:
        process.terminate()
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
    return {"images": images, "build_seconds": built, "server_ready_seconds": round(ready, 1), "k": 10,
            "mode": "fused", "queries_per_client": rounds * len(QUERIES), "clients": levels,
            "server_log_tail": (err or "")[-500:], "machine": machine()}


_BRANDS = "acme zeta nova orbit lumen terra polar vertex koda sol".split()
_CATEGORIES = "shoes shirts jackets hats bags socks dresses boots scarves belts".split()
_WORDS = "linen denim wool cotton leather canvas silk classic slim relaxed summer winter trail city".split()


def write_catalogue_csv(path: Path, n: int, seed: int = 0) -> Path:
    """A CSV of ``n`` synthetic products keyed by the synthetic images' paths (``/synthetic/NNNNNNN.jpg``)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "sku", "title", "brand", "category", "price", "in_stock", "released"])
        for i in range(1, n + 1):
            words = rng.choice(_WORDS, 2, replace=False)
            category = _CATEGORIES[rng.integers(len(_CATEGORIES))]
            w.writerow([f"/synthetic/{i:07d}.jpg", f"SKU-{i:07d}", f"{words[0]} {words[1]} {category}",
                        _BRANDS[rng.integers(len(_BRANDS))], category, f"{rng.uniform(5, 300):.2f}",
                        "yes" if rng.random() < 0.8 else "no",
                        f"20{rng.integers(15, 25)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"])
    return path


def bench_import(index_dir: Path, n: int, config: EngineConfig, scratch: Path) -> dict:
    """Time ``meta import`` of an ``n``-row CSV into the synthetic index (module doc)."""
    built = ensure_synthetic(index_dir, n, config)
    scratch.mkdir(parents=True, exist_ok=True)
    source = write_catalogue_csv(scratch / f"catalogue-{n}.csv", n)
    cfg = EngineConfig(**{**config.__dict__, "index_dir": index_dir, "progress": False})
    changed = scratch / f"catalogue-{n}-changed.csv"  # every tenth price changed
    with open(source, encoding="utf-8") as f, open(changed, "w", encoding="utf-8", newline="") as out:
        reader, writer = csv.reader(f), csv.writer(out)
        writer.writerow(next(reader))
        for i, row in enumerate(reader):
            if i % 10 == 0:
                row[5] = f"{float(row[5]) + 1:.2f}"
            writer.writerow(row)
    with Engine(cfg) as engine:
        first = engine.catalogue.import_csv(source, key="path", replace=True)
        again = engine.catalogue.import_csv(source, key="path")
        update = engine.catalogue.import_csv(changed, key="path")
        where = Filters(where=("category=shoes", "price<50"))
        engine.search("a dog on the grass", k=10, mode="image")  # warm: models, vectors, SQLite pages
        timed = []
        for q in QUERIES:
            t0 = time.perf_counter()
            hits = engine.search(q, k=10, mode="image", filters=where)
            timed.append(((time.perf_counter() - t0) * 1000, q))
        allowed = len(engine.open().store.filter_ids(where))
    return {"rows": n, "csv_bytes": source.stat().st_size, "build_seconds": built,
            "first_import_seconds": first["seconds"], "first_values": first["values"],
            "unchanged_reimport_seconds": again["seconds"], "unchanged_values_written": again["values"],
            "tenth_changed_reimport_seconds": update["seconds"], "changed_values_written": update["values"],
            "unmatched": len(first["unmatched"]), "filtered_images": allowed,
            "filtered_image_search": latency_summary(timed), "filtered_hits": len(hits), "machine": machine()}
