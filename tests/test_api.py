"""The HTTP API: a real uvicorn server on a free local port, called over HTTP with httpx.

Every Engine it serves has tiny models (TinyEncoder, TinyCaptioner) over an index in ``tmp_path``.
"""

from __future__ import annotations

import http.client
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the api extra (fastapi, uvicorn, httpx) is not installed")
httpx = pytest.importorskip("httpx")

from conftest import TinyCaptioner, TinyEncoder, make_image  # noqa: E402
from indexer.api.app import create_app  # noqa: E402
from indexer.api.server import BackgroundServer  # noqa: E402
from indexer.api.settings import ApiSettings, check_bind  # noqa: E402
from indexer.config import EngineConfig  # noqa: E402
from indexer.engine import Engine  # noqa: E402
from indexer.errors import InputError  # noqa: E402

TOKEN = "s3cret-token-for-tests-only"


def make_engine(tmp_path: Path) -> Engine:
    config = EngineConfig(index_dir=tmp_path / "idx", cache_dir=tmp_path / "cache", progress=False, batch_size=4)
    return Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner())


@pytest.fixture
def indexed(tmp_path, photo_dir):
    engine = make_engine(tmp_path)
    engine.index(photo_dir)
    (tmp_path / "cat.csv").write_text("file,sku,price,category\nred.png,AB-100,19.5,shirts\n"
                                      "green.png,CD-300,45,shoes\nblue.png,AB-200,89,jackets\n")
    engine.catalogue.import_csv(tmp_path / "cat.csv", key="file")
    yield engine
    engine.close()


@pytest.fixture
def server(indexed, photo_dir):
    app = create_app(indexed, ApiSettings(token=None, index_folders=(photo_dir,)))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client
    app.state.pixquery.jobs.wait(60)


def ids_by_name(engine: Engine) -> dict[str, int]:
    return {Path(p).name: i for i, p in engine.paths().items()}


