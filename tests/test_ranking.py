"""Caption-conditioned ranking: the query language, the keyword index, fused modes and bad queries."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TinyCaptioner, TinyEncoder, make_image
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.storage.filters import Filters
from retrieval.query import FusionWeights
from indexer.storage.keywords import fts_any
from indexer.storage.pool_keywords import PoolKeywords
from indexer.storage.schema import SCHEMA_VERSION
from indexer.storage.store import Store
from retrieval.fusion import add_relative, zscore
from retrieval.query_parser import MAX_QUERY_CHARS, keyword_phrases, parse_query

COLOURS = ("red", "green", "blue", "purple", "white", "black")


def fts_expression(terms) -> str:
    """The FTS5 expression the SQLite keyword index runs for these query terms."""
    return fts_any(keyword_phrases(list(terms)))


# --- the query language ---------------------------------------------------------------------------
def test_parse_negative_weighted_and_phrases():
    q = parse_query('beach -people dog grass^2 "park bench"^1.5 -"red car"')
    assert q.terms == (("beach", 1.0), ("dog", 1.0), ("grass", 2.0), ("park bench", 1.5))
    assert q.negative == ("people", "red car")
    assert q.positive_text == "beach dog grass park bench"
    assert fts_expression([t for t, _ in q.terms]) == '"beach" OR "dog" OR "grass" OR "park bench"'


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   ", "empty"), ("-people -cars", "only excluded"), ("- -- ^ \"\"", "nothing to look for"),
    ("x" * (MAX_QUERY_CHARS + 1), "limit"), ("cat^11", "above the limit"),
])
def test_parse_refuses_queries_with_nothing_to_find(text, message):
    with pytest.raises(InputError, match=message):
        parse_query(text)


def test_fts_expression_quotes_every_term_so_operators_are_words():
    q = parse_query('x" OR 1=1; DROP TABLE images; -- NEAR(a b) red* caption:blue "unclosed')
    expr = fts_expression([t for t, _ in q.terms])
    # every piece is a double-quoted run of word characters, joined only by our own ORs
    for piece in expr.split(" OR "):
        assert piece.startswith('"') and piece.endswith('"') and piece[1:-1].replace(" ", "").isalnum()
    # the quote after x opens a phrase that runs to the next quote; the last, unclosed one is a word
    assert expr == '"x" OR "or 1 1 drop table images near a b red caption blue" OR "unclosed"'
    q = parse_query("DROP TABLE images; NEAR(a b) red* caption:blue")
    assert fts_expression([t for t, _ in q.terms]) == ('"drop" OR "table" OR "images" OR "near" OR "b" OR "red" OR '
                                                        '"caption" OR "blue"')


def test_zscore_counts_missing_signals_as_the_lowest():
    z = zscore(np.array([1.0, np.nan, 3.0]))
    assert z[1] == z.min() == z[0] and z[2] > 0
    assert np.all(zscore(np.array([2.0, 2.0])) == 0) and len(zscore(np.zeros(0))) == 0


def test_fusion_weights_are_checked():
    with pytest.raises(InputError):
        FusionWeights(image=-1)
    with pytest.raises(InputError):
        FusionWeights(image=0, caption=0, keyword=0, tags=0, likelihood=5)
    with pytest.raises(InputError):
        FusionWeights(image=float("nan"))


# --- an index with captions -----------------------------------------------------------------------
@pytest.fixture
def captioned(tmp_path, db) -> Engine:
    """12 captioned images, on SQLite and on PostgreSQL."""
    root = tmp_path / "photos"
    for name in COLOURS:  # two near-identical files per colour (a faint stripe keeps their bytes apart)
        rgb = TinyEncoder.COLOURS[name]
        make_image(root / f"{name}.jpg", name, stripe=tuple(min(255, c + 6) for c in rgb))
        make_image(root / "more" / f"{name}-2.png", name, stripe=tuple(max(0, c - 6) for c in rgb))
    cfg = EngineConfig(index_dir=tmp_path / "idx", db_url=db.url("idx"), progress=False, captioner="test",
                       scorer=None)
    engine = Engine(cfg, encoder=TinyEncoder(), captioner=TinyCaptioner())
    engine.index(root)
    yield engine
    engine.close()


def names(hits) -> list[str]:
    return [Path(h.path).name for h in hits]


@pytest.mark.parametrize("mode", ["image", "caption", "keyword", "fused"])
def test_every_mode_finds_the_named_colour_first(captioned, mode):
    hits = captioned.search("a purple picture", k=2, mode=mode)
    assert sorted(names(hits)) == ["purple-2.png", "purple.jpg"]
    assert all(mode in h.scores or mode == "fused" for h in hits)


def test_fused_hits_carry_every_signal(captioned):
    hit = captioned.search("a blue picture", k=1, mode="fused")[0]
    assert set(hit.scores) == {"image", "caption", "keyword"}
    assert hit.caption == "a blue picture" and hit.scores["keyword"] > 0
    # the pool here is the whole index, so the candidates' BM25 is exactly the keyword index's own
    keywords = captioned.open().store.keywords
    assert keywords.doc_freq(["blue", "pictur", "nothing"]) == {"blue": 2, "pictur": 12, "nothing": 0}
    want = dict(keywords.top(["blue", "picture"], 12))
    assert hit.scores["keyword"] == pytest.approx(want[hit.id], rel=1e-6)


def test_negative_terms_drop_images_whose_caption_mentions_them(captioned):
    for mode in ("image", "caption", "keyword", "fused"):
        hits = captioned.search("picture -red -blue", k=12, mode=mode)
        assert not any(n.startswith(("red", "blue")) for n in names(hits)), mode
        if mode != "keyword":  # keyword mode only returns captions sharing a word ("picture": all)
            assert len(hits) == 8


def test_term_weights_change_the_keyword_order(captioned):
    assert names(captioned.search("red green^3", k=2, mode="keyword"))[0].startswith("green")
    assert names(captioned.search("red^3 green", k=2, mode="keyword"))[0].startswith("red")


def test_fused_weights_per_query(captioned):
    # the image signal alone sees TinyEncoder's colours; the keyword signal alone sees caption words
    img = captioned.search("white", k=3, mode="fused", weights=FusionWeights(1, 0, 0, 0))
    kw = captioned.search("white", k=3, mode="fused", weights=FusionWeights(0, 0, 1, 0))
    assert names(img)[0].startswith("white") and names(kw)[0].startswith("white")
    assert kw[0].scores["keyword"] > 0


def test_filters_and_threshold_apply_inside_fused_search(captioned, tmp_path):
    folder = tmp_path / "photos" / "more"
    hits = captioned.search("a red picture", k=6, mode="fused", filters=Filters(folder=str(folder)))
    assert len(hits) == 6 and all(Path(h.path).parent == folder for h in hits)  # k results whenever k match
    everything = captioned.search("a red picture", k=12, mode="fused")
    cut = everything[3].score
    kept = captioned.search("a red picture", k=12, mode="fused", threshold=cut)
    assert [h.id for h in kept] == [h.id for h in everything if h.score >= cut]
    assert captioned.search("a red picture", k=5, filters=Filters(file_types=("gif",))) == []


@pytest.mark.parametrize("query", [
    '"; DROP TABLE images; --', "red' OR '1'='1", 'NEAR(red blue)', "red*", "caption:red", ") OR (",
    '"""', "red AND NOT blue", "^^^ red", "\u00e9t\u00e9 rouge \u2603", "%_\\ red", "x" * 1999,
])
@pytest.mark.parametrize("mode", ["keyword", "fused"])
def test_hostile_queries_are_words_never_sql_or_fts_syntax(captioned, query, mode):
    before = captioned.stats()["images"]
    try:
        hits = captioned.search(query, k=5, mode=mode)
    except InputError:
        hits = None  # a clear refusal is fine too
    if hits is not None and mode == "keyword":  # keyword hits share a word with the query, taken literally
        words = set(re.findall(r"\w+", query.lower()))
        assert all(words & set(h.caption.split()) for h in hits)
    assert captioned.stats()["images"] == before  # nothing was dropped or changed


