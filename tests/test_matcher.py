"""The match head: its model, weight files, the text tower's token states, its place in fused ranking,
and `pixquery train matcher` on a tiny Flickr8k-shaped folder."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.native.matcher import MAX_TOKENS, Matcher, MatcherConfig, MatchHead, load_matcher, save_matcher
from indexer.config import EngineConfig
from indexer.engine import Engine
from retrieval.query import FusionWeights
from retrieval.errors import ModelLoadError

SAMPLES = Path(__file__).resolve().parents[1] / "indexer" / "sample_photos"
TINY = MatcherConfig(memory_dim=32, memory_len=49, d_model=16, n_layers=1, n_heads=2, dropout=0.0)


def _random_head(seed: int = 0, cfg: MatcherConfig = TINY) -> MatchHead:
    torch.manual_seed(seed)
    head = MatchHead(cfg)
    for p in head.parameters():  # spread the logits, so images get clearly different scores
        torch.nn.init.normal_(p, std=0.5)
    return head.eval()


def test_padding_tokens_do_not_change_the_logit():
    head = _random_head()
    g = torch.Generator().manual_seed(1)
    tokens, memory = torch.randn(3, 5, 384, generator=g), torch.randn(3, 49, 32, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    padded = torch.cat([tokens, 100 * torch.randn(3, 4, 384, generator=g)], 1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    with torch.no_grad():
        plain, with_pads = head(tokens, mask, memory), head(padded, padded_mask, memory)
    assert plain.shape == (3,)
    torch.testing.assert_close(plain, with_pads)
    assert len(set(np.round(plain.numpy(), 4))) == 3  # the logits differ between images


def test_weights_roundtrip_in_fp16_and_bad_files_are_refused(tmp_path):
    head = _random_head()
    path = tmp_path / "m.pt"
    save_matcher(head, path, {"scorer_sha256": "abc"})
    loaded, meta, sha = load_matcher(path)
    assert meta == {"scorer_sha256": "abc"} and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    for name, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.half().float())
    assert torch.load(path, map_location="cpu", weights_only=True)["format"] == "pixquery-native-matcher/1"
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="could not load the match head"):
        load_matcher(tmp_path / "junk.pt")
    with pytest.raises(ModelLoadError, match="do not exist"):
        Matcher(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="unknown match head"):
        Matcher("no-such-head")


def test_text_tower_token_states_pool_to_its_embedding_and_are_cached():
    from retrieval.native.towers import TOKEN_CACHE_SIZE, TextTower

    tower = TextTower().eval()
    with torch.inference_mode():
        states, mask = tower.token_states(["a dog runs on the grass", "snow"])
        pooled = tower(["a dog runs on the grass", "snow"])
        first = tower.token_states(["a dog runs on the grass"])  # kept from the batch call above
        again = tower.token_states(["a dog runs on the grass"])
    manual = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, manual)
    assert again[0] is first[0] and first[0].shape[1] == int(mask[0].sum())
    torch.testing.assert_close(first[0][0], states[0, :first[0].shape[1]], atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        for i in range(TOKEN_CACHE_SIZE + 5):
            tower.token_states([f"query {i}"])
        tower.token_states([f"text {i}" for i in range(9)])  # a batch of more than 8 is not kept
    assert len(tower._cache) == TOKEN_CACHE_SIZE and "text 0" not in tower._cache


def test_matcher_scores_memories_as_its_head_does(tmp_path):
    head = _random_head()
    save_matcher(head, tmp_path / "m.pt", {"scorer_sha256": "abc"})
    matcher = Matcher(str(tmp_path / "m.pt"))
    mem = np.random.default_rng(0).standard_normal((4, 49 * 32)).astype(np.float32)
    scores = matcher.score(mem, "a dog runs")
    tokens, mask = matcher.text_tower.token_states(["a dog runs"])
    loaded, _, _ = load_matcher(tmp_path / "m.pt")
    with torch.no_grad():
        manual = loaded(tokens.expand(4, -1, -1), mask.bool().expand(4, -1), torch.from_numpy(mem).view(4, 49, 32))
    np.testing.assert_allclose(scores, manual.numpy(), rtol=1e-5, atol=1e-5)
    assert matcher.scorer_sha256 == "abc" and matcher.memory_dim == 49 * 32
    assert matcher.score(np.zeros((0, 49 * 32), np.float32), "a dog").shape == (0,)
    with pytest.raises(ValueError, match="width"):
        matcher.score(mem[:, :100], "a dog")
    long_query = " ".join(["dog"] * 100)  # more tokens than the head reads: cut, not an error
    assert np.isfinite(matcher.score(mem, long_query)).all() and MAX_TOKENS < 100
    # token states prepared in a padded batch (an evaluation's queries) score as one text alone does
    alone = [matcher.score(mem, t) for t in ("a dog runs", long_query, "snow")]
    matcher.prepare(["a dog runs", long_query, "snow"], batch=2)
    assert set(matcher._prepared) == {"a dog runs", long_query, "snow"}
    for text, expected in zip(("a dog runs", long_query, "snow"), alone):
        np.testing.assert_allclose(matcher.score(mem, text), expected, rtol=1e-4, atol=1e-4)


def test_shipped_match_head_belongs_to_the_shipped_scorer():
    from captioning.native import NativeCaptioner
    from retrieval.native.matcher import DEFAULT_MATCHER
    from retrieval.shipped import DEFAULTS, shipped

    assert DEFAULTS["matcher"] == f"native:{DEFAULT_MATCHER}"
    path = shipped("matcher", DEFAULT_MATCHER).path
    assert path.stat().st_size < 5_000_000
    matcher, scorer = Matcher(DEFAULT_MATCHER), NativeCaptioner(DEFAULTS["scorer"].removeprefix("native:"))
    # without this the Engine would leave the head out of every search (with a warning)
    assert matcher.scorer_sha256 == scorer.info.weights_sha256
    assert matcher.memory_dim == int(np.prod(scorer.memory_shape))


# --- in fused ranking -------------------------------------------------------------------------------
@pytest.fixture
def scorer_and_matcher(tmp_path, tiny_scorer_weights) -> tuple[Path, Path]:
    """A tiny random scorer (d_model 32) and a random match head that records that scorer's sha256."""
    matcher = tmp_path / "matcher.pt"
    sha = hashlib.sha256(tiny_scorer_weights.read_bytes()).hexdigest()
    save_matcher(_random_head(), matcher, {"scorer_sha256": sha})
    return tiny_scorer_weights, matcher


