"""``pixquery bench index``: index N images of a folder into a fresh temporary index, end to end, as a
user's ``pixquery index`` does (discovery, hashing, decoding, embedding, captions, caption vectors,
scorer memories, writing), and report:

* images/s end to end (``end_to_end_images_per_s``: the models' loading included; ``index_images_per_s``:
  the indexing run alone) and the whole process's wall time so far (``process_s``: imports included);
* seconds per stage (``stages``): ``read`` and ``decode`` summed over the reader threads or processes,
  and on the main thread ``wait`` (for the readers), ``model`` (backbone and embedding head),
  ``memories`` (the scorer's), ``caption`` (beam search), ``caption_embed`` (text tower) and ``write``;
  each with the images/s it alone would allow;
* peak resident memory of this process and of the largest decoding worker process;
* the ratio to a naive loop timed in the same run on the first ``naive`` images: open, full decode (no
  draft mode), embed, caption greedily (beam 1, the captioner's own backbone pass), one image at a time.

:func:`make_large` writes the 12-megapixel test set (4000x3000 JPEGs upscaled from any folder), so the
large-photo figure can be reproduced from Flickr8k or any other photos; asked for more photos than the
folder holds, it makes distinct variants of them (mirrored, flipped, ...) rather than copies, which the
indexer would recognise by their hash and not embed.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageOps

from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.indexing.discover import FileEntry, discover

LARGE_SIZE = (4000, 3000)  # a phone's 12-megapixel photo


def process_seconds() -> float | None:
    """Wall seconds since this process started (Linux), else None."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, ValueError, IndexError):
        return None


def _peak_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux reports KiB (macOS bytes: not handled)


def _variant(im: Image.Image, v: int) -> Image.Image:
    """Variant ``v`` of a photo: 0 itself, then mirrored, flipped, both (turned 180 degrees); from 4 on
    the same four, each with ``v // 4`` pixels trimmed off every edge, so that no two variants match."""
    if v >= 4:
        t = v // 4
        if min(im.size) <= 2 * t:
            raise InputError(f"variant {v} of a {im.size[0]}x{im.size[1]} photo: too small to trim {t} pixels")
        im = im.crop((t, t, im.width - t, im.height - t))
    if v % 4 in (1, 3):
        im = ImageOps.mirror(im)
    if v % 4 in (2, 3):
        im = ImageOps.flip(im)
    return im


def _upscale(job: tuple[str, str, tuple[int, int], int, int]) -> str:
    src, dst, size, quality, v = job
    with Image.open(src) as im:
        big = _variant(ImageOps.exif_transpose(im).convert("RGB"), v).resize(size, Image.Resampling.BICUBIC)
    tmp = dst + ".tmp"
    big.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, dst)
    return dst


def make_large(files: list[FileEntry], out: Path, size: tuple[int, int] = LARGE_SIZE, quality: int = 90,
               workers: int | None = None, count: int | None = None) -> list[Path]:
    """Write ``count`` photos (default: one per file) made from ``files`` upscaled to ``size`` as JPEGs into
    ``out`` (kept when already there), on worker processes; returns the paths in order. Upscaled, so the
    content and the captions stay those of the source photos while the decoder does a 12-megapixel photo's
    work. The first pass over ``files`` writes ``<stem>_<W>x<H>.jpg``; a count beyond ``len(files)`` goes
    round again, pass ``v + 1`` writing variant ``v`` (see :func:`_variant`: mirrored, flipped, ...) as
    ``<stem>_<W>x<H>_v<v>.jpg``, so the photos differ in content and bytes (a symmetric source aside)."""
    count = len(files) if count is None else count
    if count and not files:
        raise InputError("no photos to make large copies of")
    out.mkdir(parents=True, exist_ok=True)
    plan = []
    for i in range(count):
        v, f = divmod(i, len(files))
        stem = f"{Path(files[f].path).stem}_{size[0]}x{size[1]}" + (f"_v{v}" if v else "")
        plan.append((files[f].path, out / f"{stem}.jpg", v))
    jobs = [(src, str(p), size, quality, v) for src, p, v in plan if not p.exists()]
    if jobs:
        with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
            list(pool.map(_upscale, jobs, chunksize=4))
    return [p for _, p, _ in plan]


def naive_loop(engine: Engine, files: list[FileEntry]) -> dict:
    """Open, full decode, embed, caption greedily, one image at a time -> images/s."""
    encoder, captioner = engine.encoder, engine.captioner
    greedy = replace(engine.config.decode, beam_size=1)

    def one(path: str) -> None:
        with Image.open(path) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")  # the whole picture: no draft mode
        encoder.encode_images([image])
        if captioner is not None:
            captioner.caption_images([image], greedy)

    one(files[0].path)  # the captioner's own backbone loads here, outside the timing
    t0 = time.perf_counter()
    for f in files:
        one(f.path)
    seconds = time.perf_counter() - t0
    return {"images": len(files), "seconds": round(seconds, 2), "images_per_s": round(len(files) / seconds, 2)}