def png(colour: str = "purple", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, TinyEncoder.COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def test_text_search_with_filters_weights_threshold_and_explanations(server, indexed):
    r = server.post("/api/search", json={"query": "red", "k": 3, "mode": "image"})
    assert r.status_code == 200 and r.headers["server-timing"].startswith("app;dur=")
    body = r.json()
    assert [Path(h["path"]).name for h in body["results"]][:1] in (["red.png"], ["red-striped.jpg"])
    assert len(body["results"]) == 3 and body["results"][0]["scores"]["image"] > 0.9
    # the same ranking as the Python API
    assert [h["id"] for h in body["results"]] == [h.id for h in indexed.search("red", k=3, mode="image")]
    r = server.post("/api/search", json={"query": "red", "k": 5, "filters": {"where": ["price<50"]},
                                         "explain": True})
    names = {Path(h["path"]).name for h in r.json()["results"]}
    assert names == {"red.png", "green.png"} and r.json()["filters"] == ["price<50"]
    top = r.json()["results"][0]
    assert top["metadata"]["sku"] == "AB-100" and top["metadata"]["price"] == 19.5
    assert 'caption has "red"' in top["explanation"] and "filters: price<50" in top["explanation"]
    assert set(top["contributions"]) >= {"image", "keyword"}
    r = server.post("/api/search", json={"query": "AB-200", "k": 1, "weights": {"meta": 1}})
    assert Path(r.json()["results"][0]["path"]).name == "blue.png"
    r = server.post("/api/search", json={"query": "red", "k": 16, "mode": "image", "threshold": 0.9})
    assert 1 <= len(r.json()["results"]) < 16
    r = server.post("/api/search", json={"query": "red", "filters": {"folder": "/nowhere", "min_width": 10}})
    assert r.status_code == 200 and r.json()["results"] == []


def test_relevance_feedback_through_the_api(server, indexed):
    ids = ids_by_name(indexed)
    plain = server.post("/api/search", json={"query": "red", "k": 16, "mode": "image"}).json()["results"]
    assert Path(plain[1]["path"]).name in ("red.png", "red-striped.jpg")
    r = server.post("/api/search", json={"query": "red", "k": 16, "mode": "image",
                                         "positive_ids": [ids["orange.png"]], "negative_ids": [ids["red.png"]]})
    after = [Path(h["path"]).name for h in r.json()["results"]]
    assert "red.png" not in after  # a bad image is left out
    assert after.index("orange.png") < [Path(h["path"]).name for h in plain].index("orange.png")
    only_good = server.post("/api/search", json={"positive_ids": [ids["blue.png"]], "k": 2, "mode": "image"})
    assert Path(only_good.json()["results"][0]["path"]).name == "blue.png"
    for body, message in (({"query": "red", "positive_ids": [999999]}, "no image with id 999999"),
                          ({"query": "red", "positive_ids": [ids["red.png"]], "negative_ids": [ids["red.png"]]},
                           "both good and bad"),
                          ({"negative_ids": [ids["red.png"]]}, "at least one image marked good")):
        r = server.post("/api/search", json=body)
        assert r.status_code == 400 and message in r.json()["detail"], r.json()


def test_search_by_uploaded_image_and_caption_an_upload(server, indexed):
    r = server.post("/api/search/image", files={"file": ("../../etc/passwd", png("purple"), "image/png")},
                    data={"k": "2", "mode": "image"})
    assert r.status_code == 200, r.json()
    assert Path(r.json()["results"][0]["path"]).name in ("purple.png", "purple-striped.jpg")
    kept = list((indexed.config.cache_dir / "uploads").iterdir())
    assert len(kept) == 1 and "passwd" not in kept[0].name  # the client's file name is never a path
    r = server.post("/api/search/image", files={"file": ("x.png", png("green"), "image/png")},
                    data={"k": "16", "mode": "image", "where": ["category=shoes"]})
    assert [Path(h["path"]).name for h in r.json()["results"]] == ["green.png"]
    r = server.post("/api/caption", files={"file": ("x.png", png("yellow"), "image/png")})
    assert r.json() == {"caption": "a yellow picture", "captioner": "test:tiny-captioner"}
    assert indexed.stats()["images"] == 16  # captioning indexes nothing


def test_uploads_are_bounded(server, indexed):
    r = server.post("/api/caption", files={"file": ("x.png", b"not an image at all", "image/png")})
    assert r.status_code == 415 and "not a readable image" in r.json()["detail"]
    bomb = io.BytesIO()
    Image.new("1", (10_000, 6_000)).save(bomb, format="PNG")  # 60 megapixels in a few KB
    r = server.post("/api/search/image", files={"file": ("b.png", bomb.getvalue(), "image/png")})
    assert r.status_code == 413 and "megapixels" in r.json()["detail"]
    big = b"\xff" * 21_000_000
    r = server.post("/api/caption", files={"file": ("x.png", big, "image/png")})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]

    def chunks():  # no Content-Length: cut off while it streams in
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(30):
            yield b"\x00" * 1_000_000

    r = server.post("/api/caption", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_similar_image_info_file_and_thumbnail(server, indexed):
    ids = ids_by_name(indexed)
    red = ids["red.png"]
    r = server.get(f"/api/images/{red}/similar", params={"k": 3})
    assert r.status_code == 200 and red not in [h["id"] for h in r.json()["results"]]
    assert [h["id"] for h in r.json()["results"]] == [h.id for h in indexed.more_like_this(red, k=3)]
    info = server.get(f"/api/images/{red}").json()
    assert info["caption"] == "a red picture" and info["metadata"]["sku"] == "AB-100" and info["width"] == 64
    f = server.get(f"/api/images/{red}/file")
    assert f.status_code == 200 and f.headers["content-type"] == "image/png"
    assert f.content == Path(info["path"]).read_bytes()
    t = server.get(f"/api/images/{red}/thumbnail")
    assert t.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(t.content)).size == (320, 240)
    assert server.get(f"/api/images/{red}/thumbnail", params={"size": 77}).status_code == 400


