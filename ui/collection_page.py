"""The Collection page: what is indexed (and skipped), indexing a folder in the background, duplicates."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from indexer.engine import Engine
from ui.common import human_bytes, no_index_message, show_error, show_thumbnail
from ui.resources import Loaded, jobs, read_only


def stats_ui(engine: Engine) -> None:
    try:
        stats = engine.stats()
        skipped = engine.skipped_files()
    except Exception as exc:  # noqa: BLE001
        show_error(exc)
        return
    c = st.columns(4)
    c[0].metric("Images", f"{stats['images']:,}")
    c[1].metric("Captioned", f"{stats['captioned']:,}")
    c[2].metric("Skipped files", f"{stats['skipped']:,}")
    c[3].metric("Index size", human_bytes(stats["index_bytes"]))
    enc, cap, last = stats["encoder"] or {}, stats["captioner"], stats["last_run"]
    lines = [f"- **Index:** `{stats['index_dir']}`",
             f"- **Encoder:** `{enc.get('name', '?')}` (dimension {enc.get('dim', '?')}, weights "
             f"`{str(enc.get('weights_sha256', ''))[:12]}`)"]
    lines.append(f"- **Captioner:** `{cap['name']}` (weights `{str(cap.get('weights_sha256', ''))[:12]}`)" if cap
                 else "- **Captioner:** none (no captions)")
    if last:
        s = last.get("summary") or {}
        lines.append(f"- **Last run:** {last['started_at'].replace('T', ' ')} on `{last['root']}`"
                     + (f": {s.get('new', 0)} new, {s.get('changed', 0)} changed, {s.get('moved', 0)} moved, "
                        f"{s.get('deleted', 0)} deleted, {s.get('skipped', 0)} skipped" if s else " (unfinished)"))
    st.markdown("\n".join(lines))
    if skipped:
        with st.expander(f"{len(skipped)} files could not be indexed"):
            st.dataframe({"file": [s["path"] for s in skipped], "reason": [s["reason"] for s in skipped]},
                         hide_index=True, width="stretch")


def _start_job(folder: str, rebuild: bool) -> None:
    folder = folder.strip()
    if not folder:
        st.session_state.index_message = "Type the folder to index."
        return
    try:
        jobs().start(folder, rebuild=rebuild)
        st.session_state.index_message = None
    except RuntimeError as exc:
        st.session_state.index_message = str(exc)


@st.fragment(run_every=1.0)
def progress_ui() -> None:
    """Refreshes itself every second while a job runs; a finished job reloads the whole page once."""
    job = jobs().current
    if job is None:
        return
    if job.running:
        label = (f"Indexing `{job.folder}`: {job.done:,} of {job.total:,} new or changed files"
                 if job.total else f"Indexing `{job.folder}`: looking for new and changed files...")
        st.progress(job.fraction(), text=label)
        st.caption("Searching keeps working meanwhile; new photos show up in results when this finishes.")
        return
    if st.session_state.get("seen_generation") != jobs().generation:
        st.session_state.seen_generation = jobs().generation
        st.rerun()  # the whole app, so every panel uses the fresh Engine


def job_result_ui() -> None:
    job = jobs().current
    if job is None or job.running:
        return
    if job.error:
        st.error(f"Indexing `{job.folder}` stopped: {job.error}", icon=":material/error:")
    elif job.summary:
        s = job.summary
        st.success(f"Indexed `{s['root']}` in {s['seconds']:.1f} s: {s['new']} new, {s['changed']} changed, "
                   f"{s['moved']} moved, {s['deleted']} deleted, {s['skipped']} skipped; "
                   f"{s['total_images']:,} images in the index.", icon=":material/check_circle:")


def indexing_ui() -> None:
    st.subheader("Index a folder")
    if read_only():
        st.caption("This app was started with `--read-only`: index from a terminal with `pixquery index FOLDER`.")
        return
    job = jobs().current
    busy = job is not None and job.running
    with st.form("index-form", border=False):
        folder = st.text_input("Folder on this computer", key="index_folder", placeholder="/home/me/Pictures",
                               help="Indexed recursively. Only new, changed, moved or deleted files cost time.")
        rebuild = st.checkbox("Rebuild: drop this index and embed everything again", key="index_rebuild")
        if st.form_submit_button("Index", type="primary", disabled=busy):
            _start_job(folder, rebuild)
    if st.session_state.get("index_message"):
        st.warning(st.session_state.index_message)
    job = jobs().current
    if job is not None and (job.running or st.session_state.get("seen_generation") != jobs().generation):
        progress_ui()
    job_result_ui()


def duplicates_ui(engine: Engine) -> None:
    st.subheader("Duplicates")
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    threshold = c1.slider("Near-duplicate similarity", 0.80, 1.0, 0.95, 0.01, key="dup_threshold",
                          help="Exact copies (same bytes) always count; near duplicates need at least this cosine.")
    if c2.button("Find duplicates", key="find_dups"):
        try:
            st.session_state.dups = (threshold, engine.duplicates(threshold=threshold))
        except Exception as exc:  # noqa: BLE001
            show_error(exc)
            return
    found = st.session_state.get("dups")
    if found is None:
        return
    threshold, groups = found
    if not groups:
        st.info(f"No duplicates (exact copies or near duplicates at {threshold:.2f}).", icon=":material/check:")
        return
    st.caption(f"{len(groups)} groups at {threshold:.2f}")
    cache_dir = engine.config.cache_dir
    for n, group in enumerate(groups[:50], 1):
        with st.container(border=True):
            what = "exact copies" if group.kind == "exact" else f"near duplicates, similarity {group.similarity:.3f}+"
            st.markdown(f"**Group {n}**: {len(group.ids)} files, {what}")
            cols = st.columns(min(len(group.ids), 6))
            for col, image_id, path in zip(cols, group.ids, group.paths):
                with col:
                    row = engine.image(image_id)
                    if row is not None:
                        show_thumbnail(cache_dir, row.path, row.content_hash, byte_size=row.byte_size)
                    st.caption(f"`{Path(path).name}`  \n{Path(path).parent}")
    if len(groups) > 50:
        st.caption(f"...and {len(groups) - 50} more groups")


def page(state: Loaded) -> None:
    st.title("Collection")
    engine = state.engine
    if not engine.exists:
        st.info(no_index_message(engine.config.index_dir), icon=":material/info:")
    elif state.problem is not None:
        show_error(state.problem)
    else:
        stats_ui(engine)
    indexing_ui()
    if engine.exists and state.problem is None:
        duplicates_ui(engine)
