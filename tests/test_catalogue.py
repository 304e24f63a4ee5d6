"""Catalogue metadata: ``meta import`` of a CSV, filters on its fields, and the ``meta`` keyword signal."""

from __future__ import annotations

import sqlite3
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from conftest import TinyCaptioner, TinyEncoder
from indexer.config import EngineConfig
from indexer.engine import Engine
from indexer.errors import InputError
from indexer.storage.catalogue import parse_condition
from indexer.storage.filters import Filters
from retrieval.query import FusionWeights


@pytest.fixture
def engine(tmp_path, photo_dir):
    config = EngineConfig(index_dir=tmp_path / "idx", cache_dir=tmp_path / "cache", progress=False, batch_size=4)
    with Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner()) as e:
        e.index(photo_dir)
        yield e


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def by_name(engine: Engine) -> dict[str, int]:
    return {Path(p).name: i for i, p in engine.paths().items()}


CATALOGUE = """file,SKU,Title,price,category,released,In Stock
red.png,AB-100,Linen shirt red,19.5,shirts,2024-03-01,yes
blue.png,AB-200,Denim jacket,89,jackets,2023-11-15,no
green.png,CD-300,Garden boots,45,shoes,2024-01-20,yes
yellow.png,CD-400,Sun hat,12,hats,2022-06-30,
nowhere.png,ZZ-999,Missing product,5,hats,2020-01-01,yes
"""


def test_import_types_values_and_reports_unmatched_keys(engine, tmp_path):
    report = engine.catalogue.import_csv(write_csv(tmp_path / "cat.csv", CATALOGUE), key="file")
    assert report["fields"] == {"sku": "text", "title": "text", "price": "number", "category": "text",
                                "released": "date", "in_stock": "text"}
    assert report["rows"] == 5 and report["matched_rows"] == 4 and report["images"] == 4
    assert report["unmatched"] == ["nowhere.png"]
    assert report["values"] == 4 * 6 - 1  # yellow's empty in-stock cell is no value
    ids = by_name(engine)
    meta = engine.catalogue.values([ids["red.png"], ids["yellow.png"], ids["white.png"]])
    assert meta[ids["red.png"]] == {"sku": "AB-100", "title": "Linen shirt red", "price": 19.5,
                                    "category": "shirts", "released": date(2024, 3, 1), "in_stock": "yes"}
    assert "in_stock" not in meta[ids["yellow.png"]] and ids["white.png"] not in meta
    fields = {f["name"]: f for f in engine.catalogue.fields()}
    assert fields["price"]["kind"] == "number" and fields["price"]["values"] == 4 and fields["sku"]["keyword"]


def test_filters_on_catalogue_fields_inside_the_search(engine, tmp_path):
    engine.catalogue.import_csv(write_csv(tmp_path / "cat.csv", CATALOGUE), key="file")
    ids = by_name(engine)

    def found(*where: str, k: int = 16) -> set[str]:
        hits = engine.search("red", k=k, mode="image", filters=Filters(where=where))
        return {Path(h.path).name for h in hits}

    assert found("category=shoes") == {"green.png"}
    assert found("category=SHOES|hats") == {"green.png", "yellow.png"}  # text compares ignore case
    assert found("price<50") == {"red.png", "green.png", "yellow.png"}
    assert found("price<50", "price>=19.5") == {"red.png", "green.png"}
    assert found("released>=2024-01-01") == {"red.png", "green.png"}
    assert found("title~SHIRT") == {"red.png"}
    assert found("title~%") == set()  # LIKE wildcards mean themselves
    assert len(found("category!=shoes")) == 15  # images without the field pass too
    # k results whenever k images match, however low they rank: "red" ranks blue low
    assert found("category=jackets", k=1) == {"blue.png"}
    # the same filter through the id list the vector search gets
    assert engine.open().store.filter_ids(Filters(where=("price>80",))).tolist() == [ids["blue.png"]]


@pytest.mark.parametrize("where, message", [
    ("colour=red", "no catalogue field 'colour'"),
    ("price<cheap", "price is a number field and 'cheap' is not a number"),
    ("released>last week", "write the date as YYYY-MM-DD"),
    ("category<shoes", "compare it with =, != or ~"),
    ("price~5", "'~' (contains) is for text fields"),
    ("just words", "is not a catalogue filter"),
    ("price<", "the value after < is empty"),
    ("x'; DROP TABLE images;--=1", "is not a usable field name"),
])
def test_bad_filters_are_clear_errors(engine, tmp_path, where, message):
    engine.catalogue.import_csv(write_csv(tmp_path / "cat.csv", CATALOGUE), key="file")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("~", r"\~")):
        engine.search("red", k=3, filters=Filters(where=(where,)))
    assert engine.stats()["images"] == 16


