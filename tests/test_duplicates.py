"""More like this, and duplicate groups: exact copies (same bytes) and near copies (resized, re-encoded)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TinyEncoder, make_image
from indexer.cli import main
from indexer.cli.args import EXIT_OK, EXIT_USAGE
from indexer.config import EngineConfig
from indexer.search.duplicates import DuplicateGroup, find_duplicates, summarize
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.storage.filters import Filters
from indexer.storage.segments import SegmentLog
from indexer.storage.vectors import VectorIndex

STRIPES = {name: (i * 30 % 255, 90, 200) for i, name in enumerate(TinyEncoder.COLOURS)}


def original(root: Path, name: str, fmt: str = "png") -> Path:
    return make_image(root / f"{name}.{fmt}", name, stripe=STRIPES[name])


@pytest.fixture
def engine(tmp_path: Path, db) -> Engine:
    """red: 3 exact copies; blue: resized + re-encoded JPEG; green: an exact pair plus a resized copy;
    the other five colours are unique."""
    root = tmp_path / "photos"
    red = original(root, "red", "jpg")
    shutil.copy(red, root / "red-copy.jpg")
    (root / "sub").mkdir()
    shutil.copy(red, root / "sub" / "red-copy2.jpg")
    blue = original(root, "blue")
    with Image.open(blue) as im:
        im.resize((32, 24)).save(root / "blue-small.png")
        im.convert("RGB").save(root / "blue-q30.jpg", quality=30)
    green = original(root, "green")
    shutil.copy(green, root / "green-copy.png")
    with Image.open(green) as im:
        im.resize((128, 96)).save(root / "green-big.png")
    for name in ("yellow", "black", "white", "purple", "orange"):
        original(root, name)
    e = Engine(EngineConfig(index_dir=tmp_path / "idx", db_url=db.url("idx"), progress=False, captioner=None),
               encoder=TinyEncoder())
    e.index(root)
    yield e
    e.close()


def names(paths) -> list[str]:
    return [Path(p).name for p in paths]


# --- more like this ---------------------------------------------------------------------------------------------
def test_more_like_this_by_path_and_by_id(engine, tmp_path, monkeypatch):
    red = (tmp_path / "photos" / "red.jpg").resolve()
    hits = engine.more_like_this(red, k=4)
    assert len(hits) == 4 and str(red) not in [h.path for h in hits]  # never itself
    assert sorted(names(h.path for h in hits[:2])) == ["red-copy.jpg", "red-copy2.jpg"]  # its copies first
    assert hits[0].scores == {"image": pytest.approx(1.0, abs=1e-5)}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    row_id = next(i for i, p in engine.paths().items() if p == str(red))
    by_id = engine.more_like_this(row_id, k=4)
    assert [h.id for h in by_id] == [h.id for h in hits]
    assert [h.id for h in engine.more_like_this(np.int64(row_id), k=4)] == [h.id for h in hits]
    monkeypatch.chdir(tmp_path)  # a relative path, and a path through '..'
    assert [h.id for h in engine.more_like_this("photos/sub/../red.jpg", k=4)] == [h.id for h in hits]
    assert len(engine.more_like_this(red, k=1000)) == len(engine.paths()) - 1


def test_more_like_this_bad_input(engine, tmp_path):
    for bad in (10_000, -1, tmp_path / "photos" / "missing.jpg", "", True, 1.5, "a\x00b", "x" * 5000,
                "' OR 1=1 --", "%"):
        with pytest.raises(InputError):
            engine.more_like_this(bad)
    outside = make_image(tmp_path / "elsewhere" / "red.png", "red")  # a real image, but not in the index
    with pytest.raises(InputError, match="not in this index"):
        engine.more_like_this(outside)
    with pytest.raises(InputError):
        engine.more_like_this(tmp_path / "photos" / "red.jpg", k=0)
    with pytest.raises(InputError):
        Filters(min_width=-10)


def test_more_like_this_with_a_filter_that_excludes_the_image_itself(engine, tmp_path):
    red = tmp_path / "photos" / "red.jpg"
    hits = engine.more_like_this(red, k=3, filters=Filters(file_types=("png",)))
    assert len(hits) == 3 and all(h.file_type == "png" for h in hits)


# --- duplicates -------------------------------------------------------------------------------------------------
def test_exact_and_near_groups(engine):
    groups = engine.duplicates(threshold=0.99)
    got = {(g.kind, tuple(sorted(names(g.paths)))) for g in groups}
    assert got == {
        ("exact", ("red-copy.jpg", "red-copy2.jpg", "red.jpg")),
        ("near", ("blue-q30.jpg", "blue-small.png", "blue.png")),
        ("near", ("green-big.png", "green-copy.png", "green.png")),  # the exact pair joins its near copy
    }
    seen = [i for g in groups for i in g.ids]
    assert len(seen) == len(set(seen))  # every image in at most one group
    for g in groups:
        assert isinstance(g, DuplicateGroup) and len(g.ids) == len(g.paths) == 3
        assert list(g.paths) == sorted(g.paths)
        assert 0.99 <= g.similarity <= 1.0
    sims = [g.similarity for g in groups]
    assert sims == sorted(sims, reverse=True) and groups[0].kind == "exact"  # same size: most similar first
    assert summarize(groups) == {"groups": 3, "images": 9, "exact_groups": 1, "exact_images": 3,
                                 "near_groups": 2, "near_images": 6, "redundant": 6}


def test_threshold_one_keeps_exact_copies_and_drops_the_reencoded_jpeg(engine):
    groups = engine.duplicates(threshold=1.0)
    kinds = {tuple(sorted(names(g.paths))): g.kind for g in groups}
    assert kinds[("red-copy.jpg", "red-copy2.jpg", "red.jpg")] == "exact"
    assert kinds[("green-copy.png", "green.png")] == "exact"  # green-big is no longer close enough
    assert all("blue-q30.jpg" not in key for key in kinds)
    # (the tiny encoder sees only a 4x4 thumbnail, so blue-small may still equal blue to float precision)


@pytest.mark.parametrize("threshold", [0, -0.5, 1.5, math.nan])
def test_bad_threshold(engine, threshold):
    with pytest.raises(InputError, match="threshold"):
        engine.duplicates(threshold=threshold)


def test_cli_similar_and_duplicates(engine, tmp_path, capsys, monkeypatch):
    engine.close()
    monkeypatch.setattr("indexer.engine.Engine.encoder", property(lambda self: self._encoder or TinyEncoder()))
    db_url = engine.config.db_url  # PostgreSQL: the CLI's --db-url
    flags = ["--db", str(tmp_path / "idx"), *(["--db-url", db_url] if db_url else [])]
    assert main(["duplicates", *flags, "--threshold", "0.99", "--json"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["groups"] == 3 and out["summary"]["images"] == 9 and len(out["groups"]) == 3
    assert main(["duplicates", *flags, "--threshold", "0.99"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "3 groups, 9 images" in text and "red-copy2.jpg" in text
    for bad in ("0", "1.5", "nan"):
        assert main(["duplicates", *flags, "--threshold", bad]) == EXIT_USAGE
        assert "threshold" in capsys.readouterr().err
    red = str(tmp_path / "photos" / "red.jpg")
    assert main(["similar", red, *flags, "-k", "2", "--json"]) == EXIT_OK
    hits = json.loads(capsys.readouterr().out)["results"]
    assert sorted(names(h["path"] for h in hits)) == ["red-copy.jpg", "red-copy2.jpg"]
    assert main(["similar", str(hits[0]["id"]), *flags, "-k", "2", "--json"]) == EXIT_OK  # by id
    assert "red.jpg" in names(h["path"] for h in json.loads(capsys.readouterr().out)["results"])
    for bad in ("99999", str(tmp_path / "nope.jpg"), "' OR 1=1 --"):
        assert main(["similar", bad, *flags]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert "not in this index" in err or "no image with id" in err


def test_find_duplicates_against_brute_force_oracle_in_small_batches():
    """Planted near pairs/triples among random vectors; batches of 64 queries, never an N x N matrix."""
    rng = np.random.default_rng(0)
    n, d = 1500, 32
    x = rng.standard_normal((n, d)).astype(np.float32)
    for a, b in zip(range(0, 300, 3), range(1, 300, 3)):  # triples (a, a+1, a+2) ~ copies of a
        x[b] = x[a] + 0.05 * rng.standard_normal(d)
        x[b + 1] = x[a] + 0.05 * rng.standard_normal(d)
    x[400] = x[401] = x[402] = x[300]  # one exact group of 4 (same hash), identical vectors
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(1000, 1000 + n, dtype=np.int64)
    index = VectorIndex(SegmentLog(Path("/nonexistent"), "images", d), use_gpu=False)
    index.put(ids, x)
    exact = [[1300, 1400, 1401, 1402]]
    calls = []

    def search(q, k, allowed):
        calls.append(len(q))
        return index.search(q, k, ids=allowed)

    groups = find_duplicates(ids, exact, index.reconstruct, search, lambda ii: {i: f"/p/{i:06d}" for i in ii},
                             threshold=0.95, k=5, batch_size=64)
    assert max(calls) <= 64 and sum(calls) == n - 3  # one query per distinct image, in batches

    # oracle: connected components of the full similarity matrix, exact copies collapsed
    sims = x @ x.T
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(sims >= 0.95, 1))):
        parent[find(i)] = find(j)
    comps: dict[int, set[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), set()).add(int(ids[i]))
    expected = {frozenset(c) for c in comps.values() if len(c) > 1}
    assert {frozenset(g.ids) for g in groups} == expected
    assert {g.kind for g in groups if 1300 in g.ids} == {"exact"}
    assert sum(g.kind == "near" for g in groups) == 100

