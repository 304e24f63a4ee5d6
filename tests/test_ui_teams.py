"""The app's catalogue filters, relevance feedback, explanations and shareable URLs (AppTest)."""

from __future__ import annotations

import pytest
import streamlit as st

from test_ui_app import Env, result_names, search, texts
from ui import resources


@pytest.fixture
def env(tmp_path, monkeypatch):
    st.cache_resource.clear()
    st.cache_data.clear()
    yield Env(tmp_path, monkeypatch)
    resources.jobs().wait(timeout=60)
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture
def catalogue(env, photo_dir, tmp_path):
    env.index(photo_dir)
    (tmp_path / "cat.csv").write_text("file,category,price\nred.png,shirts,19.5\ngreen.png,shoes,45\n"
                                      "blue.png,jackets,89\nyellow.png,hats,12\n")
    with env.engine() as engine:
        engine.catalogue.import_csv(tmp_path / "cat.csv", key="file")
    return env


def test_catalogue_widgets_filter_the_search(catalogue):
    at = search(catalogue.app(), "red")
    assert at.sidebar.multiselect(key="m_category").options == ["hats", "jackets", "shirts", "shoes"]
    at.sidebar.multiselect(key="m_category").set_value(["shoes", "hats"]).run()
    assert sorted(result_names(at)) == ["green.png", "yellow.png"]
    at.sidebar.multiselect(key="m_category").set_value([]).run()
    at.sidebar.slider(key="m_price").set_value((12.0, 20.0)).run()
    assert sorted(result_names(at)) == ["red.png", "yellow.png"]
    at.sidebar.slider(key="m_price").set_value((12.0, 89.0)).run()
    at.sidebar.text_area(key="f_where").set_value("category~shi").run()
    assert result_names(at) == ["red.png"]
    at.sidebar.text_area(key="f_where").set_value("colour=red").run()
    assert "no catalogue field 'colour'" in texts(at) and not at.exception


def test_marking_results_good_and_bad_reranks(catalogue):
    at = search(catalogue.app(), "red")
    with catalogue.engine() as engine:
        ids = {p.rsplit("/", 1)[1]: i for i, p in engine.paths().items()}
    first = result_names(at)
    assert first[0] in ("red.png", "red-striped.jpg")
    at.button(key=f"bad-{ids['red.png']}").click().run()
    assert "red.png" not in result_names(at) and "1 bad" in texts(at)
    at.button(key=f"good-{ids['purple.png']}").click().run()
    after = result_names(at)
    assert after.index("purple.png") < first.index("purple.png") and "1 good, 1 bad" in texts(at)
    at.button(key=f"good-{ids['purple.png']}").click().run()  # a second click takes the mark back
    assert "0 good, 1 bad" in texts(at)
    at.button(key="clear_marks").click().run()
    assert result_names(at) == first and "Re-ranked" not in texts(at)


def test_each_result_says_why_it_matched(catalogue):
    at = search(catalogue.app(), "red")
    whys = [c.value for c in at.caption if c.value.startswith("Why: ")]
    assert len(whys) == len(result_names(at)) and 'caption has "red"' in whys[0]
    assert "image similarity" in whys[0]
    at.sidebar.checkbox(key="explain").uncheck().run()
    assert not [c for c in at.caption if c.value.startswith("Why: ")]


def test_a_search_restores_from_its_url_and_writes_it(catalogue):
    from streamlit.testing.v1 import AppTest

    from test_ui_app import APP

    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["q"] = "red"
    at.query_params["k"] = "12"
    at.query_params["preset"] = "Looks like"
    at.query_params["where"] = ["category=shoes|hats", "price<=40"]
    at.run()
    assert not at.exception
    assert at.text_input(key="query_input").value == "red"
    assert at.sidebar.radio(key="preset").value == "Looks like" and at.sidebar.select_slider(key="k").value == 12
    assert at.sidebar.multiselect(key="m_category").value == ["shoes", "hats"]
    assert result_names(at) == ["yellow.png"]  # hats at 12, shoes at 45 > 40
    assert at.query_params["q"] == "red" and at.query_params["k"] == "12"
    search(at, "blue")
    assert at.query_params["q"] == "blue" and sorted(at.query_params["where"]) == ["category=shoes|hats", "price<=40"]


def test_a_page_restores_from_its_url(catalogue):
    from streamlit.testing.v1 import AppTest

    from test_ui_app import APP

    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "Collection"
    at.run()
    assert not at.exception and "Images: 16" in texts(at)