def test_hostile_values_are_bound_parameters(engine, tmp_path):
    engine.catalogue.import_csv(write_csv(tmp_path / "cat.csv", CATALOGUE), key="file")
    for value in ("shoes' OR '1'='1", "shoes\" OR 1=1 --", "%", "_", "); DELETE FROM images; --"):
        hits = engine.search("red", k=16, mode="image", filters=Filters(where=(f"category={value}",)))
        assert hits == []
    assert engine.stats()["images"] == 16 and len(engine.catalogue.values(list(engine.paths()))) == 4


def test_reimport_updates_and_empty_cells_clear(engine, tmp_path):
    engine.catalogue.import_csv(write_csv(tmp_path / "cat.csv", CATALOGUE), key="file")
    again = engine.catalogue.import_csv(tmp_path / "cat.csv", key="file")
    assert again["values"] == again["removed"] == again["changed_images"] == 0  # nothing differs: nothing written
    ids = by_name(engine)
    engine.catalogue.import_csv(write_csv(tmp_path / "new.csv", "file,price,category\nred.png,25,\nwhite.png,7,socks\n"),
                           key="file")
    meta = engine.catalogue.values([ids["red.png"], ids["white.png"], ids["blue.png"]])
    db = sqlite3.connect(engine.config.db_file)
    assert db.execute("SELECT count(*) FROM catalogue_fts WHERE catalogue_fts MATCH 'socks'").fetchone()[0] == 1
    assert meta[ids["red.png"]]["price"] == 25 and "category" not in meta[ids["red.png"]]
    assert meta[ids["red.png"]]["sku"] == "AB-100"  # columns not in the new file are untouched
    assert meta[ids["white.png"]] == {"price": 7, "category": "socks"}
    assert meta[ids["blue.png"]]["price"] == 89  # rows not in the new file are untouched
    engine.catalogue.import_csv(write_csv(tmp_path / "only.csv", "file,brand\nred.png,Acme\n"), key="file", replace=True)
    assert engine.catalogue.values([ids["red.png"], ids["blue.png"]]) == {ids["red.png"]: {"brand": "Acme"}}
    assert [f["name"] for f in engine.catalogue.fields()] == ["brand"]


def test_keys_by_path_relative_path_and_content_hash(engine, tmp_path, photo_dir):
    ids = by_name(engine)
    csv = write_csv(photo_dir / "cat.csv", f"path,colour\na/red.png,red\n{photo_dir / 'b' / 'blue-striped.jpg'},blue\n")
    report = engine.catalogue.import_csv(csv, key="path")
    assert report["images"] == 2 and not report["unmatched"]
    assert engine.catalogue.values([ids["red.png"]])[ids["red.png"]] == {"colour": "red"}
    import hashlib

    digest = hashlib.sha256((photo_dir / "a" / "green.png").read_bytes()).hexdigest()
    report = engine.catalogue.import_csv(write_csv(tmp_path / "sha.csv", f"sha256,colour\n{digest.upper()},green\n"),
                                    key="sha256")
    assert report["images"] == 1 and engine.catalogue.values([ids["green.png"]])[ids["green.png"]] == {"colour": "green"}


@pytest.mark.parametrize("text, options, message", [
    ("file,price\nred.png,1\n,2\n", {}, r"1 rows have no 'file' \(lines 3\)"),
    ("file,price\nred.png,1\nblue.png,2\nred.png,3\n", {}, "'red.png' on lines 2 and 4"),
    ("file,price\nred.png,1\nblue.png,2\ngreen.png,two\n", {}, "line 4: 'two'.*--type price=text"),
    ("file,released\nred.png,2024-01-01\nblue.png,2024-13-45\ngreen.png,2024-02-02\n", {}, "line 3: '2024-13-45'"),
    ("file,price\nred.png,cheap\n", {"types": {"price": "number"}}, "line 2: 'cheap'"),
    ("file;price\nred.png;1\n", {}, "seems to be separated by ';': pass --delimiter ';'"),
    ("file\tprice\nred.png\t1\n", {}, "pass --delimiter tab"),
    ("file,price\nred.png,1,2\n", {}, "line 2: 3 cells where the header has 2"),
    ("name,price\nred.png,1\n", {}, "has no 'file' column"),
    ("file,Price,price\nred.png,1,2\n", {}, "two columns are both called 'price'"),
    ("", {}, "is empty"),
    ("file,price\n", {}, "a header but no rows"),
    ("file\nred.png\n", {}, "only the key column"),
    ("file,price\nred.png,1\n", {"strict": False, "types": {"cost": "number"}}, "no column for"),
    ("file,colour\nnowhere.png,red\n", {"strict": True}, "match no indexed image"),
])
def test_bad_csvs_are_clear_errors_and_write_nothing(engine, tmp_path, text, options, message):
    engine.catalogue.import_csv(write_csv(tmp_path / "ok.csv", "file,price\nred.png,10\n"), key="file")
    before = engine.catalogue.values(list(engine.paths()))
    with pytest.raises(InputError, match=message):
        engine.catalogue.import_csv(write_csv(tmp_path / "bad.csv", text), key="file", **options)
    assert engine.catalogue.values(list(engine.paths())) == before
    assert [f["name"] for f in engine.catalogue.fields()] == ["price"]


