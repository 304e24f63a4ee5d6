"""The Streamlit app, page by page and state by state, through ``streamlit.testing.v1.AppTest``.

Every Engine the app builds comes from ``ui.resources.engine_factory``, replaced here by one with
tiny models (TinyEncoder, TinyCaptioner) over an index in ``tmp_path``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import streamlit as st
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import TinyCaptioner, TinyEncoder, make_image
from indexer.config import EngineConfig
from indexer.engine import Engine
from ui import resources

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "ui" / "app.py")


class Env:
    """The app's world in one test: where the index is, and how its Engines are built."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.index_dir, self.cache_dir = tmp_path / "idx", tmp_path / "cache"
        self.encoder_seed = 0
        monkeypatch.setattr(resources, "engine_factory", self.engine)

    def engine(self) -> Engine:
        config = EngineConfig(index_dir=self.index_dir, cache_dir=self.cache_dir, progress=False, batch_size=4,
                              captioner=None)
        return Engine(config, encoder=TinyEncoder(seed=self.encoder_seed), captioner=TinyCaptioner())

    def index(self, folder: Path) -> None:
        with self.engine() as engine:
            engine.index(folder)

    def app(self) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=60)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at


@pytest.fixture
def env(tmp_path, monkeypatch):
    st.cache_resource.clear()
    st.cache_data.clear()
    yield Env(tmp_path, monkeypatch)
    resources.jobs().wait(timeout=60)
    st.cache_resource.clear()
    st.cache_data.clear()


def texts(at: AppTest) -> str:
    """Everything the page says, as one string (markdown, captions, alerts, metrics)."""
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    return "\n".join(parts)


