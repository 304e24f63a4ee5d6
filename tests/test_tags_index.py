"""Tags and caption confidence in an index: stored with provenance, carried by copies, replaced when a
file changes, gone with deletions, added to an older index by retag, read by search, keywords and describe."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest

from captioning.confidence import FEATURES, WITHOUT_LIKELIHOOD, Logistic, save_confidence
from conftest import TinyCaptioner, make_image
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.storage.schema import SCHEMA_VERSION
from indexer.storage.store import Store
from retrieval.query import FusionWeights
from tag_fakes import COLOURS, ColourTagger, TinyGridEncoder


def confidence_file(tmp_path, threshold: float = 0.5):
    """A confidence model that trusts a caption exactly when it names the colour the tagger sees:
    p = sigmoid(20 * (tag_agreement - 0.5))."""
    def logistic(features):
        n = len(features)
        coef = np.zeros(n)
        coef[features.index("tag_agreement")] = 20.0
        return Logistic(features, np.zeros(n), np.ones(n), coef, -10.0)

    path = tmp_path / "confidence.pt"
    save_confidence(path, logistic(FEATURES), logistic(WITHOUT_LIKELIHOOD), threshold, {"note": "test"})
    return path


def engine(tmp_path, name="idx", tagger=True, captioner=None, confidence=True, db=None):
    cfg = EngineConfig(index_dir=tmp_path / name, cache_dir=tmp_path / "cache", progress=False, captioner=None,
                       scorer=None, matcher=None, confidence=str(confidence_file(tmp_path)) if confidence else None,
                       db_url=db.url(name) if db is not None else None)
    return Engine(cfg, encoder=TinyGridEncoder(), captioner=captioner,
                  tagger=ColourTagger() if tagger else None)


def stored(eng):
    store = eng.open().store
    rows = {r.id: r for r in store.all_images()}
    classes = store.classes_by_ids(rows)
    return {r.path.rsplit("/", 1)[-1]: (r.tagger, classes.get(i, []), r.caption_confidence) for i, r in rows.items()}


def test_index_stores_classes_and_tags_with_provenance(tmp_path, photo_dir, db):
    eng = engine(tmp_path, db=db)
    summary = eng.index(photo_dir)
    state = stored(eng)
    assert all(t == "test:colour-tagger|" + ColourTagger().info.weights_sha256[:16] for t, _, _ in state.values())
    tagger, classes, _ = state["red.png"]
    assert classes[0][0] == COLOURS.index("red") and classes[0][1] > 0.5  # most likely first
    assert [c for c, _ in classes] == [c for c, _ in sorted(classes, key=lambda cp: -cp[1])]
    hits = {h.path.rsplit("/", 1)[-1]: h for h in eng.search("red", k=16)}
    assert len(hits) == 16
    assert [t.name for t in hits["red.png"].tags] == ["warm", "red"]  # the group holds at least its class's probability
    assert [t.name for t in hits["green.png"].tags] == ["green"]
    assert summary.tagged == sum(bool(h.tags) for h in hits.values())
    assert eng.tags([hits["green.png"].id]) == {hits["green.png"].id: list(hits["green.png"].tags)}
    meta = json.loads(eng.open().store.get_meta("tagger"))
    assert meta["name"] == "test:colour-tagger"


def test_image_without_a_confident_class_gets_no_tags(tmp_path):
    folder = tmp_path / "photos"
    make_image(folder / "grey.png", (128, 128, 128))  # equally far from every colour's class
    make_image(folder / "red.png", "red")
    eng = engine(tmp_path)
    eng.index(folder)
    hits = {h.path.rsplit("/", 1)[-1]: h for h in eng.search("red", k=2, mode="image")}
    assert hits["grey.png"].tags == () and hits["red.png"].tags
    assert stored(eng)["grey.png"][0] is not None  # tagged, with no confident class


def test_copies_carry_tags_changes_replace_them_deletions_remove_them(tmp_path, photo_dir):
    eng = engine(tmp_path)
    eng.index(photo_dir)
    shutil.copy(photo_dir / "a" / "red.png", photo_dir / "a" / "red-copy.png")
    make_image(photo_dir / "a" / "blue.png", "green")  # changed content, same path
    (photo_dir / "a" / "white.png").unlink()
    s = eng.index(photo_dir)
    assert s.copied == 1 and s.changed == 1 and s.deleted == 1
    state = stored(eng)
    assert state["red-copy.png"][:2] == state["red.png"][:2]
    assert state["blue.png"][1][0][0] == COLOURS.index("green")
    store = eng.open().store
    con = sqlite3.connect(tmp_path / "idx" / "pixquery.sqlite")
    orphans = con.execute("SELECT COUNT(*) FROM image_classes WHERE image_id NOT IN (SELECT id FROM images)").fetchone()
    assert orphans == (0,) and store.count_images() == 16


def test_tags_join_keywords_and_the_zero_shot_signal(tmp_path, photo_dir, db):
    eng = engine(tmp_path, db=db)  # no captioner: every keyword match comes from tags
    eng.index(photo_dir)
    names = [h.path.rsplit("/", 1)[-1] for h in eng.search("warm", k=16, mode="keyword")]
    assert names and {n.split("-")[0].split(".")[0] for n in names} <= set(("red", "orange", "yellow"))
    tags_mode = [h.path.rsplit("/", 1)[-1] for h in eng.search("green", k=2, mode="tags")]
    assert {n.split("-")[0].split(".")[0] for n in tags_mode} == {"green"}
    # fused with only the tags weight ranks exactly as the zero-shot scores do
    only = FusionWeights(image=0, caption=0, keyword=0, likelihood=0, match=0, tags=1)
    fused = eng.search("purple", k=16, weights=only)
    scores = [h.scores["tags"] for h in fused]
    assert scores == sorted(scores, reverse=True) and fused[0].path.rsplit("/", 1)[-1].startswith("purple")


def test_exclusions_see_tags(tmp_path, photo_dir):
    eng = engine(tmp_path)
    eng.index(photo_dir)
    hits = eng.search("picture -red", k=16, mode="fused")
    assert all("red" not in {t.name for t in h.tags} for h in hits)


class Liar(TinyCaptioner):
    """Names the nearest colour, except that it calls every blue picture "a yellow picture"."""

    def caption_pixels(self, pixels, options=None):  # noqa: ANN001, ANN201
        return [c.replace("blue", "yellow") for c in super().caption_pixels(pixels)]


def test_caption_confidence_is_stored_and_marks_captions(tmp_path, photo_dir, db):
    eng = engine(tmp_path, captioner=Liar(), db=db)
    eng.index(photo_dir)
    hits = {h.path.rsplit("/", 1)[-1]: h for h in eng.search("picture", k=16, mode="image")}
    assert hits["red.png"].caption == "a red picture" and hits["red.png"].caption_is_confident is True
    assert hits["blue.png"].caption == "a yellow picture" and hits["blue.png"].caption_is_confident is False
    assert hits["blue.png"].caption_confidence < 0.5 < hits["red.png"].caption_confidence
    d = hits["blue.png"].to_dict()
    assert d["caption"] == "a yellow picture" and d["caption_is_confident"] is False and d["tags"][0]["name"] == "blue"
    described = {x.path.rsplit("/", 1)[-1]: x for x in eng.describe()}
    assert described["red.png"].alt_text() == "a red picture"
    assert described["blue.png"].alt_text() == "blue"  # never the uncertain caption
    counts = eng.stats()["caption_confidence"]
    assert counts["rated"] == 16 and counts["confident"] < 16 and counts["model"]["threshold"] == 0.5


def test_older_index_keeps_working_and_retag_adds_tags(tmp_path, photo_dir):
    old = engine(tmp_path, tagger=False, captioner=TinyCaptioner(), confidence=False)
    old.index(photo_dir)
    old.close()
    # make it an index of schema 5 (catalogue tables, from before tags): no tag columns, no classes table
    con = sqlite3.connect(tmp_path / "idx" / "pixquery.sqlite")
    con.executescript("DROP TABLE image_classes; ALTER TABLE images DROP COLUMN caption_confidence; "
                      "ALTER TABLE images DROP COLUMN tagger; UPDATE meta SET value = '5' WHERE key = 'schema_version';")
    con.commit()
    con.close()
    eng = engine(tmp_path)
    hits = eng.search("red", k=3)  # migrated on open; no tags yet, ranking still works
    assert hits and all(h.tags == () and h.caption_confidence is None for h in hits)
    assert Store(eng.config.url).get_meta("schema_version") == str(SCHEMA_VERSION)
    assert eng.untagged() == 16 and eng.stats()["tags"]["untagged"] == 16
    counts = eng.retag()
    assert counts == {"images": 16, "tagged": counts["tagged"], "rated": 16, "failed": 0, "interrupted": False}
    assert counts["tagged"] >= 12
    assert eng.untagged() == 0
    again = eng.retag()
    assert again["images"] == 0  # nothing left to do
    hit = eng.search("red", k=1)[0]
    assert "red" in {t.name for t in hit.tags} and hit.caption_is_confident is True


def test_retag_refuses_without_a_tagger(tmp_path, photo_dir):
    from indexer.errors import InputError

    eng = engine(tmp_path, tagger=False, confidence=False)
    eng.config.tagger = None
    eng.index(photo_dir)
    with pytest.raises(InputError, match="tagger"):
        eng.retag()


def test_export_and_alt_text_never_give_an_uncertain_caption_as_sure(tmp_path, photo_dir):
    from indexer.catalogue import alt_text, export

    eng = engine(tmp_path, captioner=Liar())
    eng.index(photo_dir)
    rows = eng.rows()
    columns, meta = export.columns_for(None, [])
    assert {"tags", "caption_confidence", "caption_uncertain"} <= set(columns)
    described = {d.id: d for d in eng.describe([r.id for r in rows])}
    recs = {r["path"].rsplit("/", 1)[-1]: r for r in export.records(rows, {}, columns + ["alt_text"], meta, described)}
    assert recs["blue.png"]["caption"] == "a yellow picture" and recs["blue.png"]["caption_uncertain"] is True
    assert recs["blue.png"]["alt_text"] == "blue" and recs["blue.png"]["tags"].startswith("blue")
    assert recs["red.png"]["caption_uncertain"] is False and recs["red.png"]["alt_text"] == "a red picture"
    assert recs["red.png"]["caption_confidence"] > 0.5 > recs["blue.png"]["caption_confidence"]
    # the site's alt text: the uncertain caption is left for review, the confident one is written
    site = tmp_path / "site"
    site.mkdir()
    for r in rows:
        if r.path.rsplit("/", 1)[-1] in ("red.png", "blue.png"):
            shutil.copy(r.path, site / r.path.rsplit("/", 1)[-1])
    (site / "index.html").write_text('<img src="red.png">\n<img src="blue.png">\n')
    by_id = {r.id: r for r in rows}
    lookup = alt_text.Lookup([(r.id, r.path, r.content_hash) for r in rows], by_id.get)
    pages, _ = alt_text.plan(site, lookup, lambda i: {}, threshold=eng.caption_threshold())
    changed = alt_text.diff(pages, site)
    assert 'alt="A red picture"' in changed and "yellow" not in changed
    assert any(src == "blue.png" and why == "its caption is marked for review" for p in pages for src, why in p.skipped)


def test_api_results_and_image_info_carry_tags_and_confidence(tmp_path, photo_dir):
    from fastapi.testclient import TestClient

    from indexer.api.app import create_app
    from indexer.api.settings import ApiSettings

    eng = engine(tmp_path, captioner=Liar())
    eng.index(photo_dir)
    client = TestClient(create_app(eng, ApiSettings(token=None)))
    found = client.post("/api/search", json={"query": "blue", "k": 16, "mode": "image"}).json()["results"]
    blue = next(h for h in found if h["path"].endswith("/blue.png"))
    assert blue["caption_is_confident"] is False and blue["tags"][0]["name"] == "blue"
    info = client.get(f"/api/images/{blue['id']}").json()
    assert info["caption"] == "a yellow picture" and info["caption_is_confident"] is False
    assert info["alt_text"] == "blue" and info["tagged"] is True and info["tags"][0]["name"] == "blue"
    tags_mode = client.post("/api/search", json={"query": "red", "k": 3, "mode": "tags"}).json()["results"]
    assert tags_mode and tags_mode[0]["path"].endswith("red.png")
