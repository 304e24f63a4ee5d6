"""Tags as users meet them: query sets with several relevant images, the tags mode and the before/after
row in ``eval retrieval``, the CLI's search output, ``retag`` and ``stats``; shipped files' hashes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import TinyCaptioner, make_image
from indexer.cli import main
from indexer.config import EngineConfig
from indexer.errors import InputError
from indexer.lab.evaluate import _ranks, evaluate_retrieval
from indexer.lab.queries import named_set, read_queries
from retrieval.shipped import SHIPPED
from tag_fakes import ColourTagger, TinyGridEncoder


def test_every_shipped_file_has_its_recorded_hash():
    for s in SHIPPED:
        assert hashlib.sha256(s.path.read_bytes()).hexdigest() == s.sha256, s.name


def test_query_file_format(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("# a comment\nquery\trelevant\tsplit\nred things\ta.jpg b.jpg\ttune\nblue\tc.jpg\n")
    qs = read_queries(path)
    assert qs.texts == ["red things", "blue"] and qs.relevant == [frozenset({"a.jpg", "b.jpg"}), frozenset({"c.jpg"})]
    assert qs.splits == ["tune", ""]
    path.write_text("no tab here\n")
    with pytest.raises(InputError, match=":1: expected"):
        read_queries(path)


def test_the_shipped_out_of_domain_set_names_only_shipped_photos():
    queries, images = named_set("ood")
    qs = read_queries(queries)
    photos = {p.name for p in images.glob("*.jpg")}
    assert len(photos) == 59 and set().union(*qs.relevant) == photos  # every photo is some query's answer
    assert len(qs.texts) == len(set(qs.texts)) >= 150 and sum(len(r) > 1 for r in qs.relevant) >= 30
    assert set(qs.splits) == {"tune", "test"}


def test_rank_of_the_first_relevant_image():
    ranked = [np.array([5, 3, 9]), np.array([1, 2]), np.array([4])]
    assert _ranks(ranked, [np.array([9, 3]), np.array([7]), np.array([4])], 10).tolist() == [2, 11, 1]


@pytest.fixture
def colour_set(tmp_path):
    images = tmp_path / "imgs"
    for colour in ("red", "green", "blue", "yellow", "purple", "orange"):
        make_image(images / f"{colour}.png", colour)
    make_image(images / "grey.png", (128, 128, 128))
    queries = tmp_path / "q.tsv"
    queries.write_text("query\trelevant\tsplit\nwarm\tred.png orange.png yellow.png\ttune\n"
                       "green\tgreen.png\ttest\npurple\tpurple.png\ttest\n")
    return images, queries


def test_eval_over_a_query_set_with_tags_and_the_before_row(tmp_path, colour_set, monkeypatch):
    images, queries = colour_set
    import indexer.lab.evaluate as evaluate

    class TaggedEngine(evaluate.Engine):  # the eval's Engine, with the colour tagger injected
        def __init__(self, config, encoder=None, captioner=None, scorer=None):
            super().__init__(config, encoder=encoder, captioner=captioner, scorer=scorer, tagger=ColourTagger())

    monkeypatch.setattr(evaluate, "Engine", TaggedEngine)
    cfg = EngineConfig(index_dir=tmp_path / "unused", progress=False, captioner=None, scorer=None, matcher=None,
                       confidence=None)
    report = evaluate_retrieval(images, None, cfg, encoder=TinyGridEncoder(), queries_file=queries, baseline=True,
                                modes=("image", "keyword", "tags", "fused"))
    t2i = report["text_to_image"]
    assert report["image_to_text"] is None and report["n_images"] == 7 and report["n_queries"] == 3
    assert set(t2i) == {"image", "keyword", "tags", "fused", "fused_before_tags"}
    assert t2i["tags"]["R@1"] == 100.0  # "warm" finds a warm colour first: any relevant image counts
    assert t2i["keyword"]["R@1"] == 100.0 and t2i["fused_before_tags"]["R@1"] <= t2i["fused"]["R@1"]
    assert set(report["by_split"]) == {"tune", "test"} and report["by_split"]["test"]["tags"]["R@1"] == 100.0
    assert report["tagger"] == "test:colour-tagger"


def test_search_prints_tags_and_marks_uncertain_captions(tmp_path, photo_dir, capsys, monkeypatch):
    from test_tags_index import engine as tagged_engine

    class Liar(TinyCaptioner):
        def caption_pixels(self, pixels, options=None):  # noqa: ANN001, ANN201
            return [c.replace("blue", "yellow") for c in super().caption_pixels(pixels)]

    eng = tagged_engine(tmp_path, captioner=Liar())
    eng.index(photo_dir)
    import indexer.engine

    monkeypatch.setattr(indexer.engine, "Engine", lambda *a, **k: eng)  # what the commands build
    assert main(["search", "blue", "-k", "1", "--mode", "image"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "/blue" in out[0]
    assert out[1].strip().startswith("tags: blue")
    assert out[2].strip().startswith("(uncertain caption, confidence") and out[2].endswith("a yellow picture")
    assert main(["search", "red", "-k", "1", "--mode", "image", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)["results"][0]
    assert hit["caption"] == "a red picture" and hit["caption_is_confident"] is True
    assert {t["name"] for t in hit["tags"]} == {"red", "warm"} and 0.5 < hit["caption_confidence"] <= 1
    assert main(["stats"]) == 0
    assert "tags: 16 images tagged by test:colour-tagger" in capsys.readouterr().out


def test_stats_and_search_of_an_index_without_tags_say_how_to_add_them(tmp_path, photo_dir, capsys, monkeypatch):
    from test_tags_index import engine as tagged_engine

    old = tagged_engine(tmp_path, tagger=False, captioner=TinyCaptioner(), confidence=False)
    old.index(photo_dir)
    eng = tagged_engine(tmp_path)
    import indexer.engine

    monkeypatch.setattr(indexer.engine, "Engine", lambda *a, **k: eng)  # what the commands build
    assert main(["search", "red", "-k", "2"]) == 0
    captured = capsys.readouterr()
    assert "red" in captured.out and "pixquery retag" in captured.err
    assert main(["stats"]) == 0
    assert "none (an index from before tags; add them with: pixquery retag)" in capsys.readouterr().out
    assert main(["retag"]) == 0
    assert "tagged 16 images" in capsys.readouterr().out
    assert main(["search", "red", "-k", "2"]) == 0
    assert "retag" not in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_models_lift_the_out_of_domain_set_by_eight_points(tmp_path):
    """Issue 20's out-of-domain figure, as in docs/BENCHMARKS.md: with the shipped models and default
    weights, fused R@1 on the shipped query set is at least 8 points above fused ranking without tags
    (``fused_before_tags``), both from the same run."""
    from indexer.lab.queries import named_set

    queries, images = named_set("ood")
    report = evaluate_retrieval(images, None, EngineConfig(index_dir=tmp_path / "unused", progress=False),
                                queries_file=queries, baseline=True, modes=("fused",))
    t2i = report["text_to_image"]
    assert report["tagger"] is not None
    assert t2i["fused"]["R@1"] >= t2i["fused_before_tags"]["R@1"] + 8
