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