def _photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for n in ("cat_tabby_chelsea_01.jpg", "surfer_on_wave_01.jpg", "woman_with_dog_on_grass_01.jpg",
              "people_playing_soccer_01.jpg"):
        shutil.copy(SAMPLES / n, root / n)
    return root


def test_fused_search_adds_the_match_signal_beside_its_scorer(tmp_path, scorer_and_matcher):
    from retrieval.factory import DEFAULT_ENCODER, create_encoder

    scorer, matcher = scorer_and_matcher
    cfg = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner=None, scorer=f"native:{scorer}",
                       matcher=f"native:{matcher}")
    with Engine(cfg, encoder=create_encoder(DEFAULT_ENCODER)) as engine:
        engine.index(_photos(tmp_path))
        hits = engine.search("a dog runs", k=4, mode="fused", weights=FusionWeights(0.01, 0, 0, 0, 100))
        assert all("match" in h.scores and "likelihood" not in h.scores for h in hits)
        # with a large match weight the order follows the match head, and its values are the head's own
        assert [h.scores["match"] for h in hits] == sorted((h.scores["match"] for h in hits), reverse=True)
        ranker = engine.ranker()
        direct = ranker.matcher.score(ranker.vectors.memories.reconstruct_present(np.array([h.id for h in hits]))[1],
                                      "a dog runs")
        np.testing.assert_allclose([h.scores["match"] for h in hits], direct, rtol=1e-5, atol=1e-5)
        both = engine.search("a dog runs", k=4, mode="fused", weights=FusionWeights(1, 0, 0, 0.5, 0.5))
        assert all({"likelihood", "match"} <= set(h.scores) for h in both)
        off = engine.search("a dog runs", k=4, mode="fused", weights=FusionWeights(1, 0, 0, 0.5, 0))
        assert all("match" not in h.scores for h in off)


def test_a_match_head_of_another_scorer_is_left_out_with_a_warning(tmp_path, scorer_and_matcher, caplog):
    from retrieval.factory import DEFAULT_ENCODER, create_encoder

    scorer, _ = scorer_and_matcher
    other = tmp_path / "other.pt"
    save_matcher(_random_head(), other, {"scorer_sha256": "0" * 64})
    cfg = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner=None, scorer=f"native:{scorer}",
                       matcher=f"native:{other}")
    with Engine(cfg, encoder=create_encoder(DEFAULT_ENCODER)) as engine, caplog.at_level(logging.WARNING):
        engine.index(_photos(tmp_path))
        hits = engine.search("a dog runs", k=2, mode="fused")
    assert hits and all("match" not in h.scores and "likelihood" in h.scores for h in hits)
    assert "trained on the memories of another scorer" in caplog.text
    # a match head that cannot be loaded is a model error (the CLI's exit 4), not a silent fallback
    missing = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner=None, scorer=f"native:{scorer}",
                           matcher=str(tmp_path / "missing.pt"))
    with Engine(missing, encoder=create_encoder(DEFAULT_ENCODER)) as engine:
        with pytest.raises(ModelLoadError, match="do not exist"):
            engine.search("a dog runs", k=2, mode="fused")