def test_wrong_encoding_is_a_clear_error_and_can_be_named(engine, tmp_path):
    text = "file,title\nred.png,Chemise rouge à manches\n"
    bad = write_csv(tmp_path / "latin.csv", text, encoding="latin-1")
    with pytest.raises(InputError, match=r"not utf-8-sig text .*line 2.*--encoding"):
        engine.catalogue.import_csv(bad, key="file")
    engine.catalogue.import_csv(bad, key="file", encoding="latin-1")
    ids = by_name(engine)
    assert engine.catalogue.values([ids["red.png"]])[ids["red.png"]]["title"] == "Chemise rouge à manches"
    with pytest.raises(InputError, match="NUL bytes"):
        engine.catalogue.import_csv(write_csv(tmp_path / "u16.csv", text, encoding="utf-16"), key="file")


def test_a_type_change_needs_the_field_dropped_first(engine, tmp_path):
    engine.catalogue.import_csv(write_csv(tmp_path / "a.csv", "file,size\nred.png,42\n"), key="file")
    with pytest.raises(InputError, match="size is a number field already; drop it first"):
        engine.catalogue.import_csv(write_csv(tmp_path / "b.csv", "file,size\nblue.png,XL\n"), key="file",
                               types={"size": "text"})
    with pytest.raises(InputError, match="line 2: 'XL'"):  # the registered kind types the new file
        engine.catalogue.import_csv(write_csv(tmp_path / "b.csv", "file,size\nblue.png,XL\n"), key="file")
    assert engine.catalogue.drop("size") == 1
    engine.catalogue.import_csv(write_csv(tmp_path / "b.csv", "file,size\nblue.png,XL\n"), key="file")
    assert engine.catalogue.fields()[0]["kind"] == "text"


def test_deleted_images_take_their_metadata_along(engine, tmp_path, photo_dir):
    engine.catalogue.import_csv(write_csv(tmp_path / "cat.csv", CATALOGUE), key="file")
    (photo_dir / "a" / "red.png").unlink()
    engine.index(photo_dir)
    db = sqlite3.connect(engine.config.db_file)
    assert db.execute("SELECT count(*) FROM catalogue_values").fetchone()[0] == 4 * 6 - 1 - 6
    assert db.execute("SELECT count(*) FROM catalogue_fts").fetchone()[0] == 3
    assert engine.search("red", k=5, filters=Filters(where=("sku=AB-100",))) == []


def test_meta_weight_finds_a_product_by_its_sku_or_brand(engine, tmp_path):
    engine.catalogue.import_csv(write_csv(tmp_path / "cat.csv", CATALOGUE), key="file")
    ids = by_name(engine)
    # the tiny encoder sees "white" in every text without a colour word: AB-200 alone finds nothing in particular
    off = engine.search("AB-200", k=1, mode="fused")
    assert off[0].id != ids["blue.png"]
    on = engine.search("AB-200", k=1, mode="fused", weights=FusionWeights(meta=1.0))
    assert on[0].id == ids["blue.png"] and on[0].scores["meta"] > 0
    assert "meta" in on[0].contributions
    boots = engine.search("garden boots", k=3, mode="fused", weights=FusionWeights(meta=2.0))
    assert boots[0].id == ids["green.png"]
    # the SKU is one phrase: "AB 100" does not match "AB-200"'s "ab" alone
    hits = engine.search("AB-100", k=16, mode="fused", weights=FusionWeights(meta=1.0))
    meta = {h.id: h.scores.get("meta", 0.0) for h in hits}
    assert meta[ids["red.png"]] > 0 and meta.get(ids["blue.png"], 0.0) == 0.0
    # text fields left out of the keyword signal do not match
    engine.catalogue.import_csv(write_csv(tmp_path / "cat.csv", CATALOGUE), key="file", keyword_fields=["title"])
    on = engine.search("AB-200", k=16, mode="fused", weights=FusionWeights(meta=1.0))
    assert all(h.scores.get("meta", 0.0) == 0.0 for h in on)


def test_condition_parsing():
    assert str(parse_condition(" In Stock = yes ")) == "in_stock=yes"
    assert parse_condition('title="a, b"').value == "a, b"
    assert parse_condition("price==5").op == "="
    assert parse_condition("a<=1").op == "<=" and parse_condition("a>=1").op == ">="
    assert np.all([parse_condition(s).op == op for s, op in (("a!=b", "!="), ("a~b", "~"), ("a>b", ">"))])
