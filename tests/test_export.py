"""``pixquery export`` (CSV / JSON lines / JSON, filtered subsets, catalogue columns), alt text written into
a site's HTML as a diff first, and the teams' CLI commands end to end (meta import, search --where --explain)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import TinyCaptioner, TinyEncoder
from indexer import cli
from indexer.catalogue import alt_text, export
from indexer.config import EngineConfig
from indexer.engine import Engine


@pytest.fixture
def engine(tmp_path, photo_dir):
    config = EngineConfig(index_dir=tmp_path / "idx", cache_dir=tmp_path / "cache", progress=False, batch_size=4)
    with Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner()) as e:
        e.index(photo_dir)
        (tmp_path / "cat.csv").write_text("file,title,price,width\nred.png,Red shirt,19.5,40\nblue.png,Blue coat,89,\n")
        e.catalogue.import_csv(tmp_path / "cat.csv", key="file")
        yield e


@pytest.fixture
def tiny_cli(monkeypatch, engine):
    """``pixquery ...`` in-process, every Engine with the tiny models of the indexed ``engine``."""
    real_init = Engine.__init__

    def init(self, config=None, encoder=None, captioner=None, scorer=None):
        real_init(self, config, encoder or TinyEncoder(), captioner or TinyCaptioner(), scorer)

    monkeypatch.setattr(Engine, "__init__", init)

    def run(*argv: str) -> int:
        return cli.main([*argv, "--db", str(engine.config.index_dir)])
    return run


def export_text(engine: Engine, fmt: str, fields: list[str] | None = None, filters=None) -> str:
    rows = engine.rows(filters)
    columns, meta = export.columns_for(fields, [f["name"] for f in engine.catalogue.fields()])
    return export.to_text(export.records(rows, engine.catalogue.values([r.id for r in rows]), columns, meta), columns, fmt)


def test_csv_export_has_every_image_captions_and_catalogue_columns(engine):
    rows = list(csv.DictReader(io.StringIO(export_text(engine, "csv"))))
    assert len(rows) == 16
    assert list(rows[0]) == [*export.DEFAULT_FIELDS, "price", "title", "meta.width"]  # 'width' is taken
    red = next(r for r in rows if r["path"].endswith("a/red.png"))
    assert red["caption"] == "a red picture" and red["captioner"].startswith("test:tiny-captioner|")
    assert red["width"] == "64" and red["meta.width"] == "40.0" and red["title"] == "Red shirt"
    assert red["caption_uncertain"] == "False"
    white = next(r for r in rows if r["path"].endswith("a/white.png"))
    assert white["title"] == "" and white["price"] == ""


def test_jsonl_and_json_exports_of_a_filtered_subset(engine):
    from indexer.storage.filters import Filters

    lines = export_text(engine, "jsonl", ["file_name", "caption", "price", "content_hash"],
                        Filters(where=("price<50",))).splitlines()
    assert [json.loads(line) for line in lines] == [
        {"file_name": "red.png", "caption": "a red picture", "price": 19.5,
         "content_hash": engine.image(json.loads(lines[0]) and engine.rows(Filters(where=("price<50",)))[0].id).content_hash}]
    data = json.loads(export_text(engine, "json", ["id", "file_type"], Filters(file_types=("jpg",))))
    assert len(data) == 8 and {d["file_type"] for d in data} == {"jpg"}
    with pytest.raises(Exception, match="no export field 'colour'"):
        export_text(engine, "csv", ["colour"])


def test_export_command_writes_a_file_whole(tiny_cli, tmp_path, capsys):
    out = tmp_path / "export.csv"
    assert tiny_cli("export", "--fields", "path,caption,title", "--where", "title~shirt", "-o", str(out)) == 0
    assert out.read_text().splitlines()[1].endswith(",a red picture,Red shirt")
    assert not list(tmp_path.glob(".export.csv.*.tmp"))
    assert tiny_cli("export", "--format", "jsonl", "--fields", "file_name") == 0
    assert len(capsys.readouterr().out.splitlines()) == 16
    assert tiny_cli("export", "--list-fields") == 0
    listed = capsys.readouterr().out
    assert "caption_uncertain" in listed and "meta.width" in listed
    assert tiny_cli("export", "--fields", "nope") == 2


def site(tmp_path: Path, photo_dir: Path) -> Path:
    root = photo_dir  # the site shows indexed photos (a/red.png, by path) and a copy of one (by content)
    (root / "img").mkdir(parents=True)
    shutil.copy(photo_dir / "a" / "green.png", root / "img" / "product-7.png")  # a copy: found by content
    (root / "index.html").write_text(
        '<html><body>\n'
        '<p>Our <b>garden</b> range</p>\n'
        '<img src="img/product-7.png" class="hero">\n'
        '<IMG SRC="a/red.png" ALT=\'\' />\n'
        '<img src="img/product-7.png" alt="Already described">\n'
        '<img src="https://example.com/x.png">\n'
        '<img src="../../etc/passwd">\n'
        '</body></html>\n')
    (root / "shop").mkdir()
    (root / "shop" / "p.htm").write_text('<img src="/img/product-7.png?v=2"/><img alt src="../img/product-7.png">\n')
    (root / "latin.html").write_bytes("<p>caf\xe9</p>".encode("latin-1"))
    return root


def test_alt_text_is_a_diff_first_then_written_into_the_tags_only(engine, tmp_path, photo_dir):
    root = site(tmp_path, photo_dir)
    rows = {r.id: r for r in engine.rows()}
    lookup = alt_text.Lookup([(r.id, r.path, r.content_hash) for r in rows.values()], rows.get)
    before = {p: p.read_bytes() for p in root.rglob("*.htm*")}
    pages, unreadable = alt_text.plan(root, lookup, lambda i: engine.catalogue.values([i]).get(i, {}))
    assert [p.name for p, _ in unreadable] == ["latin.html"]
    diff = alt_text.diff(pages, root)
    assert '+<img src="img/product-7.png" class="hero" alt="A green picture">' in diff
    assert '+<img src="/img/product-7.png?v=2" alt="A green picture"/>' in diff
    assert '<img alt src="../img/product-7.png">' in diff  # a bare alt is alt="": decorative, left alone
    assert {p: p.read_bytes() for p in root.rglob("*.htm*")} == before  # a dry run writes nothing
    skipped = {why for page in pages for _, why in page.skipped}
    assert any("decorative" in why for why in skipped) and any("has alt text" in why for why in skipped)
    assert "not an indexed image" in skipped
    assert alt_text.apply(pages) == 2
    html = (root / "index.html").read_text()
    assert html.count("A green picture") == 1 and "Already described" in html and "<b>garden</b>" in html
    assert (root / "index.html").read_text().replace(' alt="A green picture"', "") == before[root / "index.html"].decode()
    # from a catalogue field, filling alt="" too, with quotes escaped
    (tmp_path / "t.csv").write_text('file,title\nred.png,"The ""red"" <shirt>"\n')
    engine.catalogue.import_csv(tmp_path / "t.csv", key="file")
    pages, _ = alt_text.plan(root, lookup, lambda i: engine.catalogue.values([i]).get(i, {}), "title", fill_empty=True)
    filled = alt_text.diff(pages, root)
    assert "<IMG SRC=\"a/red.png\" alt=\"The &quot;red&quot; &lt;shirt&gt;\" />" in filled and '<img alt="A green picture" src=' in filled


def test_uncertain_captions_are_left_for_review(engine, tmp_path, photo_dir, monkeypatch):
    root = site(tmp_path, photo_dir)
    monkeypatch.setattr(alt_text, "caption_uncertain", lambda row: True)
    rows = {r.id: r for r in engine.rows()}
    lookup = alt_text.Lookup([(r.id, r.path, r.content_hash) for r in rows.values()], rows.get)
    pages, _ = alt_text.plan(root, lookup, lambda i: {})
    assert not any(p.changes for p in pages)
    assert any(why == "its caption is marked for review" for p in pages for _, why in p.skipped)


def test_alt_text_command_dry_run_then_apply(tiny_cli, tmp_path, photo_dir, capsys):
    root = site(tmp_path, photo_dir)
    assert tiny_cli("export", "--alt-text-html", str(root)) == 0
    captured = capsys.readouterr()
    assert "+++ b/index.html" in captured.out and "would change (dry run" in captured.err
    assert "A green picture" not in (root / "index.html").read_text()
    assert tiny_cli("export", "--alt-text-html", str(root), "--apply") == 0
    assert "A green picture" in (root / "index.html").read_text()
    assert tiny_cli("export", "--alt-text-html", str(root)) == 0  # nothing left to do
    assert "0 alt attributes" in capsys.readouterr().err


def test_meta_import_and_search_where_explain_commands(tiny_cli, tmp_path, capsys):
    (tmp_path / "more.csv").write_text("file,category\nred.png,shirts\nmissing.png,hats\n")
    assert tiny_cli("meta", "import", str(tmp_path / "more.csv"), "--key", "file") == 0
    out = capsys.readouterr().out
    assert "for 1 images from 1 of 2 rows" in out and "1 keys match no indexed image: missing.png" in out
    assert tiny_cli("meta", "fields", "--json") == 0
    assert {f["name"] for f in json.loads(capsys.readouterr().out)} == {"title", "price", "width", "category"}
    assert tiny_cli("search", "red", "--where", "category=shirts", "--explain") == 0
    out = capsys.readouterr().out
    assert "a/red.png" in out and 'why: caption has "red"' in out and "filters: category=shirts" in out
    assert tiny_cli("search", "red", "--where", "price<50", "--json", "--explain") == 0
    body = json.loads(capsys.readouterr().out)
    assert body["filters"] == ["price<50"] and "explanation" in body["results"][0]
    assert tiny_cli("search", "red", "--where", "colour=red") == 2
    assert "no catalogue field 'colour'" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("file;category\nred.png;x\n")
    assert tiny_cli("meta", "import", str(tmp_path / "bad.csv"), "--key", "file") == 2
    assert "--delimiter ';'" in capsys.readouterr().err
    assert tiny_cli("meta", "import", str(tmp_path / "bad.csv"), "--key", "file", "--delimiter", ";") == 0
    assert tiny_cli("meta", "drop", "category") == 0 and "dropped category (1 values)" in capsys.readouterr().out
