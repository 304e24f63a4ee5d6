"""The rater (captioning/training/rater.py, NativeCaptioner.use_rater): a decoder with fewer layers, distilled
from the scorer, that rates query text from the scorer's own stored memories; its training command, its
fit check, and its export for the torch-free query side."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import torch

from captioning.model import CaptionDecoder, DecoderConfig, sequence_log_likelihood
from captioning.native import NativeCaptioner, load_captioner, save_captioner
from captioning.tokenizer import WordTokenizer
from captioning.training.rater import student_of
from indexer.cli import main
from retrieval.errors import InputError
from retrieval.query import FusionWeights
from test_matcher import _tiny_flickr

WORDS = ["a photo of a dog", "a cat sits on the grass", "people playing soccer", "a surfer on a wave"]


def _scorer(path, seed: int = 0, layers: int = 2):  # noqa: ANN001, ANN202
    """A tiny random two-layer scorer saved at ``path`` -> (decoder, tokenizer, sha256)."""
    torch.manual_seed(seed)
    tok = WordTokenizer.build(WORDS, min_count=1)
    model = CaptionDecoder(DecoderConfig(vocab_size=len(tok), d_model=32, n_layers=layers, n_heads=2, d_ff=64,
                                         max_len=12))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_captioner(model.eval(), tok, path, {"note": "tiny random scorer"})
    decoder, tok, _, sha = load_captioner(path)
    return decoder, tok, sha


def test_a_student_starts_as_the_scorers_first_layers_with_its_memory_part_frozen(tmp_path):
    scorer, _, _ = _scorer(tmp_path / "s.pt")
    student = student_of(scorer, 1, dropout=0.0).eval()
    grid = torch.randn(2, 1280, 7, 7)
    with torch.no_grad():
        assert torch.equal(student.encode(grid), scorer.encode(grid))  # the index's stored memories stay valid
    assert student.cfg.n_layers == 1 and len(student.blocks) == 1
    for name, p in student.named_parameters():
        frozen = name.startswith(("grid_proj.", "row_pos", "col_pos", "ln_memory."))
        assert p.requires_grad is not frozen, name
        assert torch.equal(p, scorer.state_dict()[name]), name  # blocks.0 is the scorer's first block
    with pytest.raises(InputError, match="1 to 2"):
        student_of(scorer, 3, dropout=0.0)


@pytest.fixture
def trained(tmp_path, capsys):
    """A rater trained for one epoch by the command line on a tiny Flickr8k-shaped set -> (scorer file,
    rater file)."""
    scorer_file, rater_file = tmp_path / "scorer.pt", tmp_path / "rater.pt"
    _scorer(scorer_file)
    args = ["train", "rater", "--data", str(_tiny_flickr(tmp_path)), "--scorer", str(scorer_file),
            "--out", str(rater_file), "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    return scorer_file, rater_file


def test_train_rater_writes_a_rater_that_names_its_scorer(trained, tmp_path, capsys):
    scorer_file, rater_file = trained
    rater, _, meta, _ = load_captioner(rater_file)
    assert rater.cfg.n_layers == 1
    assert meta["scorer_sha256"] == hashlib.sha256(scorer_file.read_bytes()).hexdigest()
    log = json.loads(rater_file.with_suffix(".json").read_text())
    (epoch,) = log["history"]
    assert np.isfinite(epoch["cross_entropy"]) and np.isfinite(epoch["train_loss"])
    assert 0 <= epoch["own_first_pct"] <= 100 and 0 <= epoch["scorer_own_first_pct"] <= 100
    assert epoch["lists"] == 9  # every dev caption of the tiny set (3 images x 3 captions)
    # bad input: a clear message and exit code, nothing written
    bad = ["train", "rater", "--data", str(tmp_path / "flickr"), "--scorer", str(scorer_file),
           "--out", str(tmp_path / "r2.pt"), "--layers", "5", "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(bad) == 2
    assert "1 to 2" in capsys.readouterr().err and not (tmp_path / "r2.pt").exists()


def test_the_scorer_rates_through_its_rater_and_keeps_its_memories(trained, tmp_path, caplog):
    scorer_file, rater_file = trained
    plain, rated = NativeCaptioner(str(scorer_file)), NativeCaptioner(str(scorer_file))
    assert rated.use_rater(str(rater_file)) and rated.rater_info is not None
    assert rated._scoring_model()[0].cfg.n_layers == 1
    rated._scorer = (rated.rater, torch.float32)  # the float32 reference, not a bfloat16 copy
    grid = torch.randn(3, 1280, 7, 7)
    memory = plain.memory(grid)
    np.testing.assert_array_equal(rated.memory(grid), memory)
    text = "a dog on the grass"
    got = rated.log_likelihood(memory, text)
    rater, tok, _, _ = load_captioner(rater_file)
    rows, _ = tok.scoring_rows([text] * 3, rater.cfg.max_len)
    with torch.no_grad():
        direct = sequence_log_likelihood(rater, torch.from_numpy(memory).view(3, 49, 32), torch.tensor(rows),
                                         tok.pad_id).numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, plain.log_likelihood(memory, text), atol=1e-3)  # the rater, not the scorer
    # a rater distilled from another scorer is left out, with a warning
    _scorer(tmp_path / "other.pt", seed=1)
    other = NativeCaptioner(str(tmp_path / "other.pt"))
    with caplog.at_level(logging.WARNING):
        assert not other.use_rater(str(rater_file))
    assert "distilled from another scorer" in caplog.text and other.rater is None


def test_the_torch_free_scorer_exports_the_rater(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from captioning.export import export_scorer
    from captioning.lite import LiteScorer
    from indexer.query_models import scorer_key

    scorer_file, rater_file = trained
    scorer = NativeCaptioner(str(scorer_file))
    assert scorer.use_rater(str(rater_file))
    scorer._scorer = (scorer.rater, torch.float32)  # the float32 reference, not a bfloat16 copy
    folder = tmp_path / "export"
    folder.mkdir()
    spec = export_scorer(scorer, folder)
    assert spec["rater"] == scorer.rater_info.to_dict() and spec["info"] == scorer.info.to_dict()
    lite = LiteScorer(folder, spec, threads=1, precision="float32")
    memory = scorer.memory(torch.randn(4, 1280, 7, 7))
    np.testing.assert_allclose(lite.log_likelihood(memory, "a photo of a dog"),
                               scorer.log_likelihood(memory, "a photo of a dog"), rtol=1e-4, atol=1e-4)
    # the export of a scorer rated through a rater has a key of its own
    sha, rater_sha = scorer.info.weights_sha256, scorer.rater_info.weights_sha256
    assert scorer_key(sha, None) == sha and scorer_key(sha, rater_sha) not in (sha, rater_sha)


def test_an_engine_with_a_rater_ranks_through_it_in_pytorch_and_without_torch(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from indexer import query_models
    from indexer.config import EngineConfig
    from indexer.engine import Engine
    from test_matcher import _photos

    scorer_file, rater_file = trained
    cfg = EngineConfig(index_dir=tmp_path / "idx", cache_dir=tmp_path / "cache", progress=False, captioner=None,
                       scorer=f"native:{scorer_file}", rater=str(rater_file), matcher=None, tagger=None,
                       confidence=None)
    query_models._found.clear()
    with Engine(cfg) as engine:
        engine.index(_photos(tmp_path))
        scorer = engine.scorer
        assert scorer.rater_info is not None and scorer._scoring_model()[0] is not scorer.model
        hits = engine.search("a dog on the grass", k=4, mode="fused", weights=FusionWeights(1, 0, 0, 1, 0))
        assert len(hits) == 4 and all("likelihood" in h.scores for h in hits)
        assert engine.query_runtime() == "onnxruntime"
        lite = engine.ranker().scorer
        assert lite.rater_info == scorer.rater_info  # the export rates through the rater, as PyTorch does
        key = query_models.scorer_key(scorer.info.weights_sha256, scorer.rater_info.weights_sha256)
        assert (query_models.root(cfg.cache_dir) / query_models._name("scorer", key) / "manifest.json").is_file()
