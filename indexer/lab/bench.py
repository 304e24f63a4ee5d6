"""``pixquery bench``: timings that docs/BENCHMARKS.md quotes, measured the way users run things.

* ``bench index``: see ``indexer/lab/bench_index.py`` (end to end, per stage, against a naive loop).
* ``bench caption``: caption N images of a folder (decode + backbone + batched beam search) and
  report images/s; no index involved.
* ``bench search``: start ``pixquery search`` as a new process R times against an index and
  report the wall time until its results are printed (cold start: imports, model load, search).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.config import EngineConfig
from indexer.indexing.discover import discover
from indexer.engine import Engine
from indexer.errors import InputError


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": _torch_threads(), "python": platform.python_version(),
            "platform": platform.platform(terse=True), "date": date.today().isoformat()}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _time(cmd: list[str], what: str) -> float:
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise InputError(f"cannot run {what} {cmd[0]!r}: {exc.strerror or exc}") from None
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise InputError(f"{what} failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    return seconds


def _summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3)}


def bench_search(index_dir: Path, query: str, runs: int, baseline: str | None = None) -> dict:
    """Cold ``pixquery search`` processes; with ``baseline`` (a shell-style command line, e.g.
    ``rclip -n 10 'a dog'``), that command too, alternating with pixquery run by run (a drifting
    machine then hits both alike), and the ratio of the medians."""
    exe = shutil.which("pixquery")
    cmd = [exe] if exe else [sys.executable, "-m", "indexer.cli"]
    cmd += ["search", query, "-k", "10", "--db", str(index_dir), "-q"]
    base = shlex.split(baseline) if baseline else None
    if base == []:
        raise InputError("--baseline is empty: give the command line to compare with")
    times, base_times = [], []
    for _ in range(runs):
        times.append(_time(cmd, "pixquery search"))
        if base:
            base_times.append(_time(base, "the baseline"))
    report = {"query": query, "runs": runs, "cold_process_s_median": round(statistics.median(times), 3),
              "cold_process_s_min": round(min(times), 3), "cold_process_s_max": round(max(times), 3)}
    if base:
        report["baseline"] = {"command": baseline, **_summary(base_times)}
        report["pixquery_over_baseline"] = round(statistics.median(times) / statistics.median(base_times), 2)
    report["machine"] = machine()
    return report


def bench_caption(folder: Path, limit: int, config: EngineConfig) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from retrieval.images import load_image

    if not config.captioner:
        raise InputError("no captioner configured: pass --captioner NAME")
    files = (discover(folder.expanduser().resolve()) if folder.is_dir() else [])[:limit]
    if not files:
        raise InputError(f"no images to benchmark under {folder}")
    t0 = time.perf_counter()
    engine = Engine(config)
    captioner, batch = engine.captioner, engine.batch_size
    captioner.caption_images([Image.new("RGB", (8, 8))], config.decode)  # load every part before timing
    load_s = time.perf_counter() - t0
    prep = lambda f: captioner.preprocess(load_image(f.path).image)  # noqa: E731
    t0 = time.perf_counter()
    lengths = []
    with ThreadPoolExecutor(max_workers=engine.workers) as pool:
        for start in range(0, len(files), batch):
            pixels = torch.stack(list(pool.map(prep, files[start:start + batch])))
            lengths += [len(c.split()) for c in captioner.caption_pixels(pixels, config.decode)]
    seconds = time.perf_counter() - t0
    return {"images": len(files), "captioner": captioner.info.name, "beam": config.decode.beam_size,
            "model_load_s": round(load_s, 2), "seconds": round(seconds, 2),
            "images_per_s": round(len(files) / seconds, 2), "mean_words": round(float(np.mean(lengths)), 2),
            "batch_size": batch, "device": str(captioner.device), "machine": machine()}