def search(at: AppTest, query: str, upload: tuple[str, bytes, str] | None = None) -> AppTest:
    at.text_input(key="query_input").set_value(query)
    if upload is not None:
        at.file_uploader(key="upload").set_value(upload)
    at.form_submit_button[0].click()  # the form's Search button
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def go(at: AppTest, page: str) -> AppTest:
    at.sidebar.radio(key="page").set_value(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def result_names(at: AppTest) -> list[str]:
    """File names under the result thumbnails, in rank order."""
    return [c.value for c in at.caption if "." in c.value and "/" not in c.value and " " not in c.value]


# --- states ------------------------------------------------------------------------------------------
def test_no_index_yet_tells_what_to_do_on_both_pages(env):
    at = env.app()
    assert "no index" in texts(at).lower() and "pixquery index FOLDER" in texts(at)
    go(at, "Collection")
    assert "pixquery index FOLDER" in texts(at)
    assert at.text_input(key="index_folder") is not None  # indexing is offered right there


def test_search_shows_ranked_thumbnails_with_captions_and_scores(env, photo_dir):
    env.index(photo_dir)
    at = search(env.app(), "red")
    assert "results for" in texts(at)
    names = result_names(at)
    assert len(names) == 16 and names[0] in ("red.png", "red-striped.jpg")
    assert "a red picture" in texts(at)
    assert len(at.get("imgs")) >= 16 or len(at.get("image")) >= 16
    thumbs = list((env.cache_dir / "thumbnails").glob("*-320.jpg"))
    assert len(thumbs) == 16  # one per distinct content, made once
    before = {p: p.stat().st_mtime_ns for p in thumbs}
    search(at, "blue")
    assert {p: p.stat().st_mtime_ns for p in thumbs} == before  # cached on disk, not made again
    assert result_names(at)[0] in ("blue.png", "blue-striped.jpg")


def test_example_query_more_like_this_and_details(env, photo_dir):
    env.index(photo_dir)
    at = env.app()
    at.button(key="example-a dog on the grass").click().run()
    assert at.text_input(key="query_input").value == "a dog on the grass" and "results for" in texts(at)
    with env.engine() as engine:
        green = next(i for i, p in engine.paths().items() if p.endswith("a/green.png"))
    at.button(key=f"mlt-{green}").click().run()
    assert "photos like **green.png**" in texts(at)
    assert len(result_names(at)) == 15 and "green.png" not in result_names(at)  # itself left out
    search(at, "green")
    at.button(key=f"details-{green}").click().run()
    page = texts(at)
    assert str(photo_dir / "a" / "green.png") in page and "64 x 48 px" in page and "a green picture" in page
    assert at.table, "per-signal scores are shown"
    at.button(key="close-details").click().run()
    assert str(photo_dir / "a" / "green.png") not in texts(at)


def test_state_survives_reruns_and_widgets_change_the_search(env, photo_dir):
    env.index(photo_dir)
    at = search(env.app(), "yellow")
    first = result_names(at)
    at.run()  # a rerun with nothing changed keeps the results
    assert result_names(at) == first
    at.sidebar.select_slider(key="k").set_value(12).run()
    assert len(result_names(at)) == 12
    at.sidebar.selectbox(key="f_folder").set_value(str(photo_dir / "a")).run()
    assert result_names(at) and all("striped" not in n for n in result_names(at))
    at.sidebar.multiselect(key="f_types").set_value(["jpg"]).run()
    assert "No photos match" in texts(at)  # folder a holds only png files
    at.sidebar.multiselect(key="f_types").set_value([]).run()
    at.sidebar.selectbox(key="f_folder").set_value("All folders").run()
    at.sidebar.radio(key="preset").set_value("Custom").run()
    for name in ("caption", "keyword", "likelihood", "match", "tags"):
        at.sidebar.slider(key=f"w_{name}").set_value(0.0).run()
    assert result_names(at)[0] in ("yellow.png", "yellow-striped.jpg")
    at.sidebar.slider(key="w_image").set_value(0.0).run()  # every weight zero: a warning, default weights
    assert "using the default weights" in texts(at) and result_names(at)
    at.sidebar.number_input(key="f_min_w").set_value(1000).run()
    assert "No photos match" in texts(at) and "Loosen them" in texts(at)


def test_empty_results_and_bad_input_are_messages(env, photo_dir):
    env.index(photo_dir)
    at = env.app()
    at.sidebar.checkbox(key="use_threshold").check().run()
    at.sidebar.number_input(key="threshold").set_value(50.0).run()
    search(at, "red blue")  # nothing scores 50
    assert "No photos match" in texts(at)
    search(at, "   ")
    assert "Type what you are looking for" in texts(at)


def test_upload_an_example_image(env, photo_dir, tmp_path):
    env.index(photo_dir)
    at = env.app()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), TinyEncoder.COLOURS["purple"]).save(buf, format="PNG")
    at.sidebar.radio(key="preset").set_value("Looks like").run()
    search(at, "", upload=("mine.png", buf.getvalue(), "image/png"))
    assert "your example image" in texts(at)
    assert result_names(at)[0] in ("purple.png", "purple-striped.jpg")
    kept = list((env.cache_dir / "uploads").iterdir())
    assert len(kept) == 1 and kept[0].suffix == ".png" and "mine" not in kept[0].name
    search(at, "", upload=("bad.png", b"not an image at all", "image/png"))
    assert "not a readable image" in texts(at)


def test_encoder_mismatch_is_a_message(env, photo_dir):
    env.index(photo_dir)
    env.encoder_seed = 1  # the app's encoder now differs from the one that built the index
    at = env.app()
    assert "different model" in texts(at) and "--rebuild" in texts(at)
    go(at, "Collection")
    assert "different model" in texts(at)


def test_an_index_whose_model_cannot_be_built_is_a_message(env, photo_dir, monkeypatch):
    env.index(photo_dir)  # built by "test:tiny", which no factory knows: the app's own Engine cannot load it
    monkeypatch.setattr(resources, "engine_factory", lambda: Engine(EngineConfig(
        index_dir=env.index_dir, cache_dir=env.cache_dir, progress=False, captioner=None, offline=True)))
    at = env.app()
    assert "unknown encoder family 'test' in 'test:tiny'" in texts(at)


def test_missing_and_unreadable_files_are_messages(env, photo_dir):
    env.index(photo_dir)
    os.remove(photo_dir / "a" / "red.png")
    (photo_dir / "b" / "red-striped.jpg").write_bytes(b"garbage now")
    at = search(env.app(), "red")
    page = texts(at)
    assert "red.png is missing" in page and "red-striped.jpg changed since it was indexed" in page
    with env.engine() as engine:
        red = next(i for i, p in engine.paths().items() if p.endswith("a/red.png"))
    at.button(key=f"details-{red}").click().run()
    assert not at.exception and "is missing" in texts(at)


