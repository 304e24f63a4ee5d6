"""The torch-free query side (indexer/query_models.py, retrieval/native/lite.py, captioning/lite.py) against
the PyTorch models it is exported from: the same embeddings, likelihoods, match logits and tag scores
within float32 rounding (the 8-bit scorer and match head that searches use: within 2 %, in the same order);
a text search that never imports torch; and the fall-backs to PyTorch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer import query_models
from indexer.config import EngineConfig
from indexer.engine import Engine
from retrieval.errors import InputError
from retrieval.native import ort

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "indexer" / "sample_photos").glob("*.jpg"))
QUERIES = ["a dog running on the grass", "pizza", "two people riding bicycles by the sea", "",
           "a very long query " + "with many repeated words " * 12]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The default PyTorch models (scorer in float32) and their query side exported into a fresh cache."""
    from captioning import native
    from captioning.native import NativeCaptioner
    from retrieval.native.matcher import Matcher
    from retrieval.native.model import NativeEncoder
    from retrieval.native.tagger import create_tagger

    cache = tmp_path_factory.mktemp("cache")
    encoder = NativeEncoder()
    scorer = NativeCaptioner("effl0-sat-v1")
    scorer._scorer = (scorer.model, __import__("torch").float32)  # the float32 reference, not the bf16 copy
    matcher = Matcher(text_tower=encoder.text_tower)
    tagger = create_tagger("native:imagenet-tags-v1", text_tower=encoder.text_tower)
    query_models._found.clear()  # export here, not into a folder an earlier test of this process made
    made = query_models.prepare(cache, encoder, scorer, matcher, tagger)
    assert made == ["text", "scorer", "matcher", "tagger"]
    assert query_models.prepare(cache, encoder, scorer, matcher, tagger) == []  # already there
    assert native.NativeCaptioner is NativeCaptioner
    return cache, encoder, scorer, matcher, tagger


def _lite(cache: Path, encoder) -> query_models.QueryModels:  # noqa: ANN001
    built = encoder.info
    lite = query_models.load(EngineConfig(index_dir=cache / "unused", cache_dir=cache), built, lambda: encoder)
    assert lite is not None
    return lite


def test_exported_query_models_agree_with_pytorch(exported):
    cache, encoder, scorer, matcher, tagger = exported
    lite = _lite(cache, encoder)
    assert lite.encoder.info == encoder.info and lite.scorer.info == scorer.info
    assert lite.matcher.sha256 == matcher.sha256 and lite.tagger.info == tagger.info
    texts = [q for q in QUERIES if q]
    a, b = encoder.encode_texts(texts), lite.encoder.encode_texts(texts)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    (ea, pa), (eb, pb) = encoder.encode_texts_pooled(texts), lite.encoder.encode_texts_pooled(texts)
    assert np.abs(ea - eb).max() < 1e-5 and np.abs(pa - pb).max() < 1e-5
    exact_scorer, exact_matcher = _float32(cache, lite)
    memories = np.random.default_rng(0).normal(size=(6, int(np.prod(scorer.memory_shape)))).astype(np.float32)
    for q in QUERIES:
        ref, got = scorer.log_likelihood(memories, q), exact_scorer.log_likelihood(memories, q)
        assert got.shape == (6,) and np.abs(ref - got).max() < 1e-3 * max(1.0, np.abs(ref).max()), q
        small = lite.scorer.log_likelihood(memories, q)  # 8-bit weights: what a search uses
        assert np.abs(ref - small).max() < 0.02 * max(1.0, np.abs(ref).max()), q
        if not q:
            assert (got == 0).all() and (small == 0).all()
        else:
            assert (got < 0).all()
            apart = np.abs(ref[:, None] - ref[None]) > 0.3  # pairs clearly apart keep their order
            assert (np.sign(ref[:, None] - ref[None]) == np.sign(small[:, None] - small[None]))[apart].all(), q
            logits = matcher.score(memories, q)
            assert np.abs(logits - exact_matcher.score(memories, q)).max() < 1e-4
            approx = lite.matcher.score(memories, q)
            err, scale = logits - approx, max(1.0, np.abs(logits).max())
            # mostly a shift common to all images, which leaves a query's order alone (ranking uses each
            # logit relative to the best candidate's)
            assert np.abs(err).max() < 0.05 * scale and np.abs(err - err.mean()).max() < 0.02 * scale, q
    per_image = [QUERIES[i % 3] for i in range(6)]  # one text per image
    assert np.abs(scorer.log_likelihood(memories, per_image) - exact_scorer.log_likelihood(memories, per_image)).max() < 1e-2
    for q in texts:
        va, vb = tagger.embed_queries([q])[0], lite.tagger.embed_queries([q])[0]
        assert np.abs(va - vb).max() < 1e-5 and abs(tagger.gate(va) - lite.tagger.gate(vb)) < 1e-5
    classes = [[(207, 0.6), (208, 0.2)], [(963, 0.9)], []]
    assert [tagger.tags(c) for c in classes] == [lite.tagger.tags(c) for c in classes]
    assert np.allclose(tagger.concept_scores(va, classes), lite.tagger.concept_scores(va, classes), equal_nan=True)
    with pytest.raises(ValueError, match="width"):
        lite.matcher.score(memories[:, :10], "a dog")