def bench_index(folder: Path, limit: int, config: EngineConfig, naive: int = 100, large: Path | None = None,
                ray=None) -> dict:  # noqa: ANN001 - RayOptions
    """``ray``: index on Ray (``indexing/distributed.py``) instead of in this process; the run's seconds then
    include starting the model actors and loading the models in each of them (no stage figures then)."""
    files = discover(folder.expanduser().resolve()) if folder.is_dir() else []
    if not files:
        raise InputError(f"no images to benchmark under {folder}")
    made_s = None
    if large is not None:  # ``limit`` large photos, variants of the sources when there are fewer of them
        t0 = time.perf_counter()
        paths = make_large(files[:limit], large.expanduser().resolve(), count=limit)
        made_s = round(time.perf_counter() - t0, 1)
        files = [FileEntry(str(p), p.stat().st_size, p.stat().st_mtime) for p in paths]
    files = files[:limit]
    with tempfile.TemporaryDirectory(prefix="pixquery-bench-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "images").mkdir()
        for i, f in enumerate(files):
            os.symlink(f.path, tmp_path / "images" / f"{i:07d}{Path(f.path).suffix.lower()}")
        cfg = replace(config, index_dir=tmp_path / "index")
        with Engine(cfg) as engine:
            t0 = time.perf_counter()
            models = engine.models()  # encoder, captioner and scorer, as indexing builds them
            models.run(models.collate([models.encoder.preprocess(Image.new("RGB", (32, 32)))]), None)
            load_s = time.perf_counter() - t0
            models.seconds.clear()
            if ray is None:
                summary, extra = engine.index(tmp_path / "images"), {}
            else:
                summary, extra = _index_on_ray(engine, tmp_path / "images", ray)
            total_s = time.perf_counter() - t0
            report = {**_report(summary, engine, load_s, total_s), **extra}
            if naive:
                loop = naive_loop(engine, files[:naive])
                report["naive_loop"] = loop
                report["speedup_vs_naive"] = round(summary.images_per_second / loop["images_per_s"], 2)
    report["peak_rss_mb"] = _peak_mb(resource.RUSAGE_SELF)
    from indexer.indexing import procreader

    report["peak_rss_worker_mb"] = round(procreader.worker_peak_rss_kb / 1024, 1) or None  # None: no workers
    report["process_s"] = process_seconds()
    if large is not None:
        report["large"] = {"folder": str(large), "size": f"{LARGE_SIZE[0]}x{LARGE_SIZE[1]}",
                           "mean_file_mb": round(sum(f.size for f in files) / len(files) / 2**20, 2),
                           "made_s": made_s}
    return report


def _report(summary, engine: Engine, load_s: float, total_s: float) -> dict:  # noqa: ANN001 - IndexSummary
    from indexer.lab.bench import machine

    n = summary.embedded
    stages = {k: {"seconds": v, "images_per_s": round(n / v, 1) if v else None}
              for k, v in summary.stage_seconds.items()}
    main = sum(v for k, v in summary.stage_seconds.items() if k not in ("read", "decode"))
    stages["other"] = {"seconds": round(max(summary.seconds - main, 0.0), 3)}
    encoder = engine.encoder
    return {
        "images": n, "captioned": summary.captioned, "skipped": summary.skipped,
        "encoder": encoder.info.name,
        "captioner": engine.captioner.info.name if engine.captioner else None,
        "scorer": engine.scorer.info.name if engine.scorer else None,
        "device": str(encoder.device), "dtype": str(getattr(encoder, "dtype", "float32")).replace("torch.", ""),
        "batch_size": engine.batch_size, "workers": engine.workers,
        "readers": "processes" if engine.read_processes else "threads",
        "model_load_s": round(load_s, 2), "index_s": summary.seconds,
        "index_images_per_s": summary.images_per_second, "images_per_s": summary.images_per_second,
        "end_to_end_images_per_s": round(n / total_s, 2),
        "stages": stages, "machine": machine(),
    }


def _index_on_ray(engine: Engine, images: Path, options) -> tuple:  # noqa: ANN001 - RayOptions
    from indexer.indexing.distributed import connect, import_ray, index_on_ray

    t0 = time.perf_counter()
    started = connect(options)
    ray_start_s = time.perf_counter() - t0
    try:
        summary = index_on_ray(engine, images, options)
    finally:
        if started:
            import_ray().shutdown()
    return summary, {"ray": {"address": options.address, "start_s": round(ray_start_s, 2), "actors": summary.actors,
                             "gpus_per_actor": summary.gpus_per_actor,
                             "note": "peak_rss_mb is the driver's; index_s includes starting the actors"}}


