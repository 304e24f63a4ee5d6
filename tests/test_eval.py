"""``pixquery eval retrieval``: the JSON contract and its numbers on a hand-checkable set."""

from __future__ import annotations

import json

import pytest

from conftest import TinyEncoder, make_image
from indexer.cli import main
from indexer.config import EngineConfig
from indexer.errors import InputError
from indexer.lab.evaluate import evaluate_retrieval
from retrieval.images import load_image
from retrieval.query import SIGNALS


def captioned_set(tmp_path):
    images = tmp_path / "imgs"
    caps = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        make_image(images / f"{colour}.jpg", colour, stripe=(i * 50, 0, 0))
        caps += [f"{colour}.jpg\ta {colour} picture", f"{colour}.jpg\tsomething {colour}"]
    caps.append("yellow.jpg\tred and black")  # a wrong caption
    path = tmp_path / "caps.tsv"
    path.write_text("\n".join(caps) + "\n")
    return images, path


def test_eval_report_matches_contract_and_hand_count(tmp_path):
    images, caps = captioned_set(tmp_path)
    cfg = EngineConfig(index_dir=tmp_path / "unused", progress=False, captioner=None)
    report = evaluate_retrieval(images, caps, cfg, encoder=TinyEncoder())
    assert set(report) == {"n_images", "n_queries", "encoder", "captioner", "scorer", "rater", "matcher", "tagger",
                           "weights", "pool", "rerank_depth", "text_to_image", "image_to_text"}
    assert (report["n_images"], report["n_queries"], report["encoder"]) == (4, 9, "test:tiny")
    assert set(report["text_to_image"]) == {"image", "caption", "keyword", "fused"}
    assert set(report["text_to_image"]["image"]) == {"R@1", "R@5", "R@10", "medr"}
    assert set(report["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert report["text_to_image"]["image"]["R@5"] == 100.0  # only 4 images
    # R@1 both ways against a brute-force oracle over the same encoder, one item at a time
    enc = TinyEncoder()
    lines = [l.split("\t") for l in caps.read_text().splitlines()]
    names = sorted({n for n, _ in lines})
    iv = {n: enc.encode_images([load_image(images / n).image])[0] for n in names}
    tv = [enc.encode_texts([c])[0] for _, c in lines]
    t2i = sum(max(names, key=lambda n: float(t @ iv[n])) == owner for t, (owner, _) in zip(tv, lines))
    i2t = sum(lines[max(range(len(lines)), key=lambda j: float(tv[j] @ iv[n]))][0] == n for n in names)
    assert t2i == 8  # the wrong caption cannot find its image first
    assert report["text_to_image"]["image"]["R@1"] == pytest.approx(100 * t2i / len(lines), abs=0.01)
    assert report["image_to_text"]["R@1"] == pytest.approx(100 * i2t / len(names))
    assert not (tmp_path / "unused").exists()  # never touches the configured index


def test_eval_reports_caption_and_keyword_modes_from_generated_captions(tmp_path):
    from conftest import TinyCaptioner

    images, caps = captioned_set(tmp_path)
    cfg = EngineConfig(index_dir=tmp_path / "unused", progress=False, captioner="test")
    report = evaluate_retrieval(images, caps, cfg, encoder=TinyEncoder(), captioner=TinyCaptioner(), tune=True)
    t2i = report["text_to_image"]
    assert report["captioner"] == "test:tiny-captioner"
    # captions are "a <colour> picture", but the tiny captioner calls the yellow image orange: the six
    # red/green/blue queries find their image by keyword, the three yellow ones (incl. the wrong
    # "red and black") cannot ("picture" matches every caption with a BM25 of ~0, below "red")
    assert t2i["keyword"]["R@1"] == pytest.approx(100 * 6 / 9, abs=0.01)
    assert t2i["fused"]["R@1"] >= t2i["image"]["R@1"] - 0.01
    tuning = report["tuning"]
    assert len(tuning["first_stage"]) > 1 and set(tuning["best_first_stage"]) == set(SIGNALS)


def test_eval_cli_prints_exactly_one_json_object(tmp_path, capsys, monkeypatch):
    images, caps = captioned_set(tmp_path)
    monkeypatch.setattr("indexer.engine.Engine.encoder", property(lambda self: self._encoder or TinyEncoder()))
    assert main(["eval", "retrieval", "--images", str(images), "--captions", str(caps), "--json", "-q",
                 "--captioner", "none"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["n_queries"] == 9 and out.count("\n") == 1


def test_eval_refuses_missing_images(tmp_path):
    images, caps = captioned_set(tmp_path)
    (images / "red.jpg").unlink()
    from indexer.errors import InputError

    with pytest.raises(InputError, match="not in"):
        evaluate_retrieval(images, caps, EngineConfig(progress=False), encoder=TinyEncoder())


@pytest.mark.data
@pytest.mark.slow
def test_shipped_models_reach_issue_figures_on_flickr8k_dev(tmp_path):
    """The shipped models and default weights, as in docs/BENCHMARKS.md. Ranking issue: fused R@1
    28.86 vs image 22.66 (+6.20; it asks for +6), guarded a little below the measurement (+5.9), as a
    CPU without bfloat16 units scores in float32 and can move a few of the 5,000 queries. Encoder
    issue: the image mode (which captions do not touch) reaches R@1/5/10 of 21, 49 and 63."""
    from conftest import FLICKR8K

    dev = set((FLICKR8K / "dev.txt").read_text().split())
    lines = [l for l in (FLICKR8K / "captions.tsv").read_text().splitlines() if l.split("\t")[0] in dev]
    (tmp_path / "dev.tsv").write_text("\n".join(lines) + "\n")
    report = evaluate_retrieval(FLICKR8K / "images", tmp_path / "dev.tsv", EngineConfig(progress=False),
                                modes=("image", "fused"))
    image, fused = report["text_to_image"]["image"], report["text_to_image"]["fused"]
    assert (report["n_images"], report["n_queries"]) == (1000, 5000)
    assert image["R@1"] >= 21 and image["R@5"] >= 49 and image["R@10"] >= 63
    assert report["scorer"] is not None and report["matcher"] is not None  # both second-stage signals took part
    assert fused["R@1"] >= 28.5 and fused["R@1"] >= image["R@1"] + 5.9
    assert fused["R@5"] >= image["R@5"] and fused["R@10"] >= image["R@10"]


def test_eval_captions_contract_and_perfect_unigrams(tmp_path):
    from conftest import TinyCaptioner
    from indexer.lab.evaluate import evaluate_captions

    images = tmp_path / "imgs"
    lines = []
    for colour in ["red", "green", "blue", "yellow"]:
        make_image(images / f"{colour}.png", colour)
        lines += [f"{colour}.png\ta {colour} picture", f"{colour}.png\tsomething {colour} and bright"]
    (tmp_path / "refs.tsv").write_text("\n".join(lines) + "\n")
    cfg = EngineConfig(progress=False, captioner=None)
    report = evaluate_captions(images, tmp_path / "refs.tsv", cfg, captioner=TinyCaptioner())
    assert set(report) == {"n_images", "captioner", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr", "ROUGE-L"}
    assert report["n_images"] == 4 and report["captioner"] == "test:tiny-captioner"
    # every hypothesis equals one of its references: unigram and bigram precision are perfect
    assert report["BLEU-1"] == pytest.approx(1.0) and report["BLEU-2"] == pytest.approx(1.0)
    assert report["ROUGE-L"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="no captioner"):
        evaluate_captions(images, tmp_path / "refs.tsv", cfg)


@pytest.mark.data
@pytest.mark.slow
def test_shipped_captioner_on_flickr8k_dev(tmp_path):
    """The default captioner and decoding, as in docs/BENCHMARKS.md (measured: BLEU-4 0.2303, CIDEr 0.5787;
    the issue's targets are 0.23 and 0.55). BLEU-4 is guarded a little below the measurement, as other
    CPUs' floating point can change a few of the 1,000 captions."""
    from conftest import FLICKR8K

    from indexer.lab.evaluate import evaluate_captions

    dev = set((FLICKR8K / "dev.txt").read_text().split())
    lines = [l for l in (FLICKR8K / "captions.tsv").read_text().splitlines() if l.split("\t")[0] in dev]
    (tmp_path / "dev.tsv").write_text("\n".join(lines) + "\n")
    report = evaluate_captions(FLICKR8K / "images", tmp_path / "dev.tsv", EngineConfig(progress=False))
    assert report["n_images"] == 1000 and report["captioner"] == "native:effl0-sat-v4"
    assert report["CIDEr"] >= 0.55 and report["BLEU-4"] >= 0.228
