"""The Search page: query box, ranking and filter controls, the result grid and the details view.

State that must survive reruns lives in ``st.session_state``:

* ``source``: what is being searched for, {"kind": "text", "text", "upload"} or {"kind": "similar", "id"};
* ``hits`` / ``hits_key``: the results and the request that produced them (not recomputed on reruns
  that change nothing, e.g. opening the details of a result);
* ``selected``: the id whose details are open.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import streamlit as st

from indexer.engine import Engine
from indexer.errors import InputError
from indexer.storage.filters import Filters
from retrieval.query import FusionWeights
from ui.common import human_bytes, no_index_message, show_error, show_thumbnail, when
from ui.resources import Loaded, jobs
from ui.security import ImageUnavailable, indexed_file, parse_image_id, save_upload
from ui.thumbnails import PREVIEW_SIZE, THUMB_SIZE, thumbnail, thumbnail_path

EXAMPLES = ("a dog on the grass", "a plate of food", "a city at night", "people playing sports")
COLUMNS = 4
K_CHOICES = (12, 24, 48, 96)
# preset -> (mode, weights); None: the Engine's default weights (tuned); "Custom" shows the sliders
PRESETS: dict[str, tuple[str, FusionWeights | None]] = {
    "Balanced": ("fused", None),
    "Looks like": ("image", None),
    "Caption says": ("caption", None),
    "Exact words": ("keyword", None),
    "Tags say": ("tags", None),
    "Custom": ("fused", None),
}
WEIGHT_LABELS = {"image": "Looks like (image)", "caption": "Caption meaning", "keyword": "Caption words",
                 "likelihood": "Captioner agrees (re-scores the best)",
                 "match": "Match head agrees (re-scores the best)",
                 "tags": "Tags agree (zero-shot: what the classifier sees)"}


def _init_state() -> None:
    for key, value in (("source", None), ("hits", None), ("hits_key", None), ("selected", None),
                       ("query_input", ""), ("elapsed", None)):
        st.session_state.setdefault(key, value)


# --- callbacks (run before the next script run, so they may set widget values) -------------------
def _use_example(text: str) -> None:
    st.session_state.query_input = text
    st.session_state.source = {"kind": "text", "text": text, "upload": None}
    st.session_state.selected = None


def _more_like_this(image_id: int) -> None:
    st.session_state.source = {"kind": "similar", "id": image_id}
    st.session_state.selected = None


def _select(image_id: int | None) -> None:
    st.session_state.selected = image_id


def _clear() -> None:
    st.session_state.source = None
    st.session_state.hits = st.session_state.hits_key = None
    st.session_state.selected = None
    st.session_state.query_input = ""


# --- panels ------------------------------------------------------------------------------------------
def search_ui(engine: Engine) -> None:
    """The query box (text and/or an example image) and example queries."""
    with st.form("search", border=False, enter_to_submit=True):
        left, right = st.columns([6, 1], vertical_alignment="bottom")
        text = left.text_input("Describe the photo you are looking for", key="query_input", max_chars=500,
                               placeholder="e.g. dog on a park bench")
        submitted = right.form_submit_button("Search", type="primary", width="stretch")
        upload = st.file_uploader("...or search with an example image (optionally with words above)",
                                  type=["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"],
                                  key="upload", max_upload_size=20)
    if submitted:
        st.session_state.selected = None
        upload_path = None
        if upload is not None:
            try:
                upload_path = str(save_upload(upload.getvalue(), engine.config.cache_dir / "uploads"))
            except Exception as exc:  # noqa: BLE001 - typed errors become messages
                show_error(exc)
                return
        if not text.strip() and upload_path is None:
            st.session_state.source = None
            st.warning("Type what you are looking for, or add an example image.")
            return
        st.session_state.source = {"kind": "text", "text": text.strip() or None, "upload": upload_path}
    cols = st.columns([1] + [3] * len(EXAMPLES), vertical_alignment="center")
    cols[0].caption("Try:")
    for col, example in zip(cols[1:], EXAMPLES):
        col.button(example, key=f"example-{example}", on_click=_use_example, args=(example,), type="tertiary")


def controls_ui(folders: list[str], types: list[str]) -> dict:
    """Sidebar: ranking preset or weights, k, threshold, filters -> the search parameters."""
    sb = st.sidebar
    sb.subheader("Ranking")
    preset = sb.radio("Rank by", list(PRESETS), key="preset", horizontal=True,
                      help="Balanced fuses how the photo looks, what its caption says and the caption's words, "
                           "with weights tuned on Flickr8k; Custom sets them yourself.")
    mode, weights = PRESETS[preset]
    if preset == "Custom":
        defaults = FusionWeights()
        values = {f.name: sb.slider(WEIGHT_LABELS.get(f.name, f.name), 0.0, 5.0, float(getattr(defaults, f.name)),
                                    0.05, key=f"w_{f.name}")
                  for f in dataclasses.fields(FusionWeights)}
        try:
            weights = FusionWeights(**values)
        except InputError as exc:
            sb.warning(f"{exc}; using the default weights.")
            weights = None
    k = sb.select_slider("Results", options=K_CHOICES, value=24, key="k")
    threshold = None
    if sb.checkbox("Hide results below a score", key="use_threshold"):
        threshold = sb.number_input(
            "Minimum score", -10.0, 100.0, 0.0, 0.05, key="threshold",
            help="Looks like / Caption says: cosine similarity (-1 to 1, about 0.2 and up is a match for the "
                 "default model). Balanced and Custom: the sum of each signal's standard score among the "
                 "candidates (0 = an average candidate). Exact words: BM25.")
    sb.subheader("Filters")
    folder = sb.selectbox("Folder", ["All folders", *folders], key="f_folder")
    file_types = sb.multiselect("File type", types, key="f_types")
    use_dates = sb.checkbox("Only photos from a date range", key="f_use_dates")
    after = before = None
    if use_dates:
        rng = sb.date_input("Taken (or modified) between", value=(date(2000, 1, 1), date.today()), key="f_dates")
        if isinstance(rng, (tuple, list)) and len(rng) == 2:
            after, before = rng
    c1, c2 = sb.columns(2)
    min_w = c1.number_input("Min width", 0, 100_000, 0, 100, key="f_min_w")
    min_h = c2.number_input("Min height", 0, 100_000, 0, 100, key="f_min_h")
    filters = Filters(folder=None if folder == "All folders" else folder, after=after, before=before,
                      file_types=tuple(file_types), min_width=int(min_w), min_height=int(min_h))
    return {"mode": mode, "weights": weights, "k": int(k), "threshold": None if threshold is None else float(threshold),
            "filters": filters}


def run_search(engine: Engine, source: dict, params: dict) -> list:
    """Ask the Engine for the results of ``source`` with ``params`` (typed errors propagate)."""
    filters = params["filters"] if params["filters"].active else None  # no filter: no id list to build
    if source["kind"] == "similar":
        hits = engine.more_like_this(parse_image_id(source["id"]), k=params["k"], filters=filters)
        if params["threshold"] is not None:
            hits = [h for h in hits if h.score >= params["threshold"]]
        return hits
    return engine.search(text=source.get("text"), image=source.get("upload"), k=params["k"], mode=params["mode"],
                         weights=params["weights"], filters=filters, threshold=params["threshold"])


def _describe(source: dict, engine: Engine) -> str:
    if source["kind"] == "similar":
        row = engine.image(source["id"])
        return f"photos like **{Path(row.path).name}**" if row else "similar photos"
    parts = []
    if source.get("text"):
        parts.append(f"“{source['text']}”")
    if source.get("upload"):
        parts.append("your example image")
    return " + ".join(parts)


def results_ui(engine: Engine, params: dict, generation: int) -> None:
    """Run the search when its inputs changed, then show the grid (or why there is nothing to show)."""
    source = st.session_state.source
    if source is None:
        return
    key = repr((source, params, generation))
    if st.session_state.hits_key != key:
        t0 = time.perf_counter()
        try:
            hits = run_search(engine, source, params)
        except Exception as exc:  # noqa: BLE001 - typed errors become messages; others are logged
            st.session_state.hits = st.session_state.hits_key = None
            show_error(exc)
            return
        st.session_state.hits, st.session_state.hits_key = hits, key
        st.session_state.elapsed = time.perf_counter() - t0
    hits = st.session_state.hits
    head, clear = st.columns([6, 1], vertical_alignment="center")
    if not hits:
        head.info(f"No photos match {_describe(source, engine)}"
                  + (" with these filters or this minimum score. Loosen them in the sidebar." if
                     params["filters"].active or params["threshold"] is not None else ". Try other words."),
                  icon=":material/search_off:")
        clear.button("Clear", on_click=_clear, key="clear")
        return
    head.markdown(f"**{len(hits)}** results for {_describe(source, engine)} "
                  f":gray[({st.session_state.elapsed:.2f} s)]")
    clear.button("Clear", on_click=_clear, key="clear")
    if st.session_state.selected is not None:
        details_ui(engine, st.session_state.selected, hits)
    grid_ui(engine, hits)


def _prefetch_thumbnails(cache_dir: Path, rows: list) -> None:
    """Make the missing thumbnails of a result page on two threads (Pillow decodes without the GIL)."""
    missing = [r for r in rows if r is not None and not thumbnail_path(cache_dir, r.content_hash, THUMB_SIZE).is_file()]
    if len(missing) < 2:
        return

    def make(row) -> None:
        try:
            thumbnail(cache_dir, Path(row.path), row.content_hash, THUMB_SIZE)
        except ImageUnavailable:
            pass  # the card says so

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(make, missing))


def tag_chips(tags) -> str:
    """Tags as badges: ``:blue-badge[cheeseburger 62%]`` (markdown)."""
    return " ".join(f":blue-badge[{t.name.replace(']', ')')} {t.probability:.0%}]" for t in tags)


def caption_ui(rank: int, hit) -> None:
    """Rank, score, caption and tag chips of a result. A caption rated uncertain comes after the tags,
    greyed and marked, so the card never states it as if it were sure."""
    uncertain = bool(hit.caption) and hit.caption_is_confident is False
    head = f"**{rank}.** `{hit.score:.3f}`"
    if uncertain:
        st.markdown(f"{head} {tag_chips(hit.tags)}" if hit.tags else head)
        st.markdown(f":gray[*uncertain caption:* {hit.caption}]",
                    help=f"The caption model is not sure of this caption (confidence {hit.caption_confidence:.2f}).")
    else:
        st.markdown(f"{head} {hit.caption or ''}")
        if hit.tags:
            st.markdown(tag_chips(hit.tags))


def grid_ui(engine: Engine, hits: list) -> None:
    cache_dir = engine.config.cache_dir
    rows = {h.id: engine.image(h.id) for h in hits}
    _prefetch_thumbnails(cache_dir, list(rows.values()))
    for start in range(0, len(hits), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, (rank, hit) in zip(cols, enumerate(hits[start:start + COLUMNS], start + 1)):
            with col.container(border=True):
                row = rows[hit.id]
                if row is None:  # removed from the index since the search ran
                    st.caption(f"#{rank} {Path(hit.path).name} is no longer in the index")
                    continue
                show_thumbnail(cache_dir, row.path, row.content_hash)
                caption_ui(rank, hit)
                st.caption(Path(hit.path).name)
                b1, b2 = st.columns([3, 2], gap="small")
                b1.button("More like this", key=f"mlt-{hit.id}", on_click=_more_like_this, args=(hit.id,),
                          width="stretch", icon=":material/image_search:", type="tertiary")
                b2.button("Details", key=f"details-{hit.id}", on_click=_select, args=(hit.id,), width="stretch",
                          icon=":material/open_in_full:", type="tertiary")


def details_ui(engine: Engine, image_id: int, hits: list) -> None:
    """The selected result, large, with everything the index knows about it."""
    hit = next((h for h in hits if h.id == image_id), None)
    with st.container(border=True):
        top, close = st.columns([6, 1])
        close.button("Close", key="close-details", on_click=_select, args=(None,))
        try:
            row, _ = indexed_file(engine, image_id)
        except Exception as exc:  # noqa: BLE001
            show_error(exc)
            return
        top.markdown(f"#### {Path(row.path).name}")
        left, right = st.columns([3, 2])
        with left:
            show_thumbnail(engine.config.cache_dir, row.path, row.content_hash, PREVIEW_SIZE)
        with right:
            taken = when(row.taken_at) if row.taken_at else f"{when(row.mtime)} (file modified)"
            st.markdown("\n".join([
                f"- **Path:** `{row.path}`",
                f"- **Size:** {row.width} x {row.height} px, {human_bytes(row.byte_size)}, {row.file_type.upper()}",
                f"- **Date:** {taken}",
                f"- **Caption:** {row.caption or '(none)'}" + _confidence_note(hit),
                f"- **Tags:** {tag_chips(hit.tags) if hit is not None and hit.tags else '(none)'}",
            ]))
            if hit is not None:
                st.markdown(f"**Score** `{hit.score:.4f}`")
                if hit.scores:
                    st.table({"signal": list(hit.scores), "score": [round(v, 4) for v in hit.scores.values()]})
            st.button("More like this", key=f"mlt-details-{image_id}", on_click=_more_like_this, args=(image_id,))


def _confidence_note(hit) -> str:
    if hit is None or hit.caption_confidence is None:
        return ""
    sure = "confident" if hit.caption_is_confident else "**uncertain**"
    return f" ({sure}, confidence {hit.caption_confidence:.2f})"


@st.cache_data(max_entries=4, show_spinner=False)
def folders_and_types(_engine: Engine, generation: int) -> tuple[list[str], list[str]]:
    """The collection's folders (most images first, at most 200) and file types, for the filter widgets."""
    paths = _engine.paths().values()
    folders = Counter(os.path.dirname(p) for p in paths)
    types = sorted({os.path.splitext(p)[1].lower().lstrip(".") for p in paths} - {""})
    return [f for f, _ in folders.most_common(200)], types


@st.cache_data(max_entries=4, show_spinner=False)
def _untagged(_engine: Engine, generation: int) -> int:
    """Images without tags (an index from before tags), when tags are on."""
    try:
        return _engine.untagged() if _engine.tagger is not None else 0
    except Exception:  # noqa: BLE001 - only a hint; the search itself reports real problems
        return 0


def page(state: Loaded) -> None:
    _init_state()
    engine = state.engine
    st.title("Search your photos")
    if not engine.exists:
        st.info(no_index_message(engine.config.index_dir), icon=":material/info:")
        return
    if state.problem is not None:
        show_error(state.problem)
        return
    job = jobs().current
    if job is not None and job.running:
        st.caption(f":material/sync: Indexing {job.folder} in the background ({job.done}/{job.total}); "
                   f"new photos appear in results when it finishes.")
    untagged = _untagged(engine, state.generation)
    if untagged:
        st.caption(f":material/label_off: {untagged} photos have no tags yet, so the tags do not help find them; "
                   f"add them from a terminal with `pixquery retag`.")
    folders, types = folders_and_types(engine, state.generation)
    params = controls_ui(folders, types)
    search_ui(engine)
    results_ui(engine, params, state.generation)