def raw_get(url: str, path: str) -> int:
    """GET ``path`` exactly as written (httpx would normalise dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_images_are_named_by_id_only_no_traversal(server, indexed):
    url = str(server.base_url)
    for path in ("/api/images/../../etc/passwd", "/api/images/..%2F..%2Fetc%2Fpasswd/file",
                 "/api/images/%2Fetc%2Fpasswd/file", "/api/images//etc/passwd/file", "/api/images/-1/file",
                 "/api/images/1.5/file", "/api/images/999999/file", "/api/images/999999/thumbnail",
                 "/api/images/999999", "/api/images/999999/similar", "/api/images/99999999999999999999999/file"):
        status = raw_get(url, path)
        assert status in (404, 422), (path, status)
    r = server.get("/api/images/999999/file")
    assert r.status_code == 404 and r.json() == {"detail": "no image with id 999999 in the index", "error": "HTTPError"}
    # an indexed file that is gone: 410, never another file
    ids = ids_by_name(indexed)
    os.remove(indexed.image(ids["white.png"]).path)
    assert server.get(f"/api/images/{ids['white.png']}/file").status_code == 410


def test_hostile_ids_reach_no_file_through_any_route(server, indexed, tmp_path):
    """The app's list of hostile ids (tests/test_traversal.py), percent-encoded and raw, through every route
    that takes an id, and as feedback ids: never a 2xx, never a byte of a file that is not an indexed image."""
    from urllib.parse import quote

    from test_traversal import HOSTILE

    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwords.txt").write_text("hunter2")
    url = str(server.base_url)
    values = [str(v) for v in HOSTILE if not isinstance(v, bytes)] + [str(secret / "passwords.txt"), "/etc/passwd"]
    tried = 0
    for value in values:
        for form in {quote(value, safe=""), quote(value, safe="/")}:
            for route in ("/api/images/{}", "/api/images/{}/file", "/api/images/{}/thumbnail",
                          "/api/images/{}/similar"):
                status, body = raw_get_body(url, route.format(form))
                tried += 1
                assert status in (400, 404, 405, 422), (route, value, status)
                assert b"hunter2" not in body and b"root:" not in body, (route, value)
        for key in ("positive_ids", "negative_ids"):
            r = server.post("/api/search", json={"query": "red", key: [value]})
            tried += 1
            assert r.status_code in (400, 422), (key, value, r.status_code)
    assert tried >= 200  # every value went through every route
    # a symbolic link that is indexed and then pointed elsewhere serves nothing
    link = Path(indexed.image(ids_by_name(indexed)["red.png"]).path)
    link.unlink()
    os.symlink(secret / "passwords.txt", link)
    r = server.get(f"/api/images/{ids_by_name(indexed)['red.png']}/file")
    assert r.status_code in (404, 409, 410) and b"hunter2" not in r.content


def raw_get_body(url: str, path: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_malformed_requests_are_json_errors(server):
    r = server.post("/api/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "ValidationError"
    for body, code in (({"query": "red", "k": 0}, 422), ({"query": "red", "mode": "magic"}, 422),
                       ({"query": "red", "surprise": 1}, 422), ({"query": "   "}, 400),
                       ({"query": "red", "weights": {"colour": 1}}, 400),
                       ({"query": "red", "weights": {"image": 0, "keyword": 0}}, 400),
                       ({"query": "red", "filters": {"where": ["colour=red"]}}, 400),
                       ({"query": "red", "filters": {"where": ["x'; DROP TABLE images;--=1"]}}, 400),
                       ({"query": "red", "filters": {"where": ["price<cheap"]}}, 400)):
        r = server.post("/api/search", json=body)
        assert r.status_code == code and "detail" in r.json(), (body, r.status_code, r.text)
    assert server.get("/api/nothing-here").status_code == 404
    assert server.get("/api/stats").json()["images"] == 16  # nothing was harmed


def test_concurrent_requests_agree_with_sequential_ones(server):
    queries = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"] * 3
    expected = {q: server.post("/api/search", json={"query": q, "k": 4}).json()["results"] for q in set(queries)}

    def ask(q: str) -> tuple[str, list]:
        return q, server.post("/api/search", json={"query": q, "k": 4}).json()["results"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, queries))
    assert len(answers) == 24 and all(results == expected[q] for q, results in answers)


def test_status_stats_docs_and_indexing_a_configured_folder(server, indexed, photo_dir, tmp_path):
    status = server.get("/api/status").json()
    assert status["index"] and status["images"] == 16 and status["indexing"] is None
    stats = server.get("/api/stats").json()
    assert stats["captioned"] == 16 and {f["name"] for f in stats["catalogue_fields"]} == {"sku", "price", "category"}
    assert server.get("/docs").status_code == 200 and "/api/search" in server.get("/openapi.json").json()["paths"]
    assert server.get("/api/index/job").status_code == 404
    r = server.post("/api/index", json={"folder": str(tmp_path)})
    assert r.status_code == 403 and str(photo_dir) in r.json()["detail"]
    assert server.post("/api/index", json={"folder": "/etc"}).status_code == 403
    assert server.get("/api/index/folders").json() == [str(photo_dir.resolve())]
    make_image(photo_dir / "c" / "orange-new.png", "orange", stripe=(1, 2, 3))
    r = server.post("/api/index", json={"folder": str(photo_dir)})
    assert r.status_code == 202 and r.json()["running"]
    deadline = time.monotonic() + 60
    while (job := server.get("/api/index/job").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job["error"] is None and job["summary"]["new"] == 1 and job["done"] == job["total"] >= 1
    # the serving engine picks the new generation up
    r = server.post("/api/search", json={"query": "orange", "k": 17, "mode": "image"})
    assert "orange-new.png" in [Path(h["path"]).name for h in r.json()["results"]]
    assert len(r.json()["results"]) == 17 and server.get("/api/status").json()["images"] == 17


def test_a_token_guards_every_api_endpoint(indexed):
    app = create_app(indexed, ApiSettings(token=TOKEN))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for method, path in (("GET", "/api/status"), ("POST", "/api/search"), ("GET", "/api/images/1/file")):
            r = client.request(method, path, json={"query": "red"} if method == "POST" else None)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        bad = client.get("/api/status", headers={"Authorization": "Bearer wrong-token-wrong-token"})
        assert bad.status_code == 401
        good = client.post("/api/search", json={"query": "red", "k": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200 and len(good.json()["results"]) == 1
        assert client.get("/docs").status_code == 200  # the docs say nothing about the photos


def test_no_token_no_serving_beyond_localhost(monkeypatch):
    monkeypatch.delenv("PIXQUERY_API_TOKEN", raising=False)
    check_bind("127.0.0.1", ApiSettings())
    with pytest.raises(InputError, match="refusing to serve on 0.0.0.0 without a token"):
        check_bind("0.0.0.0", ApiSettings())
    with pytest.raises(InputError, match="at least 16"):
        ApiSettings(token="short")
    check_bind("0.0.0.0", ApiSettings(token=TOKEN))
    from indexer.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "8765"]) == 2


def test_no_index_yet_is_a_clear_status(tmp_path):
    app = create_app(make_engine(tmp_path))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/api/status").json() == {"index": False, "images": 0, "generation": None,
                                                    "indexing": None}
        r = client.post("/api/search", json={"query": "red"})
        assert r.status_code == 409 and "pixquery index" in r.json()["detail"]


def test_the_server_reads_the_keyword_statistics_before_the_first_request(server, indexed):
    """A search never waits for the whole vocabulary's document frequencies (0.27 s at a million captions)
    nor counts them one by one: the server read them when it started."""
    from indexer.storage.keywords import DF_WHOLE

    keywords = indexed.store().keywords
    assert keywords._df_state == DF_WHOLE and keywords._df  # read at start-up, before any request
    counted = []
    original = keywords._count_docs
    keywords._count_docs = lambda conn, tokens: counted.append(tokens) or original(conn, tokens)
    try:
        assert server.post("/api/search", json={"query": "a red picture", "k": 3}).status_code == 200
    finally:
        keywords._count_docs = original
    assert counted == []