# --- training -------------------------------------------------------------------------------------
def _tiny_flickr(tmp_path: Path) -> Path:
    """A Flickr8k-shaped folder of bundled sample photos with made-up captions: 6 train, 3 dev images."""
    root = tmp_path / "flickr"
    (root / "images").mkdir(parents=True)
    photos = sorted(p.name for p in SAMPLES.glob("*.jpg"))[:9]
    lines = []
    for name in photos:
        shutil.copy(SAMPLES / name, root / "images" / name)
        words = name.rsplit("_", 1)[0].replace("_", " ")
        lines += [f"{name}\ta photo of {words}", f"{name}\t{words}", f"{name}\tthere is a {words} here"]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    (root / "train.txt").write_text("\n".join(photos[:6]) + "\n")
    (root / "dev.txt").write_text("\n".join(photos[6:]) + "\n")
    return root


def test_train_matcher_cli_writes_a_head_for_the_shipped_scorer(tmp_path, capsys):
    from indexer.cli import main
    from retrieval.shipped import shipped

    out = tmp_path / "m.pt"
    args = ["train", "matcher", "--data", str(_tiny_flickr(tmp_path)), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--negatives", "3", "--cache-dir", str(tmp_path / "cache"), "-q"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    head, meta, _ = load_matcher(out)
    shipped_scorer = shipped("captioner", "effl0-sat-v1").sha256
    assert meta["scorer_sha256"] == shipped_scorer and head.cfg.memory_dim == 384
    log = json.loads(out.with_suffix(".json").read_text())
    assert [h["step"] for h in log["history"]] == [3] and np.isfinite(log["history"][0]["loss"])
    assert 0 <= log["dev"]["own_first_pct"] <= 100 and log["dev"]["own_first_of"] == 3
    # bad input: a clear message and exit code, nothing written
    assert main([*args[:5], str(tmp_path / "m2.pt"), "--negatives", "9", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "only 6 images" in capsys.readouterr().err and not (tmp_path / "m2.pt").exists()
    assert main(["train", "matcher", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m3.pt")]) == 2
    assert "Flickr8k" in capsys.readouterr().err


def test_the_second_stage_started_early_rates_like_the_one_after_the_first_stage(tmp_path, scorer_and_matcher,
                                                                                 monkeypatch):
    """Fused ranking starts the scorer on side threads for the image search's best candidates, shared out
    among them, and the match head later; the values it then uses must be those of rating the first
    stage's best directly, whether the early start covered them all, some or none, however many side
    threads shared them, and with or without a second core."""
    from indexer.search import second_stage as stage_module
    from retrieval.factory import DEFAULT_ENCODER, create_encoder

    scorer, matcher = scorer_and_matcher
    cfg = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner=None, scorer=f"native:{scorer}",
                       matcher=f"native:{matcher}")
    with Engine(cfg, encoder=create_encoder(DEFAULT_ENCODER)) as engine:
        engine.index(_photos(tmp_path))
        ranker = engine.ranker()
        ids = np.sort(ranker.vectors.memories.ids())[::-1].copy()  # 4 images, in an order of their own
        direct = ranker.rerank_signals(ids, "a dog runs")
        assert set(direct) == {"likelihood", "match"}
        with monkeypatch.context() as patch:  # only these patches end with the block (not the fixtures')
            patch.setattr(stage_module, "parallel", lambda: True)  # an early start even on one core
            for workers in (1, 3):
                patch.setattr(stage_module, "side_workers", lambda: workers)
                for guessed in (ids, ids[:2], ids[[3, 0]], np.array([ids[1], 10**6]), np.array([10**6])):
                    early = ranker.second.start(dict.fromkeys(guessed.tolist(), 0.0), "a dog runs", 10, True)
                    assert len(early.jobs) == min(workers, len(guessed))  # each reads its share's memories
                    ahead = []
                    got = ranker.second.finish(ids, "a dog runs", True, True, early, lambda: ahead.append(1))
                    assert ahead == [1]
                    for name in direct:
                        np.testing.assert_allclose(got[name], direct[name], rtol=1e-5, atol=1e-5,
                                                   err_msg=f"{guessed}, {workers} side threads")
        weights = FusionWeights(1, 0.5, 0.5, 0.5, 0.5)
        early = engine.search("a dog runs on grass", k=4, mode="fused", weights=weights)
        monkeypatch.setattr(stage_module, "parallel", lambda: False)  # one core: rated in order, no guess
        late = engine.search("a dog runs on grass", k=4, mode="fused", weights=weights)
    assert [h.id for h in early] == [h.id for h in late]
    for a, b in zip(early, late):
        assert set(a.scores) == set(b.scores) >= {"likelihood", "match"}
        for name in a.scores:
            assert a.scores[name] == pytest.approx(b.scores[name], rel=1e-5, abs=1e-5)


def test_what_showing_the_results_needs_is_read_while_the_scorer_finishes(tmp_path, scorer_and_matcher):
    """With k at most the second stage's depth the results are the first stage's best in a new order, so their
    rows and caption cosines are read before the scorer's results are collected: the same as reading them
    afterwards, and the hits need no second read."""
    from indexer.search.searcher import Searcher
    from retrieval.factory import DEFAULT_ENCODER, create_encoder
    from retrieval.query_parser import parse_query

    scorer, matcher = scorer_and_matcher
    cfg = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner=None, scorer=f"native:{scorer}",
                       matcher=f"native:{matcher}")
    with Engine(cfg, encoder=create_encoder(DEFAULT_ENCODER)) as engine:
        engine.index(_photos(tmp_path))
        ranker, searcher = engine.ranker(), engine.searcher()
        parsed = parse_query("a dog runs on grass")
        q = searcher.query(parsed, None)
        for k, ahead in ((3, True), (10, True), (11, False)):
            ranked = ranker.rank("fused", q, parsed, k, FusionWeights(), depth=10, rows=True)
            assert len(ranked.ids) == min(k, 4)
            assert (ranked.rows is not None) == ahead
            if ahead:
                assert {i: ranked.rows[i].path for i in ranked.ids.tolist()} == \
                    {i: r.path for i, r in ranker.store.images_by_ids(ranked.ids.tolist()).items()}
            np.testing.assert_allclose(ranked.signals["caption"], ranker._caption_cosines(ranked.ids, q))
        assert ranker.rank("fused", q, parsed, 3, FusionWeights(), depth=10).rows is None  # no caller to show them
        reads = []
        real = ranker.store.images_by_ids
        ranker.store.images_by_ids = lambda ids: (reads.append(list(ids)), real(ids))[1]
        try:
            hits = Searcher(ranker, searcher.encoder).search("a dog runs on grass", k=3)
        finally:
            ranker.store.images_by_ids = real
        assert len(hits) == 3 and len(reads) == 1 and set(reads[0]) >= {h.id for h in hits}


def test_a_forked_child_runs_side_work_on_threads_of_its_own():
    """A process forked after side threads started (a reader process, say) must not hand work to its
    parent's threads, which it does not have: it would wait forever."""
    import multiprocessing

    from indexer.search import side

    assert side.beside(lambda: 7).result(timeout=10) == 7  # the parent's side threads exist now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply_async(_side_work_in_child).get(timeout=60) == 42


def _side_work_in_child() -> int:
    from indexer.search import side

    return side.beside(lambda: 6 * 7).result(timeout=20)


def test_an_offer_runs_once_on_a_free_side_thread_or_else_on_the_caller(monkeypatch):
    """Work offered to the side threads runs on one that is free; when every side thread is busy, the caller
    takes the job back and runs it itself (it never waits behind the side threads' queue); either way it runs
    once, and its exception reaches the caller."""
    import threading

    from indexer.search import side

    cores = max(2, side.usable_cores())
    monkeypatch.setattr(side, "usable_cores", lambda: cores)  # side threads even on one core

    def where() -> str:
        return threading.current_thread().name

    ran: list[str] = []
    started = threading.Event()

    def recorded() -> str:
        started.set()
        ran.append(where())
        return where()

    offer = side.Offer(recorded)
    assert started.wait(timeout=20)  # the side threads are idle: one takes it
    assert offer.result() == ran[0] != where() and ran[0].startswith("pixquery-side")

    release, busy = threading.Event(), []
    for _ in range(side.side_workers()):  # every side thread busy until released
        up = threading.Event()
        busy.append(side.beside(lambda up=up: (up.set(), release.wait(timeout=60))))
        assert up.wait(timeout=20)
    try:
        ran.clear()
        assert side.Offer(recorded).result() == where() and ran == [where()]  # taken back, run here
        with pytest.raises(ZeroDivisionError):
            side.Offer(lambda: 1 / 0).result()
    finally:
        release.set()
    for job in busy:
        job.result(timeout=20)
    side.beside(lambda: None).result(timeout=20)  # queued after the jobs taken back: they have been passed over
    assert ran == [where()]  # the job taken back was not run again by a side thread once it came free

    monkeypatch.setattr(side, "parallel", lambda: False)  # one core: it runs at once, here
    ran.clear()
    assert side.Offer(recorded).result() == where() and ran == [where()]
