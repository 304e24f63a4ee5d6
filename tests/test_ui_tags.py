"""The app shows tags as chips under each result, and an uncertain caption after them, marked."""

from __future__ import annotations

import streamlit as st

from conftest import TinyCaptioner
from indexer.config import EngineConfig
from indexer.engine import Engine
from tag_fakes import ColourTagger, TinyGridEncoder
from test_tags_index import confidence_file
from test_ui_app import Env, result_names, search, texts


class Liar(TinyCaptioner):
    """Calls every blue picture yellow."""

    def caption_pixels(self, pixels, options=None):  # noqa: ANN001, ANN201
        return [c.replace("blue", "yellow") for c in super().caption_pixels(pixels)]


class TaggedEnv(Env):
    def engine(self) -> Engine:
        config = EngineConfig(index_dir=self.index_dir, cache_dir=self.cache_dir, progress=False, batch_size=4,
                              captioner=None, scorer=None, matcher=None, confidence=str(self.confidence))
        return Engine(config, encoder=TinyGridEncoder(), captioner=Liar(), tagger=ColourTagger())


def test_results_show_tag_chips_and_mark_uncertain_captions(tmp_path, monkeypatch, photo_dir):
    st.cache_resource.clear()
    st.cache_data.clear()
    env = TaggedEnv(tmp_path, monkeypatch)
    env.confidence = confidence_file(tmp_path)
    env.index(photo_dir)
    at = env.app()
    at.sidebar.radio(key="preset").set_value("Looks like").run()
    search(at, "blue")
    page = texts(at)
    assert result_names(at)[0] in ("blue.png", "blue-striped.jpg")
    assert ":blue-badge[blue" in page  # the chip
    assert ":gray[*uncertain caption:* a yellow picture]" in page
    assert "a red picture" not in page or ":blue-badge[red" in page
    at.sidebar.radio(key="preset").set_value("Tags say").run()
    assert result_names(at)[0] in ("blue.png", "blue-striped.jpg")
    st.cache_resource.clear()
    st.cache_data.clear()
