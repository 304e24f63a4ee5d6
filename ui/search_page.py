"""The Search page: query box, ranking and filter controls, the result grid and the details view.

State that must survive reruns lives in ``st.session_state``:

* ``source``: what is being searched for, {"kind": "text", "text", "upload"} or {"kind": "similar", "id"};
* ``hits`` / ``hits_key``: the results and the request that produced them (not recomputed on reruns
  that change nothing, e.g. opening the details of a result);
* ``selected``: the id whose details are open;
* ``good`` / ``bad``: ids marked good and bad (relevance feedback; cleared when the search changes);
* ``reasons``: the explanation of each result, by id.

The search is mirrored in the page's URL (``?q=dog&preset=Balanced&k=24&where=price<50``), so a
search can be bookmarked and shared: the query, the ranking, the filters and the page restore from it.
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
from ui.catalogue_filters import catalogue_ui, catalogue_widgets, restore
from ui.common import human_bytes, no_index_message, show_error, show_thumbnail, when
from ui.resources import Loaded, jobs
from ui.security import ImageUnavailable, indexed_file, parse_image_id, save_upload
from ui.tag_cards import caption_ui, confidence_note, tag_chips
from ui.tag_cards import untagged as tag_untagged
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
                 "meta": "Catalogue words (imported SKU, title, brand...)",
                 "tags": "Tags agree (zero-shot: what the classifier sees)"}


def _init_state() -> None:
    for key, value in (("source", None), ("hits", None), ("hits_key", None), ("selected", None),
                       ("query_input", ""), ("elapsed", None), ("good", []), ("bad", []), ("reasons", {})):
        st.session_state.setdefault(key, value)


# --- the URL ------------------------------------------------------------------------------------------
def restore_from_url(folders: list[str], types: list[str], fields: list[dict]) -> None:
    """Once per browser session, before the widgets are drawn: the search the URL describes."""
    if st.session_state.get("url_restored"):
        return
    st.session_state.url_restored = True
    qp = st.query_params
    text = qp.get("q", "").strip()[:500]
    if text:
        st.session_state.query_input = text
        st.session_state.source = {"kind": "text", "text": text, "upload": None}
    elif qp.get("similar", "").isdigit():
        st.session_state.source = {"kind": "similar", "id": int(qp["similar"])}
    if qp.get("preset") in PRESETS:
        st.session_state.preset = qp["preset"]
    if qp.get("k", "").isdigit() and int(qp["k"]) in K_CHOICES:
        st.session_state.k = int(qp["k"])
    if qp.get("folder") in folders:
        st.session_state.f_folder = qp["folder"]
    picked = [t for t in qp.get("type", "").split(",") if t in types]
    if picked:
        st.session_state.f_types = picked
    where = qp.get_all("where")
    if where:
        restore(where, fields)


def write_url(params: dict) -> None:
    """Mirror the current search in the URL (only what differs from the defaults)."""
    source = st.session_state.source
    state: dict[str, str | list[str]] = {}
    page = st.session_state.get("page")
    if page and page != "Search":
        state["page"] = page
    if source is not None and source["kind"] == "text" and source.get("text"):
        state["q"] = source["text"]
    elif source is not None and source["kind"] == "similar":
        state["similar"] = str(source["id"])
    if st.session_state.get("preset", "Balanced") != "Balanced":
        state["preset"] = st.session_state.preset
    if params["k"] != 24:
        state["k"] = str(params["k"])
    f = params["filters"]
    if f.folder:
        state["folder"] = f.folder
    if f.file_types:
        state["type"] = ",".join(f.file_types)
    if f.where:
        state["where"] = [str(c) for c in f.where]
    current = {k: st.query_params.get_all(k) for k in st.query_params}
    if current != {k: v if isinstance(v, list) else [v] for k, v in state.items()}:
        st.query_params.from_dict(state)


# --- callbacks (run before the next script run, so they may set widget values) -------------------
def _use_example(text: str) -> None:
    st.session_state.query_input = text
    st.session_state.source = {"kind": "text", "text": text, "upload": None}
    st.session_state.selected = None
    _clear_marks()


def _more_like_this(image_id: int) -> None:
    st.session_state.source = {"kind": "similar", "id": image_id}
    st.session_state.selected = None
    _clear_marks()


def _clear_marks() -> None:
    st.session_state.good, st.session_state.bad = [], []


def _mark(image_id: int, verdict: str) -> None:
    """Toggle ``image_id`` as good or bad (relevance feedback: the search runs again with the marks)."""
    good, bad = list(st.session_state.good), list(st.session_state.bad)
    mine, other = (good, bad) if verdict == "good" else (bad, good)
    if image_id in mine:
        mine.remove(image_id)
    else:
        mine.append(image_id)
        if image_id in other:
            other.remove(image_id)
    st.session_state.good, st.session_state.bad = good, bad


def _select(image_id: int | None) -> None:
    st.session_state.selected = image_id


def _clear() -> None:
    st.session_state.source = None
    st.session_state.hits = st.session_state.hits_key = None
    st.session_state.selected = None
    st.session_state.query_input = ""
    _clear_marks()


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
        new = {"kind": "text", "text": text.strip() or None, "upload": upload_path}
        if new != st.session_state.source:
            _clear_marks()
        st.session_state.source = new
    cols = st.columns([1] + [3] * len(EXAMPLES), vertical_alignment="center")
    cols[0].caption("Try:")
    for col, example in zip(cols[1:], EXAMPLES):
        col.button(example, key=f"example-{example}", on_click=_use_example, args=(example,), type="tertiary")


def controls_ui(folders: list[str], types: list[str], fields: list[dict] | None = None) -> dict:
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
    st.session_state.setdefault("k", 24)
    k = sb.select_slider("Results", options=K_CHOICES, key="k")
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
    where = catalogue_ui(fields or [])
    try:
        filters = Filters(folder=None if folder == "All folders" else folder, after=after, before=before,
                          file_types=tuple(file_types), min_width=int(min_w), min_height=int(min_h), where=tuple(where))
    except InputError as exc:
        sb.warning(f"{exc}; catalogue conditions left out.")
        filters = Filters(folder=None if folder == "All folders" else folder, after=after, before=before,
                          file_types=tuple(file_types), min_width=int(min_w), min_height=int(min_h))
    explain = sb.checkbox("Explain matches", value=True, key="explain",
                          help="Under each result: the caption words it matched and what each signal added.")
    return {"mode": mode, "weights": weights, "k": int(k), "threshold": None if threshold is None else float(threshold),
            "filters": filters, "explain": explain,
            "good": tuple(st.session_state.get("good", ())), "bad": tuple(st.session_state.get("bad", ()))}


def run_search(engine: Engine, source: dict, params: dict) -> list:
    """Ask the Engine for the results of ``source`` with ``params`` (typed errors propagate)."""
    filters = params["filters"] if params["filters"].active else None  # no filter: no id list to build
    good, bad = list(params.get("good", ())), list(params.get("bad", ()))
    if source["kind"] == "similar" and (good or bad):  # more like this one and the good ones, not the bad
        mode = params["mode"] if params["mode"] != "keyword" else "image"
        return engine.search(None, k=params["k"], mode=mode, weights=params["weights"], filters=filters,
                             threshold=params["threshold"], positive_ids=[parse_image_id(source["id"]), *good],
                             negative_ids=bad)
    if source["kind"] == "similar":
        hits = engine.more_like_this(parse_image_id(source["id"]), k=params["k"], filters=filters)
        if params["threshold"] is not None:
            hits = [h for h in hits if h.score >= params["threshold"]]
        return hits
    return engine.search(text=source.get("text"), image=source.get("upload"), k=params["k"], mode=params["mode"],
                         weights=params["weights"], filters=filters, threshold=params["threshold"],
                         positive_ids=good, negative_ids=bad)


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
        st.session_state.reasons = {}
        if params.get("explain") and hits:
            try:
                mode = params["mode"] if source["kind"] == "text" else "image"
                filters = params["filters"] if params["filters"].active else None
                st.session_state.reasons = {e.id: e.text for e in engine.explain(
                    hits, source.get("text"), mode, filters, params.get("good", ()), params.get("bad", ()))}
            except Exception as exc:  # noqa: BLE001 - an explanation never hides the results
                show_error(exc)
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
    if st.session_state.good or st.session_state.bad:
        note, reset = st.columns([6, 1], vertical_alignment="center")
        note.caption(f":material/thumbs_up_down: Re-ranked with your marks: {len(st.session_state.good)} good, "
                     f"{len(st.session_state.bad)} bad (bad ones and their near copies are left out).")
        reset.button("Forget marks", on_click=_clear_marks, key="clear_marks")
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
            thumbnail(cache_dir, Path(row.path), row.content_hash, THUMB_SIZE, row.byte_size)
        except ImageUnavailable:
            pass  # the card says so

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(make, missing))



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
                show_thumbnail(cache_dir, row.path, row.content_hash, byte_size=row.byte_size)
                caption_ui(rank, hit)
                st.caption(Path(hit.path).name)
                reason = st.session_state.get("reasons", {}).get(hit.id)
                if reason:
                    st.caption(f"Why: {reason}")
                g, b = st.columns(2, gap="small")
                good, bad = hit.id in st.session_state.good, hit.id in st.session_state.bad
                g.button("Good" if not good else "Good ✓", key=f"good-{hit.id}", on_click=_mark, args=(hit.id, "good"),
                         width="stretch", icon=":material/thumb_up:", type="primary" if good else "tertiary")
                b.button("Bad" if not bad else "Bad ✓", key=f"bad-{hit.id}", on_click=_mark, args=(hit.id, "bad"),
                         width="stretch", icon=":material/thumb_down:", type="primary" if bad else "tertiary")
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
            show_thumbnail(engine.config.cache_dir, row.path, row.content_hash, PREVIEW_SIZE, row.byte_size)
        with right:
            taken = when(row.taken_at) if row.taken_at else f"{when(row.mtime)} (file modified)"
            st.markdown("\n".join([
                f"- **Path:** `{row.path}`",
                f"- **Size:** {row.width} x {row.height} px, {human_bytes(row.byte_size)}, {row.file_type.upper()}",
                f"- **Date:** {taken}",
                f"- **Caption:** {row.caption or '(none)'}" + confidence_note(hit),
                f"- **Tags:** {tag_chips(hit.tags) if hit is not None and hit.tags else '(none)'}",
            ]))
            if hit is not None:
                st.markdown(f"**Score** `{hit.score:.4f}`")
                if hit.scores:
                    st.table({"signal": list(hit.scores), "score": [round(v, 4) for v in hit.scores.values()]})
            st.button("More like this", key=f"mlt-details-{image_id}", on_click=_more_like_this, args=(image_id,))



@st.cache_data(max_entries=4, show_spinner=False)
def folders_and_types(_engine: Engine, generation: int) -> tuple[list[str], list[str]]:
    """The collection's folders (most images first, at most 200) and file types, for the filter widgets."""
    paths = _engine.paths().values()
    folders = Counter(os.path.dirname(p) for p in paths)
    types = sorted({os.path.splitext(p)[1].lower().lstrip(".") for p in paths} - {""})
    return [f for f, _ in folders.most_common(200)], types



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
    untagged = tag_untagged(engine, state.generation)
    if untagged:
        st.caption(f":material/label_off: {untagged} photos have no tags yet, so the tags do not help find them; "
                   f"add them from a terminal with `pixquery retag`.")
    folders, types = folders_and_types(engine, state.generation)
    fields = catalogue_widgets(engine, state.generation, repr(engine.catalogue.fields()))
    restore_from_url(folders, types, fields)
    params = controls_ui(folders, types, fields)
    search_ui(engine)
    results_ui(engine, params, state.generation)
    write_url(params)