def test_keyword_index_follows_edits_moves_and_deletions(captioned, tmp_path):
    root = tmp_path / "photos"
    (root / "red.jpg").unlink()
    shutil.move(root / "more" / "red-2.png", root / "crimson.png")
    make_image(root / "more" / "green-2.png", "red", stripe=(1, 2, 3))  # now a red picture
    captioned.index(root)
    hits = captioned.search("red", k=10, mode="keyword")
    assert sorted(names(hits)) == ["crimson.png", "green-2.png"]
    assert names(captioned.search("green", k=10, mode="keyword")) == ["green.jpg"]


def test_schema_2_index_gets_a_filled_keyword_index(captioned):
    url = captioned.open().store.url
    captioned.close()
    old = Store(url)  # back to schema 2: no keyword index
    with old.engine.begin() as conn:
        old.keywords.uninstall(conn)
        conn.exec_driver_sql("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    old.close()
    store = Store(url)
    assert store.get_meta("schema_version") == str(SCHEMA_VERSION)
    assert len(store.keywords.top(["purple"], 10)) == 2 and store.keywords.check() == []
    store.close()


def test_keyword_check_finds_captions_changed_behind_its_back_and_rebuild_mends_them(captioned):
    store = captioned.open().store
    assert store.keywords.check() == []
    with store.engine.begin() as conn:  # by hand, around pixquery (SQLite: without the trigger that follows it)
        if store.engine.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER captions_fts_au")
        conn.exec_driver_sql("UPDATE images SET caption = 'a zebra picture' WHERE caption = 'a red picture'")
    assert store.keywords.check()  # says what is wrong
    store.keywords.rebuild()
    assert store.keywords.check() == []
    assert sorted(names(captioned.search("zebra", k=5, mode="keyword"))) == ["red-2.png", "red.jpg"]
    assert captioned.search("red", k=5, mode="keyword") == []


def test_image_only_and_image_plus_text_queries(captioned, tmp_path):
    example = make_image(tmp_path / "q.png", "green")
    assert names(captioned.search(image=example, k=2, mode="fused"))[0].startswith("green")
    with pytest.raises(InputError, match="keyword mode needs words"):
        captioned.search(image=example, mode="keyword")
    assert captioned.search("picture", image=example, k=1, mode="fused")[0].caption == "a green picture"


def test_bad_mode_and_k(captioned):
    with pytest.raises(InputError, match="unknown ranking mode"):
        captioned.search("red", mode="magic")
    with pytest.raises(InputError, match="k must be"):
        captioned.search("red", k=0)


# --- the likelihood signal: a native scorer over the native encoder's grid --------------------------
SAMPLES = Path(__file__).resolve().parents[1] / "indexer" / "sample_photos"


def test_scorer_memories_are_stored_carried_and_used(tmp_path, tiny_scorer_weights):
    from captioning.native import NativeCaptioner
    from retrieval.factory import DEFAULT_ENCODER, create_encoder

    root = tmp_path / "photos"
    root.mkdir()
    picks = ("cat_tabby_chelsea_01.jpg", "surfer_on_wave_01.jpg", "woman_with_dog_on_grass_01.jpg")
    for n in picks:
        shutil.copy(SAMPLES / n, root / n)
    scorer = NativeCaptioner(str(tiny_scorer_weights))
    cfg = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner=None, scorer=str(tiny_scorer_weights))
    encoder = create_encoder(DEFAULT_ENCODER)
    with Engine(cfg, encoder=encoder, scorer=scorer) as engine:
        engine.index(root)
        vectors = engine.open().vectors
        assert len(vectors.memories) == 3
        hits = engine.search("a dog runs", k=3, mode="fused", weights=FusionWeights(0.01, 0, 0, 100))
        assert all("likelihood" in h.scores for h in hits)
        # stored (8-bit) memories give the likelihood of fresh memories to within a small tolerance
        from retrieval.images import load_image
        grid = encoder.grid(torch.stack([encoder.preprocess(load_image(Path(h.path)).image) for h in hits]))
        fresh = scorer.log_likelihood(scorer.memory(grid), "a dog runs")
        np.testing.assert_allclose([h.scores["likelihood"] for h in hits], fresh, atol=0.05 * np.abs(fresh).max())
        # with a large likelihood weight the ranking follows it
        assert [h.scores["likelihood"] for h in hits] == sorted((h.scores["likelihood"] for h in hits), reverse=True)
        # a move keeps the memory; a deletion removes it
        shutil.move(root / picks[0], root / "moved.jpg")
        (root / picks[1]).unlink()
        engine.index(root)
        vectors = engine.open().vectors
        assert len(vectors.memories) == 2 and set(vectors.memories.ids()) == set(vectors.images.ids())


