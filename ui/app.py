"""pixquery's Streamlit app: ``pixquery ui`` runs ``streamlit run`` on this file.

Two pages over the same :class:`indexer.engine.Engine` the CLI uses: Search and Collection.
The Engine (models and index) is built once per index generation by ``ui.resources.engine_factory``
and shared by every browser session; each session keeps its own state in ``st.session_state``.
"""

from __future__ import annotations

import streamlit as st

from ui import collection_page, search_page
from ui.common import show_error
from ui.resources import jobs, loaded

PAGES = {"Search": search_page.page, "Collection": collection_page.page}


def main() -> None:
    st.set_page_config(page_title="pixquery", page_icon=":material/image_search:", layout="wide")
    st.session_state.setdefault("seen_generation", jobs().generation)
    if "page" not in st.session_state and st.query_params.get("page") in PAGES:  # a shared link to a page
        st.session_state.page = st.query_params["page"]
    name = st.sidebar.radio("Page", list(PAGES), key="page", horizontal=True, label_visibility="collapsed")
    try:
        state = loaded()
        PAGES[name](state)
    except Exception as exc:  # noqa: BLE001 - the page shows a message, never a traceback
        show_error(exc)


main()