def test_unexpected_errors_never_show_a_traceback(env, photo_dir, monkeypatch):
    env.index(photo_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Engine, "search", broken)
    at = search(env.app(), "red")
    assert "Something went wrong (RuntimeError)" in texts(at) and not at.exception


# --- the Collection page ------------------------------------------------------------------------------
def test_collection_stats_skipped_and_provenance(env, photo_dir):
    (photo_dir / "broken.jpg").write_bytes(b"not a jpeg")
    env.index(photo_dir)
    at = go(env.app(), "Collection")
    page = texts(at)
    assert "Images: 16" in page and "Captioned: 16" in page and "Skipped files: 1" in page
    assert "test:tiny" in page and "test:tiny-captioner" in page and str(photo_dir) in page
    assert at.expander and "1 files could not be indexed" in at.expander[0].label
    assert at.dataframe[0].value["file"].str.endswith("broken.jpg").any()


def test_index_a_folder_in_the_background_then_search_sees_it(env, photo_dir, tmp_path):
    env.index(photo_dir)
    at = go(env.app(), "Collection")
    more = tmp_path / "more"
    make_image(more / "orange-new.png", "orange", size=(80, 60), stripe=(1, 2, 3))
    at.text_input(key="index_folder").set_value(str(more))
    at.form_submit_button[0].click().run()
    assert not at.exception
    resources.jobs().wait(timeout=60)
    at.run()  # the progress fragment sees the finished job and reloads the page
    at.run()
    assert "1 new" in texts(at) and "Images: 17" in texts(at)
    go(at, "Search")
    search(at, "orange")
    assert "orange-new.png" in result_names(at)
    # a folder that does not exist: the job reports it, the app goes on
    go(at, "Collection")
    at.text_input(key="index_folder").set_value(str(tmp_path / "nope"))
    at.form_submit_button[0].click().run()
    resources.jobs().wait(timeout=60)
    at.run()
    at.run()
    assert "does not exist" in texts(at)


def test_an_index_built_elsewhere_while_the_app_runs_shows_up(env, photo_dir):
    at = env.app()
    assert "no index" in texts(at).lower()
    env.index(photo_dir)  # e.g. `pixquery index` in a terminal
    at.run()
    search(at, "purple")
    assert result_names(at)[0] in ("purple.png", "purple-striped.jpg")
    make_image(photo_dir / "c" / "purple-new.png", "purple", stripe=(9, 9, 9))
    env.index(photo_dir)
    at.run()
    search(at, "purple")
    assert "purple-new.png" in result_names(at)


def test_progress_is_reported_while_indexing(env, photo_dir):
    seen = []
    with env.engine() as engine:
        engine.index(photo_dir, on_progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 16) and seen[-1] == (16, 16)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_read_only_app_offers_no_indexing(env, photo_dir, monkeypatch):
    monkeypatch.setenv(resources.ENV_READ_ONLY, "1")
    env.index(photo_dir)
    at = go(env.app(), "Collection")
    assert "--read-only" in texts(at) and not at.form_submit_button


def test_duplicates_view(env, photo_dir):
    import shutil

    shutil.copy(photo_dir / "a" / "red.png", photo_dir / "red-copy.png")
    env.index(photo_dir)
    at = go(env.app(), "Collection")
    at.button(key="find_dups").click().run()
    assert not at.exception
    page = texts(at)
    assert "2 files, exact copies" in page and "red-copy.png" in page and "red.png" in page



def test_warm_up_reads_the_keyword_statistics(tmp_path, photo_dir):
    """The app's warm-up leaves nothing for the first search to read: vectors, encoder, keyword statistics."""
    from indexer.storage.keywords import DF_WHOLE
    from ui.resources import warm_up

    config = EngineConfig(index_dir=tmp_path / "idx", progress=False, captioner="test")
    with Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner()) as engine:
        assert warm_up(engine) is None  # no index yet: nothing to warm, no error
        engine.index(photo_dir)
    with Engine(config, encoder=TinyEncoder(), captioner=TinyCaptioner()) as engine:
        assert warm_up(engine) is None
        keywords = engine.store().keywords
        assert keywords._df_state == DF_WHOLE and keywords.doc_freq(["red"])["red"] >= 1
