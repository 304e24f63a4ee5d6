"""Pieces both pages use: turning errors into messages, and showing an indexed image small."""

from __future__ import annotations

import logging
import traceback
from datetime import datetime
from pathlib import Path

import streamlit as st

from indexer.errors import EncoderMismatchError, IndexCorruptError, IndexNotFoundError, InputError
from retrieval.errors import ModelLoadError, PixqueryError
from ui.security import ImageUnavailable
from ui.thumbnails import THUMB_SIZE, thumbnail

log = logging.getLogger("pixquery.ui")


def no_index_message(index_dir: Path | str) -> str:
    return (f"There is no index at `{index_dir}` yet. Build one from a terminal with "
            f"`pixquery index FOLDER --db {index_dir}`, or on the **Collection** page (left).")


def show_error(exc: BaseException) -> None:
    """A friendly message for ``exc``, never a traceback (that goes to the server log)."""
    if isinstance(exc, IndexNotFoundError):
        st.info(f"No index yet. {exc}", icon=":material/info:")
    elif isinstance(exc, EncoderMismatchError):
        st.error(f"**This index was built with a different model.** {exc}", icon=":material/sync_problem:")
    elif isinstance(exc, ModelLoadError):
        st.error(f"**A model could not be loaded.** {exc}", icon=":material/error:")
    elif isinstance(exc, IndexCorruptError):
        st.error(f"**The index cannot be read.** {exc}", icon=":material/error:")
    elif isinstance(exc, ImageUnavailable):
        st.warning(str(exc), icon=":material/broken_image:")
    elif isinstance(exc, InputError):
        st.warning(str(exc), icon=":material/warning:")
    elif isinstance(exc, PixqueryError):
        st.error(str(exc), icon=":material/error:")
    else:
        log.error("unexpected error in the app:\n%s", "".join(traceback.format_exception(exc)))
        st.error(f"Something went wrong ({type(exc).__name__}). The details are in the log of the "
                 f"`pixquery ui` process.", icon=":material/error:")


def show_thumbnail(cache_dir: Path, path: str, content_hash: str, size: int = THUMB_SIZE,
                   byte_size: int | None = None) -> bool:
    """Show an indexed image's thumbnail (``path``, ``content_hash`` and ``byte_size`` from the index); False if
    unavailable (missing, or changed since it was indexed)."""
    try:
        thumb = thumbnail(cache_dir, Path(path), content_hash, size, byte_size)
    except ImageUnavailable as exc:
        st.caption(f":material/broken_image: {exc}")
        return False
    st.image(str(thumb), width="stretch")
    return True


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def when(value: datetime | float | None) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value)
    return value.strftime("%Y-%m-%d %H:%M")