def test_log_likelihood_batches_and_pads_like_single_texts(tiny_scorer_weights):
    from captioning.native import NativeCaptioner

    scorer = NativeCaptioner(str(tiny_scorer_weights))
    mem = np.random.default_rng(0).standard_normal((3, 49 * 32)).astype(np.float32)
    texts = ["a dog runs", "the dog sits on grass", "!!!"]
    together = scorer.log_likelihood(mem, texts)
    alone = [scorer.log_likelihood(mem[i:i + 1], t)[0] for i, t in enumerate(texts)]
    np.testing.assert_allclose(together, alone, rtol=1e-2)
    assert together[2] == 0.0 and together[0] < 0
    # a hand computation: the sum of the log-softmax of each next token, teacher-forced
    ids = torch.tensor(scorer.tokenizer.encode("a dog runs", 12))[None]
    with torch.no_grad():
        logp = torch.log_softmax(scorer.model.decode(torch.from_numpy(mem[:1]).view(1, 49, 32), ids[:, :-1]), -1)
    manual = float(logp[0, torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
    assert together[0] == pytest.approx(manual, rel=2e-2)


def test_ranker_adds_likelihood_only_to_the_scored_candidates():
    fused = np.array([1.0, 0.9, 0.8, 0.1])
    top = np.array([0, 1, 2])
    out = add_relative(fused, top, np.array([-30.0, -10.0, -20.0]), weight=10.0, total=1.0)
    assert np.argmax(out) == 1 and out[3] <= out.min() + 1e-9
    assert np.array_equal(add_relative(fused, top, np.full(3, np.nan), 10.0, 1.0), fused)


def test_recaption_gives_an_index_without_memories_the_likelihood_signal(tmp_path, tiny_scorer_weights, db):
    from captioning.native import NativeCaptioner
    from retrieval.factory import DEFAULT_ENCODER, create_encoder

    root = tmp_path / "photos"
    root.mkdir()
    for n in ("cat_tabby_chelsea_01.jpg", "surfer_on_wave_01.jpg"):
        shutil.copy(SAMPLES / n, root / n)
    encoder = create_encoder(DEFAULT_ENCODER)
    weights = str(tiny_scorer_weights)
    old = EngineConfig(index_dir=tmp_path / "idx", db_url=db.url("idx"), progress=False, captioner=f"native:{weights}",
                       scorer=None)
    with Engine(old, encoder=encoder) as engine:  # an index as made before the scorer existed
        engine.index(root)
        assert not list(engine.config.vectors_dir.glob("memories-*"))
        assert "likelihood" not in engine.search("a dog runs", k=1)[0].scores
    new = EngineConfig(index_dir=tmp_path / "idx", db_url=db.url("idx"), progress=False,
                       captioner=f"native:{weights}", scorer=f"native:{weights}")
    with Engine(new, encoder=encoder, scorer=NativeCaptioner(weights)) as engine:
        assert "likelihood" not in engine.search("a dog runs", k=1)[0].scores  # memories not written yet
        store = engine.open().store
        with store.engine.begin() as conn:  # captions another captioner wrote (their keywords must go)
            conn.exec_driver_sql("UPDATE images SET caption = 'zebra zebra zebra'")
        engine.recaption()
        assert "likelihood" in engine.search("a dog runs", k=1)[0].scores
        assert engine.search("zebra", k=5, mode="keyword") == [] and store.keywords.check() == []
        with PoolKeywords({}) as tokenizer:  # the new captions' words are in the keyword index
            tokens = {t for r in store.all_images() if r.caption for t in tokenizer.tokens(r.caption)}
        assert tokens and min(store.keywords.doc_freq(tokens).values()) >= 1
        assert engine.stats()["scorer"]["name"] == f"native:{tiny_scorer_weights.resolve()}"