def _float32(cache: Path, lite: query_models.QueryModels):  # noqa: ANN202
    """The float32 graphs of the exported scorer and match head (searches use the 8-bit ones)."""
    from captioning.lite import LiteScorer
    from retrieval.native.lite import LiteMatcher

    folders = {p.name.split("-")[0]: p for p in query_models.root(cache).iterdir()}
    specs = {part: json.loads((f / "manifest.json").read_text()) for part, f in folders.items()}
    assert specs["scorer"]["files"] == {"float32": "scorer.onnx", "int8": "scorer-int8.onnx"}
    assert lite.scorer.session is not LiteScorer(folders["scorer"], specs["scorer"], 2, "float32").session
    return (LiteScorer(folders["scorer"], specs["scorer"], 2, "float32"),
            LiteMatcher(lite.matcher.text, folders["matcher"], specs["matcher"], 2, "float32"))


def test_without_an_8bit_copy_searches_use_the_float32_graph(tmp_path, monkeypatch, caplog):
    from retrieval.errors import ModelLoadError
    from retrieval.native import onnx

    (tmp_path / "scorer.onnx").write_bytes(b"not an onnx graph")
    assert onnx.graphs(tmp_path, "scorer.onnx", "the scorer") == {"float32": "scorer.onnx"}  # cannot be read
    assert "could not quantise the scorer" in caplog.text and not list(tmp_path.glob("*.tmp"))
    assert ort.model_file(tmp_path, {"files": {"float32": "scorer.onnx"}}, "scorer.onnx") == tmp_path / "scorer.onnx"
    assert ort.model_file(tmp_path, {}, "scorer.onnx", "int8") == tmp_path / "scorer.onnx"  # a manifest without files
    both = {"files": {"float32": "scorer.onnx", "int8": "scorer-int8.onnx"}}
    assert ort.model_file(tmp_path, both, "scorer.onnx") == tmp_path / "scorer-int8.onnx"
    assert ort.model_file(tmp_path, both, "scorer.onnx", "float32") == tmp_path / "scorer.onnx"
    monkeypatch.setattr(onnx, "quantize_int8", lambda *a: (_ for _ in ()).throw(ModelLoadError("no")))
    assert onnx.graphs(tmp_path, "scorer.onnx", "the scorer") == {"float32": "scorer.onnx"}


def test_load_refuses_what_it_cannot_answer_for(exported, monkeypatch):
    cache, encoder, *_ = exported
    cfg = EngineConfig(index_dir=cache / "unused", cache_dir=cache)
    full = lambda: encoder  # noqa: E731
    monkeypatch.setenv("PIXQUERY_RUNTIME", "torch")
    assert query_models.load(cfg, encoder.info, full) is None  # PyTorch asked for
    monkeypatch.setenv("PIXQUERY_RUNTIME", "tensorrt")
    with pytest.raises(InputError, match="PIXQUERY_RUNTIME"):  # as for the image tower: a clear error
        query_models.load(cfg, encoder.info, full)
    monkeypatch.setenv("PIXQUERY_RUNTIME", "auto")
    assert query_models.load(EngineConfig(index_dir=cache, cache_dir=cache, device="cuda"), encoder.info, full) is None
    assert query_models.load(cfg, None, full) is None  # a new index
    other = type(encoder.info)(encoder.info.name, "0" * 64, encoder.info.dim)
    assert query_models.load(cfg, other, full) is None  # the index was built with other heads
    assert query_models.load(EngineConfig(index_dir=cache, cache_dir=cache, scorer="native:effl0-sat-v4@0.5+effl0-sat-v1@0.5"),
                             encoder.info, full) is None  # an ensemble scorer: PyTorch only
    empty = cache.parent / "empty-cache"
    monkeypatch.setattr(query_models, "_found", {})  # forget the exports this process made elsewhere
    assert query_models.load(EngineConfig(index_dir=cache, cache_dir=empty), encoder.info, full) is None  # not exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert query_models.load(cfg, encoder.info, full) is None


