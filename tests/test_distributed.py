"""Indexing on Ray (indexer/indexing/distributed.py) against the oracle of a single-process run.

The cluster tests start a local Ray with 2 CPUs (2 single-CPU model actors) once per module; they
skip when Ray is not installed (``pip install ".[ray]"``) and are ``slow`` (Ray's start and each run's
actors take 10-30 s on 2 cores). Whatever the cluster does, the index must
equal the one a single-process run builds: same paths, ids, captions and vectors.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from captioning.captioner import DecodeOptions
from conftest import REPO, TinyCaptioner, TinyEncoder, make_image
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.indexing.discover import FileEntry
from indexer.indexing.distributed import (
    HashSet, RayOptions, RaySummary, _host_port, connect, import_ray, index_on_ray, plan_actors,
)
from indexer.indexing.models import BatchOutput, ImageModels
from indexer.indexing.reader import ReadResult
from indexer.indexing.shards import SHARD_DIR, ShardStore, from_block, to_block

SAMPLES = REPO / "indexer" / "sample_photos"


# --- without a cluster ------------------------------------------------------------------------------
def test_actor_plan_follows_the_cluster():
    cpu_node, gpu_node = {"CPU": 2.0, "memory": 1e9}, {"CPU": 16.0, "GPU": 4.0}
    assert plan_actors([cpu_node]) == plan_actors([cpu_node], actors=5)  # never more than the CPUs
    plan = plan_actors([cpu_node])
    assert (plan.actors, plan.cpus, plan.gpus, plan.threads) == (2, 1.0, 0.0, 1)
    assert plan_actors([cpu_node, cpu_node], actors=3).actors == 3
    plan = plan_actors([cpu_node, gpu_node])  # one actor per GPU, with its node's CPUs per GPU to decode
    assert (plan.actors, plan.cpus, plan.gpus, plan.threads) == (4, 4.0, 1.0, 4)
    assert plan_actors([gpu_node], use_gpu=False).actors == 16  # --device cpu: CPU actors only
    with pytest.raises(InputError):
        plan_actors([{"memory": 1e9}])
    with pytest.raises(InputError):
        plan_actors([cpu_node], actors=0)


def test_hash_set_answers_membership_like_a_set():
    rng = np.random.default_rng(0)
    hashes = [rng.bytes(32).hex() for _ in range(200)]
    inside, outside = hashes[:100], hashes[100:]
    known = HashSet(inside)
    assert len(known) == 100
    assert all(h in known for h in inside) and not any(h in known for h in outside)
    assert None not in known and "" not in known and "abc" not in HashSet([])


def test_addresses_are_parsed_or_refused():
    assert _host_port("local") is None and _host_port("auto") is None
    assert _host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert _host_port("ray://head.example:10001") == ("head.example", 10001)
    for bad in ("head.example", "head:port", ":6379"):
        with pytest.raises(InputError):
            _host_port(bad)


def test_shard_round_trip_and_reuse_rules(tmp_path):
    files = [FileEntry(str(tmp_path / f"{i}.jpg"), 100 + i, 1000.0 + i) for i in range(4)]
    results = [ReadResult(files[0], "aa" * 32, width=4, height=3), ReadResult(files[1], "bb" * 32, width=5, height=6),
               ReadResult(files[2], "cc" * 32), ReadResult(files[3], error="not a readable image (x)")]
    vecs = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    out = BatchOutput(vecs, ["a red picture", None], np.ones((2, 5), np.float32))
    block = to_block(files, results, [0, 1], out, np.array([0]), np.full((1, 3), 7, np.float32), 3, 5, "key")
    store = ShardStore(tmp_path / SHARD_DIR, "key")
    shard = store.write(block)
    rows = from_block(block)
    assert [r.embedded for r in rows] == [True, True, False, False]
    assert rows[0].caption == "a red picture" and rows[1].caption is None and rows[1].caption_vec is None
    assert np.array_equal(rows[1].vector, vecs[1]) and np.array_equal(rows[0].caption_vec, [7, 7, 7])
    assert rows[3].error.startswith("not a readable") and rows[2].content_hash == "cc" * 32
    stored = store.result(shard, 1)
    assert stored.path == files[1].path and np.array_equal(stored.vector, vecs[1]) and stored.memory.shape == (5,)
    # reusable: same stat; embedded, unreadable, or hashed content the index still holds
    assert set(store.reusable(files, HashSet(["cc" * 32]))) == {f.path for f in files}
    assert set(store.reusable(files, HashSet([]))) == {files[0].path, files[1].path, files[3].path}
    changed = [FileEntry(files[0].path, 1, 1.0)] + files[1:]
    assert files[0].path not in store.reusable(changed, HashSet([]))
    assert ShardStore(tmp_path / SHARD_DIR, "other models").reusable(files, HashSet([])) == {}
    store.clear()
    assert not (tmp_path / SHARD_DIR).exists()


def test_without_ray_the_flag_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(InputError, match=r"pip install \"pixquery\[ray\]\""):
        import_ray()


def test_an_address_that_refuses_is_a_clear_error_before_anything_is_written(tmp_path, photo_dir, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
    import socket

    from indexer.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="no Ray cluster answers"):
        connect(RayOptions(address=f"127.0.0.1:{port}"))
    code = main(["index", str(photo_dir), "--ray", f"127.0.0.1:{port}", "--db", str(tmp_path / "idx"), "-q"])
    assert code == 2 and "no Ray cluster answers at 127.0.0.1" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "idx" / "pixquery.sqlite").exists()


@pytest.mark.slow
def test_an_address_that_does_not_answer_fails_within_the_timeout(tmp_path):
    """A port that accepts connections but never speaks Ray: Ray itself would retry for minutes."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
    code = ("import socket, sys\n"
            "from indexer.indexing.distributed import RayOptions, connect\n"
            "from indexer.errors import InputError\n"
            "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(8)\n"
            "try:\n"
            "    connect(RayOptions(address=f'127.0.0.1:{srv.getsockname()[1]}', connect_timeout_s=3))\n"
            "except InputError as exc:\n"
            "    print('InputError:', exc); sys.exit(2)\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "did not answer within 3 s" in out.stdout
    assert time.perf_counter() - t0 < 60


# --- on a local 2-CPU cluster -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}})
    yield ray
    ray.shutdown()


class TinyModels:
    """Builds the tiny test models on a worker (as the driver's engine has them)."""

    def __call__(self) -> ImageModels:
        return ImageModels(TinyEncoder(), TinyCaptioner(), DecodeOptions())


class DiesOnce(TinyModels):
    """Tiny models whose worker process dies in its first batch while ``marker`` exists (then deletes it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self) -> ImageModels:
        models = super().__call__()
        run, marker = models.run, self.marker

        def run_or_die(*args, **kwargs):
            if marker.exists():
                marker.unlink()
                os._exit(1)  # the worker process dies mid-batch, as a killed node would
            return run(*args, **kwargs)

        models.run = run_or_die
        return models


def tiny_engine(index_dir: Path) -> Engine:
    config = EngineConfig(index_dir=index_dir, progress=False, batch_size=8, captioner="test:tiny-captioner")
    return Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner())


def contents(engine: Engine) -> dict[str, tuple]:
    """Everything the index holds per path: row facts, caption, image and caption vectors."""
    index = engine.open()
    rows = index.store.all_images()
    ids = np.array([r.id for r in rows], dtype=np.int64)
    images = index.vectors.images.reconstruct(ids)
    have, captions = index.vectors.captions.reconstruct_present(ids)
    assert len(index.vectors) == len(rows) == len({r.path for r in rows})  # nothing twice, no vector without row
    return {r.path: (r.id, r.content_hash, r.width, r.height, r.byte_size, r.mtime, r.encoder, r.caption, r.captioner,
                     images[i], captions[i] if have[i] else None) for i, r in enumerate(rows)}


def assert_same_index(a: Engine, b: Engine, atol: float = 1e-6) -> None:
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for path in ca:
        fa, fb = ca[path], cb[path]
        assert fa[:9] == fb[:9], path
        assert np.allclose(fa[9], fb[9], atol=atol), path
        assert (fa[10] is None) == (fb[10] is None), path
        if fa[10] is not None:
            assert np.allclose(fa[10], fb[10], atol=atol), path
    def skips(engine: Engine) -> list[tuple[str, str]]:  # reasons without the address of PIL's file object
        return [(s["path"], re.sub(r" at 0x[0-9a-f]+", "", s["reason"])) for s in engine.skipped_files()]

    assert skips(a) == skips(b)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """The bundled sample photos (59), a few more, and a file that is not an image."""
    root = tmp_path / "photos"
    shutil.copytree(SAMPLES, root / "samples", ignore=shutil.ignore_patterns("*.md"))
    make_image(root / "extra" / "red.png", "red")
    make_image(root / "extra" / "blue.png", "blue", stripe=(200, 200, 0))
    (root / "extra" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def edit_collection(root: Path) -> None:
    """Add, edit, move, copy, delete, and break files (the incremental cases of the decision table)."""
    samples = sorted((root / "samples").glob("*.jpg"))
    make_image(root / "extra" / "new-green.png", "green")
    make_image(root / "extra" / "red.png", "red", stripe=(0, 0, 0))  # edited in place
    shutil.move(samples[0], root / "extra" / "moved.jpg")
    shutil.copy(samples[1], root / "extra" / "copy.jpg")
    samples[2].unlink()
    samples[3].write_bytes(b"broken now")
    (root / "extra" / "broken.jpg").write_bytes(samples[4].read_bytes())  # repaired
    for p in (root / "extra" / "red.png", root / "extra" / "broken.jpg"):
        os.utime(p, (p.stat().st_atime, p.stat().st_mtime + 10))


@pytest.mark.slow
def test_ray_run_equals_single_process_and_reruns_only_what_changed(tmp_path, photos, ray_cluster):
    single, on_ray = tiny_engine(tmp_path / "single"), tiny_engine(tmp_path / "ray")
    s1 = single.index(photos)
    r1 = index_on_ray(on_ray, photos, build_models=TinyModels())
    assert isinstance(r1, RaySummary) and r1.actors == 2 and r1.sent_to_ray == 62 and r1.from_shards == 0
    assert (r1.new, r1.embedded, r1.skipped) == (s1.new, s1.embedded, s1.skipped) == (61, 61, 1)
    assert_same_index(single, on_ray)
    assert not (tmp_path / "ray" / SHARD_DIR).exists()  # every shard merged and committed

    edit_collection(photos)
    s2 = single.index(photos)
    r2 = index_on_ray(on_ray, photos, build_models=TinyModels())
    counts = ("new", "changed", "moved", "copied", "touched", "unchanged", "deleted", "skipped", "embedded")
    assert [getattr(r2, c) for c in counts] == [getattr(s2, c) for c in counts]
    # embedded: the new and the edited file; copies: copy.jpg and broken.jpg repaired with known content
    assert (r2.embedded, r2.moved, r2.copied, r2.deleted, r2.skipped) == (2, 1, 2, 1, 1)
    assert r2.sent_to_ray == 6  # what triage could not settle from the stat alone
    assert_same_index(single, on_ray)

    r3 = index_on_ray(on_ray, photos, build_models=TinyModels())  # nothing changed: no cluster needed
    assert (r3.sent_to_ray, r3.embedded, r3.actors) == (0, 0, 0)


@pytest.mark.slow
def test_a_worker_that_dies_mid_run_loses_nothing_and_doubles_nothing(tmp_path, photos, ray_cluster):
    marker = tmp_path / "die-once"
    marker.touch()
    single, on_ray = tiny_engine(tmp_path / "single"), tiny_engine(tmp_path / "ray")
    single.index(photos)
    summary = index_on_ray(on_ray, photos, build_models=DiesOnce(marker))
    assert not marker.exists()  # a worker did die
    assert summary.embedded == 61
    assert_same_index(single, on_ray)


class Stop(Exception):
    pass


@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_shards(tmp_path, photos, ray_cluster):
    single, on_ray = tiny_engine(tmp_path / "single"), tiny_engine(tmp_path / "ray")
    single.index(photos)

    def stop_midway(done: int, total: int) -> None:
        if done >= 30:
            raise Stop  # the driver stops (a crash, Ctrl-C) before any checkpoint committed

    with pytest.raises(Stop):
        index_on_ray(on_ray, photos, build_models=TinyModels(), on_progress=stop_midway)
    left = list((tmp_path / "ray" / SHARD_DIR).glob("*.npz"))
    assert left  # what the workers returned is on disk
    resumed = index_on_ray(on_ray, photos, build_models=TinyModels())
    assert resumed.from_shards >= 30 and resumed.from_shards + resumed.sent_to_ray == 62
    assert resumed.embedded == 61
    assert_same_index(single, on_ray)
    assert not (tmp_path / "ray" / SHARD_DIR).exists()


@pytest.mark.slow
def test_ray_with_the_shipped_models_equals_single_process_on_the_sample_photos(tmp_path, ray_cluster):
    """The default native encoder, captioner, scorer, tagger and caption confidence: same captions, vectors,
    scorer memories, tags and confidences."""
    config = EngineConfig(index_dir=tmp_path / "single", progress=False)
    with Engine(config) as single, Engine(EngineConfig(index_dir=tmp_path / "ray", progress=False)) as on_ray:
        s = single.index(SAMPLES)
        r = index_on_ray(on_ray, SAMPLES)
        assert r.embedded == s.embedded == 59 and r.captioned == s.captioned == 59
        assert_same_index(single, on_ray, atol=1e-4)
        a, b = single.open().vectors, on_ray.open().vectors
        ids = np.array(sorted(single.paths()), dtype=np.int64)
        have_a, codes_a = a.memories.codes_present(ids)
        have_b, codes_b = b.memories.codes_present(ids)
        assert have_a.all() and have_b.all()
        assert np.abs(codes_a.astype(int) - codes_b.astype(int)).max() <= 1  # 8-bit codes of the same floats
        by_path = {p: i for i, p in on_ray.paths().items()}
        tags_a, tags_b = single.tags(ids.tolist()), on_ray.tags([by_path[single.paths()[i]] for i in ids])
        assert sum(bool(t) for t in tags_a.values()) > 10  # the sample photos do get tags
        for i in ids:
            j = by_path[single.paths()[i]]
            assert [t.name for t in tags_a.get(i, [])] == [t.name for t in tags_b.get(j, [])]
            ca, cb = single.image(int(i)).caption_confidence, on_ray.image(j).caption_confidence
            assert ca is not None and cb is not None and abs(ca - cb) < 1e-3


def test_ray_is_imported_only_by_a_run_that_uses_it():
    code = ("import sys; import indexer.cli as c; c.build_parser(); "
            "import indexer.engine, indexer.indexing.distributed; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"
