"""bench index's parts: the 12-megapixel test set maker, stage timings in the indexing summary."""

from PIL import Image

from conftest import TinyCaptioner, TinyEncoder
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.indexing.discover import discover
from indexer.lab.bench_index import make_large, process_seconds


def test_make_large_upscales_to_jpegs_and_keeps_what_is_there(tmp_path, photo_dir):
    files = discover(photo_dir)[:3]
    out = make_large(files, tmp_path / "large", size=(160, 120), quality=80, workers=1)
    assert [p.name for p in out] == [f"{f.path.rsplit('/', 1)[1].rsplit('.', 1)[0]}_160x120.jpg" for f in files]
    for p in out:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (160, 120)
    stamp = out[0].stat().st_mtime_ns
    make_large(files, tmp_path / "large", size=(160, 120), workers=1)
    assert out[0].stat().st_mtime_ns == stamp


def test_index_summary_reports_seconds_per_stage(tmp_path, photo_dir):
    config = EngineConfig(index_dir=tmp_path / "idx", progress=False, batch_size=4, scorer=None)
    with Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner()) as engine:
        summary = engine.index(photo_dir)
    stages = summary.stage_seconds
    assert {"read", "decode", "wait", "model", "caption", "caption_embed", "write"} <= stages.keys()
    assert all(v >= 0 for v in stages.values()) and stages["model"] > 0 and stages["decode"] > 0
    assert sum(v for k, v in stages.items() if k not in ("read", "decode")) <= summary.seconds + 0.01
    assert process_seconds() > 0


def test_bench_search_times_a_baseline_beside_pixquery(tmp_path, photo_dir, monkeypatch):
    import sys

    import pytest

    from indexer.errors import InputError
    from indexer.lab import bench

    calls = []
    def fake_time(cmd, what):
        calls.append((what, cmd))
        return 1.0 if what == "the baseline" else 2.0

    monkeypatch.setattr(bench, "_time", fake_time)
    report = bench.bench_search(tmp_path, "a dog", 3, baseline=f"{sys.executable} -c 'print(1)'")
    assert [w for w, _ in calls] == ["pixquery search", "the baseline"] * 3  # alternating
    assert calls[1][1] == [sys.executable, "-c", "print(1)"]
    assert report["baseline"]["median_s"] == 1.0 and report["pixquery_over_baseline"] == 2.0
    monkeypatch.undo()
    with pytest.raises(InputError, match="cannot run the baseline"):
        bench._time(["/no/such/program-xyz"], "the baseline")
    with pytest.raises(InputError, match="the baseline failed"):
        bench._time([sys.executable, "-c", "import sys; sys.exit(3)"], "the baseline")


def test_make_large_beyond_the_sources_makes_distinct_variants(tmp_path):
    import hashlib

    src = tmp_path / "src"
    src.mkdir()
    for name, colour in (("one", (200, 30, 30)), ("two", (30, 30, 200))):
        im = Image.new("RGB", (32, 24), (240, 240, 240))
        im.paste(colour, (0, 0, 12, 8))  # a block in the top-left corner: no photo is symmetric
        im.save(src / f"{name}.png")
    files = discover(src)
    out = make_large(files, tmp_path / "large", size=(40, 30), quality=80, workers=1, count=9)
    assert [p.name for p in out] == ["one_40x30.jpg", "two_40x30.jpg", "one_40x30_v1.jpg", "two_40x30_v1.jpg",
                                     "one_40x30_v2.jpg", "two_40x30_v2.jpg", "one_40x30_v3.jpg",
                                     "two_40x30_v3.jpg", "one_40x30_v4.jpg"]
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in out}) == 9  # no two the same bytes
    corners = []
    for p in out[:8:2]:  # "one": itself, mirrored, flipped, both -> the red block's corner moves
        with Image.open(p) as im:
            corners.append([c for c, xy in (("tl", (2, 2)), ("tr", (37, 2)), ("bl", (2, 27)), ("br", (37, 27)))
                            if im.getpixel(xy)[0] > 150 and im.getpixel(xy)[2] < 100])
    assert corners == [["tl"], ["tr"], ["bl"], ["br"]]
    assert make_large(files, tmp_path / "large", size=(40, 30), workers=1) == out[:2]  # the first pass's names