def _photos(root: Path, n: int = 8) -> Path:
    folder = root / "photos"
    folder.mkdir()
    for p in SAMPLES[:n]:
        shutil.copy(p, folder / p.name)
    return folder


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("this process may not import torch")
sys.meta_path.insert(0, Block())
from indexer.cli import main
sys.argv = ["pixquery", *sys.argv[1:]]
sys.exit(main())
"""


def _search(env: dict, *args: str, block_torch: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", BLOCK_TORCH] if block_torch else [sys.executable, "-m", "indexer.cli"]
    return subprocess.run([*cmd, "search", *args, "--json", "-k", "5"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_text_search_after_indexing_never_imports_torch_and_ranks_as_pytorch(tmp_path, monkeypatch):
    photos = _photos(tmp_path)
    cache, index = tmp_path / "cache", tmp_path / "index"
    monkeypatch.setattr(query_models, "_found", {})  # export into this cache, whatever this process did before
    with Engine(EngineConfig(index_dir=index, cache_dir=cache, progress=False)) as engine:
        engine.index(photos)  # exports the query side at the end
    assert sorted(p.name.split("-")[0] for p in query_models.root(cache).iterdir()) == \
        ["matcher", "scorer", "tagger", "text"]
    env = {**os.environ, "PIXQUERY_DB": str(index), "PIXQUERY_CACHE_DIR": str(cache), "PIXQUERY_RUNTIME": "auto"}
    for q in ("a dog on a table", "pizza", "a plane in the sky -clouds"):
        lite = _search(env, q, block_torch=True)
        assert lite.returncode == 0, lite.stderr
        ref = _search({**env, "PIXQUERY_RUNTIME": "torch"}, q)
        assert ref.returncode == 0, ref.stderr
        got, want = json.loads(lite.stdout)["results"], json.loads(ref.stdout)["results"]
        assert [h["id"] for h in got] == [h["id"] for h in want], q
        # the PyTorch scorer runs in bfloat16, the exported scorer and match head with 8-bit weights
        assert max(abs(g["score"] - w["score"]) for g, w in zip(got, want)) < 0.1
    blocked = _search({**env, "PIXQUERY_RUNTIME": "torch"}, "a dog", block_torch=True)
    assert blocked.returncode != 0  # the check can fail: PyTorch's path does import torch


def test_image_queries_and_damaged_exports_use_pytorch(tmp_path, caplog, monkeypatch):
    photos = _photos(tmp_path, 6)
    monkeypatch.setattr(query_models, "_found", {})
    cache, index = tmp_path / "cache", tmp_path / "index"
    cfg = EngineConfig(index_dir=index, cache_dir=cache, progress=False)
    with Engine(cfg) as engine:
        engine.index(photos)
        reference = [h.id for h in engine.search(image=SAMPLES[0], k=3, mode="image")]
    with Engine(cfg) as engine:
        hits = engine.search("a cat", k=3)
        assert hits and type(engine.searcher().encoder).__name__ == "LiteTextEncoder"
        assert [h.id for h in engine.search(image=SAMPLES[0], k=3, mode="image")] == reference  # the full encoder
    for folder in query_models.root(cache).iterdir():
        if folder.name.startswith("text-"):
            (folder / "minilm.onnx").write_bytes(b"not an onnx file")
    query_models._found.clear()
    monkeypatch.setattr(ort, "_sessions", {})  # as in a new process: open the files again
    caplog.set_level("INFO", logger="indexer.query_models")
    with Engine(cfg) as engine:
        hits = engine.search("a cat", k=3)
        assert hits and type(engine.searcher().encoder).__name__ == "NativeEncoder"
    assert "exported query models cannot be used" in caplog.text
